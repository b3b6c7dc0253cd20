"""hybrid/rewrite.py: every rewrite's lengths and checksums against scapy as the independent
implementation (parse the output, delete every length and checksum, let scapy rebuild them,
compare byte for byte), over IPv4 and IPv6, TCP, UDP, ICMP and ICMPv6."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import (
    ICMP,
    IP,
    TCP,
    UDP,
    IPerror,
    IPOption_RR,
    TCPerror,
    UDPerror,
)
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
from scapy.utils import checksum as scapy_checksum

from hybrid.engine.packet import decode
from hybrid.engine.rewrite import (
    ICMP6_PORT_UNREACHABLE,
    ICMP_HOST_PROHIBITED,
    checksum,
    fill_payload,
    icmp_unreachable_for,
    replace_bytes,
    set_payload,
    tcp_rst_for,
    tcp_rst_onward,
)
from hybrid.errors import HybridError

pytestmark = pytest.mark.unit

V4 = dict(src="198.18.0.1", dst="198.19.0.2")
V6 = dict(src="2001:2::1", dst="2001:2:0:1::2")
LEN_FIELDS = ("len", "plen", "chksum", "cksum")


def scapy_rebuilt(raw: bytes) -> bytes:
    """raw with every length and checksum recomputed by scapy."""
    pkt = (IP if raw[0] >> 4 == 4 else IPv6)(raw)
    layer = pkt
    while layer:
        for name in LEN_FIELDS:
            if name in layer.fields and "error" not in layer.__class__.__name__:
                delattr(layer, name)                   # quoted packets keep theirs
        layer = layer.payload if layer.payload.__class__.__name__ not in ("NoPayload", "Raw") else None
    return bytes(pkt)


def assert_checksums(raw: bytes) -> None:
    assert decode(raw).error is None
    assert raw == scapy_rebuilt(raw)


PAYLOAD = b"GET /secret HTTP/1.1\r\nHost: blocked.example\r\n\r\nsecret secret"

PACKETS = {
    "tcp4": IP(**V4) / TCP(sport=40000, dport=80, flags="PA", seq=1000, ack=2000) / PAYLOAD,
    "tcp4-options": IP(options=[IPOption_RR()], **V4) / TCP(sport=1, dport=2, flags="PA",
                                                            options=[("MSS", 1460)]) / PAYLOAD,
    "udp4": IP(**V4) / UDP(sport=5000, dport=53) / PAYLOAD,
    "icmp4": IP(**V4) / ICMP(type=8, id=7, seq=1) / PAYLOAD,
    "tcp6": IPv6(**V6) / TCP(sport=40000, dport=80, flags="PA", seq=1, ack=2) / PAYLOAD,
    "udp6-ext": IPv6(**V6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=2) / PAYLOAD,
    "icmp6": IPv6(**V6) / ICMPv6EchoRequest(id=3, seq=4, data=PAYLOAD),
    "tcp6-routing": IPv6(**V6) / IPv6ExtHdrRouting(addresses=["2001:2::77"], segleft=1) /
    TCP(sport=1, dport=2, flags="PA") / PAYLOAD,
}


def test_checksum_matches_scapy():
    rng = random.Random(1071)
    for n in list(range(0, 70)) + [1499, 1500, 65535]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert checksum(data) == scapy_checksum(data) & 0xFFFF or (checksum(data), scapy_checksum(data)) == (0xFFFF, 0), n
    assert checksum(b"\xff\xff") == 0 and checksum(b"") == 0xFFFF and checksum(b"\0\0") == 0xFFFF


def test_checksum_rfc1071_example():
    # RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to ddf2, checksum 220d.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


@pytest.mark.parametrize("name", PACKETS)
@pytest.mark.parametrize("new", [b"", b"x", b"short", b"hello world, much longer than before " * 20])
def test_set_payload(name, new):
    before = decode(bytes(PACKETS[name]))
    out = set_payload(before, new)
    assert_checksums(out)
    after = decode(out)
    assert after.payload == new
    assert (after.proto, after.sport, after.dport, after.src, after.dst) == \
        (before.proto, before.sport, before.dport, before.src, before.dst)


@pytest.mark.parametrize("name", PACKETS)
def test_replace_and_fill(name):
    p = decode(bytes(PACKETS[name]))
    out = replace_bytes(p, b"secret", b"public!")
    assert_checksums(out)
    assert decode(out).payload == PAYLOAD.replace(b"secret", b"public!")
    out = fill_payload(p, b"h", b"\n")
    assert_checksums(out)
    assert decode(out).payload == b"h" * (len(PAYLOAD) - 1) + b"\n"
    assert len(out) == len(bytes(PACKETS[name]))


def test_fill_payload_edges():
    p = decode(bytes(IP(**V4) / TCP(flags="PA") / b"ab"))
    assert decode(fill_payload(p, b"h")).payload == b"hh"
    assert decode(fill_payload(p, b"h", b"xyz")).payload == b"yz"
    empty = decode(bytes(IP(**V4) / TCP(flags="A")))
    assert decode(fill_payload(empty, b"h", b"\n")).payload == b""
    with pytest.raises(HybridError, match="one fill byte"):
        fill_payload(p, b"hh")
    with pytest.raises(HybridError, match="empty"):
        replace_bytes(p, b"", b"x")


def test_udp_zero_checksum_is_sent_as_ffff():
    # Adding the word ~S to a sum S makes it 0xFFFF, whose checksum is 0: RFC 768 sends 0xFFFF.
    p = decode(bytes(IP(**V4) / UDP(sport=1, dport=2) / b"\0\0"))
    base = IP(set_payload(p, b"\0\0"))[UDP].chksum
    out = set_payload(p, base.to_bytes(2, "big"))
    assert IP(out)[UDP].chksum == 0xFFFF
    assert_checksums(out)


@pytest.mark.parametrize("raw,reason", [
    (b"\x00garbage", "not an IPv4 or IPv6 packet"),
    (bytes(IP(**V4) / TCP())[:30], "did not decode"),
    (bytes(IP(**V4, frag=5, proto=6) / (b"z" * 8)), "fragment"),
    (bytes(IP(**V4, flags="MF") / UDP() / b"z"), "fragment"),
    (bytes(IPv6(**V6) / IPv6ExtHdrFragment(m=1) / UDP() / b"z"), "fragment"),
    (bytes(IP(**V4, proto=47) / b"gre"), "not TCP, UDP or ICMP"),
    (bytes(IPv6(**V6) / AH(nh=6, payloadlen=4, icv=b"\0" * 12) / TCP() / b"z"), "authentication header"),
])
def test_set_payload_refuses(raw, reason):
    with pytest.raises(HybridError, match=reason):
        set_payload(decode(raw), b"x")


def test_too_long_is_refused():
    p = decode(bytes(IP(**V4) / UDP() / b"x"))
    with pytest.raises(HybridError, match="65535"):
        set_payload(p, b"x" * 70000)


# -- TCP RST ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ip", [IP(**V4), IPv6(**V6)], ids=["v4", "v6"])
def test_rst_for_ack_segment(ip):
    p = decode(bytes(ip / TCP(sport=40000, dport=443, flags="PA", seq=100, ack=5000) / b"hello"))
    out = tcp_rst_for(p)
    assert_checksums(out)
    r = (IP if p.version == 4 else IPv6)(out)
    assert (r.src, r.dst) == (str(p.dst), str(p.src))
    t = r[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, str(t.flags)) == (443, 40000, 5000, 0, "R")
    assert len(t.payload) == 0


@pytest.mark.parametrize("ip", [IP(**V4), IPv6(**V6)], ids=["v4", "v6"])
@pytest.mark.parametrize("flags,data,ack", [("S", b"", 0xFFFFFFFF + 1), ("", b"abc", 0xFFFFFFFF + 3),
                                            ("F", b"ab", 0xFFFFFFFF + 3), ("SF", b"", 0xFFFFFFFF + 2)])
def test_rst_for_segment_without_ack(ip, flags, data, ack):
    p = decode(bytes(ip / TCP(sport=1, dport=2, flags=flags, seq=0xFFFFFFFF) / data))
    out = tcp_rst_for(p)
    assert_checksums(out)
    t = (IP if p.version == 4 else IPv6)(out)[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, str(t.flags)) == (2, 1, 0, ack & 0xFFFFFFFF, "RA")


def test_rst_refusals():
    with pytest.raises(HybridError, match="not TCP"):
        tcp_rst_for(decode(bytes(IP(**V4) / UDP())))
    with pytest.raises(HybridError, match="RST"):
        tcp_rst_for(decode(bytes(IP(**V4) / TCP(flags="RA"))))
    with pytest.raises(HybridError, match="fragment"):
        tcp_rst_for(decode(bytes(IP(**V4, flags="MF") / TCP())))


# -- TCP RST on to the receiver ("reject both") -------------------------------------------------

@pytest.mark.parametrize("ip", [IP(**V4), IPv6(**V6)], ids=["v4", "v6"])
@pytest.mark.parametrize("flags,data", [("PA", b"GET / HTTP/1.1\r\n\r\n"), ("A", b""), ("FA", b"x"),
                                        ("SA", b"")])
def test_rst_onward_resets_the_receiver_as_the_sender(ip, flags, data):
    """The packet's own addresses and ports, seq = its seq exactly (RFC 5961 3.2: the receiver
    resets only on RCV.NXT), RST+ACK with its ack (what SYN-SENT needs, harmless elsewhere), no
    payload, window 0."""
    p = decode(bytes(ip / TCP(sport=40000, dport=443, flags=flags, seq=0xFFFFFFF0, ack=5000,
                              window=502, options=[("MSS", 1460)]) / data))
    out = tcp_rst_onward(p)
    assert_checksums(out)
    r = (IP if p.version == 4 else IPv6)(out)
    assert (r.src, r.dst) == (str(p.src), str(p.dst))
    assert (r.ttl if p.version == 4 else r.hlim) == 64
    t = r[TCP]
    assert (t.sport, t.dport, t.seq, t.ack, str(t.flags), t.window, t.dataofs) == \
        (40000, 443, 0xFFFFFFF0, 5000, "RA", 0, 5)
    assert len(t.payload) == 0 and t.options == []


@pytest.mark.parametrize("ip", [IP(**V4), IPv6(**V6)], ids=["v4", "v6"])
def test_both_resets_of_a_reject(ip):
    """The pair a TCP reject sends: one to each end, each with the sequence number its receiver
    expects (the sender's: the packet's ack; the receiver's: the packet's seq)."""
    p = decode(bytes(ip / TCP(sport=40000, dport=443, flags="PA", seq=100, ack=5000) / b"hello"))
    parse = IP if p.version == 4 else IPv6
    back, onward = parse(tcp_rst_for(p)), parse(tcp_rst_onward(p))
    assert (back.dst, back[TCP].dport, back[TCP].seq) == (str(p.src), 40000, 5000)
    assert (onward.dst, onward[TCP].dport, onward[TCP].seq) == (str(p.dst), 443, 100)


def test_rst_onward_ipv6_goes_to_the_final_destination():
    """On a routing header's way (segments left), the reset goes straight to the last address,
    its checksum computed for it; an AH-protected packet is reset too (the RST carries no AH)."""
    p = decode(bytes(PACKETS["tcp6-routing"]))
    out = tcp_rst_onward(p)
    assert_checksums(out)
    assert IPv6(out).dst == "2001:2::77" and IPv6(out).nh == 6
    ah = decode(bytes(IPv6(**V6) / AH(nh=6, payloadlen=4, icv=b"\0" * 12) / TCP(flags="PA", seq=7) / b"z"))
    out = tcp_rst_onward(ah)
    assert_checksums(out)
    assert IPv6(out)[TCP].seq == 7


@pytest.mark.parametrize("raw,reason", [
    (bytes(IP(**V4) / TCP(flags="S")), "without ACK"),
    (bytes(IPv6(**V6) / TCP(flags="S")), "without ACK"),
    (bytes(IP(**V4) / TCP(flags="RA")), "RST"),
    (bytes(IP(**V4) / UDP()), "not TCP"),
    (bytes(IP(**V4, flags="MF") / TCP(flags="A")), "fragment"),
    (b"", "not an IPv4 or IPv6 packet"),
])
def test_rst_onward_refusals(raw, reason):
    with pytest.raises(HybridError, match=reason):
        tcp_rst_onward(decode(raw))


@pytest.mark.parametrize("ip", [IP(**V4), IPv6(**V6)], ids=["v4", "v6"])
def test_the_scapy_check_catches_a_wrong_rst_checksum(ip):
    raw = bytearray(tcp_rst_onward(decode(bytes(ip / TCP(flags="PA", seq=1, ack=2) / b"x"))))
    raw[decode(bytes(raw)).l4_off + 16] ^= 1
    assert bytes(raw) != scapy_rebuilt(bytes(raw))


# -- ICMP unreachable -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tcp4", "udp4", "icmp4", "tcp4-options"])
@pytest.mark.parametrize("code,expected", [("admin-prohibited", 13), ("port-unreachable", 3),
                                           (ICMP_HOST_PROHIBITED, 10)])
def test_icmp4_unreachable(name, code, expected):
    orig = bytes(PACKETS[name])
    p = decode(orig)
    out = icmp_unreachable_for(p, code) if code != "admin-prohibited" else icmp_unreachable_for(p)
    assert_checksums(out)
    r = IP(out)
    assert (r.src, r.dst, r.proto, r[ICMP].type, r[ICMP].code) == (V4["dst"], V4["src"], 1, 3, expected)
    assert bytes(r[ICMP].payload) == orig and IPerror in r


def test_icmp4_quote_is_capped_at_576_bytes():
    orig = bytes(IP(**V4) / UDP(sport=1, dport=2) / (b"q" * 1400))
    out = icmp_unreachable_for(decode(orig), "port-unreachable")
    assert len(out) == 576
    assert_checksums(out)
    assert out[28:] == orig[:548]
    assert UDPerror in IP(out)


@pytest.mark.parametrize("name", ["tcp6", "udp6-ext", "icmp6", "tcp6-routing"])
@pytest.mark.parametrize("code,expected", [("admin-prohibited", 1), ("port-unreachable", 4),
                                           (ICMP6_PORT_UNREACHABLE, 4)])
def test_icmp6_unreachable(name, code, expected):
    orig = bytes(PACKETS[name])
    p = decode(orig)
    out = icmp_unreachable_for(p, code)
    assert_checksums(out)
    r = IPv6(out)
    u = r[ICMPv6DestUnreach]
    assert (r.src, r.dst, r.nh, u.type, u.code) == (V6["dst"], V6["src"], 58, 1, expected)
    assert out[48:] == orig


def test_icmp6_quote_is_capped_at_1280_bytes():
    orig = bytes(IPv6(**V6) / TCP(flags="PA") / (b"q" * 2000))
    out = icmp_unreachable_for(decode(orig))
    assert len(out) == 1280 and out[48:] == orig[:1232]
    assert_checksums(out)


@pytest.mark.parametrize("raw,reason", [
    (bytes(IP(**V4) / ICMP(type=3) / IPerror(**V4) / UDPerror()), "ICMP error"),
    (bytes(IPv6(**V6) / ICMPv6DestUnreach() / IPv6(**V6) / UDP()), "ICMPv6 error"),
    (bytes(IP(src="198.18.0.1", dst="224.0.0.251") / UDP()), "multicast"),
    (bytes(IP(src="198.18.0.1", dst="255.255.255.255") / UDP()), "broadcast"),
    (bytes(IPv6(src="2001:2::1", dst="ff02::fb") / UDP()), "multicast"),
    (bytes(IPv6(src="::", dst="2001:2::1") / UDP()), "unspecified"),
    (bytes(IP(**V4, frag=2, proto=17) / (b"z" * 8)), "fragment"),
    (b"", "not an IPv4 or IPv6 packet"),
])
def test_icmp_unreachable_refusals(raw, reason):
    with pytest.raises(HybridError, match=reason):
        icmp_unreachable_for(decode(raw))


def test_icmp_unreachable_bad_code():
    p = decode(bytes(IP(**V4) / UDP()))
    with pytest.raises(HybridError, match="unknown ICMP unreachable code"):
        icmp_unreachable_for(p, "nope")
    with pytest.raises(HybridError, match="0 to 255"):
        icmp_unreachable_for(p, 256)


def test_rewrites_never_crash_on_truncations():
    """Every prefix of every sample either rewrites cleanly or raises HybridError."""
    for pkt in PACKETS.values():
        raw = bytes(pkt)
        for cut in range(0, len(raw) + 1, 3):
            p = decode(raw[:cut])
            for fn in (lambda: set_payload(p, b"x"), lambda: fill_payload(p, b"h", b"\n"),
                       lambda: replace_bytes(p, b"e", b"E"), lambda: tcp_rst_for(p), lambda: tcp_rst_onward(p),
                       lambda: icmp_unreachable_for(p)):
                try:
                    fn()
                except HybridError:
                    pass


def test_tcp_error_quote_parses():
    out = icmp_unreachable_for(decode(bytes(PACKETS["tcp4"])))
    assert TCPerror in IP(out)


@pytest.mark.parametrize("name", PACKETS)
def test_the_scapy_check_catches_a_wrong_checksum(name):
    """Guard against a reference that compares scapy's cached bytes with themselves."""
    raw = bytearray(set_payload(decode(bytes(PACKETS[name])), b"abc"))
    p = decode(bytes(raw))
    raw[p.l4_off + {6: 16, 17: 6, 1: 2, 58: 2}[p.proto]] ^= 1
    assert bytes(raw) != scapy_rebuilt(bytes(raw))
    if p.version == 4:
        raw = bytearray(set_payload(p, b"abc"))
        raw[10] ^= 1
        assert bytes(raw) != scapy_rebuilt(bytes(raw))
