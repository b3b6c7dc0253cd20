"""The field report's whole comparison in the bench (issue 16): the passive modes (an AF_PACKET
consumer on the gateway's ports, and a bridge flooding every frame to a monitor port), on the
bridge lab, beside the queued modes and hybrid, with the capability table."""

import json
import os
import subprocess
import sys

import leakcheck
import pytest

from hybrid.lab import bench

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PINGS = 5


def _warm(lab) -> None:
    """One ping first, outside any count: both hosts know each other's address afterwards."""
    assert lab.ping("client", lab.info.server.ipv4, count=1)


def _ping(lab) -> None:
    proc = lab.run("client", ["ping", "-n", "-q", "-c", str(PINGS), "-i", "0.2", "-W", "2", lab.info.server.ipv4],
                   check=False, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _ageing(lab) -> int:
    return bench._ageing_time(lab)


def _links(lab) -> set[str]:
    out = lab.run("gw", ["ip", "-j", "link", "show"]).stdout
    return {link["ifname"] for link in json.loads(out)}


def test_afpacket_counts_each_forwarded_packet_once_where_it_came_in(bridge_lab):
    """Ingress only (PACKET_IGNORE_OUTGOING): each echo request is read on to-client and each
    reply on to-server, once; counting egress too would double both."""
    _warm(bridge_lab)
    with bench.afpacket_ports(bridge_lab) as probe:
        _ping(bridge_lab)
    c = probe.capture
    assert c["by_proto"].get("icmp") == 2 * PINGS, c
    assert c["drops"] == 0 and c["seen_share"] == 1.0
    assert c["by_iface"]["to-client"] >= PINGS and c["by_iface"]["to-server"] >= PINGS


def test_bridge_flood_monitor_sees_unicast_and_is_undone_also_on_failure(bridge_lab):
    """With ageing time 0 the bridge floods unicast frames to the monitor port, where the
    consumer reads both directions of a ping; afterwards (also after a failure inside) the
    ageing time is what it was and the monitor veth is gone. Without flooding the monitor sees
    no unicast at all: the same pings are then invisible to it."""
    before = _ageing(bridge_lab)
    assert before > 0
    _warm(bridge_lab)
    with bench.bridge_flood(bridge_lab) as probe:
        assert _ageing(bridge_lab) == 0
        assert {bench.MONITOR, bench.MONITOR_RX} <= _links(bridge_lab)
        _ping(bridge_lab)
    assert probe.capture["by_proto"].get("icmp") == 2 * PINGS, probe.capture
    assert probe.capture["by_iface"] == {bench.MONITOR_RX: probe.capture["frames"]}
    assert _ageing(bridge_lab) == before and not {bench.MONITOR, bench.MONITOR_RX} & _links(bridge_lab)

    with pytest.raises(RuntimeError, match="inside"):
        with bench.bridge_flood(bridge_lab):
            raise RuntimeError("a failure inside the mode")
    assert _ageing(bridge_lab) == before and not {bench.MONITOR, bench.MONITOR_RX} & _links(bridge_lab)

    # the control: the same consumer on a monitor port of a learning bridge sees no unicast
    bridge_lab.run("gw", ["ip", "link", "add", bench.MONITOR, "type", "veth", "peer", "name", bench.MONITOR_RX])
    try:
        bridge_lab.run("gw", ["ip", "link", "set", bench.MONITOR, "master", bridge_lab.info.bridge])
        for dev in (bench.MONITOR, bench.MONITOR_RX):
            bridge_lab.run("gw", ["ip", "link", "set", dev, "up"])
        _warm(bridge_lab)                                   # the bridge learns both hosts
        with bench.capture_consumer(bridge_lab, [bench.MONITOR_RX]) as probe:
            _ping(bridge_lab)
        assert probe.capture["by_proto"].get("icmp", 0) == 0, probe.capture
    finally:
        bridge_lab.run("gw", ["ip", "link", "del", bench.MONITOR], check=False)


def test_bench_bridge_lab_quick_runs_the_field_reports_table_and_leaves_nothing():
    """`--lab bridge` with every option the field report weighed, quick: every mode has a
    figure for both workloads, the passive consumers read the traffic (decoded it all, ran the
    rules, accounted for what their ring dropped), the capability table has every mode with
    what it can do, and the lab is gone afterwards."""
    before = leakcheck.snapshot()
    name = leakcheck.new_lab_name()
    modes = ["baseline", "nfq-all", "afpacket", "bridge-flood", "hybrid"]
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--lab", "bridge", "--modes", ",".join(modes),
                           "--workloads", "bulk-1,newconn", "--lab-name", name, "--json", "-"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["lab"] == "bridge"
    got = {(r["mode"], r["workload"]): r for r in rep["results"]}
    assert set(got) == {(m, w) for m in modes for w in ("bulk-1", "newconn")}
    for r in got.values():
        assert r["median"] > 0, r
    for m in ("afpacket", "bridge-flood"):
        for w in ("bulk-1", "newconn"):
            x = got[(m, w)]["extra_median"]
            assert x["capture_frames"] > 0 and x["capture_rule_hits"] > 0, (m, w, x)
            assert x["capture_decoded"] == x["capture_ip"] and x["capture_truncated"] == 0, (m, w, x)
            share = x["capture_seen_share"]
            assert share == pytest.approx(x["capture_frames"] / (x["capture_frames"] + x["capture_drops"]))
        bulk = got[(m, "bulk-1")]["extra_median"]
        # the consumer read the stream itself, not only broadcasts: at least a tenth of what
        # iperf3 moved, scaled by the share its ring kept
        assert bulk["capture_bytes"] >= 0.1 * bulk["bytes"] * bulk["capture_seen_share"], (m, bulk)
        nc = got[(m, "newconn")]["extra_median"]
        assert nc["capture_frames"] + nc["capture_drops"] >= 3 * nc["requests"], (m, nc)
    caps = rep["capabilities"]
    assert list(caps) == modes
    for m in ("afpacket", "bridge-flood"):
        assert caps[m]["blocks"] == caps[m]["rewrites"] == "no"
        assert set(caps[m]["seen_share"]) == {"bulk-1", "newconn"}
    for m in ("nfq-all", "hybrid"):
        assert caps[m]["blocks"].startswith("yes") and caps[m]["rewrites"] != "no" and caps[m]["seen_share"] is None
    assert leakcheck.leaked(before, leakcheck.snapshot(), lambda kind, item: item.startswith(name)) == {}
    assert not [line for line in subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.splitlines()
                if "hybrid-bench" in line]


def test_bench_refuses_bridge_flood_on_the_router_lab_in_one_line():
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--modes", "bridge-flood"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["Error: mode 'bridge-flood' needs the bridge lab: add --lab bridge"]
