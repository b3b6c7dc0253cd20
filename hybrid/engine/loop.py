"""The verdict engine: one process per NFQUEUE, deciding what happens to each queued packet and
feeding flow verdicts back into the kernel's flow table.

Per packet: decode (hybrid.engine.packet) -> a ClientHello or request head split over TCP segments
held back until joined (hybrid.engine.join) -> first matching rule (hybrid.engine.rules) -> flow follow-up
written to the pinned flow table *before* the packet's verdict, so that the flow's next packets
are already bypassed or blocked in the kernel -> the packet verdict:

- accept: clear hybrid's mark bit and return NF_REPEAT. The packet re-enters the same netfilter
  hook, no longer matches the queue rule, and meets the user's own rules after it (a plain
  NF_ACCEPT would skip them all);
- drop; reject (drop, then through a raw socket a TCP RST to the sender and one on to the
  receiver, or an ICMP unreachable to the sender; on a bridge, which has no address to route
  from, as Ethernet frames out of the bridge ports, see :meth:`Engine._send_l2`); rewrite (new payload, checksums recomputed,
  then as accept); mark (set the rule's bits under its mask, then as accept).

Before a flow verdict is written, one place (:meth:`Engine._settle`) checks it against what the
server will see. A bypass is refused when the engine cannot be sure the server reads the bytes as
it did (a head, ClientHello or DNS name it could not read exactly, a join it gave up, a checksum
the receiver will reject, a TTL that may expire before the server, bytes that are not the start
of the client's stream): the packet gets the rules' ``on_doubt`` (inspect: passed, the flow kept
inspected; drop; reset), counted by reason. Flow verdicts come from the side that is speaking: a
bypass decided on the responder's bytes is not written, and a BLOCK earned by a rule on client
bytes covers the flow only when the kernel saw the flow's own handshake and the bytes came from
the side that opened it (else it covers the packet). Every verdict the engine writes belongs to
its connection: a new SYN on the same 5-tuple starts afresh in the kernel.

Nothing a packet carries may stop the engine: an exception in decoding, a rule or a plugin is
counted and the packet accepted (the engine fails open per packet, as the queue does when the
engine is away). The engine never compiles BPF: it only opens the pinned maps.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from hybrid import instance as inst
from hybrid.datapath import queues
from hybrid.engine import follow, kernelcache, quic, rewrite
from hybrid.engine.join import (
    ABANDON_REASONS,
    DECIDE,
    JOIN_TTL,
    SegmentJoiner,
    Step,
    stricter,
)
from hybrid.engine.kernelcache import KernelNameCache
from hybrid.engine.packet import Packet, client_hello_problem, decode, http_unparsed
from hybrid.engine.quic import QuicJoiner, QuicResult
from hybrid.engine.rules import ON_DOUBT, Decision, RulesError, RuleSet, load_rules
from hybrid.errors import HybridError, TableFullError
from hybrid.fleet.share import ShareSender
from hybrid.kernel import abi, nfq

log = logging.getLogger(__name__)

FLOW_VERDICTS = {"bypass": abi.VERDICT_BYPASS, "block": abi.VERDICT_BLOCK, "inspect": abi.VERDICT_INSPECT}
STATS_INTERVAL = 0.5   # seconds between stats-file writes while counters change
# Decision-time histogram: the handler's duration in ns lands in slot dt.bit_length(), i.e. slot i
# counts 2**(i-1) <= dt < 2**i (slot 0: dt == 0). Powers of two need no search and no clamp (a
# 64-bit ns count has at most 64 bits), so the per-packet cost is two clock reads, one
# bit_length() and two additions. Published as "decision_ns_log2" and "decision_ns_sum".
DECISION_SLOTS = 65
_now_ns = time.perf_counter_ns


class RateLimiter:
    """Token bucket for the verdict log: a flood must not fill the disk."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        return False


NAME_LOG_MAX = 255     # a Host header may be long; a DNS name or SNI never is


class VerdictLog:
    """JSON lines: time, queue, flow, rule, action (and the flow follow-up). Rate-limited; when
    lines were suppressed, the next line that passes says how many."""

    def __init__(self, stream, rate: float = 50.0, burst: int = 200):
        self.stream = stream
        self.limit = RateLimiter(rate, burst)
        self._lock = threading.Lock()      # the engine's thread and the name-cache reader

    def write(self, queue: int, pkt: Packet, d: Decision) -> None:
        rec = {"time": round(time.time(), 6), "queue": queue, "rule": d.rule, "action": d.action,
               "flow": d.flow, "proto": pkt.proto,
               "src": str(pkt.src) if pkt.version else None, "sport": pkt.sport,
               "dst": str(pkt.dst) if pkt.version else None, "dport": pkt.dport}
        if named := pkt.names_read():     # the name the decision was about, as the rules read it
            rec["view"], rec["name"] = named[0], named[1][:NAME_LOG_MAX]
        self._emit(rec)

    def write_cache(self, queue: int, ev, rec: dict, admitted: bool = False) -> None:
        """A decision the kernel took from the name cache (``"by": "cache"``); ``admitted``: the
        caller already passed :meth:`admit`."""
        src, sport, dst, dport = kernelcache.event_endpoints(ev)
        self._emit({"time": round(time.time(), 6), "queue": queue, "rule": rec["rule"], "action": rec["action"],
                    "flow": rec["flow"], "proto": ev.flow.proto, "src": src, "sport": sport, "dst": dst,
                    "dport": dport, "by": "cache", "name": rec["name"]}, admitted)

    def admit(self) -> bool:
        """Whether the rate limit lets one more line through (counted as written, or as
        suppressed): a caller checks before it builds a line that costs."""
        with self._lock:
            return self.limit.allow()

    def _emit(self, rec: dict, admitted: bool = False) -> None:
        with self._lock:
            if not admitted and not self.limit.allow():
                return
            if self.limit.suppressed:
                rec["suppressed_before"] = self.limit.suppressed
                self.limit.suppressed = 0
            self.stream.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self.stream.flush()


@dataclass
class EngineStats:
    queue: int
    started: float = field(default_factory=time.time)
    packets: int = 0
    actions: dict[str, int] = field(default_factory=lambda: {a: 0 for a in ("accept", "drop", "reject", "rewrite", "mark")})
    flow_verdicts: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FLOW_VERDICTS})
    errors: int = 0            # packets whose handling raised (accepted, fail-open)
    flow_write_errors: int = 0
    pinned_write_errors: int = 0   # BLOCKs written to the flow table but not pinned (pinned table full)
    hellos_joined: int = 0     # split ClientHellos held back and decided on the joined bytes
    hellos_abandoned: int = 0  # gave up joining (out of order, too big, timed out, table full)
    http_heads_joined: int = 0     # the same for HTTP request heads sent in pieces
    http_heads_abandoned: int = 0
    # The segment joiner (hybrid.engine.join): joins given up, by reason (join.ABANDON_REASONS);
    # pieces held beyond a hole or kept with nothing before them; messages decided on two
    # readings (overlaps with different bytes); pieces the joiner set pkt.doubt on; flows
    # remembered as abandoned that the memory's bound dropped before JOIN_TTL.
    joins_abandoned: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ABANDON_REASONS, 0))
    joins_out_of_order: int = 0
    joins_overlap_differs: int = 0
    joins_doubted: int = 0
    joins_forgotten: int = 0
    # QUIC (hybrid.engine.quic): Initial packets decrypted, ClientHellos read to their end and
    # decided, datagrams held while one was joined, datagrams dropped by quic = "block". Its
    # doubts are counted in ``doubts`` as "quic:<reason>".
    quic_initials: int = 0
    quic_snis: int = 0
    quic_held: int = 0
    quic_blocked: int = 0
    reloads: int = 0
    reload_errors: int = 0
    last_reload_error: str | None = None
    reject_send_errors: int = 0    # a reject's RSTs or ICMP errors not built or not sent (dropped still)
    # On a bridge: onward RSTs not sent because the receiver's MAC address behind its port was
    # not learnt yet (no queued packet of the other direction came from it); never guessed.
    reject_no_mac: int = 0
    rewrite_errors: int = 0        # a rewrite that cannot be made (a fragment, IPsec AH): dropped instead
    # Packets the engine would have bypassed their flow on, but could not be sure the server
    # reads as it did, by reason ("http:several-hosts", "tls:interleaved", "dns:forward-pointer",
    # "join:abandoned", "tcp:bad-checksum", "ip:low-ttl", "tcp:not-stream-start", ...): the flow
    # is not bypassed; the packet gets the rules' on_doubt (counted in doubt_actions).
    doubts: dict[str, int] = field(default_factory=dict)
    doubt_actions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ON_DOUBT, 0))
    # Flow verdicts narrowed to the side that spoke: a bypass decided on the responder's bytes
    # (the flow is left as it was), a BLOCK earned on client bytes without the flow's own
    # handshake or from the responder side (the packet is dropped, the flow kept inspected).
    scoped: dict[str, int] = field(default_factory=lambda: {"responder-side": 0, "block-packet-only": 0})
    # Following a flow's messages after its first decision (hybrid.engine.follow): request heads
    # and DNS messages decided at a boundary, directions whose following started or stopped (the
    # stream is no longer HTTP), packets that held a cut message, states the bound forgot.
    follow: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("started", "http_requests", "dns_messages", "held", "stopped"), 0))
    decision_ns_log2: list[int] = field(default_factory=lambda: [0] * DECISION_SLOTS)
    decision_ns_sum: int = 0


def _attached_to_a_bridge() -> bool:
    """Whether this namespace's hybrid instance is attached to bridge ports (its state says so)."""
    try:
        with open(inst.state_path(inst.name())) as f:
            return bool(json.load(f).get("bridges"))
    except (OSError, ValueError, HybridError):
        return False


class _SynLearner:
    """On a bridge, the MAC addresses of TCP endpoints by (port, address), learnt from every SYN
    and SYN-ACK crossing the namespace's links (an AF_PACKET socket whose classic BPF filter
    passes only those, 128 bytes of each): an onward RST must reach the receiver at layer 2, and
    a receiver's own packets are seldom queued before the packet that gets rejected (tc queues
    the client's first payload, not the server's SYN-ACK). Every connection a RST can end showed
    both ends in its handshake. Keyed by the port the frame came in by, as Engine._learn."""

    # ldh [12]; v4: proto 6, not a later fragment, flags at 14 + IHL + 13; v6: next header 6,
    # flags at 14 + 40 + 13; SYN set -> keep 128 bytes, else nothing.
    _FILTER = ((0x28, 0, 0, 12), (0x15, 0, 7, 0x0800), (0x30, 0, 0, 23), (0x15, 0, 11, 6), (0x28, 0, 0, 20),
               (0x45, 9, 0, 0x1FFF), (0xB1, 0, 0, 14), (0x50, 0, 0, 27), (0x45, 5, 6, 0x02),
               (0x15, 0, 5, 0x86DD), (0x30, 0, 0, 20), (0x15, 0, 3, 6), (0x30, 0, 0, 67), (0x45, 0, 1, 0x02),
               (0x06, 0, 0, 128), (0x06, 0, 0, 0))
    _SO_ATTACH_FILTER = 26
    _PACKET_OUTGOING = 4

    def __init__(self, learn: Callable[[int, bytes, bytes], None]):
        self.learn = learn
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        prog = b"".join(struct.pack("HBBI", *ins) for ins in self._FILTER)
        buf = ctypes.create_string_buffer(prog)
        self.sock.setsockopt(socket.SOL_SOCKET, self._SO_ATTACH_FILTER,
                             struct.pack("HL", len(self._FILTER), ctypes.addressof(buf)))
        self.sock.settimeout(0.5)
        self._stop = threading.Event()
        self._indexes: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, name="syn-learner", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self.sock.recvfrom(128)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == self._PACKET_OUTGOING or len(frame) < 54:
                continue
            etype = frame[12:14]
            if etype == b"\x08\x00" and frame[23] == 6:
                src = frame[26:30]
            elif etype == b"\x86\xdd" and frame[20] == 6:
                src = frame[22:38]
            else:
                continue            # read before the filter was attached
            index = self._indexes.get(addr[0])
            if index is None:
                try:
                    index = self._indexes[addr[0]] = socket.if_nametoindex(addr[0])
                except OSError:
                    continue
            self.learn(index, src, frame[6:12])

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


class Engine:
    """Binds one queue and decides its packets. ``run()`` blocks until ``stop()`` (or SIGTERM/
    SIGINT when installed with ``install_signals``)."""

    def __init__(self, queue: int, rules_path: str, *, maps=None, mark_mask: int = 0,
                 fail_open: bool = True, maxlen: int = 4096, log_stream=None,
                 stats_path: str | None = None, flow_ttl: int | None = None, share_fd: int | None = None):
        self.queue = queue
        self.rules_path = rules_path
        self.flow_ttl = flow_ttl                           # overrides the file's (service config)
        # A broken file fails before binding; so does a mark that would touch hybrid's own bits.
        self.rules: RuleSet = load_rules(rules_path, flow_ttl, mark_mask=mark_mask)
        self.maps = maps
        self.mark_mask = mark_mask                         # hybrid's bits: cleared on accept
        self._keep_bits = ~mark_mask & 0xFFFFFFFF
        self.fail_open = fail_open
        self.maxlen = maxlen
        self.vlog = VerdictLog(log_stream) if log_stream is not None else None
        self.stats = EngineStats(queue)
        self.stats_path = stats_path
        self._nfq = None
        self._raw4: socket.socket | None = None
        self._raw6: socket.socket | None = None
        self._ifnames: dict[int, str | None] = {}
        # Bridged packets (a physical in-port): (port ifindex, source address) -> source MAC,
        # learnt from queued packets, so a reject can address a receiver at layer 2.
        self._macs: dict[tuple[int, bytes], bytes] = {}
        self._port_macs: dict[int, bytes | None] = {}
        self._l2: tuple[int, int, bytes | None] | None = None   # the rejected packet's ports and source MAC
        self._packet_sock: socket.socket | None = None
        self._syn_learner: _SynLearner | bool | None = None   # started by the first bridged packet
        self._key_pkt: Packet | None = None      # _flow_key()'s packet and its key
        self._key: tuple[bytes, int] | None = None
        self._facts_pkt: Packet | None = None    # _facts()'s packet and its answer
        self._facts_val: _Facts | None = None
        self.joiner = SegmentJoiner(self.stats)   # split ClientHellos and request heads (join.py)
        self.streams = follow.Streams()            # followed directions' carries (follow.py)
        self.quic = QuicJoiner(self.stats)         # the ClientHellos of QUIC Initials (quic.py)
        self._stop = False
        self._dirty = False
        self._publisher: threading.Thread | None = None
        self._publisher_stop = threading.Event()
        self.setup: nfq.QueueSetup | None = None
        # The kernel's name-verdict cache (kernelcache.py), when the datapath has one: set up
        # at bind, its generation renewed by every reload.
        self.names: KernelNameCache | None = None
        # Blocks a rule shares with the fleet go to the supervisor's CrowdSec link (share.py).
        self.share = ShareSender.from_fd(share_fd)

    # -- lifecycle -------------------------------------------------------------------------------
    def bind(self) -> None:
        from netfilterqueue import NetfilterQueue
        q = NetfilterQueue()
        try:
            q.bind(self.queue, self._handle, max_len=self.maxlen)
        except OSError as exc:
            raise HybridError(f"binding NFQUEUE {self.queue}: {exc} (is another engine bound to it?)") from None
        self._nfq = q
        self.setup = nfq.configure(q.get_fd(), self.queue, fail_open=self.fail_open, maxlen=self.maxlen)
        try:
            queues.record_baseline(self.queue)
        except Exception as exc:  # noqa: BLE001 - a missing figure in status must not stop an engine
            log.warning("queue %d: counters at bind not recorded: %s", self.queue, exc)
        self._declare_needs()
        self._link_name_cache()
        if self.maps is not None and _attached_to_a_bridge():
            self._start_syn_learner()     # before the first handshake the engine may have to end

    def _link_name_cache(self) -> None:
        if self.maps is None or not getattr(self.maps, "has_name_cache", False):
            return
        try:
            names = KernelNameCache(self.maps, self.queue)
            names.start(self.rules)
            if self.stats_path:     # the instance's directory: where the engines agree on a reader
                names.start_reader(os.path.join(os.path.dirname(self.stats_path), "name-events.lock"), self.vlog,
                                   changed=self._mark_dirty)
        except HybridError as exc:
            log.warning("queue %d: the kernel's name cache is not used: %s", self.queue, exc)
            return
        self.names = names

    def _mark_dirty(self) -> None:
        self._dirty = True

    def _declare_needs(self, bound: bool = True) -> None:
        """Tell the kernel which flag reasons these rules need no packets for (bare SYNs, when
        no rule can act on one): fewer round trips per connection, same decisions. Undone when
        the engine stops, so that the kernel queues what the attach options say again."""
        if self.maps is None:
            return
        skip = abi.REASON_SYN if bound and not self.rules.needs_syn else 0
        try:
            if self.maps.get_config().skip_reasons != skip:
                self.maps.update_config(skip_reasons=skip)
        except HybridError as exc:      # the maps are gone (detached meanwhile): nothing to tell
            log.warning("could not update the kernel's flag policy: %s", exc)

    def run(self) -> None:
        if self._nfq is None:
            self.bind()
        self._write_stats(force=True)
        if self.stats_path:
            # Publishes the counters while they change. The receive loop waits in recv() without
            # the GIL, so this thread runs between packets without slowing them.
            self._publisher = threading.Thread(target=self._publish, name=f"stats-q{self.queue}", daemon=True)
            self._publisher.start()
        try:
            while not self._stop:
                self._nfq.run(block=True)   # returns only through an exception (signals) or EAGAIN
        except _Stop:
            pass
        finally:
            self.close()

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        self._publisher_stop.set()
        if self._publisher is not None:
            self._publisher.join(timeout=2)
            self._publisher = None
        if self._nfq is not None:
            self._nfq.unbind()
            self._nfq = None
            self._declare_needs(bound=False)
        if self.names is not None:
            self.names.stop()
        if self._syn_learner:
            self._syn_learner.stop()
            self._syn_learner = None
        for s in (self._raw4, self._raw6, self._packet_sock):
            if s is not None:
                s.close()
        self._raw4 = self._raw6 = self._packet_sock = None
        self._write_stats(force=True)

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop the engine; SIGHUP reloads the rules. Handlers run between
        packets (the receive loop checks for signals when recv is interrupted)."""
        def stop(*_):
            if self._stop:          # a second signal (e.g. killpg plus a forwarding parent)
                return              # must not interrupt the shutdown itself
            self._stop = True
            raise _Stop

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda *_: self.reload())

    def reload(self) -> bool:
        """Load the rules file again. A broken file keeps the old rules and says why."""
        try:
            new = load_rules(self.rules_path, self.flow_ttl, mark_mask=self.mark_mask)
        except RulesError as exc:
            self.stats.reload_errors += 1
            self.stats.last_reload_error = str(exc)
            log.error("reload refused, keeping the old rules: %s", exc)
            self._write_stats(force=True)
            return False
        self.rules = new
        if self.names is not None:
            # before the next packet: no entry of the old rules may decide for the new ones
            try:
                self.names.start(new)
            except HybridError as exc:
                log.error("queue %d: the name cache could not start a new generation (%s): "
                          "it is no longer taught", self.queue, exc)
                self.names = None
        if self._nfq is not None:
            self._declare_needs()
        self.stats.reloads += 1
        self.stats.last_reload_error = None
        log.info("rules reloaded from %s (%d rules)", self.rules_path, len(new))
        self._write_stats(force=True)
        return True

    # -- per packet ------------------------------------------------------------------------------
    def _handle(self, nfpkt) -> None:
        # The per-packet path: kept flat, the accept case inline (it is most packets), the
        # interface name only resolved when a rule reads it. Measured by `hybridctl bench
        # --engine-pps` against a bare accept-all consumer.
        t0 = _now_ns()
        stats = self.stats
        stats.packets += 1
        try:
            pkt = decode(nfpkt.get_payload())
            rules = self.rules
            phys = getattr(nfpkt, "physindev", 0)    # a bridge port when the packet was bridged
            if phys and pkt.version:
                self._learn(phys, pkt.src_bytes, nfpkt)
            if rules.needs_indev:
                pkt.indev = self._ifname(phys or nfpkt.indev)
            if (pkt.proto == 6 and pkt.payload_len and self.maps is not None
                    and (rules.needs_http or rules.needs_dns) and self._follow_packet(nfpkt, pkt)):
                return
            ended_join = False
            d = d_alt = joined = joined_start = None
            if rules.needs_join and pkt.proto == 6 and pkt.payload_len and self._unread(pkt):
                pass    # a piece the server never reads is not joined: decided in doubt (pkt.doubt)
            elif rules.needs_join and pkt.proto == 6 and pkt.payload_len:
                j = self.joiner.offer(pkt, rules, self._at_stream_start_fn(pkt))
                if j is not DECIDE:
                    if j.held:
                        self._hold(pkt, nfpkt, j.step)
                        return
                    # JOINED: the flow is in the join's INSPECT until the decision replaces it;
                    # in doubt (pkt.doubt) that INSPECT is left to run its JOIN_TTL.
                    ended_join = pkt.doubt is None
                    if j.alt is not None:       # overlaps differed: decide on both readings
                        pkt.set_joined(j.alt, http=j.http)
                        d_alt = rules.decide(pkt)
                    pkt.set_joined(j.data, http=j.http)
                    joined, joined_start = j.data, j.start_seq
            elif rules.reads_quic and pkt.proto == 17 and pkt.payload_len:
                q = self.quic.offer(pkt, rules.quic_block is not None, lambda: self._udp_doubt(pkt))
                if q.step is quic.Step.HOLD:                # like a held segment, same INSPECT
                    self._hold(pkt, nfpkt, Step.HOLD)
                    return
                if q.step is quic.Step.BLOCK:
                    d = rules.quic_block
                elif q.step is quic.Step.DECIDE:
                    d_alt, ended_join = self._quic_names(pkt, q)
            pre = None
            if pkt.proto == 6 and rules.needs_http and self.maps is not None and pkt.payload_len:
                http = pkt.http
                if http is not None and http.doubt in _PIPELINED and d_alt is None:
                    # Several messages in these bytes: each is decided on its own head when the
                    # stream can be followed from its start (else the doubt stands).
                    pre = self._walk_at_start(pkt, joined, joined_start)
                    if pre is not None:
                        pkt._http = pre.messages[0][2]
            if d is None:
                d = rules.decide(pkt)
            if d_alt is not None:
                d = stricter(d, d_alt)
            if pre is not None:
                data = joined if joined is not None else pkt.payload
                for a, b, req in pre.messages[1:]:
                    d = stricter(d, self._decide_message(pkt, data[a:b], req, "http"))
            if d.flow != "inspect":
                d = self._settle(pkt, d, joined, joined_start)
            if ended_join and d.flow not in FLOW_VERDICTS:    # the decision replaces the INSPECT
                self._flow_verdict(pkt, _NONE_AFTER_JOIN)
            fol = None
            if (self.maps is not None and pkt.payload_len and d.flow in ("bypass", "none", "inspect")
                    and d.action not in ("drop", "reject") and (rules.needs_http or rules.needs_dns)):
                fol, d = self._follow_start(pkt, d, joined, joined_start, pre)
            until = self._budget(pkt, d) if d.inspect_bytes is not None else None
            if self.maps is not None and (d.flow in FLOW_VERDICTS or fol is not None or until is not None):
                self._flow_verdict(pkt, d, fol, until)
            if d.action == "accept":
                nfpkt.set_mark(nfpkt.get_mark() & self._keep_bits)
                nfpkt.repeat()
                stats.actions["accept"] += 1
            else:
                self._verdict(nfpkt, pkt, d)
            if d.log and self.vlog is not None:
                self.vlog.write(self.queue, pkt, d)
            if self.names is not None and pkt.payload_len:
                self.names.teach(pkt)
            self._dirty = True
        except _Stop:
            # SIGTERM arrived mid-packet: this packet still gets its verdict (an unbound queue
            # drops what is pending), then the receive loop ends.
            with contextlib.suppress(Exception):
                self._accept(nfpkt)
            raise
        except Exception:
            stats.errors += 1
            if stats.errors <= 10:      # the first few with their traceback, then counted only
                log.exception("queue %d: packet handling failed; accepted", self.queue)
            with contextlib.suppress(Exception):
                self._accept(nfpkt)
            self._dirty = True
        finally:
            dt = _now_ns() - t0
            stats.decision_ns_log2[dt.bit_length()] += 1
            stats.decision_ns_sum += dt

    # -- the one place a flow verdict is checked against what the server will see ---------------
    def _settle(self, pkt: Packet, d: Decision, joined: bytes | None, joined_start: int | None) -> Decision:
        """The decision as the engine may act on it, for every decision but ``inspect``:

        - scope: a BLOCK earned by a rule on client bytes is written for the flow only when the
          bytes came from the side that opened it and, for TCP, the kernel saw the flow's own
          handshake; else it covers this packet and the flow stays inspected (spoofed packets
          cannot block someone else's connection; UDP has no handshake: a packet spoofed from
          the client's address and port can still earn a BLOCK on that one 5-tuple, which
          reverse-path filtering on the gateway stops); a bypass decided on the responder's bytes is not written
          (the client's bytes are what the rules are about, and they are still to come);
        - doubt: a join the joiner could not be sure of (``pkt.doubt``), or a bypass on client
          bytes the server may not read as the engine did (:meth:`_parse_doubt`,
          :meth:`_transport_doubt`), never bypasses the flow: the packet gets the rules' ``on_doubt`` (inspect: passed, the flow kept
          inspected; drop; reset), counted by reason.

        The kernel's facts about the connection cost one map lookup, made only for a BLOCK by a
        content rule, a bypass on payload, or a packet already in doubt."""
        if d.flow == "block":
            if d.rule is not None and d.rule in self.rules.content_rules and self.maps is not None:
                facts = self._facts(pkt)
                if facts is None or not facts.from_client or (pkt.proto == 6 and not facts.handshake):
                    self.stats.scoped["block-packet-only"] += 1
                    return d._replace(flow="inspect")
            return d
        bypass = d.flow == "bypass"
        why = pkt.doubt
        # A piece the joiner kept with nothing before it: only a bypass on it is refused, and
        # only if it is not the start of its stream (which the kernel's facts can tell). A
        # flow left alone goes on being queued by the kernel's first-N budget, and a lower
        # piece by its retransmission window (bpf/classify.h).
        soft = why == _OUT_OF_ORDER
        if soft:
            why = None
        if why is None and not bypass:
            # a join in doubt keeps the flow inspected whatever the verdict, and so does a DNS
            # name a rule could not read (the next query on the 5-tuple must be seen too)
            dns = pkt.dns_unparsed
            if dns is None:
                return d
            why = "dns:" + dns
        if why is None:
            why = self._parse_doubt(pkt, joined)
        facts = self._facts(pkt) if self.maps is not None and pkt.payload_len else None
        if facts is not None and facts.verdict == abi.VERDICT_BYPASS:
            # Queued before the flow's bypass was written (the first-N packets in flight behind
            # the one that decided it): had they come a moment later, the kernel would have
            # kept them. Their doubts (not the stream's start, a piece with nothing before it)
            # must not take back a decision made on the start of the stream.
            return d._replace(flow="none") if bypass else d
        if facts is not None and not facts.from_client and not facts.midstream:
            if bypass:
                self.stats.scoped["responder-side"] += 1
                return d._replace(flow="none")
            return d                        # the responder's bytes: the rules are about the client's
        if why is None:
            why = self._transport_doubt(pkt, joined, joined_start, facts)
            if why is None and soft and (facts is None or facts.isn is None):
                why = _OUT_OF_ORDER         # where its stream starts is unknown
        if why is not None:
            return self._on_doubt(pkt, d, why)
        return d

    # -- following a flow's messages (hybrid.engine.follow) --------------------------------------
    def _follows(self, pkt: Packet) -> str | None:
        """Which messages the rules need followed on the packet's flow: "dns" (DNS to or from
        one of the rules' dns_ports, when a rule reads the question), "http" (other TCP, when a rule reads the
        request), or None."""
        rules = self.rules
        if pkt.sport in rules.dns_ports or pkt.dport in rules.dns_ports:
            return "dns" if rules.needs_dns else None
        return "http" if rules.needs_http and pkt.proto == 6 else None

    def _walk_at_start(self, pkt: Packet, joined: bytes | None, joined_start: int | None,
                       kind: str = "http") -> follow.Walk | None:
        """The HTTP (or DNS) messages in a client's first TCP bytes, when they begin its stream
        and read without doubt; else None."""
        facts = self._facts(pkt)
        if facts is None or not facts.from_client or not self._starts_stream(pkt, facts, joined_start):
            return None
        data = joined if joined is not None else pkt.payload
        walk = follow.walk_http(data) if kind == "http" else follow.walk_dns(data)
        if walk.doubt is not None or walk.stop or not walk.messages:
            return None
        return walk

    def _follow_start(self, pkt: Packet, d: Decision, joined: bytes | None,
                      joined_start: int | None, pre: follow.Walk | None = None) -> tuple[list | None, Decision]:
        """After the first decision on a flow's client bytes (accepted, flow bypassed or left
        alone): the follow-up to write with the flow verdict, so that the kernel queues the
        direction's next message; ``(None, d)`` when there is nothing to follow (not HTTP or DNS,
        not the start of the client's stream, a UDP flow already followed). A TCP segment's
        further whole messages (a pipelined request) are decided too, the strictest winning."""
        kind = self._follows(pkt)
        if kind is None:
            return None, d
        facts = self._facts(pkt)
        if facts is None:
            return None, d
        direction = self._flow_key(pkt)[1]
        if pkt.proto == 17:
            if kind != "dns" or facts.follow_bits & (abi.FOLLOW_ON(0) | abi.FOLLOW_ON(1)) == \
                    abi.FOLLOW_ON(0) | abi.FOLLOW_ON(1):
                return None, d
            self.stats.follow["started"] += 1
            return [(0, 0, follow.MESSAGE), (1, 0, follow.MESSAGE)], d
        if facts.follow_on:
            return None, d
        data = joined if joined is not None else pkt.payload
        if pre is not None:
            walk = pre                          # its further messages were decided with the first
        else:
            # None: not the stream's start (where messages begin is unknown), or nothing to follow
            walk = self._walk_at_start(pkt, joined, joined_start, kind)
            if walk is None:
                return None, d
            for a, b, req in walk.messages[1:]:
                d = stricter(d, self._decide_message(pkt, data[a:b], req, kind))
        start = joined_start if joined_start is not None else pkt.tcp_seq + (1 if pkt.tcp_flags & _TCP_SYN else 0)
        if d.action in ("drop", "reject") or d.flow not in ("bypass", "none", "inspect"):
            return None, d
        self.stats.follow["started"] += 1
        return [self._boundary(pkt, direction, start, walk, data, pkt.tcp_seq + pkt.payload_len - start)], d

    def _budget(self, pkt: Packet, d: Decision) -> list | None:
        """A rule's inspect_bytes as the kernel keeps it: per direction with a budget, the
        sequence number its stream's budget ends at (its isn + 1 + bytes); None when the flow's
        handshake was not seen (no stream start to count from), the budget is written already,
        or the decision drops."""
        if self.maps is None or pkt.proto != 6 or d.action in ("drop", "reject") or d.flow == "block":
            return None
        facts = self._facts(pkt)
        if facts is None or facts.follow_bits & (abi.FOLLOW_UNTIL(0) | abi.FOLLOW_UNTIL(1)):
            return None
        mine = self._flow_key(pkt)[1]
        client = mine if facts.from_client else 1 - mine
        out = []
        for direction, n in ((client, d.inspect_bytes[0]), (1 - client, d.inspect_bytes[1])):
            isn = facts.isns[direction]
            if n and isn is not None:
                out.append((direction, (isn + 1 + n) & _SEQ_MASK))
        return out or None

    def _boundary(self, pkt: Packet, direction: int, base: int, walk: follow.Walk, data: bytes,
                  reach: int) -> tuple[int, int, int]:
        """The follow-up after ``walk`` over ``data`` (which starts at sequence number ``base``):
        the next boundary, a checkpoint AHEAD_MAX past the packet's end (``reach`` bytes past
        base) when a body goes on further, and the carry kept for a cut message."""
        key = self._flow_key(pkt)
        nxt, mode, left = walk.next, walk.mode, 0
        if nxt - reach > follow.AHEAD_MAX:      # a checkpoint; the mode after the body is kept
            left = nxt - (reach + follow.AHEAD_MAX)
            nxt, mode = reach + follow.AHEAD_MAX, follow.BODY
        seq = (base + nxt) & _SEQ_MASK
        carry = data[nxt:] if walk.carry else b""
        self.streams.put(key, seq, carry, left, walk.mode)
        if carry:
            self.stats.follow["held"] += 1
        return (direction, seq, mode)

    def _decide_message(self, pkt: Packet, data: bytes, req, kind: str) -> Decision:
        """One whole message of several a packet carries, decided on its own bytes: the rules'
        decision, or on_doubt when the server may read it otherwise."""
        mp = pkt.message(data)
        if req is not None:
            mp._http = req
        self.stats.follow["http_requests" if kind == "http" else "dns_messages"] += 1
        d = self.rules.decide(mp)
        why = mp.dns_unparsed if kind == "dns" else None
        if why is not None:
            return self._on_doubt(pkt, d, "dns:" + why)
        return d

    def _follow_packet(self, nfpkt, pkt: Packet) -> bool:
        """A TCP payload packet of a followed direction that reaches its next message: decide
        every whole message from the boundary on (with the bytes carried from the packet before
        when a message was cut), write the next boundary with the flow verdict, then the packet's
        verdict. Returns False when the packet is not one (the usual path decides it)."""
        kind = self._follows(pkt)
        if kind is None:
            return False
        facts = self._facts(pkt)
        if facts is None or not facts.follow_on:
            return False
        boundary = facts.follow_seq
        rel = ((pkt.tcp_seq - boundary + _HALF) & _SEQ_MASK) - _HALF     # where the packet starts
        payload = pkt.payload
        if rel + len(payload) <= 0:
            return False                        # bytes before the boundary: decided as they are
        key = self._flow_key(pkt)
        direction = key[1]
        st = self.streams.get(key, boundary)
        carry = st.carry if st is not None else b""
        mode = facts.follow_mode
        why = None
        if mode == follow.BODY and st is None:
            why = "follow:state-lost"
        elif rel > len(carry):
            why = "follow:hole"                 # bytes between the boundary and this packet unseen
        elif rel < len(carry) and carry[max(rel, 0):rel + len(payload)] != payload[max(-rel, 0):len(carry) - rel]:
            why = "follow:overlap-differs"
        if why is None and rel + len(payload) <= len(carry):
            self._accept(nfpkt)                 # a retransmission of carried bytes
            self._dirty = True
            return True
        d = None
        walk = None
        if why is None:
            data = carry + payload[len(carry) - rel:]
            if kind == "http":
                walk = follow.walk_http(data, mode, st.left if st else 0, st.after if st else follow.MESSAGE)
            else:
                walk = follow.walk_dns(data)
            for a, b, req in walk.messages:
                d_i = self._decide_message(pkt, data[a:b], req, kind)
                d = d_i if d is None else stricter(d, d_i)
            why = walk.doubt or self._delivery_doubt(pkt, facts)
        fol = None
        if walk is not None and walk.stop and why is None:
            # Not HTTP (or DNS) any more at the boundary: a tunnel, an upgrade, or bytes the
            # server refuses. The packet is decided on its own bytes; the following ends.
            d_own = self.rules.decide(pkt)
            d = d_own if d is None else stricter(d, d_own)
            fol = [(direction, None, 0)]
            self.stats.follow["stopped"] += 1
        base = d if d is not None else _PASS_MESSAGE
        if why is not None:
            self.streams.drop(key)
            d = self._on_doubt(pkt, base, why)
            fol = [(direction, None, 0)]
        else:
            d = base
            if fol is None and d.action not in ("drop", "reject") and d.flow != "block":
                fol = [self._boundary(pkt, direction, boundary, walk, data, rel + len(payload))]
        if d.flow in FLOW_VERDICTS or fol is not None:
            self._flow_verdict(pkt, d, fol)
        if d.action == "accept":
            self._accept(nfpkt)
            self.stats.actions["accept"] += 1
        else:
            self._verdict(nfpkt, pkt, d)
        if d.log and d is not _PASS_MESSAGE and self.vlog is not None:
            self.vlog.write(self.queue, pkt, d)
        self._dirty = True
        return True

    def _parse_doubt(self, pkt: Packet, joined: bytes | None) -> str | None:
        """A head, ClientHello or DNS name a rule reads that could not be read exactly as the
        server reads it (the parsers say why), or a fragment; None when there is no doubt."""
        if pkt.fragment:
            return "ip:fragment"
        rules = self.rules
        if pkt.proto == 6 and pkt.payload_len:
            data = joined if joined is not None else pkt.payload
            if rules.needs_http:
                http = pkt.http
                why = http.doubt if http is not None else http_unparsed(data)
                if why is not None:
                    return "http:" + why
            if rules.needs_sni and data[0] == 0x16 and pkt.tls_sni is None:
                why = client_hello_problem(data)
                if why is not None:
                    return "tls:" + why
        why = pkt.dns_unparsed
        return None if why is None else "dns:" + why

    def _transport_doubt(self, pkt: Packet, joined: bytes | None, joined_start: int | None,
                         facts: _Facts | None) -> str | None:
        """For a bypass on payload: a checksum its receiver will reject (the server never reads
        these bytes), a TTL lower than its direction's highest (it may expire before the server:
        an insertion), client bytes that do not begin at the start of their stream (a middle
        piece decided before the start, which the server then reads unseen)."""
        if not pkt.payload_len:
            return None
        why = self._delivery_doubt(pkt, facts)
        if why is None and facts is not None and pkt.proto == 6 and facts.isn is not None \
                and self.rules.content_rules and not self._starts_stream(pkt, facts, joined_start):
            why = "tcp:not-stream-start"
        return why

    def _on_doubt(self, pkt: Packet, d: Decision, why: str) -> Decision:
        stats = self.stats
        stats.doubts[why] = stats.doubts.get(why, 0) + 1
        policy = self.rules.on_doubt
        if d.action in ("drop", "reject"):
            policy = "inspect"                      # already not passed
        stats.doubt_actions[policy] += 1
        if policy == "drop":
            return d._replace(action="drop", flow="inspect", mark=None, rewrite=None)
        if policy == "reset":
            return d._replace(action="reject", flow="inspect", mark=None, rewrite=None,
                              reject_with="tcp-reset" if pkt.proto == 6 else None)
        return d._replace(flow="inspect")

    def _unread(self, pkt: Packet) -> bool:
        """Whether the server will never read this segment (a checksum its stack rejects, a TTL
        lower than its direction's highest: it may expire on the way), so that the joiner must not
        hold it: joined, such a piece could make a message read as the server never reads it (an
        allowed Host completed by a sound piece, the real first piece sent into the bypassed flow
        afterwards). Sets ``pkt.doubt``: the packet is decided on its own bytes, never bypassed."""
        why = self._delivery_doubt(pkt, self._facts(pkt) if self.maps is not None else None)
        if why is None:
            return False
        pkt.doubt = why
        return True

    def _at_stream_start_fn(self, pkt: Packet) -> Callable[[], bool] | None:
        """For the joiner: whether ``pkt``'s bytes begin its stream, as the kernel's flow entry
        tells (one map lookup, reused by the verdict's write)."""
        if self.maps is None:
            return None

        def at_start() -> bool:
            facts = self._facts(pkt)
            return facts is not None and self._starts_stream(pkt, facts)
        return at_start

    def _facts(self, pkt: Packet) -> _Facts | None:
        """What the kernel's flow entry knows about this packet's connection (None: no entry,
        or no key). One map lookup per packet, made only when a step asks (following, joining,
        a flow verdict): the answer is kept for the packet's other steps, which run before the
        packet's own write."""
        if pkt is self._facts_pkt:
            return self._facts_val
        key = self._flow_key(pkt)
        facts = None
        if key is not None:
            try:
                flow = self.maps.get_flow(key[0])
            except HybridError:
                flow = None
            if flow is not None:
                facts = _Facts.of(flow, key[1])
        self._facts_pkt, self._facts_val = pkt, facts
        return facts

    @staticmethod
    def _starts_stream(pkt: Packet, facts: _Facts, joined_start: int | None = None) -> bool:
        """Whether the packet's bytes (or the joined message's, from ``joined_start``) begin its
        direction's stream: they start at the isn + 1 the kernel saw (a SYN's data, TCP Fast
        Open, begins one after its seq). False when the isn is unknown."""
        if facts.isn is None:
            return False
        start = joined_start if joined_start is not None else pkt.tcp_seq + (1 if pkt.tcp_flags & _TCP_SYN else 0)
        return not (start - facts.isn - 1) & _SEQ_MASK

    @staticmethod
    def _delivery_doubt(pkt: Packet, facts: _Facts | None) -> str | None:
        """Why the server may never read this packet: a transport checksum its stack rejects, or
        a TTL lower than its direction's highest (it may expire on the way); None otherwise."""
        if not rewrite.transport_checksum_ok(pkt):
            return ("tcp:" if pkt.proto == 6 else "udp:") + "bad-checksum"
        if facts is not None and pkt.ttl + _FORWARD_HOPS < facts.ttl_max:
            return "ip:low-ttl"
        return None

    def _flow_key(self, pkt: Packet) -> tuple[bytes, int] | None:
        """``pkt.flow_key()``, built once per packet: the same key object for the facts' read and
        the verdict's write lets the write skip its own read (Maps.write_verdict)."""
        if pkt is not self._key_pkt:
            self._key_pkt, self._key = pkt, pkt.flow_key()
        return self._key

    def _hold(self, pkt: Packet, nfpkt, step: Step) -> None:
        """A segment the joiner holds back: accepted without a decision; a new or grown join
        keeps its flow in INSPECT for JOIN_TTL from now, so that the flow's next segments are
        queued too (a retransmission changes nothing)."""
        if step is Step.HOLD:
            self._flow_verdict(pkt, _INSPECT_WHILE_JOINING)
        self._accept(nfpkt)
        self._dirty = True

    def _quic_names(self, pkt: Packet, q: QuicResult) -> tuple[Decision | None, bool]:
        """A datagram the QUIC joiner decides: its ``tls_sni`` is the first of the names its
        connection's ClientHello gave (None: no name); each other name is decided too, and the
        strictest of those decisions is returned (for stricter()), with whether a join ended."""
        names = q.names or (None,)
        d_alt = None
        for name in names[1:]:
            pkt.set_sni(name)
            d = self.rules.decide(pkt)
            d_alt = d if d_alt is None else stricter(d_alt, d)
        pkt.set_sni(names[0])
        return d_alt, q.ended

    def _udp_doubt(self, pkt: Packet) -> str | None:
        """For the QUIC joiner, before it reads a datagram: a checksum its receiver rejects or a
        TTL that may expire before the server (see :meth:`_transport_doubt`)."""
        return self._transport_doubt(pkt, None, None, self._facts(pkt) if self.maps is not None else None)

    def _verdict(self, nfpkt, pkt: Packet, d: Decision) -> None:
        action = d.action
        if action == "accept":
            self._accept(nfpkt)
        elif action == "drop":
            nfpkt.drop()
            if d.share is not None:
                self._share(pkt, d)
        elif action == "reject":
            nfpkt.drop()            # first: no failure to send the reset may turn into an accept
            phys = getattr(nfpkt, "physindev", 0)
            self._l2 = (phys, nfpkt.physoutdev, self._hw(nfpkt)) if phys else None
            self._send_reject(pkt, d.reject_with)
            if d.share is not None:
                self._share(pkt, d)
        elif action == "rewrite":
            try:
                out = self._rewritten(pkt, d.rewrite)
            except HybridError as exc:          # a fragment, an AH-protected packet, ...:
                nfpkt.drop()                    # it cannot pass as the rule wants it, so not at all
                self.stats.rewrite_errors += 1
                if self.stats.rewrite_errors <= 10:
                    log.error("queue %d: rule %s: %s; the packet is dropped", self.queue, d.rule, exc)
                self.stats.actions["drop"] += 1
                return
            nfpkt.set_payload(out)
            self._accept(nfpkt)
        elif action == "mark":
            value, mask = d.mark
            self._accept(nfpkt, set_bits=(value, mask))
        else:   # the rule compiler accepts no other action
            raise HybridError(f"unknown action {action!r}")
        self.stats.actions[action] += 1

    def _share(self, pkt: Packet, d: Decision) -> None:
        side, seconds, reason = d.share
        self.share.offer(str(pkt.src if side == "source" else pkt.dst), d.rule or "(default)", seconds, reason)

    def _accept(self, nfpkt, set_bits: tuple[int, int] | None = None) -> None:
        mark = nfpkt.get_mark() & self._keep_bits
        if set_bits is not None:
            value, mask = set_bits
            mark = (value & mask) | (mark & ~mask & 0xFFFFFFFF)
        nfpkt.set_mark(mark)
        nfpkt.repeat()

    @staticmethod
    def _rewritten(pkt: Packet, spec: tuple) -> bytes:
        kind = spec[0]
        if kind == "fill":
            return rewrite.fill_payload(pkt, spec[1], spec[2])
        if kind == "replace":
            return rewrite.replace_bytes(pkt, spec[1], spec[2])
        return rewrite.set_payload(pkt, spec[1])

    def _flow_verdict(self, pkt: Packet, d: Decision, fol=None, until=None) -> None:
        """Write ``d.flow`` for the packet's flow (``"none"`` with ``fol`` or ``until``: the verdict
        kept), and ``fol``, the follow-up, and ``until``, a byte budget (Maps.write_verdict(follow=,
        until=)), with it in one write."""
        if self.maps is None:
            return
        key = self._flow_key(pkt)       # the key tc builds for it; None: tc keys no such packet
        if key is None:
            return
        extra = {k: v for k, v in (("follow", fol), ("until", until)) if v is not None}
        code = None if extra and d.flow == "none" else _FLOW_CODES[d.flow]
        try:   # d.ttl: positive seconds (the rules compiler and _merge_verdict() check it)
            # conn_scoped: the verdict belongs to this connection; a new SYN on the 5-tuple ends it
            self.maps.write_verdict(key[0], code, max(1, int(d.ttl * 1e9)), conn_scoped=True, **extra)
            if d.flow in FLOW_VERDICTS:
                self.stats.flow_verdicts[d.flow] += 1
        except TableFullError as exc:    # in the flow table, not pinned: an eviction would lose it
            if d.flow in FLOW_VERDICTS:
                self.stats.flow_verdicts[d.flow] += 1
            self.stats.pinned_write_errors += 1
            if self.stats.pinned_write_errors <= 10:
                log.error("queue %d: pinning a BLOCK failed: %s", self.queue, exc)
        except HybridError as exc:
            self.stats.flow_write_errors += 1
            if self.stats.flow_write_errors <= 10:
                log.error("queue %d: writing a flow verdict failed: %s", self.queue, exc)

    def _send_reject(self, pkt: Packet, how: str | None) -> None:
        """What a reject sends: for TCP a RST to the sender and, when the packet carries ACK (its
        receiver has a connection), a RST on to the receiver as if from the sender, so that the
        server does not keep a half-open connection ("reject both"); otherwise an ICMP
        unreachable to the sender. A RST gets no answer (RFC 9293): its drop is the whole reject.
        A message that cannot be built (an ICMP error about an ICMP error, a fragment) or sent
        is counted in ``reject_send_errors`` (the first few logged) and never raises: the packet
        is dropped all the same."""
        if how == "tcp-reset" or (how is None and pkt.proto == socket.IPPROTO_TCP):
            if pkt.tcp_flags & _TCP_RST:
                return
            self._send_raw(pkt, rewrite.tcp_rst_for, "a TCP RST to the sender")
            if pkt.tcp_flags & _TCP_ACK:
                self._send_raw(pkt, rewrite.tcp_rst_onward, "a TCP RST to the receiver")
        else:
            code = "port-unreachable" if how == "icmp-port-unreachable" else "admin-prohibited"
            self._send_raw(pkt, lambda p: rewrite.icmp_unreachable_for(p, code), f"an ICMP {code}")

    def _send_raw(self, pkt: Packet, build: Callable[[Packet], bytes], what: str) -> None:
        """Build ``build(pkt)`` and send it through the raw socket of its IP version (routing
        picks the interface: the client's side or the server's), or for a bridged packet as an
        Ethernet frame out of a bridge port (:meth:`_send_l2`)."""
        try:
            out = build(pkt)
            if self._l2 is not None:
                self._send_l2(out, pkt, what)
            else:
                self._send_routed(out, pkt.version)
        except _Stop:
            raise
        except Exception as exc:   # noqa: BLE001 - HybridError (not buildable), OSError (not sent)
            self.stats.reject_send_errors += 1
            if self.stats.reject_send_errors <= 10:
                log.error("queue %d: reject: %s not sent (%s); the packet is dropped",
                          self.queue, what, exc)

    def _send_routed(self, out: bytes, version: int) -> None:
        if version == 4:
            if self._raw4 is None:
                self._raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._raw4.sendto(out, (socket.inet_ntop(socket.AF_INET, out[16:20]), 0))
        else:
            if self._raw6 is None:
                self._raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._raw6.sendto(out, (socket.inet_ntop(socket.AF_INET6, out[24:40]), 0))

    # -- layer 2, for bridged packets ------------------------------------------------------------
    _MACS_MAX = 65536

    def _learn(self, port: int, src: bytes, nfpkt) -> None:
        """Remember the source MAC of a queued bridged packet by (in-port, source address): the
        address a reject later sends to on that port. Keyed by port, so a frame that claims
        another host's address on the wrong side of the bridge cannot redirect RSTs meant for it."""
        mac = self._hw(nfpkt)
        if mac is not None:
            self._learn_mac(port, src, mac)
        if self._syn_learner is None:
            self._start_syn_learner()

    def _start_syn_learner(self) -> None:
        try:
            self._syn_learner = _SynLearner(self._learn_mac)
        except OSError as exc:
            self._syn_learner = False     # tried once; rejects then rely on queued packets
            log.warning("queue %d: on a bridge, endpoints' MAC addresses are learnt from queued packets "
                        "only (%s)", self.queue, exc)

    def _learn_mac(self, port: int, src: bytes, mac: bytes) -> None:
        key = (port, src)
        macs = self._macs
        if macs.get(key) != mac:
            if key not in macs and len(macs) >= self._MACS_MAX:
                with contextlib.suppress(StopIteration, RuntimeError):   # the learner thread writes too
                    macs.pop(next(iter(macs)), None)                     # the oldest learnt
            macs[key] = mac

    @staticmethod
    def _hw(nfpkt) -> bytes | None:
        hw = nfpkt.get_hw()
        return bytes(hw[:6]) if hw is not None and len(hw) >= 6 else None

    def _send_l2(self, out: bytes, pkt: Packet, what: str) -> None:
        """Send the IP packet ``out`` built for a reject of the bridged packet ``pkt`` as an
        Ethernet frame through an AF_PACKET socket: a bridge has no address, so nothing can be
        routed. Back to the sender (``out`` is addressed to pkt's source): out of the port the
        packet came in by, to the MAC it came from. On to the receiver: out of the port it was
        bridged to, to the MAC learnt for the receiver's address on that port; unknown, it is
        counted (``reject_no_mac``) and logged once, never broadcast."""
        in_port, out_port, sender_mac = self._l2
        v4 = out[0] >> 4 == 4
        dst = out[16:20] if v4 else out[24:40]
        if dst == pkt.src_bytes:        # to the sender
            if sender_mac is None:
                raise HybridError("the packet's source MAC address is unknown")
            port, dst_mac = in_port, sender_mac
            src_mac = self._macs.get((out_port, pkt.dst_bytes)) or self._port_mac(in_port)
        elif not out_port:              # on to this host (the INPUT hook, through the bridge)
            self._send_routed(out, 4 if v4 else 6)
            return
        else:                           # on to the receiver, as from the sender
            port, dst_mac = out_port, self._macs.get((out_port, dst))
            src_mac = sender_mac or self._port_mac(out_port)
            if dst_mac is None:
                self.stats.reject_no_mac += 1
                if self.stats.reject_no_mac == 1:
                    log.warning("queue %d: reject: %s not sent: the receiver's MAC address on the bridge "
                                "is not known yet (counted in reject_no_mac; logged once)", self.queue, what)
                return
        name = self._ifname(port)
        if name is None or src_mac is None:
            raise HybridError(f"bridge port {port} is gone")
        if self._packet_sock is None:
            self._packet_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)   # sends only
        frame = dst_mac + src_mac + (b"\x08\x00" if v4 else b"\x86\xdd") + out
        self._packet_sock.sendto(frame, (name, 0))

    def _port_mac(self, index: int) -> bytes | None:
        """A bridge port's own MAC address (cached), read through SIOCGIFHWADDR."""
        if index not in self._port_macs:
            mac = None
            name = self._ifname(index)
            if name is not None:
                with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    req = fcntl.ioctl(s.fileno(), _SIOCGIFHWADDR, struct.pack("256s", name.encode()))
                    mac = req[18:24]
            self._port_macs[index] = mac
        return self._port_macs[index]

    def _ifname(self, index: int) -> str | None:
        if not index:
            return None
        name = self._ifnames.get(index, False)
        if name is False:
            try:
                name = socket.if_indextoname(index)
            except OSError:
                name = None
            self._ifnames[index] = name
        return name

    # -- stats -----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        st = self.stats
        names = self.names.snapshot() if self.names is not None else None
        return {"pid": os.getpid(), "started": st.started, "packets": st.packets, "name_cache": names,
                "actions": dict(st.actions), "flow_verdicts": dict(st.flow_verdicts), "errors": st.errors,
                "flow_write_errors": st.flow_write_errors,
                "pinned_write_errors": st.pinned_write_errors, "reloads": st.reloads,
                "hellos_joined": st.hellos_joined, "hellos_abandoned": st.hellos_abandoned,
                "http_heads_joined": st.http_heads_joined, "http_heads_abandoned": st.http_heads_abandoned,
                "joins_abandoned": dict(st.joins_abandoned), "joins_out_of_order": st.joins_out_of_order,
                "joins_overlap_differs": st.joins_overlap_differs, "joins_doubted": st.joins_doubted,
                "joins_forgotten": st.joins_forgotten,
                "quic_initials": st.quic_initials, "quic_snis": st.quic_snis, "quic_held": st.quic_held,
                "quic_blocked": st.quic_blocked,
                "reload_errors": st.reload_errors, "last_reload_error": st.last_reload_error,
                "reject_send_errors": st.reject_send_errors, "reject_no_mac": st.reject_no_mac,
                "rewrite_errors": st.rewrite_errors,
                "doubts": dict(st.doubts), "doubt_policy": self.rules.on_doubt,
                "follow": {**st.follow, "states": len(self.streams), "forgotten": self.streams.forgotten},
                "doubt_actions": dict(st.doubt_actions), "scoped": dict(st.scoped), "share": self.share.snapshot(),
                "rules": dict(self.rules.counters), "default": self.rules.default_count,
                "rules_file": os.path.abspath(self.rules_path),
                "fail_open": self.fail_open, "flags_confirmed": self.setup.flags_confirmed if self.setup else None,
                "queue": st.queue, "kernel": self._kernel_counters(),
                "decision_ns_log2": list(st.decision_ns_log2), "decision_ns_sum": st.decision_ns_sum}

    def _kernel_counters(self) -> dict | None:
        """The kernel's view of this queue: waiting packets and overflow drops (with
        NETLINK_NO_ENOBUFS set, overflows never reach us as errors; they are counted here)."""
        c = nfq.counters().get(self.queue)
        if c is None:
            return None
        return {"waiting": c.waiting, "dropped": c.dropped, "user_dropped": c.user_dropped,
                "queued_total": c.id_sequence}

    def _publish(self) -> None:
        while not self._publisher_stop.wait(STATS_INTERVAL):
            if self._dirty:
                self._dirty = False
                self._write_stats()

    def _write_stats(self, force: bool = False) -> None:
        if not self.stats_path:
            return
        try:
            inst.write_json(self.stats_path, self.snapshot())
        except OSError as exc:
            if force:
                log.warning("cannot write engine stats to %s: %s", self.stats_path, exc)


# The flow follow-up while a split ClientHello or request head is being joined: every packet of
# the flow is queued (INSPECT), for no longer than the join may take.
_INSPECT_WHILE_JOINING = Decision(rule=None, action="accept", mark=None, rewrite=None, reject_with=None,
                                  flow="inspect", ttl=JOIN_TTL, log=False)
# A decision that leaves the flow alone, after a join: the join's INSPECT is ended (back to NONE).
_NONE_AFTER_JOIN = _INSPECT_WHILE_JOINING._replace(flow="none")
_FLOW_CODES = {**FLOW_VERDICTS, "none": abi.VERDICT_NONE}
# A followed packet that holds no whole message (a body's bytes, then a message cut at its end):
# passed, the flow left as it is (the same decision as the one that ends a join).
_PASS_MESSAGE = _NONE_AFTER_JOIN
# The HTTP view's doubts about requests pipelined after the first: the follower reads them apart.
_PIPELINED = frozenset(("pipelined", "pipelined_body", "pipelined_unparsed"))
_SEQ_MASK = 0xFFFFFFFF
_HALF = 0x80000000
_OUT_OF_ORDER = "join:out-of-order"     # hybrid.engine.join: a piece kept with nothing before it
# The engine reads a forwarded packet after the gateway decremented its TTL (ip_forward and
# ip6_forward do so before the FORWARD hook); tc recorded it before. On the INPUT hook this
# lets a packet one below its direction's highest TTL pass the check: it has arrived anyway.
_FORWARD_HOPS = 1


class _Facts(NamedTuple):
    """A connection as the kernel's flow entry saw it, from the packet's side (see
    bpf/hybrid_common.h struct hybrid_flow)."""
    from_client: bool       # the packet comes from the side whose packet created the entry
    midstream: bool         # the entry began on a non-SYN: who opened the connection is unknown
    handshake: bool         # both the SYN and the SYN-ACK were seen
    ttl_max: int            # the highest TTL seen in the packet's direction
    isn: int | None         # the packet's direction's initial sequence number, when seen
    verdict: int            # the flow's verdict now (abi.VERDICT_*)
    isns: tuple = (None, None)  # both directions' isns (by direction), None when not seen
    follow_bits: int = 0    # the entry's follow byte (both directions)
    follow_on: bool = False  # the engine follows the packet's direction ...
    follow_seq: int = 0     # ... whose next message starts here
    follow_mode: int = 0    # ... and is this (abi.FOLLOW_M_*)

    @classmethod
    def of(cls, flow, direction: int) -> _Facts:
        flags = flow.flags
        orig = 1 if flags & abi.FLOW_ORIG_HI else 0
        isn_bit = abi.FLOW_ISN1 if direction else abi.FLOW_ISN0
        return cls(direction == orig, bool(flags & abi.FLOW_MIDSTREAM),
                   flags & (abi.FLOW_ISN0 | abi.FLOW_ISN1) == abi.FLOW_ISN0 | abi.FLOW_ISN1,
                   flow.ttl_max[direction], flow.isn[direction] if flags & isn_bit else None,
                   flow.verdict,
                   tuple(flow.isn[d] if flags & (abi.FLOW_ISN1 if d else abi.FLOW_ISN0) else None for d in (0, 1)),
                   flow.follow, bool(flow.follow & abi.FOLLOW_ON(direction)),
                   flow.follow_seq[direction], flow.follow >> abi.FOLLOW_MODE_SHIFT(direction) & 3)
_TCP_SYN, _TCP_RST, _TCP_ACK = 0x02, 0x04, 0x10
_SIOCGIFHWADDR = 0x8927


class _Stop(Exception):
    """Raised from a signal handler to leave NetfilterQueue's receive loop."""
