"""hybrid as a CrowdSec bouncer, end to end: a real Local API (crowdsec 1.4.6, on the lab server's
address), `hybridctl run` in the lab gateway with a [crowdsec] table, decisions added and deleted
with cscli, and the client's packets as the proof (dropped while banned, forwarded otherwise).

Also the faults the issue names: the Local API killed and restarted (the kernel keeps its bans,
expires them on its own clock, and equals the LAPI's state after recovery), a revoked key, a flood
of 10,000 decisions in one pull, and decisions that would blackhole the gateway refused."""

from __future__ import annotations

import contextlib

import pytest
from fleetlab import lapi_networks, probe

from hybrid.lab.crowdsec import Lapi, decision_values, missing
from hybrid.lab.fleet import ServiceRun as Run
from hybrid.lab.fleet import kernel_bans, wait_for
from hybrid.lab.fleet import service_config as config

pytestmark = pytest.mark.integration

CLIENT_EXTRA = ("198.18.1.3", "198.18.1.4")       # more client addresses, each banned on its own


@pytest.fixture(scope="module")
def lapi(lab):
    why = missing()
    if why:
        pytest.fail(why)                            # CI installs crowdsec (scripts/setup.sh): never skip
    for a in CLIENT_EXTRA:
        lab.run("client", ["ip", "addr", "add", f"{a}/24", "dev", "eth0"])
    with Lapi(netns=lab.netns("server"), host=lab.info.server.ipv4) as lapi:
        yield lapi


@pytest.fixture
def gateway(lab, lapi, tmp_path):
    """`hybridctl run` linked to the LAPI as a bouncer; removed afterwards (also on failure)."""
    runs: list[Run] = []

    def start(name="gw", **kw) -> Run:
        key = lapi.add_bouncer(f"{name}-{len(runs)}-{tmp_path.name[-8:]}")
        run = Run(lab.netns("gw"), tmp_path, config(tmp_path, lapi, key=key, **kw), name=name)
        runs.append(run)
        run.key, run.bouncer = key, f"{name}-{len(runs) - 1}-{tmp_path.name[-8:]}"
        run.wait_event("crowdsec_connected")
        return run
    yield start
    for run in runs:
        run.cleanup()
    with contextlib.suppress(Exception):
        lapi.cscli("decisions", "delete", "--all")


def reaches(lab, src: str = "198.18.1.2", six: bool = False) -> bool:
    dst = lab.info.server.ipv6 if six else lab.info.server.ipv4
    return probe(lab.netns("client"), src, dst)


def test_bans_are_dropped_in_the_kernel_and_lifted(lab, lapi, gateway):
    run = gateway()
    assert reaches(lab) and reaches(lab, "198.18.1.3")
    lapi.add_decision("198.18.1.2", duration="1h")
    wait_for(lambda: not reaches(lab), "the ban on the client to drop its packets", 15)
    assert reaches(lab, "198.18.1.3")                                 # its neighbour is not banned
    st = run.status()["crowdsec"]
    assert st["connected"] and st["bouncer"]["applied"] == {"cscli/ip": 1}
    assert st["dropped_xdp"] + st["dropped_tc"] >= 1
    assert set(kernel_bans(run)) == {"198.18.1.2/32"}

    lapi.delete_decision(value="198.18.1.2")
    wait_for(lambda: reaches(lab), "the lifted ban to let the client through", 15)
    wait_for(lambda: not kernel_bans(run), "the ban trie to empty")

    # IPv6; and a range (the whole client subnet would hold the gateway's own address: refused).
    assert reaches(lab, "2001:2:0:1::2", six=True)
    lapi.add_decision("2001:2:0:1::2", duration="1h")
    wait_for(lambda: not reaches(lab, "2001:2:0:1::2", six=True), "the IPv6 ban", 15)
    assert reaches(lab)
    lapi.delete_decision(value="2001:2:0:1::2")
    wait_for(lambda: reaches(lab, "2001:2:0:1::2", six=True), "the lifted IPv6 ban", 15)
    lapi.add_decision("198.18.1.2/31", duration="1h")             # .2 and .3, not the gateway's .1
    wait_for(lambda: not reaches(lab) and not reaches(lab, "198.18.1.3"), "the range ban", 15)
    assert reaches(lab, "198.18.1.4") and set(kernel_bans(run)) == {"198.18.1.2/31"}
    lapi.delete_decision(value="198.18.1.2/31")
    wait_for(lambda: reaches(lab), "the lifted range ban", 15)

    # A decision's own duration is its TTL.
    lapi.add_decision("198.18.1.4", duration="4s")
    wait_for(lambda: not reaches(lab, "198.18.1.4"), "the short ban", 15)
    wait_for(lambda: reaches(lab, "198.18.1.4"), "the short ban to expire", 20)
    text = run.status_text()
    assert "crowdsec: connected to" in text and "bans:" in text, text


def test_decisions_that_would_blackhole_the_gateway_are_refused(lab, lapi, gateway):
    run = gateway()
    lapi.add_decision("198.18.2.0/24", duration="1h")      # holds the gateway's own 198.18.2.1 and the LAPI
    lapi.add_decision(lab.info.server.ipv4, duration="1h")  # the LAPI's own address
    lapi.add_decision("0.0.0.0/0", duration="1h")
    lapi.add_decision("::ffff:0:0/96", duration="1h")       # all of IPv4, written as IPv6
    lapi.add_decision("198.18.1.3", duration="1h", type="captcha")
    lapi.add_decision("FR", duration="1h", scope="Country")
    lapi.add_decision("198.18.1.2", duration="1h")          # and one that is fine
    wait_for(lambda: not reaches(lab), "the fine ban", 15)

    def refused():
        b = run.status()["crowdsec"]["bouncer"]
        return b if b["refused"].get("protected", 0) >= 2 and b["refused"].get("too_broad", 0) >= 2 else None
    b = wait_for(refused, "the refusals to be counted", 15)
    assert b["unsupported"] == {"type:captcha": 1, "scope:country": 1}
    assert set(kernel_bans(run)) == {"198.18.1.2/32"}      # nothing else reached the kernel
    assert reaches(lab, "198.18.1.3")                        # a captcha is not a drop unless listed
    refusals = [e for e in run.events("crowdsec_not_enforced") if e["why"] in ("protected", "too_broad")]
    assert {e["value"] for e in refusals} >= {"198.18.2.0/24", lab.info.server.ipv4, "0.0.0.0/0"}
    text = run.status_text()
    assert "refused (would blackhole the gateway): " in text and "type:captcha 1" in text, text
    assert "scope:country 1" in text, text


def test_the_kernel_keeps_its_bans_while_the_lapi_is_down_and_then_equals_it(lab, lapi, gateway):
    run = gateway()
    lapi.add_decision("198.18.1.2", duration="8s")
    lapi.add_decision("198.18.1.3", duration="1h")
    wait_for(lambda: not reaches(lab) and not reaches(lab, "198.18.1.3"), "both bans", 15)
    lapi.kill()
    try:
        run.wait_event("crowdsec_down", timeout=15)
        assert not reaches(lab, "198.18.1.3")                # kept while the store is down
        # The short ban ends on time while the store is down (its expiry is in the kernel entry).
        wait_for(lambda: reaches(lab), "the short ban to expire in the kernel", 20)
        assert not reaches(lab, "198.18.1.3")
        assert run.status()["crowdsec"]["connected"] is False
    finally:
        lapi.start()
    up = len(run.events("crowdsec_connected"))
    lapi.delete_decision(value="198.18.1.3")
    lapi.add_decision("198.18.1.4", duration="1h")
    run.wait_event("crowdsec_connected", since=up, timeout=60)
    wait_for(lambda: set(kernel_bans(run)) == {"198.18.1.4/32"}, "the kernel to equal the LAPI after recovery", 30)
    assert lapi_networks(lapi) == {"198.18.1.4/32"}
    assert reaches(lab, "198.18.1.3") and not reaches(lab, "198.18.1.4")
    assert run.proc.poll() is None


def test_a_revoked_key_keeps_the_bans_and_the_link_recovers(lab, lapi, gateway):
    run = gateway()
    lapi.add_decision("198.18.1.2", duration="1h")
    wait_for(lambda: not reaches(lab), "the ban", 15)
    lapi.delete_bouncer(run.bouncer)
    down = run.wait_event("crowdsec_down", timeout=15)
    assert down["kind"] == "auth" and run.key not in run.log_path.read_text()   # never logged
    assert not reaches(lab)                                                       # the ban stays
    lapi.cscli("bouncers", "add", run.bouncer, "--key", run.key)                  # the same key again
    run.wait_event("crowdsec_connected", count=2, timeout=60)
    assert set(kernel_bans(run)) == {"198.18.1.2/32"}
    assert run.status()["crowdsec"]["errors"].get("auth", 0) >= 1


def test_a_flood_of_10000_decisions_in_one_pull(lab, lapi, gateway):
    run = gateway()
    values = decision_values(10_000, offset=1 << 16)         # 198.19.0.0 on: never a lab address
    lapi.import_decisions(values, duration="1h")
    want = {f"{v}/32" for v in values}
    wait_for(lambda: set(kernel_bans(run)) == want, "the 10,000 bans in the kernel", 60, step=0.5)
    assert lapi_networks(lapi) == want
    # the deltas carry part of an import (the LAPI stores it in one transaction); the burst's
    # snapshot brings the rest: no decision is lost
    wait_for(lambda: any(e["startup"] and e["new"] == 10_000 for e in run.events("crowdsec_pull")),
             "the burst's snapshot", 60, step=0.5)
    assert set(kernel_bans(run)) == want
    assert reaches(lab) and run.proc.poll() is None
    st = run.status()["crowdsec"]["bouncer"]
    assert st["decisions"] == 10_000 and st["applied"] == {"cscli-import/ip": 10_000}
