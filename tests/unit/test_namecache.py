"""Which decisions the kernel may make from a name alone (hybrid.engine.namecache): worked out
from the rules, and proved against the engine's own RuleSet.decide over random rule sets and
random packets, the key taken from the engine's own parse of each packet."""

import random

import pytest
from namegen import (
    HEAD,
    NAMES,
    PORTS,
    SERVER,
    SOURCES,
    dns_query,
    hellos,
    random_ruleset,
    rule,
)

from hybrid.engine.namecache import NameKey, cached_decision
from hybrid.engine.packet import decode
from hybrid.engine.rules import _canon_host, load_rules
from hybrid.lab import craft

pytestmark = pytest.mark.unit


def ruleset(tmp_path, text: str, name: str = "r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return load_rules(str(path))


@pytest.mark.parametrize("rules, key, want", [
    # a Host rule decides its names; other names fall to the default
    (rule("h", proto="tcp", http_host=".blocked.example"), NameKey("host", "x.blocked.example", 6, 80), "h"),
    (rule("h", proto="tcp", http_host=".blocked.example"), NameKey("host", "www.example", 6, 80), "default"),
    # "wait for payload" (payload_len 0) never matches a packet that carries a name
    (rule("w", "accept", "none", proto="tcp", payload_len="0") + rule("h", proto="tcp", http_host=".blocked.example"),
     NameKey("host", "x.blocked.example", 6, 80), "h"),
    (rule("w", "accept", "none", proto="tcp", payload_len="0-10"), NameKey("host", "a.example", 6, 80), None),
    # a reject is sent from userspace: not cacheable
    (rule("h", "reject", proto="tcp", http_host=".blocked.example"), NameKey("host", "x.blocked.example", 6, 80),
     None),
    # a rule on something the key does not hold, before: the key does not decide
    (rule("p", proto="tcp", http_path="/admin"), NameKey("host", "www.example", 6, 80), None),
    (rule("s", src="198.18.9.0/24"), NameKey("sni", "a.example", 6, 443), None),
    (rule("sp", proto="udp", sport=53), NameKey("dns", "a.example", 17, 53), None),
    # ... unless a key it does hold rules the rule out first
    (rule("p", proto="tcp", dport=8080, http_path="/admin"), NameKey("host", "www.example", 6, 80), "default"),
    (rule("u", proto="udp", payload_contains="x"), NameKey("sni", "a.example", 6, 443), "default"),
    (rule("h", proto="tcp", http_host="a.example"), NameKey("sni", "a.example", 6, 443), "default"),
    # a DNS name rule on TCP may read an HTTP payload to port 53 as DNS: open for "host"
    (rule("d", proto="tcp", dns_qname="a.example"), NameKey("host", "a.example", 6, 80), None),
    (rule("d", proto="udp", dport=53, dns_qname=".ads.example"), NameKey("dns", "x.ads.example", 17, 53), "d"),
    # port = either port: a destination match decides, a miss leaves the source port open
    (rule("pt", "accept", "bypass", proto="tcp", port=443), NameKey("sni", "a.example", 6, 443), "pt"),
    (rule("pt", "accept", "bypass", proto="tcp", port=443), NameKey("sni", "a.example", 6, 8443), None),
])
def test_what_the_key_alone_decides(tmp_path, rules, key, want):
    rs = ruleset(tmp_path, HEAD + rules)
    got = cached_decision(rs, key)
    if want is None:
        assert got is None
    else:
        assert got is not None and (got.rule or "default") == want


def test_a_default_the_kernel_cannot_apply_is_not_cached(tmp_path):
    rs = ruleset(tmp_path, 'default = "drop"\n')
    assert cached_decision(rs, NameKey("host", "a.example", 6, 80)).action == "drop"
    with pytest.raises(ValueError):
        cached_decision(rs, NameKey("quic", "a.example", 17, 443))


# -- the differential test ------------------------------------------------------------------------

def random_packet(r: random.Random, tls: dict[str, bytes]) -> bytes:
    src, sport, dport = r.choice(SOURCES), r.choice([40000, 53, 41000]), r.choice(PORTS)
    kind = r.choice(["host", "sni", "dns", "dns-tcp"])
    name = r.choice(NAMES)
    if kind == "host":
        host = r.choice([name, name.upper(), name + ".", name + ":8080"])
        method, path = r.choice(["GET", "POST"]), r.choice(["/", "/admin", "/x"])
        extra = r.choice(["", "X-Note: evil\r\n"])
        payload = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
    elif kind == "sni":
        payload = tls[r.choice([name, "A.Example"])]
    else:
        payload = dns_query(r.choice([name, name.upper()]))
        if kind == "dns":
            return craft.ipv4(src, SERVER, 17, craft.udp(src, SERVER, sport, dport, payload))
        payload = len(payload).to_bytes(2, "big") + payload
    return craft.ipv4(src, SERVER, 6, craft.tcp(src, SERVER, sport, dport, 1000, 1, 0x18, payload))


def engine_key(pkt) -> NameKey | None:
    """The key the kernel would build for this packet: the name the engine reads, where it
    reads exactly one."""
    if pkt.proto == 6 and pkt.http is not None:
        h = pkt.http
        if h.doubt is None and not getattr(h, "hosts", None) and h.host:
            return NameKey("host", _canon_host(h.host), 6, pkt.dport)
        return None
    if pkt.proto == 6 and pkt.tls_sni is not None:
        return NameKey("sni", pkt.tls_sni.lower().rstrip("."), 6, pkt.dport)
    if pkt.dns_qname is not None and pkt.dns_is_response is False and pkt.dns_unparsed is None:
        return NameKey("dns", pkt.dns_qname, pkt.proto, pkt.dport)
    return None


def test_a_cached_decision_is_always_the_engines(tmp_path):
    """200 random rule sets x 700 random packets: whenever the key alone decides, the engine's
    decision for the packet is that decision. 0 mismatches, and enough cacheable cases that the
    test means something."""
    r = random.Random(13)
    tls = hellos()
    cases = cacheable = 0
    for n in range(200):
        text = random_ruleset(r)
        rs = ruleset(tmp_path, text, f"r{n}.toml")
        memo: dict[NameKey, object] = {}
        for _ in range(700):
            pkt = decode(random_packet(r, tls))
            key = engine_key(pkt)
            if key is None:
                continue
            cases += 1
            if key not in memo:
                memo[key] = cached_decision(rs, key)
            want = memo[key]
            if want is not None:
                cacheable += 1
                assert rs.decide(pkt) == want, (text, key, pkt)
    assert cases >= 100_000 and cacheable >= cases // 5, (cases, cacheable)
