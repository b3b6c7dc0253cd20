"""The DNS question name as the server reads it (hybrid.engine.packet._parse_dns): compression
pointers followed backwards only, loops and forward pointers refused, the RFC 1035 length limits,
truncated messages, several questions, odd label bytes; and, for any bytes, no exception and a
bounded number of steps. What dnsmasq does with each is tests/integration/test_evasion_dns.py."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP

from hybrid.engine.packet import (
    DNS_MAX_JUMPS,
    DNS_UNPARSED,
    _dns_name,
    _parse_dns,
    _parse_dns_tcp,
    decode,
)

pytestmark = pytest.mark.unit

Q = b"\x00\x01\x00\x01"                                   # QTYPE A, QCLASS IN


def header(qd=1, an=0, ns=0, ar=0, flags=0x0100, qid=0x1234) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def wire(name: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in name.split(b".")) + b"\0"


def parse(msg: bytes, tcp=False) -> tuple:
    return _parse_dns(struct.pack("!H", len(msg)) + msg, 2) if tcp else _parse_dns(msg, 0)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("msg, want", [
    (header() + wire(b"X.Ads.EXAMPLE") + Q, ("x.ads.example", None)),
    # a backward pointer into the header: ID 0x0178 is the label "x", flags 0x0179 the label "y"
    (header(qid=0x0178, flags=0x0179) + b"\xc0\x00" + Q, ("x.y", None)),
    (header(qid=0x0178, flags=0x0179) + b"\x03ads\xc0\x02" + Q, ("ads.y", None)),
    # a chain: the question's pointer lands on a label and a pointer further back
    (header(qid=0x0178, flags=0x0179, ar=0xC000) + b"\x01z\xc0\x0a" + Q, ("z.x.y", None)),
    (header() + b"\x00" + Q, ("", None)),                              # the root
], ids=["case", "pointer-to-header", "label-then-pointer", "chain", "root"])
def test_names_are_read_as_the_server_reads_them(msg, want, tcp):
    assert parse(msg, tcp) == (False, *want)


@pytest.mark.parametrize("msg, why", [
    (header() + b"\xc0\x10" + Q + wire(b"x.ads.example"), "forward-pointer"),
    (header(ar=1) + b"\x01x\xc0\x14" + Q + wire(b"ads.example"), "forward-pointer"),
    (header() + b"\xc0\x0c" + Q, "pointer-loop"),                      # to itself
    (header() + b"\x01a\xc0\x0c" + Q, "pointer-loop"),                 # back to its own start
    # each pointer lower than the last one's target: 0x0a -> header bytes "\xc0\x0a" again
    (header(ar=0xC00A) + b"\xc0\x0a" + Q, "pointer-loop"),
    (header() + b"\x40\x10" + Q, "label-type"),
    (header() + b"\x80\x10" + Q, "label-type"),
    (header() + (b"\x3f" + b"a" * 63) * 4 + b"\0" + Q, "too-long"),    # 257 bytes in wire form
    (header() + b"\x05abc", "truncated"),
    (header() + b"\x03abc", "truncated"),                              # no final zero
    (header() + b"\xc0", "truncated"),
    (header()[:11], "truncated"),
    (header(qd=0) + wire(b"x.ads.example") + Q, "no-question"),
])
def test_unreadable_names_give_no_name_and_a_reason(msg, why):
    is_response, name, reason = parse(msg)
    assert (name, reason) == (None, why) and reason in DNS_UNPARSED
    assert is_response in (False, None)


def test_the_longest_legal_name_reads():
    name = b".".join([b"a" * 63] * 3 + [b"b" * 61])                    # 255 bytes in wire form
    assert len(wire(name)) == 255
    assert parse(header() + wire(name) + Q) == (False, name.decode(), None)


def test_pointer_chain_longer_than_the_limit_is_a_loop():
    # A question at offset 12 can only point into the 12-byte header, so at most 6 hops; a name
    # read further on (the helper is shared) can chain more: each pointer back to the one before.
    chain = b"\x00\x00" + b"".join(b"\xc0" + bytes([12 + 2 * i]) for i in range(DNS_MAX_JUMPS + 1))
    msg = header() + chain
    last = len(msg) - 2                               # DNS_MAX_JUMPS + 1 hops from here to the root
    assert _dns_name(msg, 0, last, len(msg)) == (None, "pointer-loop")
    assert _dns_name(msg, 0, last - 2, len(msg)) == ("", None)    # exactly DNS_MAX_JUMPS hops


def test_several_questions_give_the_first_and_a_reason():
    msg = header(qd=2) + wire(b"ok.example") + Q + wire(b"x.ads.example") + Q
    assert parse(msg) == (False, "ok.example", "several-questions")


@pytest.mark.parametrize("label, name", [
    (b"x.ads.example", "x.ads.example"),              # a dot inside a label reads as the dotted name
    (b"exa\0mple", "exa\0mple"),
])
def test_odd_label_bytes_are_kept_and_counted(label, name):
    assert parse(header() + bytes([len(label)]) + label + b"\0" + Q) == (False, name, "odd-label")


def test_non_ascii_is_kept_and_only_ascii_is_lowered():
    assert parse(header() + b"\x04\xc9X\xe9Y\0" + Q) == (False, "\xc9x\xe9y", None)


def test_tcp_length_prefix_bounds_the_message():
    msg = header() + wire(b"x.ads.example") + Q
    assert _parse_dns(struct.pack("!H", 20) + msg, 2) == (False, None, "truncated")
    assert _parse_dns(struct.pack("!H", len(msg)) + msg + b"\xff" * 9, 2) == (False, "x.ads.example", None)
    # pointers count from the message, not from the length prefix
    assert parse(header(qid=0x0178, flags=0x0179) + b"\xc0\x00" + Q, tcp=True) == (False, "x.y", None)


def test_tcp_segment_without_its_length_prefix_and_pipelined_messages():
    msg = header() + wire(b"x.ads.example") + Q
    assert _parse_dns_tcp(struct.pack("!H", len(msg))) == (None, None, "truncated")
    assert _parse_dns_tcp(msg) == (False, "x.ads.example", "tcp-no-prefix")
    ok = header() + wire(b"ok.example") + Q
    two = struct.pack("!H", len(ok)) + ok + struct.pack("!H", len(msg)) + msg
    assert _parse_dns_tcp(two) == (False, "ok.example", "several-messages")
    assert _parse_dns_tcp(struct.pack("!H", len(msg)) + msg) == (False, "x.ads.example", None)


def test_packet_view_and_reason():
    msg = header() + b"\xc0\x10" + Q + wire(b"x.ads.example")
    p = decode(bytes(IP(src="198.18.0.1", dst="198.19.0.2") / UDP(sport=33333, dport=53) / msg))
    assert p.dns_unparsed is None                     # not read yet: never parses by itself
    assert (p.dns_qname, p.dns_is_response, p.dns_unparsed) == (None, False, "forward-pointer")
    t = decode(bytes(IP(src="198.18.0.1", dst="198.19.0.2") / TCP(dport=53, flags="PA")
                     / (struct.pack("!H", 9) + msg)))
    assert (t.dns_qname, t.dns_unparsed) == (None, "truncated")
    other = decode(bytes(IP(src="198.18.0.1", dst="198.19.0.2") / UDP(sport=1000, dport=1053) / msg))
    assert (other.dns_qname, other.dns_unparsed) == (None, None)


class Counting(bytes):
    """bytes that count the reads the parser makes through indexing and slicing."""

    reads = 0

    def __getitem__(self, i):
        Counting.reads += 1
        return bytes.__getitem__(self, i)


# Every loop step reads at most two bytes; steps are bounded by 127 labels (255 bytes, at least
# two each) plus DNS_MAX_JUMPS pointers plus the final byte.
MAX_READS = 2 * (2 * (128 + DNS_MAX_JUMPS + 1) + 2)     # TCP: two readings at most

_label = st.one_of(st.binary(min_size=1, max_size=2),
                   st.tuples(st.integers(0xC0, 0xFF), st.integers(0, 255)).map(bytes),
                   st.integers(0, 63).flatmap(lambda n: st.binary(min_size=n, max_size=n).map(lambda b: bytes([n]) + b)))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=600),
                 st.tuples(st.binary(min_size=12, max_size=12), st.lists(_label, max_size=200))
                 .map(lambda t: t[0] + b"".join(t[1]))),
       st.booleans())
def test_any_bytes_never_raise_and_take_bounded_steps(data, tcp):
    Counting.reads = 0
    out = _parse_dns_tcp(Counting(data)) if tcp else _parse_dns(Counting(data), 0)
    assert Counting.reads <= MAX_READS
    assert len(out) == 3 and out[2] in (None, *DNS_UNPARSED)
    if out[1] is not None:
        assert len(out[1]) <= 253 and out[1] == out[1].lower() or not out[1].isascii()
