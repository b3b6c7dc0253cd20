"""Joining a TLS ClientHello or an HTTP request head split over TCP segments, by sequence number.

A rule on the SNI, or on the Host, method or path of a request, must not be decided on a piece of
a message that arrives in several: the piece may not show the name yet, whether the split comes
from post-quantum key shares or from an evader sending one byte at a time, out of order, or with
overlapping pieces that disagree. The engine offers each queued TCP segment with payload to a
:class:`SegmentJoiner`, which answers with a :class:`JoinResult`:

- ``DECIDE``: decide the packet on its own bytes (nearly every packet). When the joiner could
  not be sure what the server reads around it, it sets ``pkt.doubt`` first (the engine then
  never bypasses the flow on this packet): ``"join:out-of-order"`` for a piece that does not
  start a message and came with nothing before it (kept a while, see below),
  ``"join:<reason>"`` for a later piece of a flow whose join was abandoned (:data:`ABANDON_REASONS`);
- ``HOLD``: the segment began or grew a join, in order or not: accept it unseen by the rules and
  keep its flow in INSPECT for :data:`JOIN_TTL`, so that the flow's next segments are queued too;
- ``HOLD_AGAIN``: a retransmission of bytes already held, identical: accept it, nothing else;
- ``JOINED``: the bytes contiguous from the message's first byte are complete (or at the size
  limit): decide this segment on ``data``; when pieces overlapped with different bytes, ``alt``
  holds the other reading and the engine decides on both, the strictest decision winning.

**By sequence, as the server reads it.** A join keeps the sequence number of the message's first
byte and the pieces by offset from it. The server uses no byte beyond a hole, so out-of-order
pieces are held and the message is decided once the bytes from its start are complete. Where two
pieces overlap with different bytes, servers' TCP stacks differ on which copy wins, so two
readings are kept: first-received and last-received. A piece that does not start a message and
arrives with no join for its flow (piece 1 before piece 0) is an "orphan": it is decided with
``pkt.doubt`` set (never a bypass on its bytes alone) and kept, so that a message starting at a
lower sequence number later joins it ("piece 1 then piece 0" reads as "piece 0 + piece 1").

**Cost in proportion to the new bytes.** The readings are bytearrays written in place; whether the
message is complete is checked incrementally (:class:`_HttpScan`, :class:`_TlsScan`): only new
bytes are scanned. The functions of hybrid.engine.packet remain the arbiter, called once when the
scan says the message may be complete.

**Bounded** in joins (:data:`HELLO_MAX_FLOWS`), per source (:data:`SOURCE_MAX_FLOWS`,
:data:`SOURCE_MAX_BYTES`), in bytes (:data:`HELD_MAX_BYTES`) and in pieces out of order per flow
(:data:`FLOW_MAX_PIECES`), so that a flood of half-sent messages costs memory we chose. A join
given up (a bound, an eviction, too big) is remembered for :data:`JOIN_TTL`
(:data:`ABANDONED_MAX` flows at most): the flow's later pieces are decided with ``pkt.doubt`` set.

After ``JOINED`` (``result.ended``) the flow is still in the join's INSPECT: the engine's
decision replaces it. The server gets each held segment, but not the whole message until the
engine has decided on it.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hybrid.engine.packet import (_METHOD_CHARS, TLS_HELLO_MAX, TLS_HELLO_MAX_RECORDS,
                                  TLS_MAX_EMPTY_RECORDS, TLS_RECORD_MAX, Packet, _parse_http,
                                  client_hello_missing, http_head_missing)
from hybrid.engine.rules import RuleSet

__all__ = ["ABANDONED_MAX", "ABANDON_REASONS", "DECIDE", "FLOW_MAX_PIECES", "HELD_MAX_BYTES",
           "HELLO_MAX_BYTES", "HELLO_MAX_FLOWS", "HELLO_TIMEOUT", "HTTP_HEAD_MAX_BYTES", "JOIN_TTL",
           "ORPHAN_TIMEOUT", "SOURCE_MAX_BYTES", "SOURCE_MAX_FLOWS", "HeldFlow", "JoinCounters",
           "JoinResult", "SegmentJoiner", "Step", "stricter"]

HELLO_MAX_FLOWS = 4096               # joins (and flows with orphan pieces) held at once
HELLO_MAX_BYTES = 65536              # a ClientHello over any number of TLS records, headers included
                                     # (packet.TLS_HELLO_MAX): beyond it, decided on the bytes joined
HTTP_HEAD_MAX_BYTES = 32768          # a request head this long without a Host line is decided as is
# Per source address (an IPv6 source by its /64, what one subscriber is given): a browser opens
# at most 6 connections per host and a few dozen in its first second; each join lasts about one
# round trip. 64 joins per source leaves a NAT'd office room, yet takes 64 sources to fill the
# table: one source cannot evict everybody else's joins. 1 MiB is 16 ClientHellos at their 64 KiB
# limit, or 64 joins of 16 KiB; a real split ClientHello (post-quantum key shares) is ~2 KiB.
SOURCE_MAX_FLOWS = 64
SOURCE_MAX_BYTES = 1 << 20
HELD_MAX_BYTES = 64 << 20            # all joins together (4096 x 64 KiB would be 256 MiB)
# Pieces held out of order in one flow, beyond the contiguous bytes: each makes the in-order
# piece's merge a little dearer (a list walk), a TCP sender has no reason to send more than a
# window of them. Beyond: the join is abandoned.
FLOW_MAX_PIECES = 64
FLOW_MAX_DIFFERING = 16              # overlaps with different bytes before the join is abandoned
FLOW_MAX_RESTARTS = 4                # a message start found below the one joined from
# A held flow is kept in INSPECT for JOIN_TTL seconds from its latest held segment: longer than
# servers wait for a request head (nginx: 60 s), so that pausing between pieces cannot outlast
# the INSPECT and let the rest pass unqueued. A join idle for HELLO_TIMEOUT (orphan pieces: for
# ORPHAN_TIMEOUT, since reordering in a network lasts well under a round trip) may be dropped
# when the table, the source's share or the byte budget is full (then counted as abandoned and
# remembered); a slow sender is otherwise joined however slow, for up to JOIN_TTL.
JOIN_TTL = 120.0
HELLO_TIMEOUT = 5.0
ORPHAN_TIMEOUT = 2.0
ABANDONED_MAX = 65536                # flows remembered as abandoned (~200 bytes each)
_EVICT_SCAN = 2 * SOURCE_MAX_FLOWS   # entries an eviction looks at (oldest activity first)

# Why a join was given up (EngineStats.joins_abandoned; pkt.doubt "join:<reason>" later on).
ABANDON_REASONS = ("table_full", "source_full", "bytes_full", "too_big", "evicted", "pieces",
                   "overlaps", "reordered")

_SEQ_MASK = 0xFFFFFFFF
_HALF = 0x80000000


class Step(enum.Enum):
    """What the engine does with the segment it offered (see the module docstring)."""
    DECIDE = "decide"
    HOLD = "hold"
    HOLD_AGAIN = "hold-again"
    JOINED = "joined"


@dataclass(frozen=True, slots=True)
class JoinResult:
    """The answer to one :meth:`SegmentJoiner.offer`."""
    step: Step
    data: bytes | None = None        # JOINED: the bytes contiguous from the message start
    http: bool = False               # JOINED: an HTTP request head (else a TLS ClientHello)
    alt: bytes | None = None         # JOINED: the last-received reading, when it differs from data
    start_seq: int | None = None     # JOINED: the TCP sequence number of data[0]

    @property
    def held(self) -> bool:
        """The segment is held back: accept it without a decision."""
        return self.step is Step.HOLD or self.step is Step.HOLD_AGAIN

    @property
    def ended(self) -> bool:
        """A join ended with this segment: its flow is in the join's INSPECT until the decision."""
        return self.step is Step.JOINED


# The results that carry no bytes, made once: offer() allocates only when a join completes.
DECIDE = JoinResult(Step.DECIDE)
HOLD = JoinResult(Step.HOLD)
HOLD_AGAIN = JoinResult(Step.HOLD_AGAIN)

_ACTION_RANK = {"accept": 0, "mark": 1, "rewrite": 2, "drop": 3, "reject": 4}
_FLOW_RANK = {"none": 0, "bypass": 1, "inspect": 2, "block": 3}


def stricter(a, b):
    """Of two decisions (for the two readings of a message), the strictest: block, drop or
    reject beat accept; then a flow BLOCK beats INSPECT beats BYPASS beats none."""
    ra = (_ACTION_RANK.get(a.action, 0), _FLOW_RANK.get(a.flow, 0))
    rb = (_ACTION_RANK.get(b.action, 0), _FLOW_RANK.get(b.flow, 0))
    return b if rb > ra else a


class JoinCounters(Protocol):
    """Where the joiner counts (the engine's EngineStats)."""
    hellos_joined: int              # split ClientHellos held back and decided on the joined bytes
    hellos_abandoned: int           # gave up joining (a bound, evicted, too big)
    http_heads_joined: int          # the same for HTTP request heads sent in pieces
    http_heads_abandoned: int
    joins_abandoned: dict           # the joins given up, by reason (ABANDON_REASONS)
    joins_out_of_order: int         # pieces held beyond a hole, or kept as orphans
    joins_overlap_differs: int      # messages decided on two readings (overlaps that differed)
    joins_doubted: int              # pieces decided with pkt.doubt set by the joiner
    joins_forgotten: int            # abandoned flows dropped from the memory before JOIN_TTL


class _HttpScan:
    """http_head_missing() of the bytes so far, fed incrementally: each byte is looked at about
    once. ``feed()`` returns True once the head may be complete (the arbiter then decides)."""
    __slots__ = ("start", "line", "pos", "done")

    def __init__(self):
        self.start = -1                # first byte after the empty lines (-1: not found yet)
        self.line = -1                 # start of the header line being read (-1: request line)
        self.pos = 0                   # bytes before it are scanned
        self.done = False

    def feed(self, d: bytearray, n: int) -> bool:
        if self.done:
            return True
        if self.start < 0:
            i, lim = self.pos, min(n, _MAX_LINE)
            while i < lim and d[i] in b"\r\n":
                i += 1
            if i < lim or i >= _MAX_LINE:
                self.start = i
            else:
                self.pos = i
                self.done = n >= _MAX_LINE
                return self.done
            self.pos = self.start
        start = self.start
        if self.line < 0:                                # the request line
            eol = d.find(b"\n", self.pos, min(n, start + _MAX_LINE))
            if eol < 0:
                self.pos = max(self.pos, min(n, start + _MAX_LINE))
                if n - start >= _MAX_LINE:
                    self.done = True
                else:
                    method = bytes(d[start:min(n, start + 17)]).split(b" ", 1)[0]
                    self.done = not (0 < len(method) <= 16 and not method.translate(None, _METHOD_CHARS))
                return self.done
            if _parse_http(bytes(d[:eol + 1])) is None:  # once: the request line only
                self.done = True
                return True
            self.line = self.pos = eol + 1
        line = self.line
        while True:
            nxt = d.find(b"\n", max(self.pos, line), n)
            if nxt < 0:
                self.line, self.pos = line, n
                return False
            if nxt == line or d[line:line + 5].lower() == b"host:" or (nxt == line + 1 and d[line] == 13):
                self.done = True
                return True
            line = nxt + 1


_MAX_LINE = 8192                       # packet._MAX_HTTP_LINE


class _TlsScan:
    """Walks the TLS records of a ClientHello as they arrive, as tls_client_hello() does: only
    the record headers and the handshake header are read. ``feed()`` returns True once the
    ClientHello is whole or a server would give up on it (the arbiter then decides)."""
    __slots__ = ("pos", "end", "cur", "have", "want", "head", "records", "empty", "done")

    def __init__(self):
        self.pos = 0                   # the current record's header
        self.end = -1                  # its end (-1: its header is not read yet)
        self.cur = 0                   # read up to here within it
        self.have = 0                  # handshake bytes so far
        self.want = 0                  # 4 + the message length, once known
        self.head = b""                # the handshake header's first bytes
        self.records = self.empty = 0
        self.done = False

    def feed(self, d: bytearray, n: int) -> bool:
        while not self.done:
            if self.end < 0:
                p = self.pos
                if p + 5 > n:
                    self.done = (p < n and d[p] != 22) or (p + 1 < n and d[p + 1] != 3)
                    return self.done
                rlen = d[p + 3] << 8 | d[p + 4]
                self.records += 1
                self.empty = self.empty + 1 if not rlen else 0
                if (d[p] != 22 or d[p + 1] != 3 or rlen > TLS_RECORD_MAX
                        or self.records > TLS_HELLO_MAX_RECORDS or self.empty > TLS_MAX_EMPTY_RECORDS):
                    self.done = True
                    return True
                self.cur, self.end = p + 5, p + 5 + rlen
            take = min(self.end, n) - self.cur
            if take > 0:
                if not self.have and d[self.cur] != 1:
                    self.done = True                     # another handshake message: not ours
                    return True
                if self.have < 4:
                    self.head += bytes(d[self.cur:self.cur + min(take, 4 - self.have)])
                    if len(self.head) == 4:
                        self.want = 4 + int.from_bytes(self.head[1:4], "big")
                        if self.want > TLS_HELLO_MAX:
                            self.done = True
                            return True
                self.have += take
                self.cur += take
                if self.want and self.have >= self.want:
                    self.done = True
                    return True
            if self.cur < self.end:
                return False                             # the record continues later
            self.pos, self.end = self.end, -1
        return True


@dataclass(slots=True)
class HeldFlow:
    """One flow direction's held pieces, keyed by (src, sport, dst, dport). Either a join
    (``start`` set: the readings hold the bytes from the message's first byte) or orphan pieces
    only (``start`` None: ``pieces`` as they came, waiting for a message start below them)."""
    source: bytes                    # the source's key for its bounds
    start: int | None                # TCP sequence number of the message's first byte
    http: bool                       # an HTTP request head (else a TLS ClientHello)
    evictable_after: float           # time.monotonic() after which a full table may drop it
    expires: float                   # time.monotonic() after which it is gone anyway (JOIN_TTL)
    held: int = 0                    # bytes it accounts for against the bounds
    pieces: list | None = None       # orphans: [(seq, bytes)] in arrival order
    first: bytearray | None = None   # first-received reading (bytes in a hole are zero)
    last: bytearray | None = None    # last-received reading, once an overlap differed
    cover: list | None = None        # [[a, b)] offsets from start held, sorted, disjoint
    scan: object = None              # _HttpScan / _TlsScan over ``first``
    scan_last: object = None         # the same over ``last``
    check_at: int = 0                # the arbiter said "not yet": ask it again from this length
    differing: int = 0               # overlaps that differed
    restarts: int = 0

    @property
    def contiguous(self) -> int:
        """Bytes held without a hole from the message start."""
        c = self.cover
        return c[0][1] if c and c[0][0] == 0 else 0

    @property
    def data(self) -> bytes:
        """The bytes contiguous from the message start (first-received reading)."""
        return bytes(self.first[:self.contiguous]) if self.first is not None else b""


# First bytes of a payload that may start a join: a TLS handshake record (0x16), or an HTTP
# request as nginx reads one: empty lines (CR, LF) before the request line, and a method of
# upper-case letters, '_' and '-'.
_MAY_START = frozenset(b"\x16\r\n_-ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(slots=True)
class _Source:
    flows: int = 0
    held: int = 0


_NO_SOURCE = _Source()               # a source with nothing held (never written)


class SegmentJoiner:
    """The joins in progress of one engine. Counts into ``stats`` (see :class:`JoinCounters`)."""

    __slots__ = ("flows", "sources", "abandoned", "held", "stats")

    def __init__(self, stats: JoinCounters):
        # Ordered by last activity (a flow is re-inserted when it grows): the idle ones first.
        self.flows: dict[tuple, HeldFlow] = {}
        self.sources: dict[bytes, _Source] = {}
        self.abandoned: dict[tuple, tuple[float, str]] = {}    # key -> (until, reason), oldest first
        self.held = 0
        self.stats = stats

    def __len__(self) -> int:
        return len(self.flows)

    # -- the entry point ---------------------------------------------------------------------------
    def offer(self, pkt: Packet, rules: RuleSet, at_start: Callable[[], bool] | None = None) -> JoinResult:
        """Offer a TCP segment with payload (``pkt.payload_len > 0``); only ClientHellos when
        ``rules.needs_sni``, only request heads when ``rules.needs_http``. ``at_start``, asked
        only for a piece that would be kept as an orphan: whether it provably begins its stream
        (the kernel saw the SYN): then nothing comes before it and it is decided on its own bytes
        (a DNS-over-TCP message, an SSH banner, ...), with no join state for it."""
        key = (pkt.src_bytes, pkt.sport, pkt.dst_bytes, pkt.dport)
        held = self.flows.get(key) if self.flows else None
        if held is not None:
            if held.expires <= time.monotonic():         # past JOIN_TTL: the server gave up too
                self._drop(key, held)
                held = None
            elif held.start is not None:
                return self._continue(pkt, key, held)
        if held is None and self.abandoned:
            gone = self.abandoned.get(key)
            if gone is not None:
                if gone[0] > time.monotonic():
                    return self._doubt(pkt, "join:" + gone[1])
                del self.abandoned[key]
        kind = _kind(pkt, rules)
        if kind is None:
            if held is None:
                return DECIDE                            # a whole message: decided on its own bytes
            # A whole message with orphan pieces held: joined with those after it.
            first = pkt.payload[0]
            kind = (False if first == 0x16 and rules.needs_sni else
                    True if first != 0x16 and first in _MAY_START and rules.needs_http else _ORPHAN)
        if kind is _ORPHAN:
            if held is None and at_start is not None and at_start():
                return DECIDE
            return self._orphan(pkt, key, held)
        return self._begin(pkt, key, kind, held)

    # -- orphans: pieces with nothing before them ----------------------------------------------------
    def _orphan(self, pkt: Packet, key: tuple, held: HeldFlow | None) -> JoinResult:
        now = time.monotonic()
        size = pkt.payload_len
        if held is None:
            why = self._room(pkt, size, now)
            if why is not None:
                return self._give_up(pkt, key, None, why)
            held = HeldFlow(_source(pkt), None, False, now + ORPHAN_TIMEOUT, now + JOIN_TTL, pieces=[])
            self._account(held, 0, 1)
        else:
            if len(held.pieces) >= FLOW_MAX_PIECES:
                return self._give_up(pkt, key, held, "pieces")
            why = self._grow_room(held, size, now)
            if why is not None:
                return self._give_up(pkt, key, held, why)
            del self.flows[key]
            held.evictable_after = now + ORPHAN_TIMEOUT
        held.pieces.append((pkt.tcp_seq, pkt.payload))
        self._account(held, size, 0)
        self.flows[key] = held
        self.stats.joins_out_of_order += 1
        return self._doubt(pkt, "join:out-of-order")

    # -- a message start ------------------------------------------------------------------------
    def _begin(self, pkt: Packet, key: tuple, http: bool, orphans: HeldFlow | None = None) -> JoinResult:
        now = time.monotonic()
        seq = pkt.tcp_seq
        if orphans is not None:
            if any(((s - seq) & _SEQ_MASK) >= _HALF for s, _ in orphans.pieces):
                # Bytes before this "start": it is not the stream's first byte, so it is a piece
                # of something else. Keep it with the others, decide it in doubt.
                return self._orphan(pkt, key, orphans)
            held = orphans
            del self.flows[key]
            self._account(held, -held.held, 0)
            pending = held.pieces
        else:
            why = self._room(pkt, pkt.payload_len, now)
            if why is not None:
                return self._give_up(pkt, key, None, why, http)
            held = HeldFlow(_source(pkt), None, http, 0.0, 0.0)
            self._account(held, 0, 1)
            pending = []
        held.start, held.http, held.pieces = seq, http, None
        held.first, held.cover = bytearray(), []
        held.scan = _HttpScan() if http else _TlsScan()
        held.evictable_after, held.expires = now + HELLO_TIMEOUT, now + JOIN_TTL
        self.flows[key] = held
        for s, data in pending:                          # orphans that came before it, in order
            r = self._put(held, s, data)
            if r.__class__ is str:
                return self._give_up(pkt, key, held, r)
        return self._grown(pkt, key, held, self._put(held, seq, pkt.payload), now)

    # -- a later piece of a join ------------------------------------------------------------------
    def _continue(self, pkt: Packet, key: tuple, held: HeldFlow) -> JoinResult:
        now = time.monotonic()
        seq, payload = pkt.tcp_seq, pkt.payload
        rel = ((seq - held.start + _HALF) & _SEQ_MASK) - _HALF
        if rel < 0:
            # A piece below the message start: the start was a later piece that looked like one
            # (piece 1 "T / HTTP/1.1..." before piece 0 "GE"). Join again from the lower start
            # if this piece is one, else keep everything as orphans waiting for one.
            if held.restarts >= FLOW_MAX_RESTARTS:
                return self._give_up(pkt, key, held, "reordered")
            first = payload[0]
            starts = (first == 0x16) if not held.http else (first in _MAY_START and first != 0x16)
            orphans = self._unstart(key, held)
            if starts:
                return self._begin(pkt, key, held.http, orphans)
            return self._orphan(pkt, key, orphans)
        limit = HTTP_HEAD_MAX_BYTES if held.http else HELLO_MAX_BYTES
        grow = max(0, min(rel + len(payload), limit) - len(held.first))
        why = self._grow_room(held, grow * (2 if held.last is not None else 1), now)
        if why is not None:
            return self._give_up(pkt, key, held, why)
        return self._grown(pkt, key, held, self._put(held, seq, payload), now)

    def _unstart(self, key: tuple, held: HeldFlow) -> HeldFlow:
        """The join's pieces as orphans again, its start found not to be the message's (rare:
        at most FLOW_MAX_RESTARTS times per flow, each O(bytes held))."""
        old, start = held.first, held.start
        pieces = [((start + a) & _SEQ_MASK, bytes(old[a:b])) for a, b in held.cover]
        if held.last is not None:                        # replayed after: last-received wins again
            pieces += [((start + a) & _SEQ_MASK, bytes(held.last[a:b])) for a, b in held.cover]
        restarts = held.restarts + 1
        del self.flows[key]
        self._account(held, -held.held, 0)
        orphans = HeldFlow(held.source, None, held.http, 0.0, 0.0, pieces=pieces, restarts=restarts)
        self.flows[key] = orphans
        self._account(orphans, sum(len(p) for _, p in pieces), 0)
        return orphans

    def _put(self, held: HeldFlow, seq: int, data: bytes) -> str | None | bool:
        """Write one piece at its offset into the readings: True if it added or changed bytes,
        False if it was all held already, identical; a reason string to give the join up."""
        limit = HTTP_HEAD_MAX_BYTES if held.http else HELLO_MAX_BYTES
        a = (seq - held.start) & _SEQ_MASK
        if a >= limit:
            return False                                 # after the message's limit: not ours
        b = min(a + len(data), limit)
        first, last, cover = held.first, held.last, held.cover
        if b > len(first):
            grow = b - len(first)
            first.extend(bytes(grow))
            if last is not None:
                last.extend(bytes(grow))
        changed = False
        # Walk the held ranges that meet [a, b): compare where held, write where new.
        i, pos, new_lo, new_hi = 0, a, a, b
        while i < len(cover) and cover[i][1] < a:
            i += 1
        j = i
        while pos < b:
            if j < len(cover) and cover[j][0] <= pos:    # inside a held range
                hi = min(b, cover[j][1])
                piece = data[pos - a:hi - a]
                if first[pos:hi] != piece:
                    if last is None:
                        last = held.last = bytearray(first)
                        held.scan_last = _HttpScan() if held.http else _TlsScan()
                    held.differing += 1
                    self.stats.joins_overlap_differs += 1
                if last is not None and last[pos:hi] != piece:
                    last[pos:hi] = piece
                    if held.scan_last is not None and held.scan_last.pos > pos:
                        held.scan_last = _HttpScan() if held.http else _TlsScan()   # read it again
                    changed = True
                pos = hi
                if hi == cover[j][1]:
                    j += 1
            else:                                        # a hole: the first copy of these bytes
                hi = min(b, cover[j][0]) if j < len(cover) else b
                piece = data[pos - a:hi - a]
                first[pos:hi] = piece
                if last is not None:
                    last[pos:hi] = piece
                changed = True
                pos = hi
        if held.differing > FLOW_MAX_DIFFERING:
            return "overlaps"
        # Merge [a, b) into the ranges i..j-1 (those it meets or touches).
        k = i
        while k < len(cover) and cover[k][0] <= b:
            new_lo, new_hi = min(new_lo, cover[k][0]), max(new_hi, cover[k][1])
            k += 1
        cover[i:k] = [[new_lo, new_hi]]
        if len(cover) > FLOW_MAX_PIECES:
            return "pieces"
        return changed

    def _grown(self, pkt: Packet, key: tuple, held: HeldFlow, put, now: float) -> JoinResult:
        if put.__class__ is str:
            return self._give_up(pkt, key, held, put)
        if len(held.cover) > 1:
            self.stats.joins_out_of_order += 1          # held beyond a hole
        size = len(held.first) + (len(held.last) if held.last is not None else 0)
        self._account(held, size - held.held, 0)
        del self.flows[key]                              # to the end: the most recently active
        held.evictable_after = now + HELLO_TIMEOUT
        held.expires = now + JOIN_TTL
        self.flows[key] = held
        if put is False:
            return HOLD_AGAIN
        n = held.contiguous
        limit = HTTP_HEAD_MAX_BYTES if held.http else HELLO_MAX_BYTES
        done = held.scan.feed(held.first, n)
        if held.last is not None:
            done = held.scan_last.feed(held.last, n) or done
        if n >= limit:
            return self._joined(pkt, key, held, n, "too_big")
        if not done or n < held.check_at:
            return HOLD
        if held.http:
            missing = http_head_missing(bytes(held.first[:n])) and (
                held.last is None or http_head_missing(bytes(held.last[:n])))
        else:
            missing = client_hello_missing(bytes(held.first[:n])) and (
                held.last is None or client_hello_missing(bytes(held.last[:n])))
        if missing:                                      # the scan was early: ask again at twice
            held.check_at = 2 * n                        # the length (amortised O(1) per byte)
            return HOLD
        return self._joined(pkt, key, held, n, None)

    def _joined(self, pkt: Packet, key: tuple, held: HeldFlow, n: int, why: str | None) -> JoinResult:
        self._drop(key, held)
        data = bytes(held.first[:n])
        alt = bytes(held.last[:n]) if held.last is not None else None
        if alt == data:
            alt = None
        if held.http:
            self.stats.http_heads_joined += 1
        else:
            self.stats.hellos_joined += 1
        if why is not None:                              # the message was not complete
            self._count_abandon(held.http, why)
            self._remember(key, why)
            self._doubt(pkt, "join:" + why)
        elif alt is not None:
            self._doubt(pkt, "join:overlap-differs")
        return JoinResult(Step.JOINED, data, held.http, alt, held.start)

    # -- bounds ----------------------------------------------------------------------------------------
    def _room(self, pkt: Packet, size: int, now: float) -> str | None:
        """Why a new held flow of ``size`` bytes from this packet's source cannot be had (after
        evicting idle ones), or None."""
        source = _source(pkt)
        src = self.sources.get(source) or _NO_SOURCE
        if src.flows >= SOURCE_MAX_FLOWS or src.held + size > SOURCE_MAX_BYTES:
            self._evict(now, source)
            if src.flows >= SOURCE_MAX_FLOWS or src.held + size > SOURCE_MAX_BYTES:
                return "source_full"
        if len(self.flows) >= HELLO_MAX_FLOWS or self.held + size > HELD_MAX_BYTES:
            self._evict(now)
            if len(self.flows) >= HELLO_MAX_FLOWS:
                return "table_full"
            if self.held + size > HELD_MAX_BYTES:
                return "bytes_full"
        return None

    def _grow_room(self, held: HeldFlow, size: int, now: float) -> str | None:
        src = self.sources[held.source]
        if src.held + size > SOURCE_MAX_BYTES:
            return "source_full"
        if self.held + size > HELD_MAX_BYTES:
            self._evict(now)
            if self.held + size > HELD_MAX_BYTES:
                return "bytes_full"
        return None

    def _evict(self, now: float, source: bytes | None = None) -> None:
        """Drop joins gone idle (all sources', or one source's), oldest activity first. The walk
        looks at no more than :data:`_EVICT_SCAN` entries, so that a flood against a full table
        costs a bounded walk per packet, not one over the table."""
        flows = self.flows
        for key in list(itertools.islice(flows, _EVICT_SCAN)):
            held = flows[key]
            if source is not None and held.source != source:
                continue
            if held.evictable_after > now and held.expires > now:
                continue
            self._drop(key, held)
            if held.expires > now:                       # evicted, not ended by its own time
                self._count_abandon(held.http, "evicted")
                self._remember(key, "evicted")

    def _give_up(self, pkt: Packet, key: tuple, held: HeldFlow | None, why: str,
                 http: bool | None = None) -> JoinResult:
        if held is not None:
            self._drop(key, held)
            http = held.http
        self._count_abandon(bool(http), why)
        self._remember(key, why)
        return self._doubt(pkt, "join:" + why)

    def _remember(self, key: tuple, why: str) -> None:
        mem = self.abandoned
        mem.pop(key, None)
        if len(mem) >= ABANDONED_MAX:
            old = next(iter(mem))
            if mem.pop(old)[0] > time.monotonic():
                self.stats.joins_forgotten += 1
        mem[key] = (time.monotonic() + JOIN_TTL, why)

    def _count_abandon(self, http: bool, why: str) -> None:
        if http:
            self.stats.http_heads_abandoned += 1
        else:
            self.stats.hellos_abandoned += 1
        self.stats.joins_abandoned[why] = self.stats.joins_abandoned.get(why, 0) + 1

    def _doubt(self, pkt: Packet, why: str) -> JoinResult:
        pkt.doubt = why
        self.stats.joins_doubted += 1
        return DECIDE

    def _account(self, held: HeldFlow, size: int, flows: int) -> None:
        src = self.sources.get(held.source)
        if src is None:
            src = self.sources[held.source] = _Source()
        src.flows += flows
        src.held += size
        held.held += size
        self.held += size

    def _drop(self, key: tuple, held: HeldFlow) -> None:
        if self.flows.get(key) is held:
            del self.flows[key]
        src = self.sources[held.source]
        src.flows -= 1
        src.held -= held.held
        self.held -= held.held
        held.held = 0
        if not src.flows:
            del self.sources[held.source]


_ORPHAN = "orphan"


def _kind(pkt: Packet, rules: RuleSet):
    """What this piece is, read alone: True the start of an HTTP head to join, False the start of
    a ClientHello to join, None a message readable on its own bytes or nothing a rule reads
    (decide it), :data:`_ORPHAN` possibly a later piece of a message the rules read (a header
    line, the middle of a ClientHello) with nothing before it."""
    payload = pkt.payload
    first = payload[0]
    if first == 0x16 and rules.needs_sni and payload[1:2] in (b"\x03", b""):   # a record header
        if pkt.tls_sni is not None or not client_hello_missing(payload):
            return None
        return False
    if rules.needs_http and first in _MAY_START and first != 0x16:
        if http_head_missing(payload) and (first > 0x0D or payload.lstrip(b"\r\n")):
            return True
        if pkt.http is not None or not payload.lstrip(b"\r\n"):
            # A request readable on its own bytes. Empty lines alone start no join: the engine
            # keeps such a flow inspected without one (loop.py), and a lone CRLF later in a flow
            # (a head's end) is not a new request.
            return None
    if rules.needs_sni:
        return _ORPHAN                                   # any bytes may be a ClientHello's middle
    # Only HTTP is read: a NUL ends any request head a server reads (nginx: 400), so a piece
    # holding one is no part of a head and is decided as it is.
    return _ORPHAN if b"\0" not in payload else None


def _source(pkt: Packet) -> bytes:
    """The key of a packet's source for the per-source bounds: its IPv4 address, or its IPv6
    /64 (one subscriber's prefix; its 2**64 addresses cost an attacker nothing)."""
    src = pkt.src_bytes
    return src if len(src) == 4 else src[:8]
