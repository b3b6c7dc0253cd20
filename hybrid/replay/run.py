"""Running a capture through the datapath and the verdict engine, offline.

What a live attachment does with a packet, done on a buffer:

1. the replay clock (bpf/hybrid.bpf.c, "The clock") is set to the packet's capture time;
2. XDP runs on the frame with BPF_PROG_TEST_RUN (unless ``xdp_mode`` is off, as on a link
   attached without XDP); XDP_DROP drops it;
3. tc runs on it; TC_ACT_SHOT drops it; a decision the kernel took from the name cache comes
   back on the name-event ring, as live;
4. a packet tc marked (hybrid's mark bits in the returned __sk_buff) goes to the engine's own
   per-packet handler (:class:`ReplayEngine`, hybrid.engine.loop.Engine with nothing sent and
   nothing bound), whose flow verdicts and name-cache entries land in the same private maps, so
   later packets are bypassed, blocked or decided in the kernel as they would be live.

Everything is private: one datapath compiled for the replay (same sources, same flags as
``attach`` plus -DHYBRID_REPLAY_CLOCK), no pin, no interface, no namespace; every fd is closed
at the end. Programs run as received on ifindex 1 (lo, the only device every namespace has:
the kernel refuses a test run on a device that does not exist), which is registered as the
attachment's interfaces are; the side of each packet (client or server) is the replay's own
bookkeeping and the engine's ``indev``.

Time is the capture's, for the kernel (the replay clock) and for the engine: while a replay runs,
the ``time`` the engine's modules and hybrid.datapath.maps see answers ``monotonic()``,
``monotonic_ns()``, ``time()`` and ``time_ns()`` with the current packet's timestamp (verdict
TTLs, join timeouts, the verdict log's rate limit and its ``time`` field all follow the capture).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import logging
import mmap
import struct
import sys
import time as _time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hybrid.datapath.options import AttachOptions
from hybrid.errors import ConfigError, HybridError
from hybrid.kernel import abi, bpfsys
from hybrid.replay.capture import Capture, Frame, open_capture

log = logging.getLogger(__name__)

# The attach options that shape what the datapath and the engine decide (hybridctl replay and
# rules test take them). hook: with forward alone (the default) a marked packet no router forwards
# (link-local, multicast) is not queued, as live. Not here: the interfaces (a replay has none), the
# families, and how a range of queues is balanced (one engine decides every flagged packet).
# xdp_mode: native and generic run XDP before tc (a link attached with XDP); off and auto run tc
# alone (auto: what attach picks on veth and virtual links; on a physical NIC it would pick
# native). tc enforces every drop XDP makes (bpf/hybrid_common.h), so verdicts are the same
# either way; only the counters say where a packet was dropped (xdp_drop_* or drop_tc_*), and a
# replay without XDP runs twice as fast.
REPLAY_KEYS = ("xdp_mode", "hook", "mark", "mark_mask", "queues", "fail_open", "flag", "first_n", "watch_port",
               "watch_prefix", "block_prefix", "flow_table_size", "source_rate", "source_burst",
               "global_rate", "global_burst", "name_cache", "over_budget")
XDP_DROP = 1
# BPF_PROG_TEST_RUN takes a buffer of at most about a page for tc (the kernel's bpf_test_init:
# PAGE_SIZE less the skb's head- and tailroom). A longer frame (a GRO/GSO aggregate a capture on
# the gateway records as one packet, as tc sees it) runs on its first TEST_RUN_MAX bytes: the
# programs classify by the headers' own lengths and read names from the first payload bytes; the
# engine gets the whole packet. Counted in the report (``cut_for_test_run``).
TEST_RUN_MAX = 3500
CSUM_COMPLETE_MAX = 2048           # see _Run.go: checksums completed on packets up to this size
TC_ACT_SHOT = 2
REPLAY_IFINDEX = 1                 # lo: see the module's docstring
SIDE_INDEX = {"client": 1, "server": 2}     # the engine's nfpkt.indev for each side
PASSED, DROPPED, REWRITTEN = "passed", "dropped", "rewritten"
_TCP_SYN, _TCP_ACK = 0x02, 0x10
_VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)


# -- the capture's clock, for the engine -------------------------------------------------------------

class ReplayTime:
    """Stands in for the ``time`` module in the engine's modules while a replay runs: the clocks
    read the capture's time (``now_ns``, set per packet); everything else is the real module's."""

    def __init__(self):
        self.now_ns = 0

    def monotonic(self) -> float:
        return self.now_ns / 1e9

    def monotonic_ns(self) -> int:
        return self.now_ns

    def time(self) -> float:
        return self.now_ns / 1e9

    def time_ns(self) -> int:
        return self.now_ns

    def __getattr__(self, name):
        return getattr(_time, name)


# Modules whose ``time`` the replay replaces: every module of the engine and the maps API (verdict
# expiries). A module added to hybrid.engine that imports time is covered by the prefix.
_CLOCK_MODULES = ("hybrid.engine.", "hybrid.datapath.maps")


@contextlib.contextmanager
def capture_clock(clock: ReplayTime):
    """While inside, the engine's modules read ``clock`` as their ``time``."""
    import hybrid.datapath.maps  # noqa: F401 - imported before the swap, or it is not swapped
    import hybrid.engine.loop  # noqa: F401 - and with it every engine module it uses
    swapped = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith(_CLOCK_MODULES):
            continue
        if getattr(mod, "time", None) is _time:
            mod.time = clock
            swapped.append(mod)
    try:
        yield clock
    finally:
        for mod in swapped:
            mod.time = _time


# -- which side a packet came in on -------------------------------------------------------------------

@dataclass
class Sides:
    """How a packet's side is told. First that applies: the pcapng interface name
    (``client_ifaces`` / ``server_ifaces``), the source MAC (``client_macs``), the source address
    (``client_nets``); else the default: a packet from an address that has sent a connection's
    first SYN (SYN without ACK) is the client side's, any other the server side's."""
    client_ifaces: frozenset[str] = frozenset()
    server_ifaces: frozenset[str] = frozenset()
    client_macs: frozenset[bytes] = frozenset()
    client_nets: tuple = ()
    _syn_senders: set = field(default_factory=set)
    _net_sides: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, client_ifaces: Iterable[str] = (), server_ifaces: Iterable[str] = (),
              client_macs: Iterable[str] = (), client_nets: Iterable[str] = ()) -> Sides:
        macs = set()
        for m in client_macs:
            try:
                b = bytes.fromhex(m.replace(":", "").replace("-", ""))
            except ValueError:
                b = b""
            if len(b) != 6:
                raise ConfigError(f"client MAC {m!r}: write six hex bytes, e.g. 02:00:00:00:01:02")
            macs.add(b)
        nets = []
        for n in client_nets:
            try:
                nets.append(ipaddress.ip_network(n, strict=False))
            except ValueError:
                raise ConfigError(f"client net {n!r}: write an address or a prefix, e.g. 198.18.1.0/24") from None
        return cls(frozenset(client_ifaces), frozenset(server_ifaces), frozenset(macs), tuple(nets))

    def side(self, frame: Frame, src: bytes | None, syn: bool) -> str:
        if frame.iface is not None:
            if frame.iface in self.client_ifaces:
                return "client"
            if frame.iface in self.server_ifaces:
                return "server"
        if self.client_macs:
            return "client" if frame.data[6:12] in self.client_macs else "server"
        if self.client_nets:
            if src is None:
                return "server"
            side = self._net_sides.get(src)
            if side is None:
                a = ipaddress.ip_address(src)
                side = "client" if any(a in n for n in self.client_nets) else "server"
                if len(self._net_sides) < 1 << 16:
                    self._net_sides[src] = side
            return side
        if src is None:
            return "server"
        if syn:
            self._syn_senders.add(src)
        return "client" if src in self._syn_senders else "server"


# -- a packet's addresses -------------------------------------------------------------------------------

_IP4 = struct.Struct(">B5xHxB2x4s4s")      # version/IHL, flags/fragment offset, protocol, src, dst
_PORTS = struct.Struct(">HH")


def parse_l3(eth: bytes) -> tuple[int, int, int, bytes, bytes, int, int, int] | None:
    """(offset of the IP header, version, protocol, src, dst, sport, dport, tcp flags) of an
    Ethernet frame (VLAN tags skipped); an ICMP/ICMPv6 echo's identifier as both ports (as tc
    keys it), ports 0 when there are none (other protocols, a later fragment); None when it is
    not IP."""
    off = 12
    n = len(eth)
    if n < 14:
        return None
    etype = (eth[12] << 8) | eth[13]
    while etype in _VLAN_TPIDS and off + 6 <= n:
        off += 4
        etype = (eth[off] << 8) | eth[off + 1]
    off += 2
    if etype == 0x0800 and n >= off + 20:
        vihl, frag, proto, src, dst = _IP4.unpack_from(eth, off)
        frag &= 0x1FFF
        l4 = off + (vihl & 0x0F) * 4
        if not frag and proto == 1 and n >= l4 + 6 and eth[l4] in (0, 8):    # echo: keyed by its id
            ident = (eth[l4 + 4] << 8) | eth[l4 + 5]
            return off, 4, proto, src, dst, ident, ident, 0
        if frag or proto not in (6, 17) or n < l4 + 4:
            return off, 4, proto, src, dst, 0, 0, 0
        sport, dport = _PORTS.unpack_from(eth, l4)
        flags = eth[l4 + 13] if proto == 6 and n > l4 + 13 else 0
        return off, 4, proto, src, dst, sport, dport, flags
    if etype == 0x86DD and n >= off + 40:
        proto = eth[off + 6]
        src, dst = eth[off + 8:off + 24], eth[off + 24:off + 40]
        l4 = off + 40
        for _ in range(6):
            if proto in (0, 43, 60) and n >= l4 + 8:
                proto, l4 = eth[l4], l4 + (eth[l4 + 1] + 1) * 8
            elif proto == 44 and n >= l4 + 8:
                if struct.unpack_from(">H", eth, l4 + 2)[0] & 0xFFF8:
                    return off, 6, eth[l4], src, dst, 0, 0, 0
                proto, l4 = eth[l4], l4 + 8
            else:
                break
        if proto == 58 and n >= l4 + 6 and eth[l4] in (128, 129):
            ident = (eth[l4 + 4] << 8) | eth[l4 + 5]
            return off, 6, proto, src, dst, ident, ident, 0
        if proto not in (6, 17) or n < l4 + 4:
            return off, 6, proto, src, dst, 0, 0, 0
        sport, dport = struct.unpack_from(">HH", eth, l4)
        flags = eth[l4 + 13] if proto == 6 and n > l4 + 13 else 0
        return off, 6, proto, src, dst, sport, dport, flags
    return None


def _sum16(data: bytes, acc: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    acc += sum(struct.unpack(f">{len(data) // 2}H", data))
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return acc


_ADDR4 = struct.Struct(">4H")
_ADDR6 = struct.Struct(">16H")


def has_partial_checksum(frame: bytes, off: int) -> bool:
    """Whether the TCP/UDP checksum of the IP packet at ``off`` holds exactly its pseudo-header's
    sum (see :func:`complete_offload_checksum`): the replay's per-packet check, made in place."""
    n = len(frame)
    v = frame[off] >> 4
    if v == 4:
        ihl = (frame[off] & 15) * 4
        proto = frame[off + 9]
        total = (frame[off + 2] << 8) | frame[off + 3]
        if (proto != 6 and proto != 17) or frame[off + 6] & 0x3F or frame[off + 7] or total < ihl or off + total > n:
            return False
        a, b, c, d = _ADDR4.unpack_from(frame, off + 12)
        acc = a + b + c + d + proto + total - ihl
        field_at = off + ihl + (16 if proto == 6 else 6)
    elif v == 6 and n >= off + 40:
        proto = frame[off + 6]
        length = (frame[off + 4] << 8) | frame[off + 5]
        total = 40 + length
        if (proto != 6 and proto != 17) or off + total > n:
            return False
        acc = sum(_ADDR6.unpack_from(frame, off + 8)) + length + proto
        field_at = off + 40 + (16 if proto == 6 else 6)
    else:
        return False
    if field_at + 2 > off + total:
        return False
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return ((frame[field_at] << 8) | frame[field_at + 1]) == acc


def complete_offload_checksum(ip: bytes) -> bytes:
    """The packet as the engine gets it from NFQUEUE, which completes a checksum the sender left
    to the NIC (CHECKSUM_PARTIAL: veth, and any sender with checksum offload, puts only the
    pseudo-header's sum in the field; a capture on the path records it so). A TCP or UDP
    checksum field holding exactly that partial sum is completed; any other is left as it is (a
    checksum that is simply wrong stays wrong, as the receiver will see it). Fragments and
    other protocols are returned unchanged."""
    if len(ip) < 20:
        return ip
    version = ip[0] >> 4
    if version == 4:
        ihl = (ip[0] & 0x0F) * 4
        proto = ip[9]
        total = struct.unpack_from(">H", ip, 2)[0]
        if proto not in (6, 17) or struct.unpack_from(">H", ip, 6)[0] & 0x3FFF or total > len(ip) or total < ihl:
            return ip
        l4, end = ihl, total
        pseudo = ip[12:20] + struct.pack(">BBH", 0, proto, end - l4)
    elif version == 6 and len(ip) >= 40:
        proto = ip[6]
        end = 40 + struct.unpack_from(">H", ip, 4)[0]
        if proto not in (6, 17) or end > len(ip):        # extension headers: left alone
            return ip
        l4 = 40
        pseudo = ip[8:40] + struct.pack(">IxxxB", end - l4, proto)
    else:
        return ip
    off = l4 + (16 if proto == 6 else 6)
    if end < off + 2:
        return ip
    field_ = struct.unpack_from(">H", ip, off)[0]
    partial = _sum16(pseudo)
    if field_ != partial:
        return ip
    seg = bytearray(ip[l4:end])
    seg[off - l4:off - l4 + 2] = b"\0\0"
    full = (~_sum16(bytes(seg), partial)) & 0xFFFF
    if proto == 17 and full == 0:
        full = 0xFFFF
    out = bytearray(ip)
    struct.pack_into(">H", out, off, full)
    return bytes(out)


def forwarded(l3) -> bool:
    """Whether a router could forward the packet (what reaches the FORWARD hook, where the queue
    rule is by default): not to or from a link-local address, not to a multicast or broadcast
    address, not from an unspecified one. (The gateway's own unicast addresses are the other
    packets FORWARD never sees; a capture does not say which they are.)"""
    src, dst = l3[3], l3[4]
    if l3[1] == 4:
        return not (dst[0] >= 224 or dst[:2] == b"\xa9\xfe" or src[:2] == b"\xa9\xfe" or src == b"\0\0\0\0")
    return not (dst[0] == 0xFF or (dst[0] == 0xFE and dst[1] & 0xC0 == 0x80)
                or (src[0] == 0xFE and src[1] & 0xC0 == 0x80) or src == bytes(16))


def endpoint(addr: bytes, port: int) -> str:
    ip = ipaddress.ip_address(addr)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# -- the engine, offline --------------------------------------------------------------------------------

class NfPacket:
    """What the engine's handler asks of a NetfilterQueue packet, recorded instead of sent."""
    __slots__ = ("payload", "mark", "indev", "verdict", "rewritten")

    def __init__(self, payload: bytes, mark: int, indev: int):
        self.payload = payload
        self.mark = mark
        self.indev = indev
        self.verdict = None         # "accept" (repeat) or "drop"
        self.rewritten = False

    def get_payload(self) -> bytes:
        return self.payload

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def set_payload(self, payload: bytes) -> None:
        self.payload = bytes(payload)
        self.rewritten = True

    def repeat(self) -> None:
        self.verdict = "accept"

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


def _engine_class():
    from hybrid.engine.loop import Engine

    class ReplayEngine(Engine):
        """The engine's real decision code; what it would send (a reject's RSTs and ICMP errors)
        is counted, never sent, and its input interfaces are the replay's sides."""

        side_names: dict[int, str] = {}
        sent: list[bytes]

        def _send_raw(self, pkt, build, what):   # noqa: D401 - replaces the raw socket
            try:
                self.sent.append(build(pkt))
            except Exception as exc:  # noqa: BLE001 - as the engine: counted, never raised
                self.stats.reject_send_errors += 1
                log.debug("reject: %s not built (%s)", what, exc)

        def _send_routed(self, out, version):     # reached only through _send_raw, replaced above
            self.sent.append(out)

        def _send_l2(self, out, pkt, what):       # likewise (a bridged packet's reject)
            self.sent.append(out)

        def _start_syn_learner(self):             # a packet socket reading this host's traffic: never
            self._syn_learner = False

        def _port_mac(self, index):               # the sides are no interfaces of this host
            return None

        def _ifname(self, index):
            return self.side_names.get(index)

    return ReplayEngine


# -- results ----------------------------------------------------------------------------------------

@dataclass
class FlowRecord:
    """One flow of the replay, oriented from the endpoint that sent its first packet (``a``)."""
    proto: int
    a: str
    b: str
    first_seen_ns: int
    packets: list[int] = field(default_factory=lambda: [0, 0])     # [from a, from b]
    bytes: list[int] = field(default_factory=lambda: [0, 0])
    flagged: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    engine_packets: int = 0
    cache_packets: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {PASSED: 0, DROPPED: 0, REWRITTEN: 0})
    decided_by: str = "nothing"           # "engine", "kernel cache", "kernel" (prefix, ban), "nothing"
    rule: str | None = None               # the rule that decided (None: none matched, or undecided)
    action: str | None = None             # the engine's or the cache's last action on the flow
    flow_verdict: str | None = None       # the last flow verdict written (bypass, block, inspect)
    side: str = "client"                  # the side of the flow's first packet
    orig: tuple = ()                      # (address bytes, port) of a: the packets' direction

    @property
    def verdict(self) -> str:
        """dropped: every packet after the decision dropped (or any dropped and none passed after);
        rewritten: any rewritten; else passed. A flow whose packets were dropped only some of the
        time says ``mixed``."""
        o = self.outcomes
        if o[REWRITTEN]:
            return REWRITTEN
        if o[DROPPED] and not o[PASSED]:
            return DROPPED
        if o[DROPPED]:
            return "mixed" if self.flow_verdict != "block" else DROPPED
        return PASSED

    def as_dict(self) -> dict:
        return {"proto": {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(self.proto, str(self.proto)),
                "a": self.a, "b": self.b, "first_seen": round(self.first_seen_ns / 1e9, 6), "side": self.side,
                "packets": list(self.packets), "bytes": list(self.bytes), "flagged": self.flagged,
                "reasons": dict(self.reasons), "engine_packets": self.engine_packets,
                "cache_packets": self.cache_packets, "outcomes": dict(self.outcomes),
                "decided_by": self.decided_by, "rule": self.rule, "action": self.action,
                "flow_verdict": self.flow_verdict, "verdict": self.verdict}


@dataclass
class Report:
    capture: str
    format: str
    packets: int = 0                      # records in the capture
    replayed: int = 0                     # run through the programs
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: str | None = None
    outcomes: dict[str, int] = field(default_factory=lambda: {PASSED: 0, DROPPED: 0, REWRITTEN: 0})
    sides: dict[str, dict[str, int]] = field(default_factory=lambda: {
        s: {"packets": 0, "bytes": 0, "flagged": 0, "dropped": 0} for s in ("client", "server")})
    kernel: dict[str, int] = field(default_factory=dict)      # the datapath's counters (status's names)
    engine: dict = field(default_factory=dict)                # the engine's snapshot (status's names)
    flows: list[FlowRecord] = field(default_factory=list)
    first_ns: int = 0
    last_ns: int = 0
    elapsed_s: float = 0.0
    rejects_built: int = 0
    cut_for_test_run: int = 0
    flagged_not_forwarded: int = 0        # marked but link-local/multicast: never at the FORWARD hook

    def as_dict(self) -> dict:
        return {"capture": self.capture, "format": self.format, "packets": self.packets, "replayed": self.replayed,
                "skipped": dict(self.skipped), "truncated": self.truncated, "outcomes": dict(self.outcomes),
                "sides": self.sides, "kernel": self.kernel, "engine": self.engine,
                "capture_seconds": round((self.last_ns - self.first_ns) / 1e9, 6),
                "elapsed_seconds": round(self.elapsed_s, 3), "rejects_built": self.rejects_built,
                "cut_for_test_run": self.cut_for_test_run, "flagged_not_forwarded": self.flagged_not_forwarded,
                "flows": [f.as_dict() for f in self.flows]}


# -- the replay ------------------------------------------------------------------------------------

class _PcapOut:
    """A pcap file of Ethernet frames (nanosecond timestamps), written as the replay goes."""

    def __init__(self, path: str):
        import dpkt
        try:
            self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        self.w = dpkt.pcap.Writer(self.f, linktype=1, nano=True)
        self.count = 0

    def write(self, ts_ns: int, frame: bytes) -> None:
        self.w.writepkt(frame, ts=ts_ns / 1e9)
        self.count += 1

    def close(self) -> None:
        self.f.close()


class Replay:
    """One replay: ``opts`` the attach options that shape classification (their ``interfaces``
    are not used), ``rules_path`` the engine's rules, ``sides`` how packets are given a side."""

    def __init__(self, rules_path: str, opts: AttachOptions, sides: Sides | None = None, *,
                 log_stream=None, write_passed: str | None = None, write_dropped: str | None = None,
                 progress: Callable[[int, int, int, float], None] | None = None,
                 side_names: tuple[str, str] = ("client", "server")):
        self.rules_path = rules_path
        self.opts = opts
        self.sides = sides or Sides()
        self.log_stream = log_stream
        self.write_passed = write_passed
        self.write_dropped = write_dropped
        self.progress = progress
        self.side_names = side_names

    def run(self, capture: str | Capture) -> Report:
        from hybrid.engine.rules import load_rules
        cap = capture if isinstance(capture, Capture) else open_capture(capture)
        load_rules(self.rules_path, mark_mask=self.opts.mark_mask)   # a broken file: one line, before compiling
        frames = iter(cap)
        first = next(frames, None)            # so is a file that is not a capture
        frames = itertools.chain((first,), frames) if first is not None else iter(())
        opts = self.opts
        with contextlib.ExitStack() as stack:
            from hybrid.datapath import loader
            dp = loader.compile_datapath(None, flow_table_size=opts.flow_table_size, names=opts.name_cache,
                                         replay_clock=True)
            stack.callback(dp.close)
            maps = dp.maps()
            stack.callback(maps.close)
            clock = ReplayTime()
            stack.enter_context(capture_clock(clock))
            stack.enter_context(_one_line_engine_errors())
            run = _Run(self, dp, maps, clock, stack)
            return run.go(cap, frames)


class _OneLine(logging.Filter):
    """An engine error about a packet of the capture is one line (the engine logs the first few
    with their traceback, live); they are counted in the totals (engine errors)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


@contextlib.contextmanager
def _one_line_engine_errors():
    logger = logging.getLogger("hybrid.engine.loop")
    f = _OneLine()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


class _Run:
    """The state of one replay while it runs."""

    def __init__(self, replay: Replay, dp, maps, clock: ReplayTime, stack: contextlib.ExitStack):
        from hybrid.datapath import attach as attach_mod
        self.replay = replay
        self.opts = opts = replay.opts
        self.dp, self.maps, self.clock = dp, maps, clock
        attach_mod._apply_config(maps, opts, None)        # what attach writes, from the same options
        self.run_xdp = opts.xdp_mode in ("native", "generic")
        self.slot = maps.register_iface(REPLAY_IFINDEX, abi.IFACE_XDP if self.run_xdp else 0)
        # The queue rule's hooks: with input (or output) the gateway's own packets are queued
        # too; with forward alone (the default) only what it forwards.
        self.queue_local = bool(set(opts.hooks) - {"forward"})
        self.not_forwarded = 0
        self.mark_value = opts.mark & opts.mark_mask
        self.mark_mask = opts.mark_mask
        Engine = _engine_class()
        self.engine = Engine(opts.queue_first, replay.rules_path, maps=maps, mark_mask=opts.mark_mask,
                             fail_open=opts.fail_open, log_stream=replay.log_stream)
        self.engine.sent = []
        self.engine.side_names = {SIDE_INDEX["client"]: replay.side_names[0],
                                  SIDE_INDEX["server"]: replay.side_names[1]}
        stack.callback(self._close_engine)
        self.engine._declare_needs()                      # what bind() tells the kernel
        self.engine._link_name_cache()
        self.ring = None
        if self.engine.names is not None:
            from hybrid.kernel.ringbuf import RingBuffer
            self.ring = RingBuffer.open(maps.fd(abi.MAP_NAME_EVENTS))
            stack.callback(self.ring.close)
            self.engine.names.vlog = self.engine.vlog
        # What the engine decided for the packet being handled: the last rule decision and the
        # flow verdicts written (wrapped on these instances only).
        self._decided: list = []
        self._written: list = []
        rules = self.engine.rules
        decide = rules.decide

        def recording_decide(pkt, _decide=decide, _log=self._decided):
            d = _decide(pkt)
            _log.append(d)
            return d
        rules.decide = recording_decide
        write_verdict = maps.write_verdict

        def recording_write(key, verdict, ttl_ns, *a, _w=write_verdict, _log=self._written, **kw):
            _log.append(verdict)
            return _w(key, verdict, ttl_ns, *a, **kw)
        maps.write_verdict = recording_write
        self.out_passed = _PcapOut(replay.write_passed) if replay.write_passed else None
        self.out_dropped = _PcapOut(replay.write_dropped) if replay.write_dropped else None
        for out in (self.out_passed, self.out_dropped):
            if out is not None:
                stack.callback(out.close)
        # The clock's key and value, and the tc and XDP contexts, made once.
        # The clock is a BPF_F_MMAPABLE array: its one value is written through the mapping.
        self.clock_map = mmap.mmap(dp.clock_fd(), mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.clock_words = memoryview(self.clock_map).cast("Q")
        stack.callback(self._close_clock)
        self.flows: dict[tuple, FlowRecord] = {}
        self.last_reasons = self._reason_counts()
        self.pending_cache: list = []

    def _close_clock(self) -> None:
        self.clock_words.release()
        self.clock_map.close()

    def _close_engine(self) -> None:
        eng = self.engine
        if eng.names is not None:
            eng.names.stop()
        with contextlib.suppress(Exception):
            eng._declare_needs(bound=False)

    def _reason_counts(self) -> dict[str, int]:
        c = self.maps.slot_counters(self.slot)         # one slot's per-CPU values: one lookup
        return {name: c.get(f"reason_{name}", 0) for name in abi.REASON_NAMES.values()}

    def _on_event(self, data) -> None:
        ev = abi.NameEvent.from_buffer_copy(bytes(data[:ctypes.sizeof(abi.NameEvent)]))
        self.pending_cache.append(ev)
        self.engine.names._event(data)

    def go(self, cap: Capture, frames: Iterable[Frame]) -> Report:
        # The per-packet path: kept flat and free of per-packet allocations where it can be
        # (measured by docs/benchmarks.md's "Replay"); every test run reuses its buffers.
        rep = Report(cap.path, cap.format)
        t0 = _time.monotonic()
        last_progress = t0 - 1.0            # the first report at the first 1,024 packets, then every 0.5 s
        progress = self.replay.progress
        tc = bpfsys.TestRun(self.dp.tc_fd, bpfsys.SkBuff(ifindex=REPLAY_IFINDEX, ingress_ifindex=REPLAY_IFINDEX),
                            TEST_RUN_MAX, name=abi.PROG_TC)
        tc_in, tc_out = tc.ctx, tc.ctx_out
        xdp = None
        if self.run_xdp:
            xdp = bpfsys.TestRun(self.dp.xdp_fd, bpfsys.XdpMd(ingress_ifindex=REPLAY_IFINDEX), TEST_RUN_MAX,
                                 name=abi.PROG_XDP)
            xdp_in = xdp.ctx
        clock, clock_words = self.clock, self.clock_words
        sides = self.replay.sides
        flows = self.flows
        outcomes = rep.outcomes
        mark_mask, mark_value = self.mark_mask, self.mark_value
        out_passed, out_dropped = self.out_passed, self.out_dropped
        ring = self.ring
        side_stats = rep.sides
        skipped_out = "sent by the capturing host (a copy of a packet received on another link)"
        n_out = 0
        replayed = 0
        first_ns = last_ns = 0
        for frame in frames:
            if frame.direction == "out":
                n_out += 1
                continue
            data = frame.data
            l3 = parse_l3(data)
            if l3 is not None:
                src = l3[3]
                side = sides.side(frame, src, l3[2] == 6 and (l3[7] & 0x12) == _TCP_SYN)
            else:
                side = sides.side(frame, None, False)
            ts = frame.ts_ns
            if not first_ns:
                first_ns = ts
            last_ns = ts
            clock.now_ns = ts
            clock_words[0] = ts
            replayed += 1
            n = len(data)
            if l3 is not None and (l3[2] == 6 or l3[2] == 17) and n - l3[0] <= CSUM_COMPLETE_MAX:
                # What the sender's stack completes on the way out (CHECKSUM_PARTIAL), completed
                # here: the name parsers trust such a packet live (bpf/namecache.h) and NFQUEUE
                # hands the engine it completed. Larger packets (bulk data, aggregates) are left
                # as captured: no name is read from them, and summing them costs.
                if has_partial_checksum(data, l3[0]):
                    data = data[:l3[0]] + complete_offload_checksum(data[l3[0]:])
            st = side_stats[side]
            st["packets"] += 1
            st["bytes"] += n
            rec = None
            if l3 is not None:
                _, _, proto, src, dst, sport, dport, _ = l3
                a, b = (src, sport), (dst, dport)
                key = (proto, a, b) if a <= b else (proto, b, a)
                rec = flows.get(key)
                if rec is None:
                    rec = flows[key] = FlowRecord(proto, endpoint(src, sport), endpoint(dst, dport), ts, side=side)
                    rec.orig = a
                d = 0 if a == rec.orig else 1
                rec.packets[d] += 1
                rec.bytes[d] += n
            outcome = PASSED
            out_frame = data
            run_data = data
            if n > TEST_RUN_MAX:
                run_data = data[:TEST_RUN_MAX]
                rep.cut_for_test_run += 1
            if xdp is not None:
                xdp_in.data_end = len(run_data)
                if xdp(run_data) == XDP_DROP:
                    outcome = DROPPED
                    if rec is not None and rec.decided_by == "nothing":
                        rec.decided_by = "kernel"
            if outcome is PASSED:
                tc_in.wire_len = n if n < 65535 else 65535
                ret = tc(run_data)
                cache = ring is not None and self._drain_cache(rec)
                mark = tc_out.mark
                if ret == TC_ACT_SHOT:
                    outcome = DROPPED
                    if rec is not None and not cache and rec.decided_by == "nothing":
                        rec.decided_by = "kernel"
                elif (mark & mark_mask) == mark_value:
                    st["flagged"] += 1
                    outcome, out_frame = self._to_engine(data, l3, rec, side, mark)
            outcomes[outcome] += 1
            if rec is not None:
                rec.outcomes[outcome] += 1
            if outcome is DROPPED:
                st["dropped"] += 1
                if out_dropped is not None:
                    out_dropped.write(ts, data)
            elif out_passed is not None:
                out_passed.write(ts, out_frame)
            if progress is not None and not replayed & 1023:
                now = _time.monotonic()
                if now - last_progress >= 0.5:
                    last_progress = now
                    progress(replayed, cap.packets, len(flows), now - t0)
        if n_out:
            rep.skipped[skipped_out] = n_out
        rep.replayed, rep.first_ns, rep.last_ns = replayed, first_ns, last_ns
        rep.flagged_not_forwarded = self.not_forwarded
        rep.packets = cap.packets
        for k, v in cap.skipped.items():
            rep.skipped[k] = rep.skipped.get(k, 0) + v
        rep.truncated = cap.truncated
        rep.format = cap.format
        rep.elapsed_s = _time.monotonic() - t0
        rep.kernel = self._kernel_totals()
        eng = self.engine
        snap = {"packets": eng.stats.packets, "actions": dict(eng.stats.actions),
                "flow_verdicts": dict(eng.stats.flow_verdicts), "errors": eng.stats.errors,
                "doubts": dict(eng.stats.doubts), "rules": dict(eng.rules.counters), "default": eng.rules.default_count,
                "name_cache": eng.names.snapshot() if eng.names is not None else None}
        rep.engine = snap
        rep.rejects_built = len(eng.sent)
        rep.flows = sorted(self.flows.values(), key=lambda f: f.first_seen_ns)
        return rep

    def _kernel_totals(self) -> dict[str, int]:
        c = dict(self.maps.stats().get(REPLAY_IFINDEX) or {})
        return c

    def _drain_cache(self, rec: FlowRecord | None) -> bool:
        if not self.ring.pending():
            return False
        self.pending_cache.clear()
        self.ring.drain(self._on_event)
        hit = False
        for ev in self.pending_cache:
            hit = True
            if rec is not None:
                rec.cache_packets += 1
                rec.decided_by = "kernel cache"
                names = self.engine.names._rule_names
                rule_id = ev.rule
                rec.rule = names[rule_id] if 0 < rule_id < len(names) else None
                rec.action = abi.NAME_ACTIONS.get(ev.action, "?")
                v = abi.VERDICT_NAMES.get(ev.verdict)
                if v in ("bypass", "block"):
                    rec.flow_verdict = v
        return hit

    def _to_engine(self, data: bytes, l3, rec: FlowRecord | None, side: str, mark: int):
        """The engine's handler on a flagged packet: (outcome, the frame as it leaves)."""
        if rec is not None:
            rec.flagged += 1
            now = self._reason_counts()
            for name, n in now.items():
                delta = n - self.last_reasons.get(name, 0)
                if delta:
                    rec.reasons[name] = rec.reasons.get(name, 0) + delta
            self.last_reasons = now
        if l3 is None:              # the queue rule is an iptables/ip6tables rule: IP only
            return PASSED, data
        if not self.queue_local and not forwarded(l3):
            # Marked, but never at the hook the queue rule is in: it goes up to the gateway's own
            # stack (an ICMPv6 router solicitation, say) unqueued, as live.
            self.not_forwarded += 1
            return PASSED, data
        ip_off = l3[0]
        nf = NfPacket(complete_offload_checksum(data[ip_off:]), mark, SIDE_INDEX[side])
        self._decided.clear()
        self._written.clear()
        self.engine._handle(nf)
        if rec is not None:
            rec.engine_packets += 1
            written = [abi.VERDICT_NAMES.get(c) for c in self._written if c is not None]
            written = [v for v in written if v in ("bypass", "block")]
            if self._decided:
                d = self._decided[-1]
                acted = d.rule is not None or d.action != "accept" or bool(written) or nf.verdict == "drop"
                # a later pass-through (the responder's packets of a flow the cache decided, say)
                # does not take the decision away from who made it
                if acted or rec.decided_by == "nothing":
                    rec.decided_by = "engine"
                    rec.rule = d.rule
                    rec.action = d.action
            if written:
                rec.flow_verdict = written[-1]
                rec.decided_by = "engine"
        if nf.verdict == "drop" or nf.verdict is None and not self.opts.fail_open:
            return DROPPED, data
        if nf.rewritten:
            return REWRITTEN, data[:ip_off] + nf.payload
        return PASSED, data


def replay(capture: str, rules_path: str, opts: AttachOptions, sides: Sides | None = None, **kw) -> Report:
    """Replay ``capture`` (see :class:`Replay`)."""
    if not isinstance(opts, AttachOptions):
        raise HybridError("replay needs AttachOptions")
    return Replay(rules_path, opts, sides, **kw).run(capture)
