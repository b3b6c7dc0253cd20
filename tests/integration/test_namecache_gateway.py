"""The name-verdict cache on a real gateway (issue 13): hybrid attached with --name-cache, the
engine teaching names, dnsmasq and nginx as servers, dig and curl as clients. A name's first
connection goes through the engine, the next ones are decided in the kernel and reported back
(verdict log, engine counters, status); a rules reload under load never lets one packet through
on the old rules; an operator can list and flush the cache."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from gwlab import (
    attached_with_engine,
    engine_stats,
    hctl,
    kernel_counters,
    status,
    wait_for,
)

pytestmark = pytest.mark.integration

RECORDS = {"a.example": "192.0.2.8", "flip.example": "192.0.2.9", "x.ads.example": "192.0.2.10"}
ALLOW = 'default = "accept"\ndefault_flow = "bypass"\nflow_ttl = 300\n'
BLOCK_ADS = ALLOW + ('[[rule]]\nname = "block-ads"\nproto = "udp"\ndport = 53\ndns_qname = ".ads.example"\n'
                     'action = "drop"\nflow = "block"\nttl = 60\n')
BLOCK_FLIP = ALLOW + ('[[rule]]\nname = "block-flip"\nproto = "udp"\ndport = 53\ndns_qname = "flip.example"\n'
                      'action = "drop"\nflow = "block"\nttl = 60\n')


def dig(lab, name: str) -> str:
    """dig's short answer from the client (empty: no answer within a second)."""
    proc = lab.run("client", ["dig", "+short", "+tries=1", "+time=1", f"@{lab.info.server.ipv4}", name],
                   check=False, timeout=10)
    return "\n".join(ln for ln in proc.stdout.splitlines() if ln and not ln.startswith(";;"))


@pytest.fixture(scope="module")
def dns(lab):
    from hybrid.lab.servers import Dns
    with Dns(lab, records=RECORDS) as d:
        yield d


def test_a_names_next_connections_are_decided_in_the_kernel_and_reported(lab, dns, tmp_path):
    with attached_with_engine(lab, tmp_path, BLOCK_ADS, "--name-cache") as eng:
        assert dig(lab, "a.example") == RECORDS["a.example"]           # the engine decides, teaches
        before = kernel_counters(lab)
        for _ in range(5):                                              # each dig: a new source port
            assert dig(lab, "a.example") == RECORDS["a.example"]
        after = kernel_counters(lab)
        assert after["cache_passed"] - before["cache_passed"] == 5, (str({k: v for k, v in after.items() if v}), engine_stats(lab)["name_cache"])
        # a blocked name: the engine drops the first query and teaches the drop; the kernel
        # drops the next ones itself
        assert dig(lab, "x.ads.example") == ""
        b2 = kernel_counters(lab)
        assert dig(lab, "x.ads.example") == ""
        assert kernel_counters(lab)["cache_dropped"] - b2["cache_dropped"] >= 1
        st = engine_stats(lab, until=lambda s: (s.get("name_cache") or {}).get("kernel_decisions", 0) >= 6)
        nc = st["name_cache"]
        assert nc["kernel_decisions"] >= 6 and nc["kernel_actions"]["accept"] >= 5, (str(nc), str({k: v for k, v in kernel_counters(lab).items() if v}))
        assert nc["kernel_rules"].get("block-ads", 0) >= 1, nc
        full = status(lab)
        assert full["name_cache"]["hits"] >= 6 and full["name_cache"]["current"] >= 2, full["name_cache"]
        text = hctl(lab, "status").stdout
        assert "name cache:" in text, text
        shown = json.loads(hctl(lab, "name-cache", "show", "--json").stdout)
        names = {e["name"]: e for e in shown["entries"]}
        assert names["a.example"]["action"] == "accept" and names["a.example"]["flow"] == "bypass", names
        assert names["a.example"]["hits"] >= 5 and names["x.ads.example"]["action"] == "drop", names
        out = hctl(lab, "name-cache", "flush").stdout
        assert out.startswith("flushed ") and int(out.split()[1].replace(",", "")) >= 2, out
        assert json.loads(hctl(lab, "name-cache", "show", "--json").stdout)["entries"] == []
        b3 = kernel_counters(lab)
        assert dig(lab, "a.example") == RECORDS["a.example"]           # to the engine again
        assert kernel_counters(lab)["cache_miss"] - b3["cache_miss"] == 1


_LOAD = r"""
import json, socket, struct, sys, time
srv, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0\0\1\0\1"
out = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:   # a new flow each time
        s.settimeout(0.02)
        t = time.monotonic_ns()
        s.sendto(q, (srv, 53))
        port = s.getsockname()[1]
        try:
            s.recv(512)
            out.append((t, port, 1))
        except OSError:
            out.append((t, port, 0))
print(json.dumps(out))
"""


def test_a_reload_under_load_never_applies_an_old_verdict(lab, dns, tmp_path):
    """A client queries flip.example on a new flow (a new socket) as fast as it can while the
    rules change from "allow" to "block flip.example": every query on a new flow sent after the
    engine says it reloaded is dropped, although the kernel was passing the name from its cache
    a moment before. (A query whose source port was used before the reload belongs to a flow
    bypassed then, until its verdict's TTL: reloads apply to new flows.)"""
    with attached_with_engine(lab, tmp_path, ALLOW, "--name-cache") as eng:
        rules = tmp_path / "rules.toml"
        load = lab.popen("client", [sys.executable, "-c", _LOAD, lab.info.server.ipv4, "flip.example", "4"],
                         stdout=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: kernel_counters(lab)["cache_passed"] >= 20, timeout=10,
                     what="the kernel deciding flip.example from the cache")
            rules.write_text(BLOCK_FLIP)
            eng.proc.send_signal(signal.SIGHUP)
            st = engine_stats(lab, until=lambda s: s.get("reloads", 0) >= 1, timeout=10)
            acked = time.monotonic_ns()
            assert st["reloads"] == 1
            out, _ = load.communicate(timeout=30)
        finally:
            if load.poll() is None:
                load.kill()
                load.communicate()
        sent = json.loads(out)
        # Only new flows: a query from a source port used before the reload belongs to a flow
        # bypassed before it, whose verdict lives its TTL (rules apply to new flows).
        old_ports = {port for t, port, _ in sent if t <= acked}
        after = [ok for t, port, ok in sent if t > acked and port not in old_ports]
        before = [ok for t, _, ok in sent if t <= acked]
        assert sum(before) >= 20 and len(after) >= 30, (len(before), len(after))
        answered = [t for t, port, ok in sent if t > acked and ok and port not in old_ports]
        assert sum(after) == 0, (f"{sum(after)} of {len(after)} queries answered after the reload: "
                                 f"{[(t - acked) / 1e6 for t in answered]} ms after; engine {engine_stats(lab)}; "
                                 f"kernel { {k: v for k, v in kernel_counters(lab).items() if v}!s}")
        c = kernel_counters(lab)
        assert c["cache_dropped"] >= 10, c          # the block was taught and decided in the kernel
