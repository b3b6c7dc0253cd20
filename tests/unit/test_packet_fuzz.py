"""Property tests: decode() and every lazy field never raise, on arbitrary bytes and on valid
packets with bytes flipped, inserted, deleted or cut; the rewrites raise only HybridError."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)

from hybrid.engine.packet import Packet, decode
from hybrid.engine.rewrite import (
    fill_payload,
    icmp_unreachable_for,
    replace_bytes,
    set_payload,
    tcp_rst_for,
)
from hybrid.errors import HybridError

pytestmark = pytest.mark.unit

FAST = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LAZY = ("src", "dst", "src_int", "dst_int", "payload", "http", "tls_sni", "dns_qname",
        "dns_is_response")
V4 = dict(src="198.18.0.1", dst="198.19.0.2")
V6 = dict(src="2001:2::1", dst="2001:2:0:1::2")


def _client_hello() -> bytes:
    out = ssl.MemoryBIO()
    conn = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname="fuzz.example")
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def _dns_tcp(name: str) -> bytes:
    msg = bytes(DNS(qd=DNSQR(qname=name)))
    return len(msg).to_bytes(2, "big") + msg


SEEDS = [bytes(p) for p in (
    IP(options=[IPOption_RR()], **V4) / TCP(sport=1, dport=80, flags="PA", options=[("MSS", 1)]) /
    b"GET /p HTTP/1.1\r\nHost: h.example:81\r\n\r\n",
    IP(**V4) / TCP(sport=1, dport=443, flags="PA") / _client_hello(),
    IPv6(**V6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["2001:2::9"]) /
    TCP(sport=1, dport=443, flags="PA") / _client_hello(),
    IP(**V4) / UDP(sport=9, dport=53) / DNS(qd=DNSQR(qname="a.fuzz.example")),
    IPv6(**V6) / IPv6ExtHdrDestOpt() / UDP(sport=53, dport=9) / DNS(qr=1, qd=DNSQR(qname="b.example")),
    IPv6(**V6) / TCP(sport=1, dport=53, flags="PA") / _dns_tcp("c.example"),
    IP(**V4, flags="MF") / ICMP(id=3) / (b"i" * 20),
    IPv6(**V6) / IPv6ExtHdrFragment(m=1) / ICMPv6EchoRequest(data=b"j" * 20),
)]


def touch_all(p: Packet) -> None:
    assert isinstance(p, Packet)
    for name in LAZY:
        getattr(p, name)
    p.flow_tuple()
    repr(p)
    assert p.error is None or isinstance(p.error, str)
    assert p.version in (0, 4, 6)
    assert 0 <= p.payload_len == len(p.payload)


def try_rewrites(p: Packet) -> None:
    for fn in (lambda: set_payload(p, b"xyz"), lambda: fill_payload(p, b"h", b"\n"),
               lambda: replace_bytes(p, b"a", b"bb"), lambda: tcp_rst_for(p),
               lambda: icmp_unreachable_for(p), lambda: icmp_unreachable_for(p, "port-unreachable")):
        try:
            out = fn()
        except HybridError:
            continue
        assert decode(out).error is None


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes(raw):
    touch_all(decode(raw))


@FAST
@given(st.binary(max_size=120).map(lambda b: b"\x45" + b), st.binary(max_size=120).map(lambda b: b"\x60" + b))
def test_arbitrary_bytes_behind_an_ip_version(v4, v6):
    touch_all(decode(v4))
    touch_all(decode(v6))


@st.composite
def mutated(draw):
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "cut")))
        if not raw:
            break
        i = draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            raw[i] = draw(st.sampled_from((0, 1, 0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFF)))
        elif op == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[i:i + draw(st.integers(1, 8))]
        else:
            del raw[i:]
    return bytes(raw)


@FAST
@given(mutated())
def test_mutated_valid_packets(raw):
    p = decode(raw)
    touch_all(p)
    try_rewrites(p)


def test_seeds_are_valid_and_rewritable():
    for raw in SEEDS:
        p = decode(raw)
        assert p.error is None
        touch_all(p)
    assert decode(SEEDS[1]).tls_sni == decode(SEEDS[2]).tls_sni == "fuzz.example"
    assert decode(SEEDS[5]).dns_qname == "c.example"
