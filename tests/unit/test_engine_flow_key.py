"""The engine writes its flow verdicts under the key the tc program builds for the same packet.

The kernel's side is the reference model of bpf/hybrid.bpf.c (tests/bpf/reference.py; the BPF
tests prove the two equal, and tests/bpf/test_engine_key.py runs the engine's keys through the
real program). ICMP is where the two drifted: the echo types are per family (0/8 over IPv4,
128/129 over IPv6), and an ICMP type 128 or an ICMPv6 type 8 is no echo message."""

from __future__ import annotations

import struct

import pytest
from reference import PKT_OK, canonical_key, key_tuple, parse
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from hybrid.engine.loop import Engine
from hybrid.engine.packet import decode
from hybrid.kernel import abi

pytestmark = pytest.mark.unit

A4, B4 = "198.18.1.2", "198.18.2.2"
A6, B6 = "2001:db8:1::2", "2001:db8:2::2"
IDENT = 0x1234


def icmp(version: int, itype: int, *, reverse: bool = False, proto: int | None = None) -> bytes:
    """An ICMP (version 4) or ICMPv6 (version 6) message of any type, with IDENT where an echo
    carries its identifier, so that a key taking it for one shows."""
    header = struct.pack("!BBHHH", itype, 0, 0, IDENT, 1) + b"ping"
    if version == 4:
        src, dst = (B4, A4) if reverse else (A4, B4)
        return bytes(IP(src=src, dst=dst, proto=abi.IPPROTO_ICMP if proto is None else proto) / Raw(header))
    src, dst = (B6, A6) if reverse else (A6, B6)
    return bytes(IPv6(src=src, dst=dst, nh=abi.IPPROTO_ICMPV6 if proto is None else proto) / Raw(header))


CASES = {
    "v4-echo-request": icmp(4, 8),
    "v4-echo-reply": icmp(4, 0, reverse=True),
    "v4-dest-unreachable": icmp(4, 3),
    "v4-timestamp": icmp(4, 13),                       # carries an identifier, but is not echo
    "v4-type-128": icmp(4, 128),                       # ICMPv6's echo request number
    "v4-type-129": icmp(4, 129),
    "v6-echo-request": icmp(6, 128),
    "v6-echo-reply": icmp(6, 129, reverse=True),
    "v6-dest-unreachable": icmp(6, 1),
    "v6-neighbor-solicitation": icmp(6, 135),
    "v6-type-8": icmp(6, 8),                           # ICMP's echo request number
    "v6-type-0": icmp(6, 0),
    "icmp-over-v6": icmp(6, 8, proto=abi.IPPROTO_ICMP),      # tc: malformed, no key
    "icmpv6-over-v4": icmp(4, 128, proto=abi.IPPROTO_ICMPV6),
    "tcp": bytes(IP(src=A4, dst=B4) / TCP(sport=40000, dport=80, flags="S")),
    "udp-v6": bytes(IPv6(src=B6, dst=A6) / UDP(sport=53, dport=40000) / Raw(b"x")),
    "gre": bytes(IP(src=A4, dst=B4, proto=47) / Raw(b"\x00\x00\x08\x00" + b"x" * 20)),
}


def kernel_key(l3: bytes) -> tuple | None:
    """The key (reference form) hybrid_tc_ingress builds for this packet, None if none."""
    ether = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x86DD if l3[0] >> 4 == 6 else 0x0800)
    p = parse(bytes(ether / Raw(l3)))
    return canonical_key(p)[0] if p.status == PKT_OK else None


class RecordingMaps:
    def __init__(self):
        self.keys: list[tuple] = []

    def get_flow(self, key):      # the kernel's facts: unknown here
        return None

    def write_verdict(self, key: bytes, verdict: int, ttl_ns: int | None, conn_scoped: bool = False) -> None:
        self.keys.append(key_tuple(abi.FlowKey.from_buffer_copy(key)))


class FakePacket:
    def __init__(self, payload: bytes):
        self.payload, self.verdicts = payload, []

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return 0

    def set_mark(self, m):
        pass

    def repeat(self):
        self.verdicts.append("repeat")


@pytest.fixture
def engine(tmp_path) -> Engine:
    rules = tmp_path / "rules.toml"
    rules.write_text('default = "accept"\ndefault_flow = "block"\n')   # a flow verdict for every packet
    e = Engine(0, str(rules), maps=None)
    e.maps = RecordingMaps()
    return e


@pytest.mark.parametrize("name", list(CASES))
def test_engine_writes_its_verdict_under_the_kernels_key(engine, name):
    l3 = CASES[name]
    want = kernel_key(l3)
    p = FakePacket(l3)
    engine._handle(p)
    assert p.verdicts == ["repeat"] and engine.stats.errors == 0
    assert engine.maps.keys == ([want] if want is not None else [])
    assert engine.stats.flow_verdicts["block"] == (1 if want is not None else 0)


@pytest.mark.parametrize("version, request_, reply", [(4, 8, 0), (6, 128, 129)])
def test_echo_request_and_reply_share_the_identifier_key(engine, version, request_, reply):
    for l3 in (icmp(version, request_), icmp(version, reply, reverse=True)):
        engine._handle(FakePacket(l3))
    a, b = engine.maps.keys
    assert a == b and a[2:4] == (IDENT, IDENT)


@pytest.mark.parametrize("version, itype", [(4, 128), (4, 129), (4, 13), (6, 8), (6, 0), (6, 1)])
def test_other_icmp_types_are_keyed_without_ports(engine, version, itype):
    """The bug this file was written for: type 128 over IPv4 (and 8 over IPv6) had the
    identifier as ports in the engine's key, 0 in the kernel's."""
    engine._handle(FakePacket(icmp(version, itype)))
    (key,) = engine.maps.keys
    assert key[2:4] == (0, 0)


@pytest.mark.parametrize("name", list(CASES))
def test_packet_flow_tuple_and_flow_key_agree(name):
    """Packet.flow_tuple() (for hybrid.maps.flow_key) and Packet.flow_key() (the engine's) pick
    the same ports wherever the kernel builds a key."""
    from hybrid.datapath.maps import flow_key
    pkt = decode(CASES[name])
    got = pkt.flow_key()
    if kernel_key(CASES[name]) is None:
        assert got is None
        return
    key, direction = flow_key(*pkt.flow_tuple())
    assert got == (bytes(key), direction)
