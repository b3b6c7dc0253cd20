"""hybrid/packet.py: decode() against packets built by scapy, the HTTP/TLS/DNS views, and
truncation at every byte never raising."""

from __future__ import annotations

import ipaddress
import ssl

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.packet import Raw

from hybrid.engine.packet import HttpRequest, Packet, decode

pytestmark = pytest.mark.unit

V4 = dict(src="198.18.0.1", dst="198.19.0.2")
V6 = dict(src="2001:2::1", dst="2001:2:0:1::2")
LAZY = ("src", "dst", "src_int", "dst_int", "payload", "http", "tls_sni", "dns_qname",
        "dns_is_response")
FIELDS = ("raw", "version", "proto", "src_bytes", "dst_bytes", "sport", "dport", "tcp_flags",
          "tcp_seq", "tcp_ack", "icmp_type", "icmp_code", "ip_hlen", "l4_off", "payload_off",
          "payload_len", "fragment", "error", "indev")


def touch_all(p: Packet) -> None:
    for name in FIELDS + LAZY:
        getattr(p, name)
    p.flow_tuple()
    p.flow_key()
    repr(p)


def client_hello(server_hostname: str | None) -> bytes:
    """A real ClientHello from Python's own TLS stack, through memory BIOs (no network)."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    out = ssl.MemoryBIO()
    conn = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return out.read()


# -- layers and fields ------------------------------------------------------------------------

def test_tcp_v4_with_ip_and_tcp_options():
    pkt = (IP(options=[IPOption_RR()], **V4) /
           TCP(sport=40000, dport=443, flags="SA", seq=0xFFFFFFF0, ack=7,
               options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]) / b"abc")
    pkt = IP(bytes(pkt))                               # scapy fills ihl/dataofs
    p = decode(bytes(pkt))
    assert p.error is None
    assert (p.version, p.proto, p.sport, p.dport) == (4, 6, 40000, 443)
    assert p.src == ipaddress.ip_address(V4["src"]) and p.dst == ipaddress.ip_address(V4["dst"])
    assert p.src_bytes == ipaddress.ip_address(V4["src"]).packed and len(p.dst_bytes) == 4
    assert p.src_int == int(ipaddress.ip_address(V4["src"]))
    assert p.dst_int == int(ipaddress.ip_address(V4["dst"]))
    assert p.tcp_flags == int(pkt[TCP].flags) == 0x12
    assert (p.tcp_seq, p.tcp_ack) == (0xFFFFFFF0, 7)
    assert (p.icmp_type, p.icmp_code) == (-1, -1)
    assert p.ip_hlen == p.l4_off == pkt.ihl * 4 > 20
    assert p.payload_off == p.l4_off + pkt[TCP].dataofs * 4
    assert (p.payload, p.payload_len, p.fragment) == (b"abc", 3, False)
    assert p.flow_tuple() == (p.src, p.dst, 40000, 443, 6)
    assert p.indev is None


def test_udp_v4_and_padding_after_ip_length_is_not_payload():
    raw = bytes(IP(**V4) / UDP(sport=5000, dport=6000) / b"data") + b"\0" * 6
    p = decode(raw)
    assert (p.error, p.proto, p.sport, p.dport, p.payload) == (None, 17, 5000, 6000, b"data")
    assert p.tcp_flags == 0 and p.http is None and p.tls_sni is None and p.dns_qname is None


def test_icmp_v4_echo_keyed_by_identifier():
    p = decode(bytes(IP(**V4) / ICMP(type=8, code=0, id=0x1234, seq=3) / b"ping"))
    assert (p.proto, p.icmp_type, p.icmp_code, p.sport, p.dport) == (1, 8, 0, 0, 0)
    assert p.payload == b"ping" and p.payload_off == p.l4_off + 8
    assert p.flow_tuple()[2:] == (0x1234, 0x1234, 1)


def test_icmp_v4_error_has_no_ports():
    p = decode(bytes(IP(**V4) / ICMP(type=3, code=13) / IP(**V4) / UDP()))
    assert (p.icmp_type, p.icmp_code, p.flow_tuple()[2:4]) == (3, 13, (0, 0))


@pytest.mark.parametrize("ext", [
    IPv6ExtHdrHopByHop(),
    IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["2001:2::9"]) / IPv6ExtHdrDestOpt(),
    IPv6ExtHdrFragment(m=1, offset=0, id=5),
    AH(nh=60, payloadlen=4, spi=1, icv=b"\0" * 12) / IPv6ExtHdrDestOpt(),
], ids=["hop", "hop-rt-dst", "first-fragment", "ah-dst"])
@pytest.mark.parametrize("l4,proto,ports", [
    (TCP(sport=1, dport=80, flags="S"), 6, (1, 80)),
    (UDP(sport=2, dport=53), 17, (2, 53)),
])
def test_v6_walks_extension_headers(ext, l4, proto, ports):
    pkt = IPv6(**V6) / ext / l4 / b"xyz"
    raw = bytes(pkt)
    p = decode(raw)
    assert p.error is None, p.error
    assert (p.version, p.proto, (p.sport, p.dport)) == (6, proto, ports)
    assert p.l4_off == p.ip_hlen == len(raw) - len(bytes(pkt[l4.__class__]))
    assert p.payload == b"xyz"
    assert p.fragment == (IPv6ExtHdrFragment in pkt)
    assert p.src == ipaddress.ip_address(V6["src"]) and len(p.src_bytes) == 16
    assert p.dst_int == int(ipaddress.ip_address(V6["dst"]))


def test_icmpv6_echo_and_error():
    p = decode(bytes(IPv6(**V6) / ICMPv6EchoRequest(id=9, seq=1, data=b"hi")))
    assert (p.proto, p.icmp_type, p.icmp_code, p.payload) == (58, 128, 0, b"hi")
    assert p.flow_tuple()[2:] == (9, 9, 58)
    p = decode(bytes(IPv6(**V6) / ICMPv6DestUnreach(code=4) / IPv6(**V6) / UDP()))
    assert (p.icmp_type, p.icmp_code, p.flow_tuple()[2:4]) == (1, 4, (0, 0))


def test_icmp_only_over_its_own_ip_version():
    """Like the BPF classifier: protocol 1 in IPv6 and 58 in IPv4 are not ICMP."""
    assert decode(bytes(IPv6(**V6, nh=1) / ICMP())).icmp_type == -1
    assert decode(bytes(IP(**V4, proto=58) / ICMPv6EchoRequest())).icmp_type == -1


def test_fragments():
    first = decode(bytes(IP(**V4, flags="MF", frag=0) / UDP(sport=1, dport=2) / (b"a" * 16)))
    assert first.fragment and (first.sport, first.dport) == (1, 2)
    later = decode(bytes(IP(**V4, frag=3, proto=17) / (b"b" * 16)))
    assert later.fragment and (later.sport, later.dport, later.proto) == (0, 0, 17)
    assert later.payload == b"b" * 16 and later.error is None and later.http is None
    later6 = decode(bytes(IPv6(**V6) / IPv6ExtHdrFragment(offset=2, nh=6) / (b"c" * 16)))
    assert later6.fragment and (later6.sport, later6.proto, later6.payload) == (0, 6, b"c" * 16)


def test_unknown_transport_and_no_next_header():
    p = decode(bytes(IP(**V4, proto=47) / b"gre!"))
    assert (p.proto, p.sport, p.payload, p.error) == (47, 0, b"gre!", None)
    p = decode(bytes(IPv6(**V6, nh=59)))
    assert (p.proto, p.payload_len, p.error) == (59, 0, None)


@pytest.mark.parametrize("raw,reason", [
    (b"", "empty packet"),
    (b"\x45" + b"\0" * 10, "truncated IPv4 header"),
    (b"\x44" + b"\0" * 30, "bad IPv4 header length"),
    (b"\x60" + b"\0" * 20, "truncated IPv6 header"),
    (b"\x20" * 40, "not IPv4 or IPv6"),
])
def test_malformed_ip(raw, reason):
    p = decode(raw)
    assert (p.error, p.version, p.proto, p.src, p.payload) == (reason, 0, 0, None, b"")
    touch_all(p)


def test_malformed_transport_keeps_what_was_decoded():
    raw = bytearray(bytes(IP(**V4) / TCP(sport=7, dport=8)))
    raw[32] = 0x40                                     # data offset 16 bytes
    p = decode(bytes(raw))
    assert (p.error, p.version, p.sport, p.dport, p.payload_len) == ("bad TCP data offset", 4, 7, 8, 0)
    p = decode(bytes(IP(**V4) / TCP())[:-4])
    assert p.error == "bad IPv4 total length" or p.error == "truncated IPv4 packet"


def test_too_many_extension_headers():
    pkt = IPv6(**V6)
    for _ in range(9):
        pkt = pkt / IPv6ExtHdrDestOpt()
    p = decode(bytes(pkt / UDP()))
    assert p.error == "too many IPv6 extension headers" and p.sport == 0


# -- HTTP -------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload,expected", [
    (b"GET /index.html?q=1 HTTP/1.1\r\nUser-Agent: x\r\nHost: WWW.Example.COM\r\n\r\n",
     HttpRequest("GET", "www.example.com", "/index.html?q=1")),
    (b"POST /api HTTP/1.0\r\nhost:   example.org:8080  \r\nContent-Length: 3\r\n\r\nabc",
     HttpRequest("POST", "example.org", "/api")),
    (b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n", HttpRequest("GET", "2001:db8::1", "/")),
    (b"GET / HTTP/1.0\r\n\r\nHost: not-a-header\r\n", HttpRequest("GET", None, "/")),
    (b"GET /x HTTP/1.1\r\nAccept: */*\r\nHost: cut.example", HttpRequest("GET", "cut.example", "/x")),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
     HttpRequest("CONNECT", "example.com", "example.com:443")),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", None),
    (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", None),
    (b"GET / HTTP/1.1", None),
    (b"HTTP/1.1 200 OK\r\nHost: a\r\n\r\n", None),
    (b"\x16\x03\x01\x00\x05hello", None),
])
def test_http(payload, expected):
    p = decode(bytes(IP(**V4) / TCP(sport=5555, dport=80, flags="PA") / payload))
    assert p.http == expected
    assert p.http is p.http                            # cached


def test_http_only_on_tcp():
    assert decode(bytes(IP(**V4) / UDP() / b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")).http is None


# -- TLS SNI ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ip", [IP(**V4), IPv6(**V6)], ids=["v4", "v6"])
def test_sni_from_a_real_client_hello(ip):
    hello = client_hello("Example.COM")
    p = decode(bytes(ip / TCP(sport=40000, dport=443, flags="PA") / hello))
    assert p.tls_sni == "example.com"
    assert p.http is None and p.dns_qname is None


def test_sni_absent_without_server_name():
    hello = client_hello(None)
    assert decode(bytes(IP(**V4) / TCP(flags="PA") / hello)).tls_sni is None


def test_sni_survives_truncation_after_the_extension_only():
    hello = client_hello("sni.test")
    ext = hello.find(b"sni.test") + len(b"sni.test")
    for cut in range(len(hello) + 1):
        sni = decode(bytes(IP(**V4) / TCP(flags="PA") / hello[:cut])).tls_sni
        assert sni == ("sni.test" if cut >= ext else None), cut


def test_sni_from_scapy_tls_layer():
    from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName
    from scapy.layers.tls.handshake import TLSClientHello
    from scapy.layers.tls.record import TLS
    hello = TLS(msg=[TLSClientHello(ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=b"scapy.example")])])])
    assert decode(bytes(IP(**V4) / TCP(flags="PA") / bytes(hello))).tls_sni == "scapy.example"


# -- DNS --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ip", [IP(**V4), IPv6(**V6)], ids=["v4", "v6"])
def test_dns_over_udp(ip):
    q = decode(bytes(ip / UDP(sport=33333, dport=53) / DNS(id=1, rd=1, qd=DNSQR(qname="WWW.Example.com."))))
    assert (q.dns_qname, q.dns_is_response) == ("www.example.com", False)
    r = decode(bytes(ip / UDP(sport=53, dport=33333) / DNS(id=1, qr=1, qd=DNSQR(qname="a.b"))))
    assert (r.dns_qname, r.dns_is_response) == ("a.b", True)


def test_dns_over_tcp_with_length_prefix():
    msg = bytes(DNS(id=2, qd=DNSQR(qname="tcp.example", qtype="AAAA")))
    p = decode(bytes(IP(**V4) / TCP(sport=40000, dport=53, flags="PA") / (len(msg).to_bytes(2, "big") + msg)))
    assert (p.dns_qname, p.dns_is_response) == ("tcp.example", False)


def test_dns_refuses_pointers_and_odd_messages():
    header = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    pointer = decode(bytes(IP(**V4) / UDP(dport=53) / (header + b"\xc0\x0c\x00\x01\x00\x01")))
    assert (pointer.dns_qname, pointer.dns_is_response) == (None, False)
    loop = decode(bytes(IP(**V4) / UDP(dport=53) / (header + b"\x01a\xc0\x0c")))
    assert loop.dns_qname is None
    root = decode(bytes(IP(**V4) / UDP(dport=53) / (header + b"\x00\x00\x02\x00\x01")))
    assert root.dns_qname == ""
    no_question = decode(bytes(IP(**V4) / UDP(dport=53) / (header[:4] + b"\0" * 8)))
    assert (no_question.dns_qname, no_question.dns_is_response) == (None, False)
    not_port_53 = decode(bytes(IP(**V4) / UDP(sport=1000, dport=1053) / DNS(qd=DNSQR(qname="x"))))
    assert (not_port_53.dns_qname, not_port_53.dns_is_response) == (None, None)
    too_long = decode(bytes(IP(**V4) / UDP(dport=53) / (header + (b"\x3f" + b"a" * 63) * 5 + b"\0")))
    assert too_long.dns_qname is None


# -- robustness -------------------------------------------------------------------------------

SAMPLES = [
    IP(options=[IPOption_RR()], **V4) / TCP(flags="PA", options=[("MSS", 1400)]) /
    b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
    IPv6(**V6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(m=1) / UDP(dport=53) / DNS(qd=DNSQR(qname="q.example")),
    IP(**V4) / TCP(sport=1, dport=53, flags="PA") / b"\x00\x1d" / DNS(qd=DNSQR(qname="t.example")),
    IP(**V4) / ICMP() / (b"x" * 10),
    IPv6(**V6) / AH(nh=58, payloadlen=4, icv=b"\0" * 12) / ICMPv6EchoRequest(data=(b"y" * 10)),
    IPv6(**V6) / TCP(flags="PA") / Raw(client_hello("trunc.example")),
]


@pytest.mark.parametrize("pkt", SAMPLES, ids=lambda p: p.summary())
def test_truncation_at_every_byte_never_raises(pkt):
    raw = bytes(pkt)
    for cut in range(len(raw) + 1):
        p = decode(raw[:cut])
        touch_all(p)
        if cut < len(raw):
            assert p.error is not None, cut
    assert decode(raw).error is None


def test_slots_and_laziness():
    p = decode(bytes(IP(**V4) / TCP() / b"x"))
    assert not hasattr(p, "__dict__")
    with pytest.raises(AttributeError):
        p.unknown = 1                                  # type: ignore[attr-defined]
    assert p.src is p.src and p.payload is p.payload


def test_built_by_decode_only():
    with pytest.raises(TypeError):
        Packet(b"\x45")                                 # type: ignore[call-arg]


def test_flow_key_is_none_where_tc_builds_none():
    assert decode(b"").flow_key() is None
    assert decode(bytes(IP(**V4, flags="MF") / UDP(sport=1, dport=2) / (b"a" * 16))).flow_key() is None
    assert decode(bytes(IP(**V4) / TCP())[:30]).flow_key() is None          # truncated TCP header
    assert decode(bytes(IPv6(**V6, nh=1) / ICMP())).flow_key() is None      # ICMP over IPv6
    key, direction = decode(bytes(IP(**V4) / UDP(sport=1, dport=2))).flow_key()
    assert len(key) == 40 and direction == 0


def test_set_joined_reads_the_view_from_the_joined_bytes():
    head = b"GET /a HTTP/1.1\r\nHost: Joined.Example\r\n\r\n"
    p = decode(bytes(IP(**V4) / TCP(sport=1, dport=80, flags="PA") / head[-10:]))
    assert p.http is None
    p.set_joined(head, http=True)
    assert p.http == HttpRequest("GET", "joined.example", "/a")
    hello = client_hello("joined.example")
    p = decode(bytes(IP(**V4) / TCP(sport=1, dport=443, flags="PA") / hello[-10:]))
    p.set_joined(hello, http=False)
    assert p.tls_sni == "joined.example" and p.http is None


def test_ah_length_is_in_4_byte_units():
    """AH's length field counts 32-bit words minus 2 (RFC 4302), unlike other extension headers."""
    p = decode(bytes(IPv6(**V6) / AH(nh=58, payloadlen=4, icv=b"\0" * 12) / ICMPv6EchoRequest(id=4)))
    assert (p.error, p.proto, p.l4_off, p.icmp_type, p.flow_tuple()[2]) == (None, 58, 64, 128, 4)


def test_bytes_like_input_is_copied_to_bytes():
    raw = bytes(IP(**V4) / UDP(sport=1, dport=2) / b"x")
    for form in (bytearray(raw), memoryview(raw)):
        p = decode(form)
        assert type(p.raw) is bytes and p.src == ipaddress.ip_address(V4["src"]) and p.payload == b"x"


@pytest.mark.parametrize("data, missing", [
    (b"G", True), (b"GET", True), (b"GET /index", True), (b"GET / HTTP/1.1", True),
    (b"GET / HTTP/1.1\r\n", True), (b"GET / HTTP/1.1\r\nUser-Agent: x\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: a.exa", True),                 # the Host line cut: not yet
    (b"GET / HTTP/1.1\r\nHost: a.example\r\n", False),        # a whole Host line
    (b"GET / HTTP/1.1\r\nhOsT: a.example\r\n", False),
    (b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n", False),     # headers ended without a Host
    (b"EHLO mail.example\r\n", False), (b"get / HTTP/1.1", False), (b"SSH-2.0-x", False),
    (b"\x16\x03\x01", False), (b"", False), (b"G" * 17, False), (b"GET" + b"x" * 9000, False),
])
def test_http_head_missing(data, missing):
    from hybrid.engine.packet import http_head_missing
    assert http_head_missing(data) is missing
