"""The verdict engine's flow verdicts reach the packets they are meant for: the engine decides a
packet (a rules file that blocks every flow), writes its verdict with its own key into the flow
table, and hybrid_tc_ingress, run on the same packet and on the flow's other direction, drops
them (BPF_PROG_TEST_RUN). Where tc builds no key, the engine writes nothing. ICMP is the case in
point: echo types differ per family, and ICMP type 128 over IPv4 is not echo."""

from __future__ import annotations

import struct

import pytest
from bpfkit import A4, A6, B4, B6, IP, TCP, UDP, IPv6, Raw, frame
from reference import TC_ACT_SHOT

from hybrid.engine.loop import Engine
from hybrid.kernel import abi

pytestmark = pytest.mark.bpf


def icmp(version: int, itype: int, src: str, dst: str, proto: int | None = None):
    header = struct.pack("!BBHHH", itype, 0, 0, 0x1234, 1) + b"ping"
    if version == 4:
        return IP(src=src, dst=dst, proto=abi.IPPROTO_ICMP if proto is None else proto) / Raw(header)
    return IPv6(src=src, dst=dst, nh=abi.IPPROTO_ICMPV6 if proto is None else proto) / Raw(header)


# name -> (packet the engine decides, the flow's packet the other way), as scapy layers
FLOWS = {
    "v4-echo": (icmp(4, 8, A4, B4), icmp(4, 0, B4, A4)),
    "v4-dest-unreachable": (icmp(4, 3, A4, B4), icmp(4, 3, B4, A4)),
    "v4-type-128": (icmp(4, 128, A4, B4), icmp(4, 129, B4, A4)),
    "v6-echo": (icmp(6, 128, A6, B6), icmp(6, 129, B6, A6)),
    "v6-dest-unreachable": (icmp(6, 1, A6, B6), icmp(6, 1, B6, A6)),
    "v6-type-8": (icmp(6, 8, A6, B6), icmp(6, 0, B6, A6)),
    "tcp": (IP(src=A4, dst=B4) / TCP(sport=40000, dport=80, flags="A"),
            IP(src=B4, dst=A4) / TCP(sport=80, dport=40000, flags="A")),
    "udp-v6": (IPv6(src=A6, dst=B6) / UDP(sport=40000, dport=53) / Raw(b"q"),
               IPv6(src=B6, dst=A6) / UDP(sport=53, dport=40000) / Raw(b"r")),
}


class FakePacket:
    def __init__(self, payload: bytes):
        self.payload = payload

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return 0

    def set_mark(self, m):
        pass

    def repeat(self):
        pass


@pytest.fixture
def engine(tmp_path, maps) -> Engine:
    rules = tmp_path / "rules.toml"
    rules.write_text('default = "accept"\ndefault_flow = "block"\n')
    return Engine(0, str(rules), maps=maps)


@pytest.mark.parametrize("name", list(FLOWS))
def test_tc_applies_the_verdict_the_engine_wrote(run, maps, engine, name):
    decided, other_way = FLOWS[name]
    engine._handle(FakePacket(bytes(decided)))
    assert engine.stats.flow_verdicts["block"] == 1 and engine.stats.flow_write_errors == 0
    assert maps.flow_count() == 1
    assert run.tc(frame(decided)).action == TC_ACT_SHOT
    assert run.tc(frame(other_way)).action == TC_ACT_SHOT
    assert run.nonzero() == {"packets": 2, "drop_tc_flow": 2}
    assert maps.flow_count() == 1                        # no second flow: both hit the engine's key


@pytest.mark.parametrize("l3", [icmp(6, 128, A6, B6, proto=abi.IPPROTO_ICMP),
                                icmp(4, 8, A4, B4, proto=abi.IPPROTO_ICMPV6)],
                         ids=["icmp-over-v6", "icmpv6-over-v4"])
def test_no_verdict_where_tc_builds_no_key(run, maps, engine, l3):
    engine._handle(FakePacket(bytes(l3)))
    assert maps.flow_count() == 0 and engine.stats.flow_verdicts["block"] == 0
    r = run.tc(frame(l3))
    assert r.action != TC_ACT_SHOT
    assert run.nonzero() == {"packets": 1, "flagged": 1, "reason_malformed": 1}
