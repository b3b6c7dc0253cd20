"""The demo and the benchmark harness, end to end, as a user runs them."""

import json
import os
import subprocess
import sys

import leakcheck
import pytest
from gwlab import HYBRIDCTL

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_leaves_nothing():
    before = leakcheck.snapshot()
    name = leakcheck.new_lab_name()
    proc = subprocess.run([*HYBRIDCTL, "demo", "--lab-name", name, "--seconds", "1", "--requests", "3", "--json"],
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
    # The demo's rules decide nothing on a bare SYN: the engine had the kernel skip SYNs, and
    # connections were queued by their first payload alone.
    assert "reason_first_n" in reasons and "reason_syn" not in reasons
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
    for r in by_mode.values():                           # each mode's sample paired with a baseline one
        assert r["workload"] == "bulk-1" and r["median"] > 0
        assert len(r["samples"]) == (2 if r["mode"] == "baseline" else 1)
        assert (r["paired_spread"] is None) == (r["mode"] == "baseline")
    # Not a performance assertion: nfq-all queues every packet, so it must at least be the
    # slower one by a wide margin, or the mode is not doing what it claims.
    assert by_mode["nfq-all"]["median"] < by_mode["hybrid"]["median"] / 2


def test_bench_quick_new_modes_and_workloads_leave_nothing():
    """The queued peers (OpenSnitch style, first 4 KiB) and the new workloads in a quick form:
    every mode produces samples with their extras, ct-new is blind to payload and connbytes is
    not, and every rule, process and lab is gone afterwards. (payload-visibility runs first: after
    newconn's thousands of connections, a new connection may reuse a 5-tuple the engine bypassed
    for flow_ttl, and hybrid is then blind to it; see docs/benchmarks.md.)"""
    before = leakcheck.snapshot()
    name = leakcheck.new_lab_name()
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--modes", "ct-new,connbytes,hybrid",
                           "--workloads", "payload-visibility,newconn,udp-small", "--lab-name", name, "--json", "-"],
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    got = {(r["mode"], r["workload"]): r for r in rep["results"]}
    modes, workloads = ("baseline", "ct-new", "connbytes", "hybrid"), ("newconn", "udp-small", "payload-visibility")
    assert set(got) == {(m, w) for m in modes for w in workloads}
    for m in modes:
        nc, udp = got[(m, "newconn")], got[(m, "udp-small")]
        # one sample per mode, each paired with a baseline sample of its own
        assert nc["median"] > 0 and nc["unit"] == "req/s" and len(nc["samples"]) == (3 if m == "baseline" else 1)
        assert nc["extra_median"]["p99_ms"] >= nc["extra_median"]["p50_ms"] > 0
        per_request = nc["extra_median"]["queued_per_request"]
        if m == "baseline":
            assert per_request == 0
        elif m == "connbytes":
            assert per_request > 2                   # the whole short exchange is queued
        else:
            assert 0.9 <= per_request <= 1.5, (m, per_request)   # the SYN (ct-new), the request (hybrid)
        assert udp["median"] > 0 and udp["extra_median"]["sent_pps"] >= udp["median"]
    vis = {m: got[(m, "payload-visibility")] for m in modes}
    assert all(v["extra_median"]["connections"] == 20 for v in vis.values())
    assert vis["baseline"]["median"] == 0.0          # no engine: nothing seen
    assert vis["ct-new"]["median"] == 0.0            # only handshakes queued: blind to payload
    assert vis["connbytes"]["median"] == 1.0
    assert vis["hybrid"]["median"] == 1.0            # fast and still sees every first payload
    assert got[("baseline", "udp-small")]["extra_median"]["queued_pps"] == 0
    assert leakcheck.leaked(before, leakcheck.snapshot(), lambda kind, item: item.startswith(name)) == {}
    assert not [line for line in subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.splitlines()
                if "hybrid-bench" in line]


def test_bench_wrk_output_is_parsed():
    from hybrid.lab.bench import parse_wrk
    out = """Running 1s test @ http://198.18.0.1/
  1 threads and 8 connections
  Latency Distribution
     50%  348.00us
     75%  500.00us
     90%    1.20ms
     99%    1.03s
  11491 requests in 1.00s, 2.79MB read
  Socket errors: connect 1, read 2, write 0, timeout 0
Requests/sec:  11491.72
"""
    rps, extra = parse_wrk(out)
    assert rps == 11491.72 and extra == {"p50_ms": pytest.approx(0.348), "p99_ms": 1030.0, "errors": 3,
                                         "requests": 11491}


def test_bench_quick_flood_blocks_where_each_mode_says():
    """The flood workloads in a quick form (synflood: only that it measures, with and without
    hybrid). flood: the legitimate stream is measured with and without the flood, and the flood
    dies where the mode blocks it: at netfilter for baseline (an iptables DROP), at tc for hybrid
    on veth (no XDP), at XDP for hybrid-generic; none of it reaches the server.

    Two runs, so that synflood is measured under one hybrid mode (hybrid), not both: a bench
    sample of a hybrid mode is a fresh attach (a compile, 6-10 s on CI) plus a baseline sample,
    and synflood's measurement does not depend on where XDP runs."""
    before = leakcheck.snapshot()
    names = []
    results = []
    for modes, workloads in (("hybrid", "flood,synflood"), ("hybrid-generic", "flood")):
        names.append(name := leakcheck.new_lab_name())
        proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--modes", modes,
                               "--workloads", workloads, "--lab-name", name, "--json", "-"],
                              capture_output=True, text=True, timeout=300,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert proc.returncode == 0, proc.stderr
        results += json.loads(proc.stdout)["results"]
    flood = [r for r in results if r["workload"] == "flood"]
    assert sorted(r["mode"] for r in flood) == ["baseline", "baseline", "hybrid", "hybrid-generic"]  # a baseline per run
    syn = {r["mode"]: r for r in results if r["workload"] == "synflood"}
    assert set(syn) == {"baseline", "hybrid"}
    for r in syn.values():                    # spoofed SYNs: measured with and without, not blocked
        x = r["extra_median"]
        assert r["unit"] == "conn/s" and r["median"] > 0 and x["no_flood_cps"] > 0
        assert 0 < x["completed"] <= 1 and x["flood_sent_pps"] > 1000
    assert syn["baseline"]["extra_median"]["queued_pps"] == 0
    where = {"baseline": "flood_netfilter_pps", "hybrid": "flood_tc_pps", "hybrid-generic": "flood_xdp_pps"}
    for r in flood:
        mode, x = r["mode"], r["extra_median"]
        assert r["unit"] == "Gbit/s" and r["median"] > 0 and x["no_flood_gbps"] > 0
        for kept, gbps, clean in zip(r["extra"]["kept"], r["samples"], r["extra"]["no_flood_gbps"]):
            assert kept == pytest.approx(gbps / clean)     # per sample (baseline has one per mode)
        assert x["flood_sent_pps"] > 1000
        assert x[where[mode]] >= 0.99 * x["flood_sent_pps"], (mode, x)      # died where the mode blocks
        for other in set(where.values()) - {where[mode]}:
            assert x[other] == 0, (mode, x)
        assert x["flood_server_pps"] == 0, (mode, x)
    assert leakcheck.leaked(before, leakcheck.snapshot(), lambda kind, item: item.startswith(tuple(names))) == {}


def test_bench_takeover_measures_both_ways_and_leaves_nothing():
    """--takeover --quick: one `hybridctl run` with a spare engine and one without, each engine
    killed once; both report how long the queue stayed unbound, and nothing is left behind."""
    before = leakcheck.snapshot()
    name = leakcheck.new_lab_name()
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--takeover", "--quick", "--lab-name", name,
                           "--json", "-"], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert {k: len(v) for k, v in res["samples"].items()} == {"spare": 1, "no-spare": 1}
    assert all(0 < v[0] < 60 for v in res["samples"].values())
    assert leakcheck.leaked(before, leakcheck.snapshot(), lambda kind, item: item.startswith(name)) == {}
    assert not os.path.exists(f"/run/hybrid/run-{name}-gw.lock")
