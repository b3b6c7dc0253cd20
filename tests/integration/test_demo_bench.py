"""The demo and the benchmark harness, end to end, as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

import leakcheck

pytestmark = pytest.mark.integration
HYBRIDCTL = os.path.join(os.path.dirname(sys.executable), "hybridctl")


def test_demo_runs_end_to_end_and_leaves_nothing():
    before = leakcheck.snapshot()
    name = leakcheck.new_lab_name()
    proc = subprocess.run([HYBRIDCTL, "demo", "--lab-name", name, "--seconds", "1", "--requests", "3", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["reachable"] == {"ipv4": True, "ipv6": True}
    assert rep["http_ok"] == rep["http_total"] == 3
    assert rep["blocked_ok"] is True                                 # the engine reset the blocked Host
    assert rep["engine"]["rules"]["block-demo-host"] == 1
    assert rep["engine"]["flow_verdicts"]["block"] == 1 and rep["engine"]["flow_verdicts"]["bypass"] >= 3
    assert rep["bulk_bytes"] > 10_000_000
    # The point of hybrid: the kernel saw the bulk, the queue only a handful of packets.
    assert 0 < rep["queued_packets"] < rep["kernel_packets"] / 100
    assert rep["consumer_packets"] >= rep["queued_packets"] > 0   # GSO packets are split when queued
    reasons = {k for e in rep["status"]["interfaces"].values() for k, v in e["counters"].items() if v}
    assert {"reason_syn", "reason_first_n"} <= reasons
    # Only what this demo created counts (other runs may share the machine).
    assert leakcheck.leaked(before, leakcheck.snapshot(), lambda kind, item: item.startswith(name)) == {}


def test_bench_quick_smoke_run():
    """CI proves the harness works (the full run is a manual step): a quick run produces a
    baseline and a ratio for every mode asked for."""
    name = leakcheck.new_lab_name()
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--modes", "hybrid,nfq-all",
                           "--lab-name", name, "--json", "-"],
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    by_mode = {r["mode"]: r for r in rep["results"]}
    assert set(by_mode) == {"baseline", "hybrid", "nfq-all"}
    assert by_mode["baseline"]["ratio_to_baseline"] == 1.0
    for r in by_mode.values():
        assert r["workload"] == "bulk-1" and len(r["samples"]) == 1 and r["median"] > 0
    # Not a performance assertion: nfq-all queues every packet, so it must at least be the
    # slower one by a wide margin, or the mode is not doing what it claims.
    assert by_mode["nfq-all"]["median"] < by_mode["hybrid"]["median"] / 2
