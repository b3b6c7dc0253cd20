"""The flood sender in the lab: its frames reach the gateway (counted there by an iptables rule
on the spoofed source prefix), they are real packets the gateway forwards, and it stops and
reports when told to."""

from __future__ import annotations

import re
import time

import pytest
from gwlab import HYBRIDCTL, start_engine

from hybrid.lab import flood

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
    def tx_dropped() -> int:                       # frames the kernel dropped sending on the client's veth
        import json
        link = json.loads(lab.run("client", ["ip", "-s", "-j", "link", "show", "eth0"]).stdout)[0]
        return link["stats64"]["tx"]["dropped"]

    dropped = tx_dropped()
    with flood.flooding(lab, SOURCES) as f:
        time.sleep(2.0)
        assert f.proc.poll() is None               # still flooding: it stops when told to
    res = f.result
    assert res is not None and res.sent > 0
    # errors: send calls the kernel refused (ENOBUFS), one per frame the veth dropped (a drop after
    # part of a batch fails the next call), so it is the kernel's drop count, less one refusal the
    # flood may not have sent again before it stopped. Usually 0 and 0.
    refused = tx_dropped() - dropped
    assert res.errors <= refused <= res.errors + 1, (res, refused)
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
    proc = subprocess.run([sys.executable, "-m", "hybrid.lab.flood", "--iface", "nonexistent0", "--sources", SOURCES,
                           "--dst", "198.18.2.2", "--dst-mac", "02:00:00:00:00:01", "--seconds", "0.1"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "flood: refusing to flood from the initial network namespace: run it inside a lab namespace "
        "(ip netns exec NAME-client ...)"]


# -- issue 6: a SYN flood from spoofed sources against admission control ---------------------------
SYN_RULES = ('default = "accept"\ndefault_flow = "bypass"\nflow_ttl = 300\n'
             '[[rule]]\nname = "no-telnet"\nproto = "tcp"\ndport = 23\naction = "drop"\n')   # reads SYNs
LEGIT = r"""
import json, socket, sys, time
ip, n = sys.argv[1], int(sys.argv[2])
ok = 0
start = time.monotonic()
for i in range(n):
    try:
        with socket.create_connection((ip, 80), timeout=3) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: legit\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        ok += data.startswith(b"HTTP/1.1 200")
    except OSError:
        pass
print(json.dumps({"ok": ok, "n": n, "seconds": time.monotonic() - start}))
"""
GLOBAL_RATE = 2000          # flagged packets/s the engine is given; the flood sends ~100x that
CONNECTIONS = 200


def _legit(lab) -> dict:
    import json
    import sys
    proc = lab.run("client", [sys.executable, "-c", LEGIT, lab.info.server.ipv4, str(CONNECTIONS)],
                   timeout=CONNECTIONS * 4 + 30)
    return json.loads(proc.stdout)


def test_syn_flood_from_spoofed_sources_leaves_legitimate_connections_through(lab, tmp_path):
    """Spoofed SYNs from 198.18.128.0/17 at full speed while a client opens connections one after
    another. The global budget keeps the engine's queue from ever overflowing (nothing passes
    uninspected by overflow), the flood's SYNs are refused by the budget, and the legitimate
    client still completes at least 99% of its connections."""
    import json
    import os
    import signal
    import subprocess

    from hybrid.lab.servers import Nginx

    def hctl(*args):
        proc = subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def over_global(st) -> int:
        return sum(e["counters"].get("over_global", 0) for e in st["interfaces"].values())

    rules = tmp_path / "rules.toml"
    rules.write_text(SYN_RULES)
    hctl("attach", "to-client", "to-server", "--global-rate", str(GLOBAL_RATE))
    stats = f"/run/hybrid/instances/{lab.netns('gw')}/engine-0.json"
    engine = start_engine(lab, rules, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(stats):
            assert engine.poll() is None and time.monotonic() < deadline, "engine did not start"
            time.sleep(0.05)
        with Nginx(lab):
            quiet = _legit(lab)
            with flood.flooding(lab, "198.18.128.0/17", kind="syn", port=80, cpu=0) as f:
                time.sleep(0.5)
                before = json.loads(hctl("status", "--json"))
                loud = _legit(lab)
                after = json.loads(hctl("status", "--json"))
        sent = f.result.sent
        print(f"\nlegitimate client: {quiet['ok']}/{CONNECTIONS} connections at "
              f"{quiet['ok'] / quiet['seconds']:.0f}/s without the flood, {loud['ok']}/{CONNECTIONS} at "
              f"{loud['ok'] / loud['seconds']:.0f}/s under {f.result.pps:,.0f} spoofed SYNs/s; "
              f"refused by the global budget: {over_global(after) - over_global(before):,}")
        assert quiet["ok"] == CONNECTIONS
        assert loud["ok"] >= 0.99 * CONNECTIONS, loud
        assert sent > 10 * GLOBAL_RATE                        # it was a flood, well over budget ...
        assert over_global(after) - over_global(before) > sent / 4   # ... that the budget refused,
        assert after["queue"]["passed_overflow"] == 0         # so the queue never overflowed
        assert after["queue"]["dropped_overflow"] == 0
    finally:
        if engine.poll() is None:
            os.kill(engine.pid, signal.SIGTERM)
            try:
                engine.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(engine.pid, signal.SIGKILL)
                engine.wait()
        hctl("detach", "--all")
