"""The AF_PACKET consumer's ring walking, on a synthetic TPACKET_V3 ring laid out as the kernel
lays it out (<linux/if_packet.h>): block descriptors, frames chained by tp_next_offset, a
sockaddr_ll after each frame header, the link-layer header at tp_mac and the IP one at tp_net."""

import socket
import struct

import pytest

from hybrid.engine.rules import compile_rules
from hybrid.lab import afpacket as af

pytestmark = pytest.mark.unit

BLOCK = 4096
RULES = """
default = "accept"
[[rule]]
name = "http-host"
proto = "tcp"
http_host = ".seen.example"
action = "accept"
"""


def ipv4_tcp(payload: bytes, sport: int = 40000, dport: int = 80) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 6, 0,
                     socket.inet_aton("198.18.1.2"), socket.inet_aton("198.18.2.2"))
    return ip + tcp + payload


def ether(ethertype: int, body: bytes) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ethertype) + body


def lay_block(ring: bytearray, block: int, frames: list[tuple[int, bytes, int]], *, status: int = af.TP_STATUS_USER,
              first: int = 48, cut: int | None = None) -> None:
    """Write one block at ``block``: ``frames`` are (ifindex, ethernet frame, wire length)."""
    off = block + first
    starts = []
    for ifindex, data, wire_len in frames:
        mac = 48 + 20 + 6                       # header, sockaddr_ll, padding, as tpacket_rcv aligns
        net = mac + af.ETH_HLEN
        snap = len(data) if cut is None else min(cut, len(data))
        struct.pack_into("=IIIIIIHH", ring, off, 0, 1, 2, snap, wire_len, 0, mac, net)
        struct.pack_into("=HHi", ring, off + 48, socket.AF_PACKET, socket.htons(struct.unpack("!H", data[12:14])[0]),
                         ifindex)
        ring[off + mac:off + mac + snap] = data[:snap]
        starts.append(off)
        off += (mac + snap + 15) & ~15
    for a, b in zip(starts, starts[1:]):        # chain: tp_next_offset (0 for the last)
        struct.pack_into("=I", ring, a, b - a)
    struct.pack_into("=IIIIIIQ", ring, block, 1, 0, status, len(frames), first, off - block, 7)


def test_frames_of_a_block_are_walked_in_order_with_their_offsets():
    ring = bytearray(BLOCK * 2)
    a = ether(0x0800, ipv4_tcp(b"GET / HTTP/1.1\r\nHost: x.seen.example\r\n\r\n"))
    b = ether(0x0806, b"\x00" * 28)                          # ARP: not IP
    c = ether(0x0800, ipv4_tcp(b"", sport=40001))
    lay_block(ring, BLOCK, [(3, a, len(a)), (4, b, 60), (3, c, len(c))], first=64)
    got = af.block_frames(ring, BLOCK)
    assert [(f.ifindex, f.protocol, f.snaplen, f.length) for f in got] == \
        [(3, 0x0800, len(a), len(a)), (4, 0x0806, len(b), 60), (3, 0x0800, len(c), len(c))]
    assert bytes(ring[got[0].offset + got[0].mac:got[0].offset + got[0].mac + got[0].snaplen]) == a
    assert got[0].offset == BLOCK + 64 and got[1].offset > got[0].offset


def test_inspect_decodes_ip_frames_runs_the_rules_and_counts_the_rest():
    ring = bytearray(BLOCK)
    req = ether(0x0800, ipv4_tcp(b"GET / HTTP/1.1\r\nHost: a.seen.example\r\n\r\n"))
    other = ether(0x0800, ipv4_tcp(b"GET / HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n", sport=40002))
    arp = ether(0x0806, b"\x00" * 28)
    broken = ether(0x0800, b"\x45\x00")                      # a truncated IPv4 header
    lay_block(ring, 0, [(3, req, len(req)), (4, other, len(other)), (3, arp, 60), (3, broken, len(broken))])
    counts = af.Counts()
    rules = compile_rules(RULES)
    af.inspect_block(ring, 0, counts, rules.decide, {3: "to-client", 4: "to-server"})
    assert counts.frames == 4 and counts.ip == 3 and counts.decoded == 2 and counts.undecodable == 1
    assert counts.rule_hits == {"http-host": 1}                # only the matching Host
    assert counts.by_proto == {"tcp": 2}
    assert counts.by_iface == {"to-client": 3, "to-server": 1}
    assert counts.bytes == len(req) + len(other) + 60 + len(broken)


def test_count_only_decodes_nothing():
    ring = bytearray(BLOCK)
    req = ether(0x0800, ipv4_tcp(b"GET / HTTP/1.1\r\nHost: a.seen.example\r\n\r\n"))
    lay_block(ring, 0, [(3, req, len(req))] * 3)
    counts = af.Counts()
    af.inspect_block(ring, 0, counts, compile_rules(RULES).decide, {3: "p"}, decode_ip=False)
    assert counts.frames == counts.ip == 3 and counts.decoded == 0 and counts.rule_hits == {}


def test_a_frame_cut_by_the_ring_is_counted_as_truncated():
    ring = bytearray(BLOCK)
    big = ether(0x0800, ipv4_tcp(b"x" * 1000))
    lay_block(ring, 0, [(3, big, len(big))], cut=200)
    counts = af.Counts()
    af.inspect_block(ring, 0, counts, None, {3: "p"})
    assert counts.truncated == 1 and counts.bytes == len(big)


def test_blocks_are_taken_only_when_the_kernel_hands_them_over_and_given_back():
    ring = bytearray(BLOCK * 3)
    f = ether(0x0800, ipv4_tcp(b""))
    lay_block(ring, 0, [(3, f, len(f))])
    lay_block(ring, BLOCK, [(3, f, len(f))], status=af.TP_STATUS_KERNEL)   # still the kernel's
    assert af.block_ready(ring, 0) and not af.block_ready(ring, BLOCK)
    af.release_block(ring, 0)
    assert not af.block_ready(ring, 0)
    assert struct.unpack_from("=I", ring, af.BLOCK_STATUS_OFF)[0] == af.TP_STATUS_KERNEL


def test_the_ring_walks_ready_blocks_in_order_and_wraps():
    ring = af.Ring.__new__(af.Ring)                            # the walking alone, on a buffer
    ring.block_size, ring.block_nr, ring.next = BLOCK, 3, 2
    ring.map = bytearray(BLOCK * 3)
    f = ether(0x0800, ipv4_tcp(b""))
    for blk in (2, 0):
        lay_block(ring.map, blk * BLOCK, [(3, f, len(f))])
    assert list(ring.ready_blocks()) == [2 * BLOCK, 0]         # block 1 is the kernel's: stop there
    assert ring.next == 1 and not any(af.block_ready(ring.map, b * BLOCK) for b in range(3))


def test_the_filter_accepts_only_the_given_interfaces():
    code = af.ifindex_filter([7, 9])
    insns = [struct.unpack_from("=HBBI", code, i) for i in range(0, len(code), 8)]
    assert insns[0] == (0x20, 0, 0, 0xFFFFF008)                # load the receiving ifindex
    # each jeq jumps to the last instruction (accept); falling through reaches "return 0"
    for pos, (op, jt, jf, k) in enumerate(insns[1:3], start=1):
        assert op == 0x15 and jf == 0 and pos + 1 + jt == len(insns) - 1
    assert insns[-2] == (0x06, 0, 0, 0) and insns[-1] == (0x06, 0, 0, 0xFFFFFFFF)


def test_counts_merge_and_the_seen_share_counts_ring_drops():
    total = af.Counts()
    total.merge({"frames": 30, "drops": 10, "rule_hits": {"a": 1}, "by_iface": {"p": 30}})
    total.merge({"frames": 50, "drops": 10, "rule_hits": {"a": 2, "b": 1}, "by_iface": {"p": 50}})
    s = total.summary()
    assert s["frames"] == 80 and s["drops"] == 20 and s["rule_hits"] == {"a": 3, "b": 1}
    assert s["seen_share"] == pytest.approx(0.8)
    assert af.Counts().summary()["seen_share"] is None
