"""A pure-Python model of the datapath in bpf/ (hybrid.bpf.c and its headers): the oracle the BPF tests (and later a fuzzer)
compare the kernel against. It works on raw frame bytes, like the BPF code, and follows it step
by step; change both together.

    ref = Reference(abi.Config(...))
    r = ref.tc(frame, now_ns=..., mark=0)     # TcResult(action, mark, outcome, reasons, ...)
    x = ref.xdp(frame, now_ns=...)            # XdpResult(action, counter)

Where the C makes a choice the header leaves open (ICMP payload = bytes after the 8-byte header,
INSPECT replacing the PREFIX reason, too many IPv6 extension headers = MALFORMED), this model
makes the same one, and says so in tests/bpf/test_tc.py. It does not model a full flow table
(FLOW_FULL) or concurrent CPUs; the LRU's evictions are modelled as the test makes them
(:meth:`Reference.evict`, with the kernel's entry deleted), and the pinned verdicts that
survive them (:meth:`Reference.pin`, hybrid_pinned). Bans (hybrid_bans) are modelled as the
kernel holds them, one expiry per prefix, looked up by longest match (:meth:`Reference.ban`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from hybrid.datapath.maps import canonical_order, parse_cidr
from hybrid.kernel import abi

# Parse outcomes (bpf/packet.h enum hybrid_pkt_status)
PKT_OK, PKT_NOT_IP, PKT_BAD_L3, PKT_FRAGMENT, PKT_BAD_L4 = range(5)

# tc verdicts as BPF_PROG_TEST_RUN returns them (retval is a u32): the program passes with
# TC_ACT_UNSPEC (-1) so that later filters on the hook still run.
TC_ACT_UNSPEC, TC_ACT_SHOT = 0xFFFFFFFF, 2
TC_ACT_PASS = TC_ACT_UNSPEC
XDP_DROP, XDP_PASS = 1, 2

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_AH, IPPROTO_DSTOPTS = 0, 43, 44, 51, 60
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
EXT_HEADERS = (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_AH)

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
MAPPED = b"\x00" * 10 + b"\xff\xff"


@dataclass
class Parsed:
    status: int
    vlan: int = 0
    saddr: bytes = b""       # 16 bytes, network order (IPv4 mapped)
    daddr: bytes = b""
    sport: int = 0           # host-order numbers
    dport: int = 0
    proto: int = 0
    tcp_flags: int = 0
    seq: int = 0
    l3_len: int = 0
    payload_len: int = 0
    ttl: int = 0             # IPv4 TTL / IPv6 hop limit
    frag_keyed: bool = False  # a fragment at offset 0 whose TCP/UDP ports were read (proto: the transport's)
    payload_off: int = 0     # TCP/UDP: offset of the payload in the frame
    udp_short: bool = False  # UDP: the UDP length ends before the IP payload


def _l3_offset(frame: bytes) -> int:
    """Where the IP header starts: after the Ethernet header and up to two VLAN tags."""
    off, ethertype = 14, _be16(frame, 12)
    while ethertype in (ETH_P_8021Q, ETH_P_8021AD) and off + 4 <= len(frame):
        ethertype = _be16(frame, off + 2)
        off += 4
    return off


def _be16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 2], "big")


def parse(frame: bytes) -> Parsed:
    """parse_packet() for a fully linear frame (BPF_PROG_TEST_RUN frames always are)."""
    n = len(frame)
    p = Parsed(PKT_NOT_IP)
    if n < 14:
        return p
    eth_type = _be16(frame, 12)
    off = 14
    for i in range(abi.MAX_VLAN_DEPTH):
        if eth_type not in (ETH_P_8021Q, ETH_P_8021AD):
            break
        if off + 4 > n:
            return Parsed(PKT_NOT_IP, vlan=p.vlan)
        if i == 0:
            p.vlan = _be16(frame, off) & 0x0FFF
        eth_type = _be16(frame, off + 2)
        off += 4
    l3 = off

    if eth_type == ETH_P_IP:
        if l3 + 20 > n:
            p.status = PKT_BAD_L3
            return p
        ver, ihl = frame[l3] >> 4, frame[l3] & 0x0F
        if ver != 4 or ihl < 5 or l3 + ihl * 4 > n or _be16(frame, l3 + 2) < ihl * 4:
            p.status = PKT_BAD_L3
            return p
        p.l3_len = _be16(frame, l3 + 2)
        if l3 + p.l3_len > n:
            p.status = PKT_BAD_L3
            return p
        p.saddr = MAPPED + frame[l3 + 12:l3 + 16]
        p.daddr = MAPPED + frame[l3 + 16:l3 + 20]
        p.proto = frame[l3 + 9]
        p.ttl = frame[l3 + 8]
        cur = l3 + ihl * 4
        frag = _be16(frame, l3 + 6) & 0x3FFF
        if frag:
            if not frag & 0x1FFF:                                  # offset 0: the first fragment
                _fragment_ports(p, frame, cur, min(n, l3 + p.l3_len), p.proto)
            p.status = PKT_FRAGMENT
            return p
        v6 = False
    elif eth_type == ETH_P_IPV6:
        if l3 + 40 > n or frame[l3] >> 4 != 6:
            p.status = PKT_BAD_L3
            return p
        p.l3_len = 40 + _be16(frame, l3 + 4)
        if l3 + p.l3_len > n:
            p.status = PKT_BAD_L3
            return p
        p.saddr = bytes(frame[l3 + 8:l3 + 24])
        p.daddr = bytes(frame[l3 + 24:l3 + 40])
        p.ttl = frame[l3 + 7]
        l3_end = l3 + p.l3_len
        nh = frame[l3 + 6]
        cur = l3 + 40
        result = None
        for _ in range(abi.MAX_IPV6_EXT):
            if nh == IPPROTO_FRAGMENT:
                result = PKT_BAD_L3 if cur + 8 > n or cur + 8 > l3_end else PKT_FRAGMENT
                break
            if nh not in EXT_HEADERS:
                break
            if cur + 2 > n:
                result = PKT_BAD_L3
                break
            length = (frame[cur + 1] + 2) * 4 if nh == IPPROTO_AH else (frame[cur + 1] + 1) * 8
            nh = frame[cur]
            if cur + length > l3_end or cur + length > n:
                result = PKT_BAD_L3
                break
            cur += length
        else:
            if nh in EXT_HEADERS or nh == IPPROTO_FRAGMENT:
                p.proto = 0
                p.status = PKT_BAD_L4  # too many extension headers: flagged MALFORMED
                return p
        if result == PKT_BAD_L3:
            p.status = PKT_BAD_L3
            return p
        p.proto = nh
        if result == PKT_FRAGMENT:
            if not _be16(frame, cur + 2) & 0xFFF8:               # offset 0: first (or atomic)
                _fragment_ports(p, frame, cur + 8, l3_end, frame[cur])
            p.status = PKT_FRAGMENT
            return p
        v6 = True
    else:
        return p

    l4_len = p.l3_len - (cur - l3)
    bad = Parsed(PKT_BAD_L4, p.vlan, p.saddr, p.daddr, proto=p.proto, l3_len=p.l3_len)
    if p.proto == IPPROTO_TCP:
        if cur + 20 > n or frame[cur + 12] >> 4 < 5:
            return bad
        hl = (frame[cur + 12] >> 4) * 4
        if cur + hl > n or hl > l4_len:
            return bad
        p.sport, p.dport = _be16(frame, cur), _be16(frame, cur + 2)
        p.tcp_flags = frame[cur + 13]
        p.seq = int.from_bytes(frame[cur + 4:cur + 8], "big")
        p.payload_len = l4_len - hl
        p.payload_off = cur + hl
    elif p.proto == IPPROTO_UDP:
        if cur + 8 > n:
            return bad
        ulen = _be16(frame, cur + 4)
        if ulen < 8 or ulen > l4_len:
            return bad
        p.sport, p.dport = _be16(frame, cur), _be16(frame, cur + 2)
        p.payload_len = ulen - 8
        p.payload_off = cur + 8
        p.udp_short = ulen != l4_len
    elif p.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if (p.proto == IPPROTO_ICMP) == v6 or cur + 8 > n or l4_len < 8:
            return bad
        echo = (0, 8) if p.proto == IPPROTO_ICMP else (128, 129)
        if frame[cur] in echo:
            p.sport = p.dport = _be16(frame, cur + 4)
        p.payload_len = l4_len - 8
    else:
        p.payload_len = l4_len
    p.status = PKT_OK
    return p


def _fragment_ports(p: Parsed, frame: bytes, cur: int, end: int, proto: int) -> None:
    """parse_l4_ports(): the ports of a TCP/UDP header at ``cur`` of a first fragment, when
    their 4 bytes lie before the frame's and the fragment's end (``end``)."""
    if proto in (IPPROTO_TCP, IPPROTO_UDP) and cur + 4 <= min(end, len(frame)):
        p.sport, p.dport = _be16(frame, cur), _be16(frame, cur + 2)
        p.proto = proto
        p.frag_keyed = True


def _s32(x: int) -> int:
    """(__s32) of a u32 difference: sequence-space comparison with wraparound."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def suspicious(flags: int) -> bool:
    return (flags == 0
            or flags & (SYN | FIN) == SYN | FIN
            or flags & (SYN | RST) == SYN | RST
            or flags & (FIN | RST) == FIN | RST
            or flags & (FIN | PSH | URG) == FIN | PSH | URG
            or flags & (FIN | ACK) == FIN)


def canonical_key(p: Parsed) -> tuple[tuple, int]:
    """(hashable key, direction) as flow_key_build() orders it."""
    direction = canonical_order(p.saddr, p.sport, p.daddr, p.dport)
    lo, hi = ((p.saddr, p.sport), (p.daddr, p.dport)) if direction == 0 else ((p.daddr, p.dport), (p.saddr, p.sport))
    return (lo[0], hi[0], lo[1], hi[1], p.vlan, p.proto), direction


@dataclass
class RefFlow:
    first_seen_ns: int
    last_seen_ns: int
    flags: int
    verdict: int = abi.VERDICT_NONE
    verdict_expires_ns: int = 0
    packets: list = field(default_factory=lambda: [0, 0])
    bytes: list = field(default_factory=lambda: [0, 0])
    payload_packets: list = field(default_factory=lambda: [0, 0])
    flagged: int = 0
    seq_end: list = field(default_factory=lambda: [None, None])   # None: not set
    ttl_max: list = field(default_factory=lambda: [0, 0])
    isn: list = field(default_factory=lambda: [None, None])       # None: not set (FLOW_ISN0/1 clear)
    seq_bytes: list = field(default_factory=lambda: [0, 0])       # bytes[dir] & 0xffffffff when seq_end moved
    follow_seq: list = field(default_factory=lambda: [0, 0])      # the engine's follow-up (written by it)
    until_seq: list = field(default_factory=lambda: [0, 0])       # a byte budget's end (FOLLOW_UNTIL)
    follow: int = 0


@dataclass
class TcResult:
    action: int
    mark: int
    outcome: int                # the abi.CNT_* outcome counter (NOT_IP ... DROP_TC_PREFIX)
    reasons: int = 0            # after masking with config.reasons (0 unless flagged)
    events: tuple = ()          # extra counters bumped: CNT_FLOW_NEW, CNT_VERDICT_EXPIRED
    key: tuple | None = None
    direction: int | None = None

    def counters(self) -> dict[int, int]:
        out = {abi.CNT_PACKETS: 1, self.outcome: 1}
        for ev in self.events:
            out[ev] = out.get(ev, 0) + 1
        if self.outcome == abi.CNT_FLAGGED:
            for bit in abi.REASON_NAMES:
                if self.reasons & bit:
                    out[abi.reason_counter(bit)] = 1
        return out


@dataclass
class RefNameVerdict:
    expires_ns: int
    flow_ttl_ns: int
    action: int                 # abi.NAME_ACT_*
    verdict: int                # abi.VERDICT_NONE, _BYPASS or _BLOCK
    hits: int = 0
    follow: int = 0             # 1: a passed packet moves the flow's follow-up (names_follow_on())


@dataclass
class XdpResult:
    action: int
    counter: int | None


class Reference:
    def __init__(self, config: abi.Config, ports: dict[int, int] | None = None,
                 prefixes: dict[str, int] | None = None, bans: dict[str, int] | None = None):
        self.config = config
        self.ports = dict(ports or {})
        self.prefixes: dict[tuple[int, int], int] = {}
        for cidr, action in (prefixes or {}).items():
            self.add_prefix(cidr, action)
        self.bans: dict[tuple[int, int], int] = {}      # hybrid_bans: (prefixlen, prefix) -> expires_ns
        for cidr, expires in (bans or {}).items():
            self.ban(cidr, expires)
        self.flows: dict[tuple, RefFlow] = {}
        self.pinned: dict[tuple, tuple[int, int, int]] = {}   # hybrid_pinned: key -> (verdict, expires_ns, origin)
        self.sources: dict[bytes, int] = {}     # admission: source address -> tat (GCRA)
        self.global_tat = 0                     # the global bucket
        # The name-verdict cache (bpf/namecache.h): its generation, and its entries as
        # (generation, kind, name, proto, dport) -> RefNameVerdict.
        self.name_generation = 0
        self.name_cache: dict[tuple, RefNameVerdict] = {}

    @staticmethod
    def _gcra(tat: int, now: int, interval: int, tolerance: int) -> int:
        t = max(tat, now)
        return 0 if t - now > tolerance else t + interval

    def _admit(self, saddr: bytes, first_of_flow: bool, low_priority: bool, now: int) -> list[int]:
        """admit(): [] when admitted (buckets charged), else the CNT_OVER_* events."""
        cfg, over = self.config, []
        src_tat = glob_tat = 0
        if first_of_flow and cfg.source_interval_ns:
            src_tat = self._gcra(self.sources.get(saddr, 0), now, cfg.source_interval_ns, cfg.source_tolerance_ns)
            if not src_tat:
                over.append(abi.CNT_OVER_SOURCE)
        if cfg.global_interval_ns:
            tol = cfg.global_tolerance_ns // 2 if low_priority else cfg.global_tolerance_ns
            glob_tat = self._gcra(self.global_tat, now, cfg.global_interval_ns, tol)
            if not glob_tat:
                over.append(abi.CNT_OVER_GLOBAL)
        if over:
            return over
        if first_of_flow and cfg.source_interval_ns:
            self.sources[saddr] = src_tat
        if cfg.global_interval_ns:
            self.global_tat = glob_tat
        return []

    def add_prefix(self, cidr: str, action: int) -> None:
        key = parse_cidr(cidr)
        self.prefixes[(key.prefixlen, int.from_bytes(bytes(key.addr), "big"))] = action

    def prefix_action(self, addr: bytes) -> int:
        value = int.from_bytes(addr, "big")
        best, action = -1, 0
        for (plen, net), act in self.prefixes.items():
            mask = ((1 << plen) - 1) << (128 - plen) if plen else 0
            if value & mask == net & mask and plen > best:
                best, action = plen, act
        return action

    def _prefixes_match(self, p: Parsed) -> int:
        if not self.config.flags & abi.CFG_HAVE_PREFIXES:
            return 0
        return self.prefix_action(p.saddr) | self.prefix_action(p.daddr)

    def ban(self, cidr: str, expires_ns: int) -> None:
        """What Maps.write_bans() writes: one entry of the ban trie (expires_ns 0 = never)."""
        key = parse_cidr(cidr)
        self.bans[(key.prefixlen, int.from_bytes(bytes(key.addr), "big"))] = expires_ns

    def unban(self, cidr: str) -> None:
        key = parse_cidr(cidr)
        self.bans.pop((key.prefixlen, int.from_bytes(bytes(key.addr), "big")), None)

    def ban_expiry(self, addr: bytes) -> int | None:
        """The expiry of the longest ban containing addr (None: in no ban)."""
        value = int.from_bytes(addr, "big")
        best, expires = -1, None
        for (plen, net), exp in self.bans.items():
            mask = ((1 << plen) - 1) << (128 - plen) if plen else 0
            if value & mask == net & mask and plen > best:
                best, expires = plen, exp
        return expires

    def _banned(self, p: Parsed, now_ns: int) -> bool:
        """bans_match(): the source or the destination in a live ban (the longest match only:
        an expired entry does not fall back to a shorter one), while HAVE_BANS is set."""
        if not self.config.flags & abi.CFG_HAVE_BANS:
            return False
        for addr in (p.saddr, p.daddr):
            exp = self.ban_expiry(addr)
            if exp is not None and self._live(exp, now_ns):
                return True
        return False

    def set_verdict(self, key: tuple, verdict: int, expires_ns: int = 0, now_ns: int = 0,
                    conn_scoped: bool = False) -> None:
        """What Maps.write_verdict() writes to the flow table (the pin is :meth:`pin`'s)."""
        flow = self.flows.setdefault(key, RefFlow(now_ns, now_ns, 0))
        flow.verdict, flow.verdict_expires_ns = verdict, expires_ns
        if conn_scoped:
            flow.flags |= abi.FLOW_CONN_VERDICT
        else:
            flow.flags &= ~abi.FLOW_CONN_VERDICT

    def pin(self, key: tuple, verdict: int, expires_ns: int = 0, origin: int = abi.PIN_ENGINE) -> None:
        """What userspace adds to hybrid_pinned (after the flow table: Maps.write_verdict)."""
        self.pinned[key] = (verdict, expires_ns, origin)

    def evict(self, key: tuple) -> None:
        """The LRU drops the flow's entry (the fuzz deletes it from the kernel's table too)."""
        self.flows.pop(key, None)

    @staticmethod
    def _live(expires_ns: int, now_ns: int) -> bool:
        return expires_ns == 0 or now_ns < expires_ns

    def _blocked(self, flow: RefFlow, now_ns: int) -> bool:
        return flow.verdict == abi.VERDICT_BLOCK and self._live(flow.verdict_expires_ns, now_ns)

    @staticmethod
    def _followed(flow: RefFlow, p: Parsed, direction: int) -> bool:
        """flow_followed(): the engine follows the direction and the packet reaches its next message."""
        if p.payload_len == 0:
            return False
        if (flow.follow & abi.FOLLOW_UNTIL(direction) and p.proto == IPPROTO_TCP
                and _s32(p.seq - flow.until_seq[direction]) < 0):
            return True
        if not flow.follow & abi.FOLLOW_ON(direction):
            return False
        if p.proto != IPPROTO_TCP:
            return True
        return _s32(p.seq + p.payload_len - flow.follow_seq[direction]) > 0

    @staticmethod
    def _next_message(flow: RefFlow, p: Parsed, direction: int) -> bool:
        """names_next_message(): the packet starts the next message of a followed direction."""
        f = flow.follow
        if not f & abi.FOLLOW_ON(direction):
            return False
        if p.proto != IPPROTO_TCP:
            return True
        if (f >> abi.FOLLOW_MODE_SHIFT(direction)) & 3 != abi.FOLLOW_M_MESSAGE or f & abi.FOLLOW_UNTIL(direction):
            return False
        return p.seq == flow.follow_seq[direction]

    def set_until(self, key: tuple, direction: int, seq: int | None) -> None:
        """What the engine writes for a byte budget (Maps.write_verdict(until=...)); None: none."""
        flow = self.flows[key]
        flow.follow &= ~abi.FOLLOW_UNTIL(direction)
        if seq is not None:
            flow.follow |= abi.FOLLOW_UNTIL(direction)
            flow.until_seq[direction] = seq & 0xFFFFFFFF

    def set_follow(self, key: tuple, direction: int, seq: int | None, mode: int = abi.FOLLOW_M_MESSAGE) -> None:
        """What the engine writes (Maps.write_verdict(follow=...)): follow direction's next
        message at ``seq`` (None: stop following it)."""
        flow = self.flows[key]
        on, shift = abi.FOLLOW_ON(direction), abi.FOLLOW_MODE_SHIFT(direction)
        flow.follow &= ~(on | 3 << shift)
        if seq is not None:
            flow.follow |= on | mode << shift
            flow.follow_seq[direction] = seq & 0xFFFFFFFF

    @staticmethod
    def _new_connection(flow: RefFlow, p: Parsed, direction: int) -> bool:
        """flow_new_connection(): a bare SYN on a connection-scoped verdict whose sequence number
        is not the isn recorded for its direction."""
        return (_bare_syn(p) and bool(flow.flags & abi.FLOW_CONN_VERDICT)
                and flow.isn[direction] != p.seq)

    def _restore_pinned(self, key: tuple, flow: RefFlow, p: Parsed, now_ns: int) -> bool:
        """flow_restore_pinned(): a live pin's verdict into the new entry (CONN_VERDICT for the
        engine's), except an ENGINE pin met by a bare SYN, deleted as an expired one is."""
        pin = self.pinned.get(key)
        if pin is None:
            return False
        verdict, expires, origin = pin
        if not self._live(expires, now_ns) or (origin == abi.PIN_ENGINE and _bare_syn(p)):
            del self.pinned[key]
            return False
        flow.verdict, flow.verdict_expires_ns = verdict, expires
        if origin == abi.PIN_ENGINE:
            flow.flags |= abi.FLOW_CONN_VERDICT
        return True

    def _fragment_blocked(self, key: tuple, now_ns: int) -> bool:
        flow = self.flows.get(key)
        if flow is not None:
            return self._blocked(flow, now_ns)
        pin = self.pinned.get(key)
        return pin is not None and pin[0] == abi.VERDICT_BLOCK and self._live(pin[1], now_ns)

    def _names_cache(self, frame: bytes, p: Parsed, key: tuple, flow: RefFlow, direction: int, kind: int,
                     name: str, now_ns: int, events: list[int]) -> int | None:
        """names_cache(): CNT_CACHE_PASSED/_DROPPED when a live entry decides the packet (its
        verdict carried out), else None with the reason in events."""
        if not self.name_generation:
            return None
        k = (self.name_generation, kind, name, p.proto, p.dport)
        entry = self.name_cache.get(k)
        if entry is None:
            events.append(abi.CNT_CACHE_MISS)
            return None
        if entry.expires_ns <= now_ns:
            del self.name_cache[k]
            events.append(abi.CNT_CACHE_EXPIRED)
            return None
        if self._name_doubt(frame, p, flow, direction):
            events.append(abi.CNT_CACHE_REFUSED)
            return None
        entry.hits += 1
        if entry.follow and entry.action == abi.NAME_ACT_ACCEPT:    # names_follow_on()
            if p.proto == IPPROTO_TCP:
                self.set_follow(key, direction, p.seq + p.payload_len, abi.FOLLOW_M_MESSAGE)
            else:
                flow.follow |= abi.FOLLOW_ON(0) | abi.FOLLOW_ON(1)
        if entry.verdict in (abi.VERDICT_BYPASS, abi.VERDICT_BLOCK):
            flow.verdict = entry.verdict
            flow.verdict_expires_ns = now_ns + entry.flow_ttl_ns if entry.flow_ttl_ns else 0
            flow.flags |= abi.FLOW_CONN_VERDICT | abi.FLOW_BY_CACHE
            if entry.verdict == abi.VERDICT_BLOCK:
                self.pinned[key] = (abi.VERDICT_BLOCK, flow.verdict_expires_ns, abi.PIN_ENGINE)
        return abi.CNT_CACHE_DROPPED if entry.action == abi.NAME_ACT_DROP else abi.CNT_CACHE_PASSED

    @staticmethod
    def _name_doubt(frame: bytes, p: Parsed, flow: RefFlow, direction: int) -> bool:
        """names_doubt(): the engine's doubts, as tc repeats them (BPF_PROG_TEST_RUN's packets
        carry CHECKSUM_NONE: their checksum is verified)."""
        from hybrid.engine.packet import decode
        from hybrid.engine.rewrite import transport_checksum_ok
        if p.ttl < flow.ttl_max[direction]:
            return True
        if p.proto == IPPROTO_TCP:
            if flow.isn[0] is None or flow.isn[1] is None:
                return True
            if p.tcp_flags & SYN or (p.seq != (flow.isn[direction] + 1) & 0xFFFFFFFF
                                     and not Reference._next_message(flow, p, direction)):
                return True
        ip = frame[_l3_offset(frame):]
        pkt = decode(ip)
        if pkt.l4_off != (40 if pkt.version == 6 else 20):
            return True                                          # options / extension headers
        return not transport_checksum_ok(pkt)

    def xdp(self, frame: bytes, now_ns: int) -> XdpResult:
        p = parse(frame)
        if p.status in (PKT_NOT_IP, PKT_BAD_L3):
            return XdpResult(XDP_PASS, None)
        if self._prefixes_match(p) & abi.PREFIX_BLOCK:
            return XdpResult(XDP_DROP, abi.CNT_XDP_DROP_PREFIX)
        if self._banned(p, now_ns):
            return XdpResult(XDP_DROP, abi.CNT_XDP_DROP_BAN)
        if p.status != PKT_OK and not p.frag_keyed:
            return XdpResult(XDP_PASS, None)
        cfg = self.config
        if (cfg.flags & abi.CFG_OVER_DROP and cfg.source_interval_ns and p.proto == IPPROTO_TCP
                and p.tcp_flags & (SYN | ACK) == SYN):
            tat = self.sources.get(p.saddr)
            if tat is not None and tat > now_ns and tat - now_ns > cfg.source_tolerance_ns:
                return XdpResult(XDP_DROP, abi.CNT_XDP_DROP_SOURCE)
        key, direction = canonical_key(p)
        flow = self.flows.get(key)       # a miss passes, pinned or not: tc restores the entry
        if flow is not None and self._blocked(flow, now_ns) and not self._new_connection(flow, p, direction):
            return XdpResult(XDP_DROP, abi.CNT_XDP_DROP_FLOW)
        return XdpResult(XDP_PASS, None)

    def tc(self, frame: bytes, now_ns: int, mark: int = 0) -> TcResult:
        cfg = self.config
        p = parse(frame)
        if p.status == PKT_NOT_IP:
            return TcResult(TC_ACT_PASS, mark, abi.CNT_NOT_IP)
        if p.status == PKT_BAD_L3:
            return TcResult(TC_ACT_PASS, mark, abi.CNT_MALFORMED_L3)
        reasons = 0
        act = self._prefixes_match(p)
        if act & abi.PREFIX_BLOCK:
            return TcResult(TC_ACT_SHOT, mark, abi.CNT_DROP_TC_PREFIX)
        if act & abi.PREFIX_WATCH:
            reasons |= abi.REASON_PREFIX
        if self._banned(p, now_ns):
            return TcResult(TC_ACT_SHOT, mark, abi.CNT_DROP_TC_BAN)
        key = direction = flow = prev = None
        events: list[int] = []
        if p.status == PKT_FRAGMENT and p.frag_keyed and self._fragment_blocked(canonical_key(p)[0], now_ns):
            return TcResult(TC_ACT_SHOT, mark, abi.CNT_DROP_TC_FLOW)   # a first fragment of a blocked flow
        if p.status == PKT_FRAGMENT:
            reasons |= abi.REASON_FRAGMENT
        elif p.status == PKT_BAD_L4:
            reasons |= abi.REASON_MALFORMED
        else:
            key, direction = canonical_key(p)
            flow = self.flows.get(key)
            is_syn = _bare_syn(p)
            conn = flow is not None and bool(flow.flags & abi.FLOW_CONN_VERDICT)
            if flow is not None and is_syn and (self._new_connection(flow, p, direction) if conn
                                                else not self._blocked(flow, now_ns)):
                # A SYN starts a new connection on a recycled 5-tuple: the entry starts over
                # (a connection-scoped verdict: its ENGINE pin goes, a MANUAL one holds).
                flow = self.flows[key] = RefFlow(now_ns, now_ns, abi.FLOW_ORIG_HI if direction else 0)
                if conn:
                    self._restore_pinned(key, flow, p, now_ns)
                    events.append(abi.CNT_CONN_RESTART)
                events.append(abi.CNT_FLOW_NEW)
            elif flow is None:
                flags = abi.FLOW_ORIG_HI if direction else 0
                if p.proto == IPPROTO_TCP and not is_syn:
                    flags |= abi.FLOW_MIDSTREAM
                flow = self.flows[key] = RefFlow(now_ns, now_ns, flags)
                events.append(abi.CNT_FLOW_NEW)
                if self._restore_pinned(key, flow, p, now_ns):      # evicted: restored
                    events.append(abi.CNT_EVICTED_DECIDED)
            flow.last_seen_ns = now_ns
            flow.packets[direction] += 1
            flow.bytes[direction] += p.l3_len
            verdict = flow.verdict
            if verdict != abi.VERDICT_NONE and flow.verdict_expires_ns and now_ns >= flow.verdict_expires_ns:
                flow.verdict, flow.verdict_expires_ns = abi.VERDICT_NONE, 0
                events.append(abi.CNT_VERDICT_EXPIRED)
                verdict = abi.VERDICT_NONE
            # flow_note_facts(): the direction's highest TTL; its first SYN-carrying segment's isn.
            flow.ttl_max[direction] = max(flow.ttl_max[direction], p.ttl)
            if p.proto == IPPROTO_TCP and p.tcp_flags & SYN and flow.isn[direction] is None:
                flow.isn[direction] = p.seq
                flow.flags |= abi.FLOW_ISN1 if direction else abi.FLOW_ISN0
            prev = None
            if p.payload_len > 0:
                prev = flow.payload_packets[direction]
                flow.payload_packets[direction] += 1
            if verdict == abi.VERDICT_BLOCK:
                return TcResult(TC_ACT_SHOT, mark, abi.CNT_DROP_TC_FLOW, 0, tuple(events), key, direction)
            followed = verdict != abi.VERDICT_INSPECT and (
                self._followed(flow, p, direction)
                or (p.proto == IPPROTO_UDP and p.payload_len > 0 and 443 in (p.sport, p.dport)
                    and direction == (1 if flow.flags & abi.FLOW_ORIG_HI else 0)
                    and frame[p.payload_off] & 0x80))           # quic_long_header()
            if verdict == abi.VERDICT_BYPASS and not followed:
                return TcResult(TC_ACT_PASS, mark, abi.CNT_BYPASSED, 0, tuple(events), key, direction)
            if verdict == abi.VERDICT_BYPASS:
                reasons |= abi.REASON_FOLLOW        # only the next message of a bypassed flow
            elif verdict == abi.VERDICT_INSPECT:
                reasons = abi.REASON_INSPECT
            else:
                if p.proto == IPPROTO_TCP and p.tcp_flags & (SYN | ACK) == SYN:
                    reasons |= abi.REASON_SYN
                if prev is not None and prev < cfg.first_n:
                    reasons |= abi.REASON_FIRST_N
                    if p.proto == IPPROTO_TCP:
                        end = (p.seq + p.payload_len) & 0xFFFFFFFF
                        old = flow.seq_end[direction]
                        if old is None or _s32(end - old) > 0:
                            flow.seq_end[direction] = end
                            flow.seq_bytes[direction] = flow.bytes[direction] & 0xFFFFFFFF
                        flow.flags |= abi.FLOW_SEQ1 if direction else abi.FLOW_SEQ0
                elif prev is not None and p.proto == IPPROTO_TCP and flow.seq_end[direction] is not None:
                    if ((flow.bytes[direction] - flow.seq_bytes[direction]) & 0xFFFFFFFF) >= abi.SEQ_FORGET:
                        # the direction moved on by more than any window: seq_end is forgotten
                        flow.seq_end[direction] = None
                        flow.flags &= ~(abi.FLOW_SEQ1 if direction else abi.FLOW_SEQ0)
                    elif 0 < (flow.seq_end[direction] - p.seq) % (1 << 32) <= abi.RETRANS_WINDOW:
                        reasons |= abi.REASON_FIRST_N      # a retransmission of inspected bytes
                if cfg.flags & abi.CFG_HAVE_PORTS and p.proto in (IPPROTO_TCP, IPPROTO_UDP):
                    bit = abi.PORT_TCP if p.proto == IPPROTO_TCP else abi.PORT_UDP
                    if self.ports.get(p.sport, 0) & bit or self.ports.get(p.dport, 0) & bit:
                        reasons |= abi.REASON_PORT
            if verdict != abi.VERDICT_BYPASS:
                if p.proto == IPPROTO_TCP and suspicious(p.tcp_flags):
                    reasons |= abi.REASON_SUSPICIOUS
                if followed:
                    reasons |= abi.REASON_FOLLOW
        reasons &= cfg.reasons & ~cfg.skip_reasons
        if not reasons:
            return TcResult(TC_ACT_PASS, mark, abi.CNT_PASSED, 0, tuple(events), key, direction)
        if cfg.source_interval_ns or cfg.global_interval_ns:
            unproven = p.status != PKT_OK or abi.CNT_FLOW_NEW in events
            bulk_only = not reasons & ~(abi.REASON_PORT | abi.REASON_PREFIX | abi.REASON_INSPECT)
            over = self._admit(p.saddr, unproven or (flow is not None and flow.flagged == 0),
                               unproven or bulk_only, now_ns)
            if over:
                events += over
                if p.payload_len > 0 or p.status != PKT_OK or cfg.flags & abi.CFG_OVER_DROP:
                    if flow is not None and p.payload_len > 0:
                        flow.payload_packets[direction] -= 1    # a dropped packet spends no first-N
                    return TcResult(TC_ACT_SHOT, mark, abi.CNT_OVER_DROP, 0, tuple(events), key, direction)
                return TcResult(TC_ACT_PASS, mark, abi.CNT_OVER_PASS, 0, tuple(events), key, direction)
        # names_wanted(), at the end of tc's steps: a flagged first payload of the opening
        # direction, in a flow without a verdict, goes to its parser program and the cache.
        # So does the next message of a direction the engine follows (names_next_message()).
        if (flow is not None and cfg.flags & abi.CFG_NAMES and p.payload_len > 0
                and not reasons & abi.REASON_INSPECT
                and direction == (1 if flow.flags & abi.FLOW_ORIG_HI else 0)
                and p.proto in (IPPROTO_TCP, IPPROTO_UDP)
                and ((prev == 0 and flow.verdict == abi.VERDICT_NONE)
                     or (flow.verdict in (abi.VERDICT_NONE, abi.VERDICT_BYPASS)
                         and self._next_message(flow, p, direction)))):
            payload = frame[p.payload_off:p.payload_off + p.payload_len]
            cnt, kind, name = kernel_name(p, payload)
            events.append(cnt)
            if name is not None:
                outcome = self._names_cache(frame, p, key, flow, direction, kind, name, now_ns, events)
                if outcome is not None:     # decided there: not queued after all
                    action = TC_ACT_SHOT if outcome == abi.CNT_CACHE_DROPPED else TC_ACT_PASS
                    return TcResult(action, mark, outcome, 0, tuple(events), key, direction)
        if flow is not None:
            flow.flagged += 1
        new_mark = (cfg.mark_value & cfg.mark_mask) | (mark & ~cfg.mark_mask & 0xFFFFFFFF)
        return TcResult(TC_ACT_PASS, new_mark, abi.CNT_FLAGGED, reasons, tuple(events), key, direction)


# ---- names (bpf/names.h) --------------------------------------------------------------------------

def _name_char(c: int, dot_ok: bool) -> int:
    if 0x41 <= c <= 0x5A:
        return c | 0x20
    if 0x61 <= c <= 0x7A or 0x30 <= c <= 0x39 or c in (0x2D, 0x5F) or (dot_ok and c == 0x2E):
        return c
    return 0


def kernel_name(p: Parsed, payload: bytes) -> tuple[int, int, str | None]:
    """(abi.CNT_NAME_* counter, abi.NAME_* kind or 0, name or None): what names_read() makes
    of a first payload (bpf/names.h), modelled step by step."""
    none = (abi.CNT_NAME_NONE, 0, None)
    if p.proto == IPPROTO_UDP:
        if p.dport != 53:
            return none
        if p.udp_short:
            return (abi.CNT_NAME_FORM, 0, None)
    elif p.proto != IPPROTO_TCP:
        return none
    if not payload:
        return none
    if len(payload) > abi.NAME_SCAN:
        return (abi.CNT_NAME_TOO_LONG, 0, None)
    if p.dport == 53:
        kind, r = abi.NAME_DNS, _kernel_dns(payload, 2 if p.proto == IPPROTO_TCP else 0)
    elif payload[0] == 22:
        kind, r = abi.NAME_SNI, _kernel_sni(payload)
    elif 0x41 <= payload[0] <= 0x5A:
        kind, r = abi.NAME_HOST, _kernel_http(payload)
    else:
        return none
    if isinstance(r, int):
        return (r, 0, None)
    return (abi.NAME_READ[kind], kind, r)


def _kernel_dns(d: bytes, base: int):
    n = len(d)
    if base:
        if n < 2:
            return abi.CNT_NAME_TRUNCATED
        m = _be16(d, 0)
        if m + 2 > n:
            return abi.CNT_NAME_TRUNCATED
        if m + 2 < n:
            return abi.CNT_NAME_SEVERAL
    if n < base + 12:
        return abi.CNT_NAME_TRUNCATED
    if d[base + 2] & 0x80:
        return abi.CNT_NAME_FORM
    qd = _be16(d, base + 4)
    if qd == 0:
        return abi.CNT_NAME_NONE
    if qd != 1:
        return abi.CNT_NAME_SEVERAL
    out = bytearray()
    left = 0
    for k in range(abi.NAME_MAX + 2):
        i = base + 12 + k
        if i >= n:
            return abi.CNT_NAME_TRUNCATED
        c = d[i]
        if left == 0:
            if c == 0:
                return out.decode() if out else abi.CNT_NAME_NONE
            if c >= 0xC0:
                return abi.CNT_NAME_POINTER
            if c & 0xC0:
                return abi.CNT_NAME_FORM
            if out:
                if len(out) >= abi.NAME_MAX:
                    return abi.CNT_NAME_TOO_LONG
                out.append(0x2E)
            left = c
            continue
        ch = _name_char(c, False)
        if not ch:
            return abi.CNT_NAME_ODD
        if len(out) >= abi.NAME_MAX:
            return abi.CNT_NAME_TOO_LONG
        out.append(ch)
        left -= 1
    return abi.CNT_NAME_TOO_LONG


def _kernel_sni(d: bytes):
    n = len(d)
    if n < 9:
        return abi.CNT_NAME_TRUNCATED
    if d[1] != 3:
        return abi.CNT_NAME_FORM
    rlen = _be16(d, 3)
    if rlen > 16384:
        return abi.CNT_NAME_FORM
    if rlen + 5 > n:
        return abi.CNT_NAME_TRUNCATED
    if rlen + 5 < n:
        return abi.CNT_NAME_SEVERAL
    if d[5] != 1:
        return abi.CNT_NAME_NONE
    hlen = int.from_bytes(d[6:9], "big")
    if hlen + 4 > rlen:
        return abi.CNT_NAME_TRUNCATED
    if hlen + 4 < rlen:
        return abi.CNT_NAME_SEVERAL
    end = n
    pos = 43
    if pos + 1 > end:
        return abi.CNT_NAME_FORM
    pos += 1 + d[pos]
    if pos + 2 > end:
        return abi.CNT_NAME_FORM
    pos += 2 + _be16(d, pos)
    if pos + 1 > end:
        return abi.CNT_NAME_FORM
    pos += 1 + d[pos]
    if pos == end:
        return abi.CNT_NAME_NONE
    if pos + 2 > end:
        return abi.CNT_NAME_FORM
    if pos + 2 + _be16(d, pos) != end:
        return abi.CNT_NAME_FORM
    pos += 2
    at = length = 0
    for _ in range(64):
        if pos + 4 > end:
            break
        etype, elen = _be16(d, pos), _be16(d, pos + 2)
        pos += 4
        if pos + elen > end:
            return abi.CNT_NAME_FORM
        if etype == 0:
            if length:
                return abi.CNT_NAME_SEVERAL
            if elen < 5 or _be16(d, pos) != elen - 2 or d[pos + 2] != 0:
                return abi.CNT_NAME_FORM
            if _be16(d, pos + 3) != elen - 5:
                return abi.CNT_NAME_SEVERAL
            if elen == 5:
                return abi.CNT_NAME_FORM
            if elen - 5 > abi.NAME_MAX:
                return abi.CNT_NAME_TOO_LONG
            at, length = pos + 5, elen - 5
        pos += elen
    if pos != end:
        return abi.CNT_NAME_FORM
    if not length:
        return abi.CNT_NAME_NONE
    out = bytearray()
    for c in d[at:at + length]:
        ch = _name_char(c, True)
        if not ch:
            return abi.CNT_NAME_ODD
        out.append(ch)
    return out.decode()


# names_http() (bpf/names.h): its limits, and the iterations of its two byte loops.
HTTP_METHOD, HTTP_LINES, HTTP_OWS, HTTP_CL = 16, 64, 8, 24
HTTP_TARGET_ITER, HTTP_HEAD_ITER = 320, 320


def _fold_differs(b: bytes, p: int, name: bytes) -> bool:
    """http_differ(fold=1): letters case-blind (c | 0x20), other bytes exact."""
    for j, want in enumerate(name):
        c = b[p + j]
        if 0x61 <= want <= 0x7A:
            c |= 0x20
        if c != want:
            return True
    return False


# name_plain_run(): the bytes from pos to the end of its aligned 8 before the first special
# one: printable ASCII in the head; in the target, not '%', '.', '?' either until the query.
_HEAD_RUN = re.compile(rb"[\x20-\x7e]*")
_PATH_RUN = re.compile(rb"[\x21-\x24\x26-\x2d\x2f-\x3e\x40-\x7e]*")
_QUERY_RUN = re.compile(rb"[\x21-\x7e]*")


def _plain_run(b: bytes, pos: int, run: re.Pattern) -> int:
    return run.match(b, pos, pos + 8 - (pos & 7)).end() - pos


def _kernel_http(d: bytes):
    """names_http(): the Host, or the counter of why not. Its byte loops are modelled with
    their iterations (a plain run up to the end of an aligned 8, then one byte), since running
    out of them is a reason of its own."""
    n = len(d)
    if n >= abi.NAME_SCAN:
        return abi.CNT_NAME_TOO_LONG
    b = d + bytes(24)                    # the NUL tc writes after the payload (what follows never decides)
    i = 1
    for _ in range(HTTP_METHOD - 1):
        if i >= n or not 0x41 <= b[i] <= 0x5A:
            break
        i += 1
    if i >= n:
        return abi.CNT_NAME_TRUNCATED
    if b[i] != 0x20:
        return abi.CNT_NAME_FORM
    if i + 1 >= n:
        return abi.CNT_NAME_TRUNCATED
    if b[i + 1] != 0x2F:
        return abi.CNT_NAME_FORM
    # The target: one plain run and one byte an iteration.
    pos, query, stopped = i + 1, False, False
    for _ in range(HTTP_TARGET_ITER):
        i = pos + _plain_run(b, pos, _QUERY_RUN if query else _PATH_RUN)
        c = b[i]
        stop = not 0x21 <= c <= 0x7E or (not query and (c == 0x25 or (c == 0x2E and b[i - 1] == 0x2E
                                                                        and b[i - 2] == 0x2F)))
        query = query or c == 0x3F
        if stop:
            pos, stopped = i, True
            break
        pos = i + 1
    if not stopped:
        return abi.CNT_NAME_TOO_LONG
    i = pos
    if i >= n:
        return abi.CNT_NAME_TRUNCATED
    c = b[i]
    if c != 0x20:
        return abi.CNT_NAME_ODD if not 0x21 <= c <= 0x7E else abi.CNT_NAME_FORM
    i += 1
    if i + 10 > n:
        return abi.CNT_NAME_TRUNCATED
    if b[i:i + 7] != b"HTTP/1." or b[i + 7] not in b"01" or b[i + 8] != 0x0D:
        return abi.CNT_NAME_FORM
    # The head: one plain run and one byte (or a CR LF) an iteration; line starts to the table.
    pos, a, stopped, line = i + 8, 0, False, {}
    for _ in range(HTTP_HEAD_ITER):
        i = pos + _plain_run(b, pos, _HEAD_RUN)
        c = b[i]
        plain = 0x20 <= c <= 0x7E
        crlf = c == 0x0D and b[i + 1] == 0x0A
        stop = not (plain or crlf) or (crlf and b[i + 2] in (0x0D, 0x20))
        line[a & (2 * HTTP_LINES - 1)] = i + 2
        a += crlf
        pos = i + plain + 2 * crlf
        if stop:
            stopped = True
            break
    if not stopped:
        return abi.CNT_NAME_TOO_LONG
    i = pos
    if i >= n:
        return abi.CNT_NAME_TRUNCATED
    if a > HTTP_LINES:
        return abi.CNT_NAME_FORM
    c = b[i]
    if a and line[a - 1] == i and c in (0x0D, 0x20):
        if c == 0x20:
            return abi.CNT_NAME_ODD
        if i + 1 >= n:
            return abi.CNT_NAME_TRUNCATED
        if b[i + 1] != 0x0A:
            return abi.CNT_NAME_ODD
    else:
        if c == 0x0D and i + 1 >= n:
            return abi.CNT_NAME_TRUNCATED
        return abi.CNT_NAME_ODD
    # Host, Content-Length, Transfer-Encoding lines.
    host = cl = 0
    te = False
    for v in range(HTTP_LINES - 1):
        if v + 1 >= a:
            break
        p = line[v]
        if not _fold_differs(b, p, b"host"):
            if b[p + 4] == 0x3A:
                if host:
                    return abi.CNT_NAME_SEVERAL
                host = v + 1
            elif b[p + 4] == 0x20:
                return abi.CNT_NAME_ODD
        elif not _fold_differs(b, p, b"content-length:"):
            if cl:
                return abi.CNT_NAME_SEVERAL
            cl = v + 1
        elif not _fold_differs(b, p, b"transfer-encoding:"):
            te = True
    if not host:
        return abi.CNT_NAME_NONE
    hend = line[a - 1] + 2
    if hend < n:
        if te or not cl:
            return abi.CNT_NAME_SEVERAL
        p, e = line[cl - 1] + 15, line[cl] - 2
        value = digits = 0
        after = False
        k = 0
        while k < HTTP_CL and p + k < e:
            c = b[p + k]
            if c == 0x20:
                after = after or digits > 0
            elif 0x30 <= c <= 0x39 and not after and digits < 9:
                value, digits = value * 10 + c - 0x30, digits + 1
            else:
                return abi.CNT_NAME_FORM
            k += 1
        if p + k != e or not digits:
            return abi.CNT_NAME_FORM
        if hend + value < n:
            return abi.CNT_NAME_SEVERAL
    # The Host value.
    p, e = line[host - 1] + 5, line[host] - 2
    k = 0
    while k < HTTP_OWS and b[p] == 0x20:
        p, k = p + 1, k + 1
    out = bytearray()
    label_start = True
    for _ in range(abi.NAME_MAX + 1):
        ch = _name_char(b[p], True)
        if not ch:
            break
        if ch == 0x2E:
            if label_start:
                return abi.CNT_NAME_FORM
            label_start = True
        else:
            label_start = False
        if len(out) >= abi.NAME_MAX:
            return abi.CNT_NAME_TOO_LONG
        out.append(ch)
        p += 1
    if b[p] == 0x3A:
        p += 1
        k = 0
        while k < 6 and 0x30 <= b[p] <= 0x39:
            p, k = p + 1, k + 1
        if k == 0 or k > 5:
            return abi.CNT_NAME_FORM
    k = 0
    while k < HTTP_OWS and b[p] == 0x20:
        p, k = p + 1, k + 1
    if p != e:
        return abi.CNT_NAME_ODD
    if out and label_start:
        out.pop()
    return out.decode() if out else abi.CNT_NAME_FORM


def _bare_syn(p: Parsed) -> bool:
    """pkt_is_bare_syn(): TCP, SYN without ACK."""
    return p.proto == IPPROTO_TCP and p.tcp_flags & (SYN | ACK) == SYN


def flow_key_of(key: tuple) -> abi.FlowKey:
    """Inverse of :func:`key_tuple`."""
    lo, hi, plo, phi, vlan, proto = key
    k = abi.FlowKey()
    k.addr_lo[:], k.addr_hi[:] = lo, hi
    k.port_lo = int.from_bytes(plo.to_bytes(2, "big"), "little")
    k.port_hi = int.from_bytes(phi.to_bytes(2, "big"), "little")
    k.vlan, k.proto = vlan, proto
    return k


def key_tuple(key: abi.FlowKey) -> tuple:
    """A kernel FlowKey in the reference's hashable form."""
    return (bytes(key.addr_lo), bytes(key.addr_hi),
            int.from_bytes(key.port_lo.to_bytes(2, "little"), "big"),
            int.from_bytes(key.port_hi.to_bytes(2, "little"), "big"), key.vlan, key.proto)


def ip16(addr: str) -> bytes:
    ip = ipaddress.ip_address(addr)
    return MAPPED + ip.packed if ip.version == 4 else ip.packed
