"""HTTP evasions, with nginx as the oracle: every crafted request head is sent first with no
hybrid to record what nginx itself does with it (which virtual host answered, /admin or not, an
error, a reset), then through hybrid with rules that block the host ``x.blocked.example`` and
the path ``/admin``. Whatever nginx would have served from the blocked host or /admin must not
get through hybrid; what nginx serves from the allowed host must still be served.

The server's reading, not ours, decides what a variant is: a variant whose head nginx refuses
(400) is fine either way, as long as hybrid serves nothing blocked."""

from __future__ import annotations

import json
import os
import sys

import pytest
from gwlab import attached_with_engine, engine_stats
from leakcheck import new_lab_name

from hybrid.lab.demo import Nginx
from hybrid.lab.topology import Lab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["router", "bridge"])
def lab(request):
    """The same evasions through a routing gateway and through a transparent bridge (issue 16:
    attaching to a bridge's ports is bridge mode, queued through br_netfilter)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: run sudo ./scripts/test.sh")
    with Lab(new_lab_name(), kind=request.param) as lab:
        yield lab

A, B = "allowed.example", "x.blocked.example"

VARIANTS: list[tuple[str, bytes]] = [
    ("plain allowed", b"GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("plain blocked", b"GET / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n"),
    ("plain admin", b"GET /admin HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("leading CRLF", b"\r\nGET / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n"),
    ("leading LFs", b"\n\n\r\nGET / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n"),
    ("bare LF", b"GET / HTTP/1.1\nHost: x.blocked.example\n\n"),
    ("bare LF allowed", b"GET / HTTP/1.1\nHost: allowed.example\n\n"),
    ("two spaces after method", b"GET  / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n"),
    ("spaces around version", b"GET /   HTTP/1.1   \r\nHost: x.blocked.example\r\n\r\n"),
    ("tab after method", b"GET\t/ HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n"),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: x.blocked.example\r\n\r\n"),
    ("HTTP/1.10", b"GET / HTTP/1.10\r\nHost: x.blocked.example\r\n\r\n"),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: x.blocked.example\r\n\r\n"),
    ("absolute URI", b"GET http://x.blocked.example/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("absolute URI with port", b"GET http://x.blocked.example:80/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("absolute URI no path", b"GET http://x.blocked.example HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("absolute URI allowed", b"GET http://allowed.example/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("absolute URI reversed", b"GET http://allowed.example/ HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n"),
    ("userinfo", b"GET http://u@x.blocked.example/ HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("mixed case host", b"GET / HTTP/1.1\r\nHost: X.Blocked.EXAMPLE\r\n\r\n"),
    ("mixed case name", b"GET / HTTP/1.1\r\nhOsT: x.blocked.example\r\n\r\n"),
    ("trailing dot", b"GET / HTTP/1.1\r\nHost: x.blocked.example.\r\n\r\n"),
    ("host with port", b"GET / HTTP/1.1\r\nHost: x.blocked.example:80\r\n\r\n"),
    ("host with odd port", b"GET / HTTP/1.1\r\nHost: x.blocked.example:8080\r\n\r\n"),
    ("tabs around host", b"GET / HTTP/1.1\r\nHost:\tx.blocked.example\t\r\n\r\n"),
    ("no space after colon", b"GET / HTTP/1.1\r\nHost:x.blocked.example\r\n\r\n"),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : x.blocked.example\r\n\r\n"),
    ("duplicate host", b"GET / HTTP/1.1\r\nHost: allowed.example\r\nHost: x.blocked.example\r\n\r\n"),
    ("duplicate host allowed", b"GET / HTTP/1.1\r\nHost: allowed.example\r\nHost: allowed.example\r\n\r\n"),
    ("CRLFCRLF vs LFLF", b"GET / HTTP/1.1\r\nHost: x.blocked.example\n\n"),
    ("HTTP/1.0 host", b"GET / HTTP/1.0\r\nHost: x.blocked.example\r\n\r\n"),
    ("double slash admin", b"GET //admin HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("percent admin", b"GET /%61dmin HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("dot segment admin", b"GET /x/../admin HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("dot admin", b"GET /./admin HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("encoded dots admin", b"GET /x/%2e%2e/admin HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("encoded slash admin", b"GET /x%2f..%2fadmin HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("upper case admin", b"GET /ADMIN HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("admin in query", b"GET /?/admin HTTP/1.1\r\nHost: allowed.example\r\n\r\n"),
    ("pipelined admin", (b"GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n"
                         b"GET /admin HTTP/1.1\r\nHost: allowed.example\r\n\r\n")),
    ("pipelined blocked", (b"GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n"
                           b"GET / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n")),
    ("body then admin", (b"POST / HTTP/1.1\r\nHost: allowed.example\r\nContent-Length: 3\r\n\r\nabc"
                         b"GET /admin HTTP/1.1\r\nHost: allowed.example\r\n\r\n")),
    ("HTTP/0.9", b"GET /\r\n"),
]

# One connection per variant from the client namespace: send, half-close, read to the end.
CLIENT = r"""
import json, socket, sys
addr, variants = sys.argv[1], json.loads(sys.argv[2])
out = {}
for name, hexhead in variants:
    s = socket.create_connection((addr, 80), timeout=5)
    try:
        s.sendall(bytes.fromhex(hexhead))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        out[name] = data.decode("latin-1")
    except socket.timeout:
        out[name] = "TIMEOUT"
    except OSError:                     # reset (on the send, the half-close or the read)
        out[name] = "RESET"
    finally:
        s.close()
print(json.dumps(out))
"""

BLOCK = """
default = "accept"
default_flow = "bypass"
flow_ttl = 30

[[rule]]
name = "block-host"
proto = "tcp"
http_host = ".blocked.example"
action = "reject"
flow = "block"

[[rule]]
name = "block-admin"
proto = "tcp"
http_path = "/admin"
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


def served(response: str) -> set[str]:
    """What nginx served, read from the bodies: "blocked", "admin", "allowed" (several when it
    answered pipelined requests), or the first status code that was not 200."""
    seen = set()
    if "vhost blocked" in response:
        seen.add("blocked")
    if "admin of" in response:
        seen.add("admin")
    if "vhost allowed" in response:
        seen.add("allowed")
    if not seen:
        seen.add(response.split(" ", 2)[1] if response.startswith("HTTP/") else response or "EMPTY")
    return seen


def send_all(lab) -> dict[str, str]:
    arg = json.dumps([(n, h.hex()) for n, h in VARIANTS])
    out = lab.run("client", [sys.executable, "-c", CLIENT, lab.info.server.ipv4, arg], timeout=600)
    return json.loads(out.stdout)


def test_hybrid_decides_on_what_nginx_serves(lab, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    www.chmod(0o755)
    tmp_path.chmod(0o755)
    (www / "index.html").write_text("vhost allowed\n")
    (www / "admin").write_text("admin of allowed\n")
    extra = f"""  server {{ listen 80; listen [::]:80; server_name {B};
    default_type text/plain;
    location / {{ return 200 "vhost blocked\\n"; }}
    location /admin {{ return 200 "vhost blocked, admin of blocked\\n"; }} }}
  server {{ listen 80; listen [::]:80; server_name {A};
    root {www}; default_type text/plain; }}
"""
    with Nginx(lab, root=str(www), extra_servers=extra):
        direct = send_all(lab)                     # nginx's own reading, no hybrid
        with attached_with_engine(lab, tmp_path, BLOCK, "--xdp-mode", "generic"):
            through = send_all(lab)
            # The counters are published every 0.5 s: wait for the ones asserted below.
            st = engine_stats(lab, until=lambda st: st["doubts"].get("http:host_conflict")
                              and st["doubts"].get("http:duplicate_host")
                              and st["rules"].get("block-host", 0) >= 10 and st["rules"].get("block-admin", 0) >= 5)
    table = []
    wrong = []
    for name, _ in VARIANTS:
        want, got = served(direct[name]), served(through[name])
        forbidden = want & {"blocked", "admin"}
        if forbidden:
            ok = not (got & {"blocked", "admin"})  # hybrid must not let nginx serve it
        elif "allowed" in want:
            ok = got == want                       # allowed requests still served
        else:
            ok = not (got & {"blocked", "admin"})  # nginx refused it: nothing blocked may come back
        table.append(f"{name:28} nginx={sorted(want)} hybrid={sorted(got)} {'ok' if ok else 'WRONG'}")
        if not ok:
            wrong.append(name)
    print("\n".join(table))
    print("engine doubts:", st.get("doubts"), "rules:", st.get("rules"))
    # The oracle must have seen the evasions work at all: nginx served the blocked host or /admin.
    assert served(direct["absolute URI"]) == {"blocked"} and served(direct["percent admin"]) == {"admin"}
    assert served(direct["plain allowed"]) == {"allowed"}
    assert not wrong, "\n".join(table)
    # Ambiguous heads that no rule blocked were not bypassed, and counted by reason.
    assert st["doubts"]["http:host_conflict"] >= 1 and st["doubts"]["http:duplicate_host"] >= 1
    assert st["rules"]["block-host"] >= 10 and st["rules"]["block-admin"] >= 5 and st["errors"] == 0
