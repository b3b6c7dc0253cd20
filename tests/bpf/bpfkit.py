"""Helpers for the BPF_PROG_TEST_RUN tests: running the programs on crafted frames, reading
counters, resetting maps.

Frames run as if received on ifindex 1 (lo), which is registered in a stats slot; nothing is
sent anywhere: BPF_PROG_TEST_RUN runs the program on a buffer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from hybrid.datapath.maps import Maps
from hybrid.kernel import abi, bpfsys

LO = 1
MARK_VALUE = 0x00100000
MARK_MASK = 0x00100000
MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


def default_config(**overrides) -> abi.Config:
    cfg = abi.Config(mark_value=MARK_VALUE, mark_mask=MARK_MASK, reasons=abi.REASONS_ALL, first_n=2)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


# The maps reset() knows: it empties all but the name parsers' per-CPU scratch, which tc rewrites
# for every first payload it reads (its one counter, attempts, is read as a difference; see
# test_names). A map added to the datapath must be added here and emptied below, or a test that
# shares the session's datapath could see what an earlier one left.
RESET_MAPS = frozenset({abi.MAP_CONFIG, abi.MAP_FLOWS, abi.MAP_PREFIXES, abi.MAP_PORTS, abi.MAP_IFACES,
                        abi.MAP_STATS, abi.MAP_SOURCES, abi.MAP_BUDGET, abi.MAP_PINNED, abi.MAP_NAMES_SCRATCH,
                        abi.MAP_NAME_CACHE, abi.MAP_NAME_STATE, abi.MAP_NAME_EVENTS, abi.MAP_BANS})


def reset(maps: Maps) -> None:
    """Empty every map but the names scratch and restore the default config, lo registered in
    slot 1."""
    unknown = set(maps.fds()) - RESET_MAPS
    assert not unknown, f"bpfkit.reset does not empty {sorted(unknown)}: add them to RESET_MAPS and reset()"
    for key, _ in list(maps.flows()):
        maps.delete_flow(key)
    for key, _ in list(maps.pinned()):
        maps.unpin_verdict(key)
    for cidr in list(maps.prefixes()):
        maps.del_prefix(cidr)
    maps.write_bans({}, list(maps.bans()))
    for port in list(maps.watched_ports()):
        maps.unwatch_port(port)
    for ifindex in list(maps.ifaces()):
        maps.unregister_iface(ifindex)
    for slot in range(abi.MAX_IFACES):
        maps._zero_slot(slot)
    maps.clear_admission()
    if maps.has_name_cache:
        maps.flush_names()
        maps.set_name_state(0, 0)
        from hybrid.kernel.ringbuf import RingBuffer
        with RingBuffer.open(maps.fd(abi.MAP_NAME_EVENTS)) as ring:
            ring.drain(lambda record: None)
    maps.set_config(default_config())
    assert maps.register_iface(LO) == 1


@dataclass
class Run:
    action: int
    mark: int


class Runner:
    """Runs the two programs on frames and reads the counters of lo's slot."""

    def __init__(self, datapath, maps: Maps):
        self.dp = datapath
        self.maps = maps

    def tc(self, frame: bytes, mark: int = 0, ifindex: int = LO) -> Run:
        ctx = bpfsys.SkBuff(mark=mark, ifindex=ifindex)
        r = bpfsys.prog_test_run(self.dp.tc_fd, bytes(frame), ctx, name=abi.PROG_TC)
        return Run(r.retval, r.ctx.mark)

    def xdp(self, frame: bytes, ifindex: int = LO) -> int:
        data = bytes(frame)
        ctx = bpfsys.XdpMd(data_end=len(data), ingress_ifindex=ifindex)
        return bpfsys.prog_test_run(self.dp.xdp_fd, data, ctx, name=abi.PROG_XDP).retval

    def counters(self, ifindex: int = LO) -> dict[str, int]:
        return self.maps.stats()[ifindex]

    def nonzero(self, ifindex: int = LO) -> dict[str, int]:
        return {k: v for k, v in self.counters(ifindex).items() if v}

    def check_invariant(self, ifindex: int = LO) -> None:
        c = self.counters(ifindex)
        outcomes = sum(c[abi.COUNTER_NAMES[i]] for i in abi.TC_OUTCOMES)
        assert c["packets"] == outcomes, c
        reasons = sum(c[abi.COUNTER_NAMES[abi.reason_counter(bit)]] for bit in abi.REASON_NAMES)
        assert c["flagged"] <= reasons, c


def monotonic_ns() -> int:
    return time.monotonic_ns()


def flow_of(maps: Maps, key) -> abi.Flow:
    flow = maps.get_flow(key)
    assert flow is not None, "flow not in the table"
    return flow


# ---- frames -----------------------------------------------------------------------------------------
# scapy layers imported one by one: scapy.all pulls in everything (and routes/ARP lookups for
# unset MAC addresses); every frame below sets its MACs explicitly.
from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6  # noqa: E402
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

A4, B4 = "198.18.1.2", "198.18.2.2"          # A < B: packets A -> B travel direction 0
A6, B6 = "2001:db8:1::2", "2001:db8:2::2"


def frame(l3, vlans=(), qinq: bool = False) -> bytes:
    """Ethernet frame around an L3 packet, with 802.1Q tags (outer first); ``qinq`` makes the
    outer tag 802.1ad."""
    pkt = Ether(**MACS)
    for i, vid in enumerate(vlans):
        pkt = pkt / (Dot1AD(vlan=vid) if qinq and i == 0 else Dot1Q(vlan=vid))
    return bytes(pkt / l3)


def tcp4(flags="A", payload=b"", src=A4, dst=B4, sport=40000, dport=80, vlans=(), seq=0, **ip) -> bytes:
    l4 = TCP(sport=sport, dport=dport, flags=flags, seq=seq)
    if payload:
        l4 = l4 / Raw(payload)
    return frame(IP(src=src, dst=dst, **ip) / l4, vlans)


def udp4(payload=b"x", src=A4, dst=B4, sport=40000, dport=53, vlans=()) -> bytes:
    return frame(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(payload), vlans)


def tcp6(flags="A", payload=b"", src=A6, dst=B6, sport=40000, dport=80, ext=None, vlans=()) -> bytes:
    l4 = TCP(sport=sport, dport=dport, flags=flags)
    if payload:
        l4 = l4 / Raw(payload)
    l3 = IPv6(src=src, dst=dst)
    if ext is not None:
        l3 = l3 / ext
    return frame(l3 / l4, vlans)


def icmp4_echo(src=A4, dst=B4, ident=77, reply=False) -> bytes:
    return frame(IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident, seq=1) / Raw(b"ping"))


def icmp6_echo(src=A6, dst=B6, ident=77, reply=False) -> bytes:
    echo = ICMPv6EchoReply if reply else ICMPv6EchoRequest
    return frame(IPv6(src=src, dst=dst) / echo(id=ident, seq=1, data=b"ping"))


def pad60(data: bytes) -> bytes:
    """What the wire does to short frames: pad to the 60-byte Ethernet minimum."""
    return data + b"\x00" * max(0, 60 - len(data))




def reason_counters(reasons: int) -> dict[str, int]:
    """The reason_* counters one flagged packet with ``reasons`` adds."""
    return {f"reason_{name}": 1 for bit, name in abi.REASON_NAMES.items() if reasons & bit}
