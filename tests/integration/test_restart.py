"""Restart after a crash: kill -9 of the engine, then `hybridctl attach` again with the same
options and a new engine, as a supervisor would. Nothing is duplicated (one jump and one queue
rule per family, one tc filter and one XDP program per interface, one stats file per queue) and
nothing is lost (the pinned maps are reused: a bypassed flow stays bypassed, counters go on)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from gwlab import HYBRIDCTL, start_engine
from traffic import udp_send

from hybrid.datapath.maps import Maps, flow_key
from hybrid.kernel import abi, bpffs, nfq

pytestmark = pytest.mark.integration
IFACES = ["to-client", "to-server"]
OPTIONS = ["--xdp-mode", "generic", "--fail-open"]
RULES = 'default = "accept"\ndefault_flow = "bypass"\nflow_ttl = 300\n'
SPORT, DPORT = 40777, 9777


def hctl(lab, *args):
    proc = subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"hybridctl {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def engine_bound(lab, rules, instance_dir: str, old_pid: int | None = None):
    """Start `hybridctl engine`; its process and the pid of the engine bound to queue 0."""
    proc = start_engine(lab, rules, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stats = os.path.join(instance_dir, "engine-0.json")
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "engine did not start"
        try:
            with open(stats) as f:
                pid = json.load(f)["pid"]
            if pid != old_pid and nfq.counters(f"/proc/{pid}/net/netfilter/nfnetlink_queue").get(0):
                return proc, pid
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)


def kill_9(proc, child: int) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)


def the_flow(lab):
    key, _ = flow_key(lab.info.client.ipv4, lab.info.server.ipv4, SPORT, DPORT, socket.IPPROTO_UDP)
    with Maps.open_pinned(os.path.join(bpffs.locate(), lab.netns("gw"))) as maps:
        return maps.get_flow(key), maps.stats()


def inventory(lab) -> dict:
    """What of hybrid is in the gateway namespace, counted."""
    out: dict = {}
    for save in ("iptables-save", "ip6tables-save"):
        text = lab.run("gw", [save]).stdout
        out[save] = {"jumps": sum(1 for ln in text.splitlines() if ln.startswith("-A FORWARD") and "-j HYBRID" in ln),
                     "queue rules": text.count("-j NFQUEUE"), "chains": text.count(":HYBRID ")}
    links = {link["ifname"]: link for link in json.loads(lab.run("gw", ["ip", "-j", "-d", "link", "show"]).stdout)}
    for ifname in IFACES:
        filters = lab.run("gw", ["tc", "filter", "show", "dev", ifname, "ingress"]).stdout
        xdp = links[ifname].get("xdp", {})
        progs = [xdp.get("prog", {})] if "prog" in xdp else xdp.get("attached", [])
        out[ifname] = {"tc filters": filters.count(abi.PROG_TC),
                       "tc filters (any)": filters.count(" handle "),
                       "xdp": sorted(p.get("prog", p).get("name", "?") for p in progs),
                       "clsact": lab.run("gw", ["tc", "qdisc", "show", "dev", ifname]).stdout.count("clsact")}
    return out


def test_restart_after_kill_9_reuses_state_and_duplicates_nothing(lab, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    instance_dir = f"/run/hybrid/instances/{lab.netns('gw')}"
    hctl(lab, "attach", *IFACES, *OPTIONS)
    engine = child = None
    try:
        engine, child = engine_bound(lab, rules, instance_dir)
        # A flow the engine bypasses: its first datagram is queued, the rest stay in the kernel.
        assert udp_send(lab, [b"hello"] * 3, dport=DPORT, sport=SPORT) == 3
        flow, stats = the_flow(lab)
        assert flow is not None and flow.verdict == abi.VERDICT_BYPASS
        before = inventory(lab)
        assert before["iptables-save"] == before["ip6tables-save"] == {"jumps": 1, "queue rules": 1, "chains": 1}
        for ifname in IFACES:
            assert before[ifname] == {"tc filters": 1, "tc filters (any)": 1, "xdp": [abi.PROG_XDP], "clsact": 1}
        packets_before = {k: v["packets"] for k, v in stats.items() if k}

        kill_9(engine, child)
        out = json.loads(hctl(lab, "attach", *IFACES, *OPTIONS, "--json"))
        assert out["reused_pins"] is True
        engine, child = engine_bound(lab, rules, instance_dir, old_pid=child)

        assert inventory(lab) == before                           # nothing duplicated, nothing lost
        assert sorted(f for f in os.listdir(instance_dir) if f.startswith("engine-")) == ["engine-0.json"]
        assert sorted(f for f in os.listdir(instance_dir) if f.startswith("nfq-")) == ["nfq-0.json"]
        flow_after, stats_after = the_flow(lab)
        assert flow_after.verdict == abi.VERDICT_BYPASS          # the verdict survived the restart
        assert flow_after.packets[0] == flow.packets[0] == 3
        for ifindex, n in packets_before.items():                  # counters were not reset
            assert stats_after[ifindex]["packets"] >= n
        # The new engine never sees the bypassed flow: its datagrams stay in the kernel.
        st = json.loads(hctl(lab, "status", "--json"))
        queued = st["queue"]["queues"][0]["queued"]
        assert udp_send(lab, [b"more"] * 5, dport=DPORT, sport=SPORT) == 5
        st = json.loads(hctl(lab, "status", "--json"))
        assert st["queue"]["queues"][0]["queued"] == queued
        assert the_flow(lab)[0].packets[0] == 8
        assert [e["pid"] for e in st["engines"]] == [child]
    finally:
        if engine is not None and engine.poll() is None:
            kill_9(engine, child)
        hctl(lab, "detach", "--all")
    assert not os.path.exists(instance_dir)
