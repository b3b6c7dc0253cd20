"""Joining a TLS ClientHello or an HTTP request head split over TCP segments.

A rule on the SNI, or on the Host, method or path of a request, must not be decided on the first
piece of a message that arrives in several: the piece may not show the name yet, whether the
split comes from post-quantum key shares or from an evader sending one byte at a time. The
engine offers each queued TCP segment with payload to a :class:`SegmentJoiner`, which answers
with a :class:`JoinResult`:

- ``DECIDE``: no join involved, decide the packet on its own bytes (nearly every packet);
- ``HOLD``: the segment began or grew a join: accept it unseen by the rules and keep its flow in
  INSPECT for :data:`JOIN_TTL`, so that the flow's next segments are queued too;
- ``HOLD_AGAIN``: a retransmission of a segment already held: accept it, nothing else;
- ``GAP``: a segment out of order ended the join (counted abandoned): decide it on its own bytes;
- ``JOINED``: the message is whole (or at its size limit): decide this segment on ``data``, the
  bytes joined so far including it.

After ``GAP`` and ``JOINED`` (``result.ended``) the flow is still in the join's INSPECT: the
engine's decision replaces it. The server gets each held segment, but not the whole message
until the engine has decided on it.

Bounded in flows, bytes and time, so that a flood of half-sent messages costs memory we chose,
not memory an attacker chooses.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Protocol

from hybrid.engine.packet import Packet, client_hello_missing, http_head_missing
from hybrid.engine.rules import RuleSet

__all__ = ["DECIDE", "HELLO_MAX_BYTES", "HELLO_MAX_FLOWS", "HELLO_TIMEOUT", "HTTP_HEAD_MAX_BYTES",
           "JOIN_TTL", "HeldFlow", "JoinCounters", "JoinResult", "SegmentJoiner", "Step"]

HELLO_MAX_FLOWS = 4096               # joins in progress at once
HELLO_MAX_BYTES = 65536              # a ClientHello over any number of TLS records, headers included
                                     # (packet.TLS_HELLO_MAX): beyond it, decided on the bytes joined
HTTP_HEAD_MAX_BYTES = 32768          # a request head this long without a Host line is decided as is
# A held flow is kept in INSPECT for JOIN_TTL seconds from its latest held segment: longer than
# servers wait for a request head (nginx: 60 s), so that pausing between pieces cannot outlast
# the INSPECT and let the rest pass unqueued. A join idle for HELLO_TIMEOUT may be dropped when
# the table is full (then counted as abandoned); a slow sender is otherwise joined however slow.
JOIN_TTL = 120.0
HELLO_TIMEOUT = 5.0

_SEQ_MASK = 0xFFFFFFFF


class Step(enum.Enum):
    """What the engine does with the segment it offered (see the module docstring)."""
    DECIDE = "decide"
    HOLD = "hold"
    HOLD_AGAIN = "hold-again"
    GAP = "gap"
    JOINED = "joined"


@dataclass(frozen=True, slots=True)
class JoinResult:
    """The answer to one :meth:`SegmentJoiner.offer`."""
    step: Step
    data: bytes | None = None        # JOINED: the joined bytes, this segment's included
    http: bool = False               # JOINED: an HTTP request head (else a TLS ClientHello)

    @property
    def held(self) -> bool:
        """The segment is held back: accept it without a decision."""
        return self.step is Step.HOLD or self.step is Step.HOLD_AGAIN

    @property
    def ended(self) -> bool:
        """A join ended with this segment: its flow is in the join's INSPECT until the decision."""
        return self.step is Step.GAP or self.step is Step.JOINED


# The results that carry no bytes, made once: offer() allocates only when a join completes.
DECIDE = JoinResult(Step.DECIDE)
HOLD = JoinResult(Step.HOLD)
HOLD_AGAIN = JoinResult(Step.HOLD_AGAIN)
GAP = JoinResult(Step.GAP)


class JoinCounters(Protocol):
    """Where the joiner counts (the engine's EngineStats)."""
    hellos_joined: int              # split ClientHellos held back and decided on the joined bytes
    hellos_abandoned: int           # gave up joining (out of order, too big, timed out, table full)
    http_heads_joined: int          # the same for HTTP request heads sent in pieces
    http_heads_abandoned: int


@dataclass(slots=True)
class HeldFlow:
    """One join in progress, keyed by the flow's direction (src, sport, dst, dport)."""
    data: bytes                      # the payload joined so far
    expect: int                      # the next TCP sequence number expected (host order)
    evictable_after: float           # time.monotonic() after which a full table may drop it
    http: bool                       # an HTTP request head (else a TLS ClientHello)


# First bytes of a payload that may start a join: a TLS handshake record (0x16), or an HTTP
# request as nginx reads one: empty lines (CR, LF) before the request line, and a method of
# upper-case letters, '_' and '-'.
_MAY_START = frozenset(b"\x16\r\n_-ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class SegmentJoiner:
    """The joins in progress of one engine. Counts into ``stats`` (``hellos_joined``,
    ``hellos_abandoned``, ``http_heads_joined``, ``http_heads_abandoned``)."""

    __slots__ = ("flows", "stats")

    def __init__(self, stats: JoinCounters):
        self.flows: dict[tuple, HeldFlow] = {}
        self.stats = stats

    def __len__(self) -> int:
        return len(self.flows)

    def offer(self, pkt: Packet, rules: RuleSet) -> JoinResult:
        """Offer a TCP segment with payload (``pkt.payload_len > 0``); only ClientHellos when
        ``rules.needs_sni``, only request heads when ``rules.needs_http``."""
        first = pkt.raw[pkt.payload_off]
        flows = self.flows
        if not flows and first not in _MAY_START:
            return DECIDE                   # neither a TLS record nor a request, nothing held: most packets
        key = (pkt.src_bytes, pkt.sport, pkt.dst_bytes, pkt.dport)
        held = flows.get(key) if flows else None
        if held is None:
            return self._begin(pkt, key, first, rules)
        return self._continue(pkt, key, held)

    def _begin(self, pkt: Packet, key: tuple, first: int, rules: RuleSet) -> JoinResult:
        if first == 0x16 and rules.needs_sni:
            http = False
            if pkt.tls_sni is not None or not client_hello_missing(pkt.payload):
                return DECIDE
        elif first != 0x16 and rules.needs_http and http_head_missing(pkt.payload) \
                and (first > 0x0D or pkt.payload.lstrip(b"\r\n")):
            # Empty lines alone start no join: the engine keeps such a flow inspected without
            # one (loop.py), and a lone CRLF later in a flow (a head's end) is not a new request.
            http = True
        else:
            return DECIDE
        now = time.monotonic()
        if len(self.flows) >= HELLO_MAX_FLOWS:
            self._expire(now)
            if len(self.flows) >= HELLO_MAX_FLOWS:
                self._abandoned(http)
                return DECIDE
        self.flows[key] = HeldFlow(pkt.payload, (pkt.tcp_seq + pkt.payload_len) & _SEQ_MASK,
                                   now + HELLO_TIMEOUT, http)
        return HOLD

    def _continue(self, pkt: Packet, key: tuple, held: HeldFlow) -> JoinResult:
        expect = held.expect
        if pkt.tcp_seq != expect:
            if ((expect - pkt.tcp_seq) & _SEQ_MASK) < 0x80000000:    # a retransmission: already held
                return HOLD_AGAIN
            del self.flows[key]                                       # a gap: decide on what we have
            self._abandoned(held.http)
            return GAP
        data = held.data + pkt.payload
        if held.http:
            missing, limit = http_head_missing(data), HTTP_HEAD_MAX_BYTES
        else:
            missing, limit = client_hello_missing(data), HELLO_MAX_BYTES
        if missing and len(data) < limit:
            held.data = data
            held.expect = (expect + pkt.payload_len) & _SEQ_MASK
            held.evictable_after = time.monotonic() + HELLO_TIMEOUT
            return HOLD
        del self.flows[key]                                           # decide this segment on the whole
        if held.http:
            self.stats.http_heads_joined += 1
        else:
            self.stats.hellos_joined += 1
        return JoinResult(Step.JOINED, data, held.http)

    def _abandoned(self, http: bool) -> None:
        if http:
            self.stats.http_heads_abandoned += 1
        else:
            self.stats.hellos_abandoned += 1

    def _expire(self, now: float) -> None:
        for k in [k for k, v in self.flows.items() if v.evictable_after <= now]:
            self._abandoned(self.flows.pop(k).http)
