"""QUIC (HTTP/3's transport) through the lab gateway: a real aioquic client in the client namespace,
a real aioquic server in the server namespace (tests/quicpeer.py), hybrid attached to the gateway
and an engine running examples/rules/realistic.toml, whose block-quic-sni rule blocks
``*.tracker.example`` over QUIC.

The server is the oracle: it prints the server name of every ClientHello it parses. With rules
that accept everything, every handshake completes (the blocked name too: nothing but hybrid stops
it); with realistic.toml, the allowed name completes and echoes (its ClientHello in one datagram,
and a post-quantum-sized one over two datagrams, over IPv6 and QUIC version 2), while the blocked
name fails and the server never parses its ClientHello (in one datagram: the datagram is dropped;
over two: the first is held and passed, the second dropped, so the server holds half a hello);
with ``quic = "block"`` every handshake fails and the server parses nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading

import pytest
from gwlab import attachment, clear_flows, engine_running, engine_stats

pytestmark = pytest.mark.integration
HERE = os.path.dirname(os.path.abspath(__file__))
QUICPEER = os.path.join(os.path.dirname(HERE), "quicpeer.py")
REALISTIC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples", "rules", "realistic.toml")
ALLOWED, BLOCKED = "www.allowed.example", "login.tracker.example"
ACCEPT_ALL = 'default = "accept"\ndefault_flow = "bypass"\n'
TIMEOUT = 1.5            # a handshake through the lab takes milliseconds; a blocked one never ends


@contextlib.contextmanager
def quic_server(lab, tmp_path):
    """quicpeer's echo server on UDP 443 in the server namespace, with a self-signed certificate;
    yields a function that returns the server names it has parsed so far."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=server.example"],
                   check=True, capture_output=True, timeout=30)
    proc = lab.popen("server", [sys.executable, QUICPEER, "server", "--cert", cert, "--key", key],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    names: list[str | None] = []
    reader = None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "ready", f"quic server did not start: {line!r} {proc.poll()}"

        def read():
            for ln in proc.stdout:
                names.append(json.loads(ln)["sni"])
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        yield lambda: list(names)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if reader is not None:
            reader.join(timeout=5)
        proc.stdout.close()
        proc.stderr.close()


def clients(lab, *runs: tuple[str, str, list[str]]) -> list[dict]:
    """quicpeer clients in the client namespace, all at once, each (server address, name, extra
    options); their outcomes in order ({"ok": ..., "echo"|"error": ...})."""
    procs = []
    try:
        for host, name, extra in runs:
            procs.append(lab.popen("client", [sys.executable, QUICPEER, "client", "--host", host, "--sni", name,
                                              "--timeout", str(TIMEOUT), *extra],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        out = []
        for p in procs:
            so, se = p.communicate(timeout=30)
            lines = so.strip().splitlines()
            out.append(json.loads(lines[-1]) if lines else {"ok": False, "error": f"no outcome: {se[-400:]}"})
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_quic_through_the_gateway(lab, tmp_path):
    v4, v6 = lab.info.server.ipv4, lab.info.server.ipv6
    cases = [(v4, ALLOWED, []), (v6, ALLOWED, ["--pq", "--version", "2"]), (v4, BLOCKED, []), (v4, BLOCKED, ["--pq"])]
    with open(REALISTIC) as f:
        realistic = f.read()
    with quic_server(lab, tmp_path) as parsed, attachment(lab):
        with engine_running(lab, tmp_path / "accept", ACCEPT_ALL):
            oracle = clients(lab, *cases)
        assert [o["ok"] for o in oracle] == [True] * 4, oracle            # nothing else stops the blocked name
        assert oracle[0]["echo"] == f"ping {ALLOWED}"
        assert parsed().count(BLOCKED) == 2 and parsed().count(ALLOWED) == 2

        clear_flows(lab)
        before = len(parsed())
        with engine_running(lab, tmp_path / "realistic", realistic):
            got = clients(lab, *cases)
            st = engine_stats(lab, until=lambda s: s["rules"].get("block-quic-sni", 0) >= 2 and s["quic_snis"] >= 4)
        assert [g["ok"] for g in got] == [True, True, False, False], got
        assert [g["echo"] for g in got[:2]] == [f"ping {ALLOWED}"] * 2
        assert [g["error"] for g in got[2:]] == ["TimeoutError"] * 2
        assert parsed()[before:].count(BLOCKED) == 0, parsed()          # the server never read the blocked hello
        assert parsed()[before:].count(ALLOWED) == 2
        assert st["errors"] == 0 and st["rules"]["block-quic-sni"] == 2 and st["rules"]["block-tls-sni"] == 0, st
        assert st["quic_snis"] == 4 and st["quic_held"] >= 2 and st["quic_initials"] >= 6, st
        assert not [k for k in st["doubts"] if k.startswith("quic:")], st["doubts"]
        assert st["flow_verdicts"]["block"] >= 2 and st["flow_verdicts"]["bypass"] >= 2, st["flow_verdicts"]

        clear_flows(lab)
        before = len(parsed())
        with engine_running(lab, tmp_path / "block", 'quic = "block"\n' + realistic):
            blocked = clients(lab, (v4, ALLOWED, []), (v6, ALLOWED, ["--pq"]))
            st = engine_stats(lab, until=lambda s: s["quic_blocked"] >= 2)
        assert [b["ok"] for b in blocked] == [False, False], blocked
        assert parsed()[before:] == [], parsed()
        assert st["quic_blocked"] >= 2 and st["quic_initials"] == 0 and st["errors"] == 0, st
