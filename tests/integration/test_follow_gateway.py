"""No blind spot after a bypass (issue 14), with real servers as the oracle: on one kept-alive
connection, after allowed requests (with Content-Length and chunked bodies, pipelined, a head cut
in two), a request to a blocked Host is not served; every allowed request still is. Each sequence
runs first without hybrid, to record what nginx serves, then through the gateway. The same for
DNS: several queries from one UDP socket (and on one TCP connection with dig +keepopen), the
blocked name unanswered, the allowed ones answered; and only the packets that carry a message are
queued (the bodies and the answers' bytes stay in the kernel)."""

from __future__ import annotations

import json
import sys

import pytest
from gwlab import attached_with_engine, engine_stats, kernel_counters

from hybrid.lab.demo import Nginx
from hybrid.lab.servers import Dns

pytestmark = pytest.mark.integration

A, B = "allowed.example", "x.blocked.example"


def req(host: str, path: str = "/", body: bytes | None = None, chunked: bool = False) -> bytes:
    head = f"{'POST' if body is not None else 'GET'} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is None:
        return (head + "\r\n").encode()
    if chunked:
        parts = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 3000]), body[i:i + 3000])
                         for i in range(0, len(body), 3000))
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + parts + b"0\r\n\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


BODY = bytes(range(256)) * 400                         # 100 KiB: many segments

# Each sequence: the sends on one connection, in order; after each send the client reads the
# responses that send asked for (one per request head in it) before sending the next.
SEQUENCES: dict[str, list[bytes]] = {
    "keep-alive then blocked": [req(A), req(A), req(B)],
    "keep-alive allowed only": [req(A), req(A), req(A), req(A)],
    "content-length body then blocked": [req(A, "/up", BODY), req(B)],
    "chunked body then blocked": [req(A, "/up", BODY, chunked=True), req(B)],
    "pipelined after a body": [req(A), req(A, "/up", b"abc") + req(A) + req(B)],
    "head cut in two": [req(A), req(B)[:20], req(B)[20:]],
    "body and next head in one send": [req(A, "/up", BODY) + req(B)],
    "admin after keep-alive": [req(A), req(A, "/admin")],
}

# Responses that must come back through hybrid before the send carrying the blocked request.
SERVED_BEFORE = {"keep-alive then blocked": 2, "content-length body then blocked": 1, "chunked body then blocked": 1,
                 "pipelined after a body": 1, "head cut in two": 1, "body and next head in one send": 0,
                 "admin after keep-alive": 1}

CLIENT = r"""
import json, socket, sys, time
addr, seqs = sys.argv[1], json.loads(sys.stdin.read())

def responses(s, n):
    # read n responses (nginx's: Content-Length bodies), or what came before a reset or close
    data, got = b"", []
    while len(got) < n:
        i = data.find(b"\r\n\r\n")
        if i >= 0:
            head = data[:i].decode("latin-1")
            cl = [int(l.split(":", 1)[1]) for l in head.split("\r\n") if l.lower().startswith("content-length:")]
            end = i + 4 + (cl[0] if cl else 0)
            if len(data) >= end:
                got.append(data[:end].decode("latin-1"))
                data = data[end:]
                continue
        chunk = s.recv(65536)
        if not chunk:
            got.append("CLOSED")
            break
        data += chunk
    return got

out = {}
for name, sends in seqs:
    s = socket.create_connection((addr, 80), timeout=4)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    got = []
    try:
        for hexdata in sends:
            data = bytes.fromhex(hexdata)
            s.sendall(data)
            heads = data.count(b" HTTP/1.1\r\n")
            if heads:
                got += responses(s, heads)
            else:
                time.sleep(0.2)         # a piece of a head: nothing to read yet
            if got and got[-1] == "CLOSED":
                break
    except socket.timeout:
        got.append("TIMEOUT")
    except OSError:
        got.append("RESET")
    finally:
        s.close()
    out[name] = got
print(json.dumps(out))
"""

ADMIN_RULE = """
[[rule]]
name = "block-admin"
proto = "tcp"
http_path = "/admin"
action = "reject"
flow = "block"
"""

RULES = """
default = "accept"
default_flow = "bypass"
flow_ttl = 30

[[rule]]
name = "block-host"
proto = "tcp"
http_host = ".blocked.example"
action = "reject"
flow = "block"
""" + ADMIN_RULE + """
[[rule]]
name = "block-dns"
dport = 53                  # UDP and TCP; a DNS rule on any port would leave no Host cacheable
dns_qname = ".ads.example"
action = "drop"
flow = "none"

[[rule]]
name = "wait-for-payload"
proto = "tcp"
payload_len = 0
action = "accept"
flow = "none"
log = false
"""


def served(responses: list[str]) -> list[str]:
    out = []
    for r in responses:
        if "vhost blocked" in r:
            out.append("blocked")
        elif "admin of" in r:
            out.append("admin")
        elif "vhost allowed" in r or "upload ok" in r:
            out.append("allowed")
        else:
            out.append(r.split(" ", 2)[1] if r.startswith("HTTP/") else r)
    return out


def run_all(lab) -> dict[str, list[str]]:
    arg = json.dumps([(n, [x.hex() for x in sends]) for n, sends in SEQUENCES.items()])
    out = lab.run("client", [sys.executable, "-c", CLIENT, lab.info.server.ipv4], input=arg, timeout=300)
    return {k: served(v) for k, v in json.loads(out.stdout).items()}


@pytest.mark.parametrize("cache", [False, True], ids=["engine", "name-cache"])
def test_every_request_on_a_kept_alive_connection_is_decided(lab, tmp_path, cache):
    """With the name cache, the kernel decides known names at each boundary and moves the
    follow-up itself (bpf/namecache.h): the same requests must be refused."""
    www = tmp_path / "www"
    www.mkdir()
    www.chmod(0o755)
    tmp_path.chmod(0o755)
    (www / "index.html").write_text("vhost allowed\n")
    (www / "admin").write_text("admin of allowed\n")
    extra = f"""  server {{ listen 80; listen [::]:80; server_name {B};
    default_type text/plain; location / {{ return 200 "vhost blocked\\n"; }} }}
  server {{ listen 80; listen [::]:80; server_name {A}; root {www}; default_type text/plain;
    client_max_body_size 1m; keepalive_requests 1000;
    location /up {{ client_body_buffer_size 1m; return 200 "upload ok\\n"; }} }}
"""
    with Nginx(lab, root=str(www), extra_servers=extra):
        direct = run_all(lab)
        # A path rule makes every Host uncacheable (the Host alone does not decide): the cache
        # variant runs without it, and without the /admin sequence.
        rules = RULES.replace(ADMIN_RULE, "") if cache else RULES
        with attached_with_engine(lab, tmp_path, rules, "--xdp-mode", "generic", *(["--name-cache"] if cache else [])):
            before = kernel_counters(lab)
            through = run_all(lab)
            after = kernel_counters(lab)
            st = engine_stats(lab, until=lambda st: st["follow"]["http_requests"] >= (3 if cache else 8))
    table, wrong = [], []
    for name in SEQUENCES:
        if cache and name == "admin after keep-alive":
            continue
        want, got = direct[name], through[name]
        if "blocked" in want or "admin" in want:
            # nothing blocked served, and every response to the sends before the one that holds
            # the first blocked request (a send holding it may be refused whole)
            ok = got[:SERVED_BEFORE[name]] == want[:SERVED_BEFORE[name]] and not {"blocked", "admin"} & set(got)
        else:
            ok = got == want
        table.append(f"{name:34} nginx={want} hybrid={got} {'ok' if ok else 'WRONG'}")
        if not ok:
            wrong.append(name)
    print("\n".join(table))
    print("engine follow:", st["follow"], "doubts:", st["doubts"])
    # The oracle served the blocked requests when nothing stood between.
    assert direct["keep-alive then blocked"] == ["allowed", "allowed", "blocked"]
    assert direct["chunked body then blocked"] == ["allowed", "blocked"]
    assert not wrong, "\n".join(table)
    # The bodies stayed in the kernel: far fewer packets queued than the 100 KiB bodies' segments.
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("flagged", "reason_follow", "bypassed", "cache_passed")}
    print("kernel:", delta)
    assert delta["bypassed"] > delta["flagged"]
    if cache:       # known allowed names at boundaries decided in the kernel
        assert delta["cache_passed"] >= 3, delta
    else:
        assert delta["reason_follow"] >= 8, delta
    assert st["errors"] == 0


DNS_CLIENT = r"""
import json, socket, struct, sys
server, names = sys.argv[1], sys.argv[2].split(",")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.5)
out = []
for i, name in enumerate(names):
    q = struct.pack(">HHHHHH", 0x1000 + i, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s.sendto(q, (server, 53))
    try:
        r = s.recv(4096)
        out.append("answered" if r[:2] == q[:2] else "other")
    except socket.timeout:
        out.append("TIMEOUT")
print(json.dumps(out))
"""


def test_every_dns_query_on_one_socket_and_one_connection_is_decided(lab, tmp_path):
    records = {"a.example": "198.18.0.10", "b.example": "198.18.0.11", "x.ads.example": "198.18.0.12"}
    names = "a.example,b.example,x.ads.example,a.example"
    with Dns(lab, records=records), attached_with_engine(lab, tmp_path, RULES, "--xdp-mode", "generic"):
        out = lab.run("client", [sys.executable, "-c", DNS_CLIENT, lab.info.server.ipv4, names], timeout=30)
        assert json.loads(out.stdout) == ["answered", "answered", "TIMEOUT", "answered"]
        # dig +keepopen: the queries on one TCP connection (a dropped message stalls the stream
        # behind it, so the blocked name comes last)
        tcp = lab.run("client", ["dig", "+tcp", "+keepopen", "+short", "+tries=1", "+time=2",
                                 f"@{lab.info.server.ipv4}", "a.example", "b.example", "x.ads.example"],
                      timeout=30, check=False)
        answers = tcp.stdout.split()
        assert "198.18.0.10" in answers and "198.18.0.11" in answers and "198.18.0.12" not in answers, tcp.stdout
        st = engine_stats(lab, until=lambda st: st["follow"]["dns_messages"] >= 2)
    assert st["rules"]["block-dns"] >= 2 and st["errors"] == 0


def test_a_resolver_on_a_configured_dns_port(lab, tmp_path):
    """dns_ports = [5353]: a resolver there has every query of a reused socket decided too."""
    rules = """
dns_ports = [5353]
default = "accept"
default_flow = "bypass"

[[rule]]
name = "block-dns"
dns_qname = ".ads.example"
action = "drop"
"""
    records = {"a.example": "198.18.0.10", "x.ads.example": "198.18.0.12"}
    client = DNS_CLIENT.replace("(server, 53)", "(server, 5353)")
    with Dns(lab, records=records, port=5353), attached_with_engine(lab, tmp_path, rules, "--xdp-mode", "generic"):
        out = lab.run("client", [sys.executable, "-c", client, lab.info.server.ipv4,
                                 "a.example,x.ads.example,a.example"], timeout=30)
        assert json.loads(out.stdout) == ["answered", "TIMEOUT", "answered"]
        st = engine_stats(lab, until=lambda st: st["rules"].get("block-dns"))
    assert st["rules"]["block-dns"] >= 1 and st["errors"] == 0
