"""The HTTP request head as the server (RFC 9112, nginx 1.22) reads it: the evasions of the
"decide on what the server will see" issue, path normalisation, and the heads the engine must
not bypass. The lab test tests/integration/test_evasion_http.py checks the same variants
against a real nginx."""

from __future__ import annotations

import pytest

from hybrid.engine.packet import (
    HttpRequest,
    _parse_http,
    http_head_missing,
    http_unparsed,
    normalize_http_path,
)
from hybrid.engine.rules import compile_rules

pytestmark = pytest.mark.unit

B = "x.blocked.example"


@pytest.mark.parametrize("head, host, path", [
    (b"GET / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n", B, "/"),
    (b"\r\nGET / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n", B, "/"),          # leading empty line
    (b"\n\r\n\nGET / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n", B, "/"),
    (b"GET / HTTP/1.1\nHost: x.blocked.example\n\n", B, "/"),                     # bare LF
    (b"GET  / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n", B, "/"),              # two spaces
    (b"GET /   HTTP/1.1  \r\nHost: x.blocked.example\r\n\r\n", B, "/"),
    (b"GET / HTTP/1.2\r\nHost: x.blocked.example\r\n\r\n", B, "/"),               # any 1.x
    (b"GET / HTTP/1.10\r\nHost: x.blocked.example\r\n\r\n", B, "/"),
    (b"GET http://x.blocked.example/ HTTP/1.1\r\n\r\n", B, "/"),                      # absolute form
    (b"GET http://X.Blocked.Example:8080/a HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n", B, "/a"),
    (b"GET HTTP://x.blocked.example HTTP/1.1\r\n\r\n", B, "/"),
    (b"GET / HTTP/1.1\r\nHost: X.BLOCKED.Example.\r\n\r\n", B, "/"),             # case, trailing dot
    (b"GET / HTTP/1.1\r\nHost: x.blocked.example:8080\r\n\r\n", B, "/"),          # port
    (b"GET / HTTP/1.1\r\nHost:\tx.blocked.example\t\r\n\r\n", B, "/"),            # tabs
    (b"GET / HTTP/1.1\r\nhost:x.blocked.example\r\n\r\n", B, "/"),
    (b"GET / HTTP/1.1\r\nHost : x.blocked.example\r\n\r\n", None, "/"),           # nginx ignores it
    (b"GET / HTTP/1.1\r\n Host: x.blocked.example\r\n\r\n", None, "/"),           # a folded line too
    (b"GET /\r\n", None, "/"),                                                     # HTTP/0.9
])
def test_host_as_the_server_reads_it(head, host, path):
    r = _parse_http(head)
    assert r is not None and (r.host, r.path, r.doubt) == (host, path, None)
    assert http_unparsed(head) is None


@pytest.mark.parametrize("head, doubt, hosts", [
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: x.blocked.example\r\n\r\n", "duplicate_host",
     ("a.example", B)),
    (b"GET / HTTP/1.1\nHost: a.example\nhost: a.example\n\n", "duplicate_host", ("a.example",)),
    (b"GET http://a.example/ HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n", "host_conflict", ("a.example",)),
    (b"GET http://u@x.blocked.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", "userinfo",
     ("u@x.blocked.example", B, "a.example")),
])
def test_ambiguous_heads_carry_every_candidate(head, doubt, hosts):
    r = _parse_http(head)
    assert r.doubt == doubt and r.hosts == hosts


@pytest.mark.parametrize("head, why", [
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "bad_version"),
    (b"GET / HTTP/1.100\r\nHost: a\r\n\r\n", "bad_version"),
    (b"GET / http/1.1\r\nHost: a\r\n\r\n", "bad_version"),
    (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", "bad_target"),
    (b"POST /\r\n", "bad_request_line"),
    (b"GET / HTTP/1.1", "incomplete"),
    (b"\r\n", "incomplete"),
    (b"GE", "incomplete"),
    (b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n", "bad_path"),
    (b"GET /../x HTTP/1.1\r\nHost: a\r\n\r\n", "bad_path"),
    (b"GET /" + b"a" * 9000, "line_too_long"),
])
def test_maybe_a_request_but_unparsed(head, why):
    assert _parse_http(head) is None and http_unparsed(head) == why


@pytest.mark.parametrize("data", [b"", b"\x16\x03\x01\x00\x05hello", b"HTTP/1.1 200 OK\r\n\r\n",
                                  b"get / HTTP/1.1\r\n", b"GET\t/ HTTP/1.1\r\n", b"SSH-2.0-x\r\n", b"220 mail ESMTP\r\n",
                                  b"A" * 100])
def test_not_a_request(data):
    assert http_unparsed(data) is None


@pytest.mark.parametrize("target, path", [
    ("/admin", "/admin"), ("//admin", "/admin"), ("/%61dmin", "/admin"), ("/x/../admin", "/admin"),
    ("/./admin", "/admin"), ("/x/%2e%2e/admin", "/admin"), ("/x%2F..%2Fadmin", "/admin"),
    ("/a//b///c", "/a/b/c"), ("/admin/.", "/admin/"), ("/admin/x/..", "/admin/"), ("/a/..", "/"),
    ("/Admin", "/Admin"),                                            # case kept: nginx on Linux
    ("/admin?x=/../y", "/admin?x=/../y"),                             # the query as sent
    ("/%25", "/%"), ("/a%20b", "/a b"),
])
def test_path_normalised_like_nginx(target, path):
    r = _parse_http(b"GET " + target.encode() + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert r.path == path and normalize_http_path(target) == path


@pytest.mark.parametrize("data, missing", [
    (b"\r\n", True), (b"\r\nGE", True), (b"\nGET / HTTP/1.1\n", True), (b"GET / HTTP/1.1\nA: b\n", True),
    (b"GET / HTTP/1.1\nHost: a\n", False), (b"GET / HTTP/1.1\nA: b\n\n", False),
    (b"\r\nGET / HTTP/1.1\r\nA: b\r\n\r\n", False), (b"_X", True),
])
def test_head_missing_reads_like_the_server(data, missing):
    assert http_head_missing(data) is missing


RULES = """
default = "accept"
default_flow = "bypass"
[[rule]]
name = "host"
proto = "tcp"
http_host = ".blocked.example"
action = "reject"
flow = "block"
[[rule]]
name = "admin"
proto = "tcp"
http_path = ["/admin", "/%73ecret"]
action = "reject"
flow = "block"
"""


class _Pkt:
    proto, payload_len = 6, 1

    def __init__(self, head):
        self.http = _parse_http(head)


@pytest.mark.parametrize("head, rule", [
    (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: x.blocked.example.:80\r\n\r\n", "host"),
    (b"GET http://x.blocked.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", "host"),
    (b"GET http://a.example/ HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n", None),     # nginx: a.example
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: x.blocked.example\r\n\r\n", "host"),
    (b"GET //admin HTTP/1.1\r\nHost: a.example\r\n\r\n", "admin"),
    (b"GET /%61dmin HTTP/1.1\r\nHost: a.example\r\n\r\n", "admin"),
    (b"GET /x/../admin HTTP/1.1\r\nHost: a.example\r\n\r\n", "admin"),
    (b"GET /secret HTTP/1.1\r\nHost: a.example\r\n\r\n", "admin"),                    # rule normalised too
    (b"GET /Admin HTTP/1.1\r\nHost: a.example\r\n\r\n", None),                         # case-sensitive
])
def test_rules_see_the_server_reading(head, rule):
    rs = compile_rules(RULES)
    assert rs.decide(_Pkt(head)).rule == rule


def test_plain_request_unchanged_shape():
    assert _parse_http(b"GET /i HTTP/1.1\r\nHost: WWW.Example.COM\r\n\r\n") == HttpRequest("GET", "www.example.com", "/i")


@pytest.mark.parametrize("head, rule", [
    (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\nGET /admin HTTP/1.1\r\nHost: a.example\r\n\r\n", "admin"),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\nGET / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n", "host"),
    ((b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nabcde"
      b"GET /admin HTTP/1.1\r\nHost: a.example\r\n\r\n"), "admin"),
    (b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nabcde", None),
])
def test_pipelined_requests_all_seen(head, rule):
    r = _parse_http(head)
    assert compile_rules(RULES).decide(_Pkt(head)).rule == rule
    assert (r.doubt is not None) == (rule is not None)
