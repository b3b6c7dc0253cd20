"""Two lab gateways and one real CrowdSec Local API on a management network (hybrid/lab/fleet.py):
a rule with share = {...} blocks a client on gateway A, A's engine reports it as an alert, and
gateway B drops that address in its kernel: the client behind B loses its server."""

from __future__ import annotations

import pytest
from fleetlab import probe
from leakcheck import new_lab_name

from hybrid.lab.crowdsec import Lapi, missing
from hybrid.lab.fleet import FleetNet, kernel_bans, wait_for
from hybrid.lab.fleet import ServiceRun as Run
from hybrid.lab.fleet import service_config as config
from hybrid.lab.servers import Nginx
from hybrid.lab.topology import Lab

pytestmark = pytest.mark.integration

SHARING_RULES = '''
[[rule]]
name = "block-and-share"
proto = "tcp"
http_host = ".blocked.example"
action = "reject"
flow = "block"
share = { ban = "source", duration = "1h", reason = "asked for a blocked host" }

[[rule]]
name = "handshakes"
proto = "tcp"
payload_len = 0
action = "accept"
'''


@pytest.fixture
def fleet(tmp_path):
    why = missing()
    if why:
        pytest.fail(why)
    with Lab(new_lab_name()) as a, Lab(new_lab_name()) as b, FleetNet(new_lab_name()) as net:
        net.join(a.netns("gw"))
        net.join(b.netns("gw"))
        with Lapi(netns=net.netns, host=net.ipv4) as lapi:
            runs: list[Run] = []
            try:
                yield a, b, lapi, runs
            finally:
                for r in runs:
                    r.cleanup()


def curl(lab, host: str):
    return lab.run("client", ["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://{lab.info.server.ipv4}/", "-H", f"Host: {host}"], check=False)


def test_a_block_on_one_gateway_is_dropped_by_the_other(fleet, tmp_path):
    a, b, lapi, runs = fleet
    rules = tmp_path / "share.toml"
    rules.write_text(SHARING_RULES)
    machine = lapi.add_machine("gw-a")
    runs.append(Run(a.netns("gw"), tmp_path, config(tmp_path, lapi, machine=machine, rules=str(rules), name="a"),
                    name="a"))
    runs.append(Run(b.netns("gw"), tmp_path, config(tmp_path, lapi, key=lapi.add_bouncer("gw-b"), name="b"),
                    name="b"))
    gw_a, gw_b = runs
    gw_a.wait_event("crowdsec_started")
    gw_b.wait_event("crowdsec_connected")
    client = a.info.client.ipv4                      # the same lab address behind both gateways
    assert probe(b.netns("client"), client, b.info.server.ipv4)
    with Nginx(a):
        assert curl(a, "www.example.test").stdout == "200"
        assert curl(a, "x.blocked.example").returncode != 0        # reset by A's engine
        wait_for(lambda: f"{client}/32" in kernel_bans(gw_b), "B to hold the ban A shared", 15)
        assert not probe(b.netns("client"), client, b.info.server.ipv4)
    d = [d for d in lapi.decisions() if d["value"] == client]
    assert len(d) == 1 and d[0]["origin"] == "hybrid" and d[0]["scenario"] == "hybrid/block-and-share"
    assert d[0]["type"] == "ban"
    share = gw_a.status()["crowdsec"]["share"]
    assert share["pushed"] == 1 and share["pending"] == 0
    # Blocking again (the same address, while its ban lasts) reports nothing new.
    with Nginx(a):
        assert curl(a, "y.blocked.example").returncode != 0
    st = wait_for(lambda: (s := gw_a.status()["crowdsec"])["share"]["pushed"] == 1 and
                  s["engines_share"]["repeated"] + s["share"]["deduplicated"] >= 1 and s, "the repeat counted", 10)
    assert len([d for d in lapi.decisions() if d["value"] == client]) == 1
    assert "shared blocks: pushed 1" in gw_a.status_text()
    assert st["connected"]
