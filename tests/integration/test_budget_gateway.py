"""A rule's byte budget (inspect_bytes), through the lab gateway: an IPS-style content rule on a
request body sees the body's first bytes although the connection was bypassed on its request
head, and only those: a TCP sink in the server namespace tells what reached the server.

- without a budget, the signature in the body reaches the server (the blind spot the budget is for);
- with inspect_bytes = 65536, a signature 30 KB into the body is caught: the connection is reset
  and the server never receives it;
- a signature past the budget (100 KB in) is not seen: the budget is what the rule asked for.
"""

from __future__ import annotations

import json
import sys

import pytest
from gwlab import attached_with_engine, engine_stats

pytestmark = pytest.mark.integration

SINK = r"""
import json, socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 8080)); srv.listen(8); srv.settimeout(20)
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    c, _ = srv.accept()
    c.settimeout(5)
    data = b""
    try:
        while chunk := c.recv(65536):
            data += chunk
    except OSError:
        pass
    c.close()
    print(json.dumps({"bytes": len(data), "evil": b"EVIL-SIGNATURE" in data}), flush=True)
"""

CLIENT = r"""
import json, socket, sys, time
addr, offsets = sys.argv[1], json.loads(sys.argv[2])
out = []
for off in offsets:
    body = bytearray(b"a" * 120000)
    body[off:off + 14] = b"EVIL-SIGNATURE"
    head = b"POST /up HTTP/1.1\r\nHost: files.example\r\nContent-Length: %d\r\n\r\n" % len(body)
    s = socket.create_connection((addr, 8080), timeout=5)
    try:
        s.sendall(head)
        time.sleep(0.2)             # the head decided (and the flow bypassed) before the body
        s.sendall(bytes(body))
        s.shutdown(socket.SHUT_WR)
        s.recv(10)
        out.append("sent")
    except OSError:
        out.append("reset")
    finally:
        s.close()
    time.sleep(0.3)
print(json.dumps(out))
"""

RULES = """
default = "accept"
default_flow = "bypass"
flow_ttl = 30

[[rule]]
name = "uploads"
proto = "tcp"
http_host = "files.example"
action = "accept"
flow = "bypass"
{budget}

[[rule]]
name = "ips-evil"
proto = "tcp"
payload_contains = "EVIL-SIGNATURE"
action = "reject"
flow = "block"

[[rule]]
name = "wait-for-payload"
proto = "tcp"
payload_len = 0
action = "accept"
flow = "none"
log = false
"""

OFFSETS = [30000, 100000]


def run(lab, tmp_path, budget: str) -> tuple[list, list, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    with attached_with_engine(lab, tmp_path, RULES.format(budget=budget), "--xdp-mode", "generic"):
        sink = lab.popen("server", [sys.executable, "-c", SINK, lab.info.server.ipv4, str(len(OFFSETS))],
                         stdout=-1, text=True)
        try:
            assert sink.stdout.readline().strip() == "ready"
            out = lab.run("client", [sys.executable, "-c", CLIENT, lab.info.server.ipv4, json.dumps(OFFSETS)],
                          timeout=60)
            got = [json.loads(sink.stdout.readline()) for _ in OFFSETS]
        finally:
            sink.kill()
            sink.wait()
            sink.stdout.close()
        st = engine_stats(lab)
    return json.loads(out.stdout), got, st


def test_a_byte_budget_lets_a_content_rule_see_a_bypassed_body(lab, tmp_path):
    sent, got, _ = run(lab, tmp_path / "none", "")
    assert [g["evil"] for g in got] == [True, True], got        # the blind spot: both reach the server
    sent, got, st = run(lab, tmp_path / "budget", "inspect_bytes = 65536")
    print("with a budget:", sent, got, st["rules"])
    assert got[0]["evil"] is False and sent[0] == "reset"          # 30 KB in: caught, reset
    assert got[1]["evil"] is True                                  # 100 KB in: past the budget
    assert st["rules"]["ips-evil"] >= 1 and st["errors"] == 0
