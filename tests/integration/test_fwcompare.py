"""hybrid.lab.fwcompare in its quick mode, on the real kernel: a real CrowdSec Local API bans a
prefix, a spoofed flood from that prefix crosses the lab gateway while iperf3 runs, under hybrid's
bouncer and under Debian's crowdsec-firewall-bouncer.

Only what must hold whatever the noise is asserted, never a rate or a time: under hybrid the flood
dies at XDP and nothing of it reaches netfilter or the server; under the firewall bouncer it dies
in the bouncer's FORWARD rule, after netfilter and conntrack saw it, and nothing reaches the
server; without a bouncer it does reach the server (the server's counter is alive); and the
machine is left as it was, also when the run fails half-way."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from leakcheck import new_lab_name, session_processes

from hybrid import instance as inst
from hybrid.kernel import bpffs
from hybrid.lab import fwcompare
from hybrid.lab.topology import existing_netns

pytestmark = pytest.mark.integration

OURS = ("crowdsec", "iperf3", "hybridctl", "hybrid.lab.flood", "hybrid.cli.main")


def _root_state() -> dict:
    """The root namespace's nft tables, ipsets and FORWARD rules: the run must not touch them."""
    def out(argv):
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    return {"nft": out(["nft", "list", "tables"]), "ipset": out(["ipset", "list", "-n"]),
            "forward": out(["iptables", "-w", "-S", "FORWARD"]) + out(["ip6tables", "-w", "-S", "FORWARD"])}


def _ours_running(tmp) -> list[str]:
    """Processes this session started that the run may have started (or that name its temp dir)."""
    found = []
    for pid in session_processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(tmp) in cmd or any(word in cmd for word in OURS):
            found.append(f"{pid}: {cmd[:120]}")
    return found


def assert_clean(name: str, tmp, root_before: dict) -> None:
    """Nothing of the run named ``name`` is left: namespaces, lab record, hybrid's pins and run
    files, processes, temp files, and nothing changed in the root namespace."""
    assert [ns for ns in existing_netns() if ns.startswith(name)] == []
    assert not os.path.exists(inst.lab_record_path(name))
    gw = f"{name}-gw"
    assert not os.path.exists(inst.directory(gw))
    assert [p for p in (inst.lock_path(gw), inst.spares_path(gw), inst.crowdsec_path(gw)) if os.path.exists(p)] == []
    root = bpffs.locate()
    assert root is None or not os.path.exists(os.path.join(root, gw))
    deadline = time.monotonic() + 5                # a process told to stop may be on its way out
    while _ours_running(tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ours_running(tmp) == []
    assert os.listdir(tmp) == []
    assert _root_state() == root_before


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One run of ``python -m hybrid.lab.fwcompare --quick``, everything it writes in a temp dir."""
    why = fwcompare.missing()
    if why:
        pytest.fail(why)                            # CI installs them (scripts/setup.sh): never skip
    tmp = tmp_path_factory.mktemp("fwcompare")
    work = tmp / "tmp"
    work.mkdir()
    name = new_lab_name()
    root_before = _root_state()
    out_json = tmp / "report.json"
    proc = subprocess.run([sys.executable, "-m", "hybrid.lab.fwcompare", "--quick", "--lab-name", name,
                           "--json", str(out_json)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TMPDIR": str(work)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    return {"report": json.loads(out_json.read_text()), "stdout": proc.stdout, "stderr": proc.stderr,
            "name": name, "work": work, "root_before": root_before}


def _only(report: dict, mode: str) -> dict:
    (sample,) = report["samples"][mode]             # quick: one repetition
    return sample


def test_the_report_has_every_mode_once_and_a_table(quick):
    rep = quick["report"]
    assert rep["repetitions"] == 1 and rep["seconds"] == 2
    assert rep["modes"] == ["baseline", "flood", "hybrid", "hybrid-tc", "crowdsec-fw"]
    assert rep["banned"] == fwcompare.BANNED and rep["conntrack"] is True and rep["xdp_mode"] == "generic"
    # one baseline next to each of the other modes, each paired with the one before it
    assert len(rep["samples"]["baseline"]) == 4
    for mode in ("flood", "hybrid", "hybrid-tc", "crowdsec-fw"):
        s = _only(rep, mode)
        assert s["gbps"] > 0 and s["baseline_gbps"] > 0
        assert math.isclose(s["ratio"], s["gbps"] / s["baseline_gbps"])
        assert s["flood"]["sent"] > 0 and s["flood"]["pps"] > 0
        assert s["baseline_gbps"] in [b["gbps"] for b in rep["samples"]["baseline"]]
        assert ("quiet_gbps" in s) == (mode != "flood")
        assert 0 <= s["softirq_share"] <= 1
        assert s["flood_cpu"]["sender_s"] > 0 and s["flood_cpu"]["us_per_packet"] > 0   # the sender's CPU is read
        summary = rep["summary"][mode]
        assert summary["samples"] == 1 and summary["ratio_median"] == s["ratio"]
        assert summary["ratio_spread"] == [s["ratio"], s["ratio"]]
        # the counters count the banned prefix alone, each packet at most at one end of its trip
        died = s["packets"]
        assert sum(died.get(k, 0) for k in ("xdp", "tc", "rule", "server")) <= s["flood"]["sent"], (died, s["flood"])
    table = quick["stdout"]
    for mode in rep["modes"]:
        assert f"\n{mode} " in "\n" + table, table
    assert "where the flood died" in table


def test_hybrid_drops_the_flood_at_xdp_before_netfilter_and_nothing_reaches_the_server(quick):
    s = _only(quick["report"], "hybrid")
    died = s["packets"]
    assert died["xdp"] > 0, died
    assert died["tc"] == 0, died                    # XDP saw every packet of the banned prefix first
    assert died["netfilter"] == 0 and died.get("conntrack_new", 0) == 0, died
    assert died["server"] == 0, died


def test_without_xdp_hybrid_drops_the_flood_at_tc_before_netfilter(quick):
    died = _only(quick["report"], "hybrid-tc")["packets"]
    assert died["tc"] > 0 and died["xdp"] == 0, died
    assert died["netfilter"] == 0 and died["server"] == 0, died


def test_the_firewall_bouncer_drops_in_its_forward_rule_after_netfilter_and_conntrack(quick):
    rep = quick["report"]
    s = _only(rep, "crowdsec-fw")
    died = s["packets"]
    assert died["rule"] > 0, died
    assert died["server"] == 0, died
    # each packet its FORWARD rule dropped went through prerouting and conntrack first
    assert died["netfilter"] >= died["conntrack_new"] >= died["rule"], died
    assert "xdp" not in died and "tc" not in died
    found = rep["findings"]["crowdsec_iptables"]
    assert found["ipset_members"] == [fwcompare.BANNED]       # the Range decision, whole
    assert [st["backend"] for st in rep["findings"]["crowdsec_fw_stop"]] == ["nftables", "iptables"]


def test_without_a_bouncer_the_flood_reaches_the_server(quick):
    died = _only(quick["report"], "flood")["packets"]
    assert died["server"] > 0, died                 # the server's counter sees the prefix
    assert died.get("rule", 0) == died.get("xdp", 0) == 0


def test_the_nftables_mode_finding_is_consistent(quick):
    f = quick["report"]["findings"]["crowdsec_nftables"]
    assert f["hooks"] and all(isinstance(h, str) for h in f["hooks"])
    assert f["flood_sent"] > 0
    assert f["drops_forwarded"] == (f["rule_packets"] > 0)
    if "forward" not in f["hooks"] and "prerouting" not in f["hooks"]:
        # a chain on input alone never sees forwarded packets: the flood went through
        assert f["rule_packets"] == 0 and f["reached_server"] > 0, f
    assert "nftables mode: its chains hook" in quick["stdout"]


def test_the_machine_is_left_clean(quick):
    assert_clean(quick["name"], quick["work"], quick["root_before"])


@pytest.mark.parametrize("mode", ["crowdsec-fw", "hybrid"])
def test_a_failure_half_way_leaves_the_machine_clean(mode, tmp_path, monkeypatch):
    """The flood sample fails while the mode's bouncer, the LAPI and the flood run."""
    root_before = _root_state()
    name = new_lab_name()

    def flood_then_fail(lab, seconds, probe, rate=0):
        with fwcompare.flooding(lab, fwcompare.BANNED, port=fwcompare.FLOOD_PORT, cpu=fwcompare.FLOOD_CPU):
            time.sleep(0.3)
            raise RuntimeError("boom (test)")

    monkeypatch.setattr(fwcompare, "_flood_sample", flood_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        fwcompare.run([mode], 1, 1, lab_name=name, nft_check=False, tmp_parent=str(tmp_path))
    assert_clean(name, tmp_path, root_before)
