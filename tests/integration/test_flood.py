"""The flood sender in the lab: its frames reach the gateway (counted there by an iptables rule
on the spoofed source prefix), they are real packets the gateway forwards, and it stops and
reports when told to."""

from __future__ import annotations

import re
import time

import pytest

from hybrid import flood

pytestmark = pytest.mark.integration
SOURCES = "198.18.1.128/25"


def _counter(lab, role: str, table: str, chain: str, comment: str) -> int:
    out = lab.run(role, ["iptables", "-t", table, "-L", chain, "-v", "-x", "-n"]).stdout
    for line in out.splitlines():
        if comment in line:
            return int(line.split()[0])
    raise AssertionError(f"no counting rule {comment} in {role} {table} {chain}:\n{out}")


@pytest.fixture
def counting(lab):
    """Count the flood's packets where the gateway receives them (raw PREROUTING) and where the
    server receives them; rules removed afterwards."""
    rules = [("gw", "raw", "PREROUTING", "flood-at-gw"), ("server", "raw", "PREROUTING", "flood-at-server")]
    for role, table, chain, comment in rules:
        lab.run(role, ["iptables", "-t", table, "-I", chain, "-s", SOURCES, "-p", "udp", "--dport", "9",
                       "-m", "comment", "--comment", comment])
    try:
        yield lambda role: next(_counter(lab, r, t, c, m) for r, t, c, m in rules if r == role)
    finally:
        for role, table, chain, comment in rules:
            lab.run(role, ["iptables", "-t", table, "-D", chain, "-s", SOURCES, "-p", "udp", "--dport", "9",
                           "-m", "comment", "--comment", comment], check=False)


def test_rate_limited_flood_arrives_at_the_gateway_frame_for_frame(lab, counting):
    with flood.flooding(lab, SOURCES, rate=20000, seconds=1.0) as f:
        f.proc.wait(timeout=30)
    res = f.result
    assert res is not None and res.sent > 5000
    assert counting("gw") == res.sent              # every frame sent was received by the gateway
    # ... as packets it forwards: they reach the server (a few may still be in flight)
    deadline = time.monotonic() + 5
    while counting("server") < res.sent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counting("server") == res.sent


def test_unlimited_flood_runs_until_stopped_and_reports(lab, counting):
    with flood.flooding(lab, SOURCES) as f:
        time.sleep(2.0)
        assert f.proc.poll() is None               # still flooding: it stops when told to
    res = f.result
    assert res is not None and res.sent > 0 and res.errors >= 0
    at_gw = counting("gw")
    assert 0 < at_gw <= res.sent
    print(f"\nflood: {res.sent:,} frames in {res.seconds} s = {res.pps:,.0f} packets/s sent, "
          f"{at_gw:,} received by the gateway")


def test_refuses_sources_outside_the_lab_range(lab):
    with pytest.raises(Exception, match=re.escape("must lie inside 198.18.0.0/15")):
        with flood.flooding(lab, "10.0.0.0/8"):
            pass


def test_refuses_to_run_in_the_initial_namespace():
    import subprocess
    import sys
    # A made-up interface: should the check ever fail, nothing could be sent anyway.
    proc = subprocess.run([sys.executable, "-m", "hybrid.flood", "--iface", "nonexistent0", "--sources", SOURCES,
                           "--dst", "198.18.2.2", "--dst-mac", "02:00:00:00:00:01", "--seconds", "0.1"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "flood: refusing to flood from the initial network namespace: run it inside a lab namespace "
        "(ip netns exec NAME-client ...)"]
