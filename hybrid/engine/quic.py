"""Reading the server name of QUIC handshakes: the TLS ClientHello inside a client's Initial packets.

QUIC (RFC 9000) protects its Initial packets with keys that every observer can derive (RFC 9001
5.2; version 2: RFC 9369): HKDF-Extract of the client's first Destination Connection ID with the
version's published salt, then HKDF-Expand-Label ``client in``, then the version's ``key``,
``iv`` and ``hp`` labels. The engine removes the header protection (an AES-128-ECB mask over a
sample of the payload), decrypts the payload (AES-128-GCM, with the header as associated data),
walks the frames and puts the CRYPTO frames' bytes at their offsets in the handshake stream.
Once the stream holds a whole ClientHello, :func:`hybrid.engine.packet.client_hello_sni` reads its
server_name, and the ``tls_sni`` rules decide the datagram that completed it. A post-quantum
ClientHello (1.5-2.5 KB) does not fit one 1200-byte datagram: its first datagrams are held (accepted,
their flow kept in INSPECT so that the next ones are queued too), and the one that completes it
is decided.

The engine offers every UDP datagram with payload to a :class:`QuicJoiner`, which answers with a
:class:`QuicResult`:

- ``PASS``: not a client's QUIC Initial the engine reads (DNS, a server's packets, QUIC of a flow
  whose handshake was never seen): decide it as any UDP datagram;
- ``HOLD``: it began or grew a ClientHello, cleanly: accept it, keep its flow in INSPECT;
- ``DECIDE``: decide it on ``names`` (the server names of its connection's ClientHello: once per
  name, the strictest decision wins; ``()`` when there is none to read). When the joiner cannot be
  sure what the server reads, it sets ``pkt.doubt`` ("quic:<reason>", :data:`QUIC_DOUBTS`) and
  the engine never bypasses the flow on it (loop.py, ``Engine._settle``);
- ``BLOCK``: the rules say ``quic = "block"``: drop it, block the flow.

**As the server reads it.** The engine reads what an RFC 9000 server (aioquic 1.x, checked
against its source) reads from the same bytes, and says "doubt" where servers may differ, never
guessing a name:

- keys: a connection is named by the Destination Connection ID of the first Initial the engine
  saw from its flow (the 5-tuple); a later Initial with another DCID (the client switches to the
  server's after its first answer) is tried with the keys of the flow's connections too; one no
  known key decrypts is ``undecryptable``;
- a datagram under 1200 bytes: servers discard its Initials (RFC 9000 14.1), so the engine does
  not read them either (``short-datagram``): a ClientHello completed by bytes the server never
  got would be decided on bytes it does not read;
- a packet number seen before in the connection: servers discard the packet (RFC 9000 12.3), so
  does the engine; with other bytes than the first copy: ``duplicate-packet``;
- frames: PADDING, PING, ACK, CRYPTO and CONNECTION_CLOSE; any other frame in an Initial closes
  the connection (``forbidden-frame``), as does a frame that does not parse (``malformed``) or a
  reserved header bit set (``reserved-bits``); the frames before it are read, as the server does;
- CRYPTO frames by offset, in any order (Chrome shuffles its ClientHello over several frames);
  bytes at an offset held already that differ: ``overlap-differs``, and the names of both readings
  (first-received, last-received) are decided on; a stream that is not a ClientHello
  (``not-client-hello``), one beyond :data:`CRYPTO_MAX` (``too-big``), a ClientHello whose
  server_name is ambiguous or malformed (``sni-duplicate``: two server_name extensions, aioquic
  takes the last; ``sni-malformed``, ``hello-malformed``): every name found is decided on;
- coalesced packets: every long-header packet of the datagram is walked; Initials after the first
  of another DCID, or behind another packet type, are read and doubted (``coalesced``): servers
  differ on them (RFC 9000 12.2 says ignore, aioquic decrypts them with the connection's keys);
- another version on UDP 443 (``unknown-version``): the engine cannot read it, the server may;
- a connection decided while another one on the same 5-tuple is unfinished or in doubt
  (``several-connections``): a bypass of the 5-tuple would let the other one's ClientHello through
  unseen.

A connection once in doubt stays in doubt: each later datagram of it is decided (never held) with
its doubt and its names. A datagram with a checksum its receiver rejects or a TTL that may not reach
the server (the engine's transport checks, asked before reading) is decided in doubt and not read.
Every datagram of a flow whose join was given up (a bound, an eviction) is decided in doubt
(``quic:table-full``, ``source-full``, ``bytes-full``, ``evicted``, ``pieces``, ``packets``,
``connections``, ``overlaps``) for :data:`~hybrid.engine.join.JOIN_TTL`.

**Cost in proportion to the bytes**: each packet is decrypted once per key tried (at most one per
connection of its flow), each frame and each CRYPTO byte is looked at once, padding is skipped by a
C search, and each reading of the ClientHello is parsed once it is whole, again only after a piece
with differing bytes (at most :data:`CONN_MAX_DIFFERING`). Bounded as the TCP joiner is
(hybrid/engine/join.py): flows held at once, per source (an IPv6 source by its /64), bytes, CRYPTO
ranges, packets and differing pieces per connection, connections per flow.
"""

from __future__ import annotations

import enum
import hmac
import itertools
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hybrid.engine.join import ABANDONED_MAX, HELD_MAX_BYTES, HELLO_TIMEOUT, JOIN_TTL, SOURCE_MAX_BYTES
from hybrid.engine.packet import TLS_HELLO_MAX, Packet, client_hello_names, client_hello_sni

__all__ = ["CONN_MAX_DIFFERING", "CONN_MAX_PACKETS", "CONN_MAX_RANGES", "CRYPTO_MAX", "FLOW_MAX_CONNS", "MIN_INITIAL_DATAGRAM",
           "QUIC_DOUBTS", "QUIC_MAX_FLOWS", "QUIC_PORT", "QUIC_V1", "QUIC_V2", "SOURCE_MAX_FLOWS",
           "QuicCounters", "QuicJoiner", "QuicResult", "Step", "client_initial_secret", "initial_keys"]

QUIC_V1 = 0x00000001                 # RFC 9000
QUIC_V2 = 0x6B3343CF                 # RFC 9369
QUIC_PORT = 443                      # where another long-header version is doubted (or blocked)
MIN_INITIAL_DATAGRAM = 1200          # RFC 9000 14.1: servers discard Initials in smaller datagrams
CRYPTO_MAX = TLS_HELLO_MAX           # handshake stream bytes joined (64 KiB; a real one is < 3 KB)
CONN_MAX_RANGES = 64                 # CRYPTO byte ranges held apart per connection
CONN_MAX_PACKETS = 128               # Initial packets read per connection (64 KiB is ~55 datagrams)
CONN_MAX_DIFFERING = 16              # pieces whose bytes differ from those held (each may re-parse)
FLOW_MAX_CONNS = 4                   # connections per 5-tuple (a Retry makes 2)
QUIC_MAX_FLOWS = 16384               # flows with a ClientHello joined or decided, held at once
# Per source: flows held (joined or decided; decided ones cost no bytes and go first when room is
# needed) and joined bytes (join.py's 1 MiB; a real ClientHello is 1-3 KB).
SOURCE_MAX_FLOWS = 256
_EVICT_SCAN = 128                    # flows one eviction looks at, oldest activity first
_KEYS_CACHED = 1024                  # (DCID, version) -> keys

# The reasons the joiner gives (pkt.doubt "quic:<reason>"); see the module docstring.
QUIC_DOUBTS = ("undecryptable", "unknown-version", "malformed", "short-datagram", "duplicate-packet",
               "forbidden-frame", "reserved-bits", "overlap-differs", "not-client-hello", "too-big",
               "sni-duplicate", "sni-malformed", "hello-malformed", "coalesced", "several-connections",
               "table-full", "source-full", "bytes-full", "evicted", "pieces", "packets", "connections",
               "overlaps")


@dataclass(frozen=True, slots=True)
class _Version:
    salt: bytes
    key: bytes                       # HKDF-Expand-Label labels
    iv: bytes
    hp: bytes
    initial: int                     # long-header type bits of an Initial, of a Retry
    retry: int


_VERSIONS = {
    QUIC_V1: _Version(bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
                      b"quic key", b"quic iv", b"quic hp", 0, 3),
    QUIC_V2: _Version(bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
                      b"quicv2 key", b"quicv2 iv", b"quicv2 hp", 1, 0),
}


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """TLS 1.3 HKDF-Expand-Label (RFC 8446 7.1) with an empty context, SHA-256, ``length`` <= 32
    (one HMAC block)."""
    info = struct.pack("!HB", length, 6 + len(label)) + b"tls13 " + label + b"\x00"
    return hmac.digest(secret, info + b"\x01", "sha256")[:length]


def client_initial_secret(dcid: bytes, version: int = QUIC_V1) -> bytes:
    """The client's Initial secret for a connection whose client chose ``dcid`` (RFC 9001 5.2)."""
    initial = hmac.digest(_VERSIONS[version].salt, dcid, "sha256")           # HKDF-Extract
    return _expand_label(initial, b"client in", 32)


def initial_keys(dcid: bytes, version: int = QUIC_V1) -> tuple[bytes, bytes, bytes]:
    """(key, iv, hp) that protect the client's Initial packets of ``version``."""
    v = _VERSIONS[version]
    secret = client_initial_secret(dcid, version)
    return _expand_label(secret, v.key, 16), _expand_label(secret, v.iv, 12), _expand_label(secret, v.hp, 16)


class _Keys:
    __slots__ = ("aead", "iv", "hp")

    def __init__(self, dcid: bytes, version: int):
        key, iv, hp = initial_keys(dcid, version)
        self.aead = AESGCM(key)
        self.iv = int.from_bytes(iv, "big")
        # ECB has no state between blocks: one encryptor masks every sample.
        self.hp = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()


class Step(enum.Enum):
    """What the engine does with the datagram it offered (see the module docstring)."""
    PASS = "pass"
    HOLD = "hold"
    DECIDE = "decide"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class QuicResult:
    """The answer to one :meth:`QuicJoiner.offer`."""
    step: Step
    names: tuple = ()                # DECIDE: the server names to decide on (None: a ClientHello without one)
    ended: bool = False              # DECIDE: a join that had held datagrams (its flow in INSPECT) ended here


PASS = QuicResult(Step.PASS)
HOLD = QuicResult(Step.HOLD)
BLOCK = QuicResult(Step.BLOCK)


class QuicCounters(Protocol):
    """Where the joiner counts (the engine's EngineStats)."""
    quic_initials: int               # Initial packets decrypted
    quic_snis: int                   # ClientHellos read to their end (their names decided)
    quic_held: int                   # datagrams held while a ClientHello was joined
    quic_blocked: int                # datagrams dropped by quic = "block"


class _Header:
    """One long-header packet of a datagram (RFC 9000 17.2)."""
    __slots__ = ("pos", "version", "initial", "dcid", "pn_off", "end")

    def __init__(self, pos, version, initial, dcid, pn_off, end):
        self.pos, self.version, self.initial, self.dcid, self.pn_off, self.end = pos, version, initial, dcid, pn_off, end


def _varint(d: bytes, i: int) -> tuple[int | None, int]:
    """RFC 9000 16: (value, next offset), or (None, i) when the bytes end inside it."""
    if i >= len(d):
        return None, i
    ln = 1 << (d[i] >> 6)
    if i + ln > len(d):
        return None, i
    return int.from_bytes(d[i:i + ln], "big") & ((1 << (8 * ln - 2)) - 1), i + ln


def _packets(d: bytes) -> tuple[list[_Header], bool]:
    """The long-header packets at the start of datagram ``d``, as servers split it (aioquic's
    pull_quic_header): each ends where its Length says; a short-header packet, a Retry or an
    unknown version takes the rest. The bool: bytes that do not parse as a packet were met."""
    out: list[_Header] = []
    pos, n = 0, len(d)
    while pos < n:
        if not d[pos] & 0x80:
            return out, False                            # a short header: the rest of the datagram
        if pos + 7 > n:
            return out, True
        version = int.from_bytes(d[pos + 1:pos + 5], "big")
        v = _VERSIONS.get(version)
        if v is None:
            return out, version != 0 or bool(out)        # not ours (a version negotiation: a server's)
        dcil = d[pos + 5]
        p = pos + 6 + dcil
        if dcil > 20 or p >= n:                          # RFC 9000 17.2: at most 20 in v1 (and v2)
            return out, True
        dcid = d[pos + 6:p]
        scil = d[p]
        p += 1 + scil
        if scil > 20 or p > n:
            return out, True
        kind = (d[pos] >> 4) & 3
        if kind == v.retry:
            return out, False                            # a server's; no Length: the rest
        initial = kind == v.initial
        if initial:
            tlen, p = _varint(d, p)
            if tlen is None or p + tlen > n:
                return out, True
            p += tlen                                    # the token
        length, p = _varint(d, p)
        if length is None or p + length > n:
            return out, True
        out.append(_Header(pos, version, initial, dcid, p, p + length))
        pos = p + length
    return out, False


def _decode_pn(expected: int, truncated: int, nbits: int) -> int:
    """RFC 9000 A.3: the packet number closest to ``expected`` with these low bits."""
    win = 1 << nbits
    hwin, mask = win >> 1, win - 1
    candidate = (expected & ~mask) | truncated
    if candidate <= expected - hwin and candidate < (1 << 62) - win:
        return candidate + win
    if candidate > expected + hwin and candidate >= win:
        return candidate - win
    return candidate


def _unprotect(keys: _Keys, d: bytes, h: _Header, expected: int) -> tuple[bytes, int, int] | None:
    """(plaintext, packet number, first byte unmasked) of the Initial ``h``, or None when these
    keys do not open it (RFC 9001 5.3, 5.4)."""
    pn_off, end = h.pn_off, h.end
    if pn_off + 20 > end:                                # the 16-byte sample starts 4 after pn_off
        return None
    mask = keys.hp.update(d[pn_off + 4:pn_off + 20])
    b0 = d[h.pos] ^ (mask[0] & 0x0F)
    pnl = (b0 & 3) + 1
    truncated = int.from_bytes(d[pn_off:pn_off + pnl], "big") ^ int.from_bytes(mask[1:1 + pnl], "big")
    pn = _decode_pn(expected, truncated, 8 * pnl)
    header = bytes((b0,)) + d[h.pos + 1:pn_off] + truncated.to_bytes(pnl, "big")
    try:
        plain = keys.aead.decrypt((keys.iv ^ pn).to_bytes(12, "big"), d[pn_off + pnl:end], header)
    except InvalidTag:
        return None
    return plain, pn, b0


_NONZERO = re.compile(rb"[^\x00]")


class _Stream:
    """A connection's Initial CRYPTO stream by offset: ``first`` the first-received reading (zero
    in holes), ``last`` the last-received one once an overlap differed, ``cover`` the ranges held
    ([a, b), sorted, disjoint). ``parsed`` keeps each reading's parse once whole: its bytes change
    only by a differing piece (no hole is left in it), which clears it, and those are bounded
    (CONN_MAX_DIFFERING), so a ClientHello is parsed a bounded number of times."""
    __slots__ = ("first", "last", "cover", "differing", "parsed")

    def __init__(self):
        self.first = bytearray()
        self.last: bytearray | None = None
        self.cover: list[list[int]] = []
        self.differing = 0
        self.parsed: list = [None, None]              # per reading: (names, doubt) once whole

    @property
    def size(self) -> int:
        return len(self.first) + (len(self.last) if self.last is not None else 0)

    @property
    def contiguous(self) -> int:
        c = self.cover
        return c[0][1] if c and c[0][0] == 0 else 0

    def put(self, off: int, data: bytes) -> tuple[bool, bool]:
        """Write ``data`` at ``off``: (bytes new or changed, an overlap differed)."""
        end = off + len(data)
        first, cover = self.first, self.cover
        i = 0
        while i < len(cover) and cover[i][1] < off:
            i += 1
        j = i
        differs = False
        while j < len(cover) and cover[j][0] < end:      # the held ranges this piece overlaps
            a, b = max(off, cover[j][0]), min(end, cover[j][1])
            if a < b and first[a:b] != data[a - off:b - off]:
                differs = True
            j += 1
        if differs:
            self.differing += 1
            self.parsed = [None, None]
            if self.last is None:
                self.last = bytearray(first)             # the reading before this piece
        if end > len(first):
            first.extend(bytes(end - len(first)))
        last = self.last
        if last is not None and end > len(last):
            last.extend(bytes(end - len(last)))
        changed = differs
        pos, k = off, i
        while pos < end:                                 # the holes: first copies of their bytes
            if k < len(cover) and cover[k][0] <= pos:
                pos = max(pos, cover[k][1])
                k += 1
                continue
            hi = min(end, cover[k][0]) if k < len(cover) else end
            first[pos:hi] = data[pos - off:hi - off]
            changed = True
            pos = hi
        if last is not None:
            last[off:end] = data
        # merge [off, end) with the ranges it meets or touches
        k, lo, hi = i, off, end
        while k < len(cover) and cover[k][0] <= end:
            lo, hi = min(lo, cover[k][0]), max(hi, cover[k][1])
            k += 1
        cover[i:k] = [[lo, hi]]
        return changed, differs

    def hello(self) -> tuple[bool, tuple, str | None]:
        """(whole, names, doubt): whether each reading holds a whole ClientHello (or one beyond the
        bound), the server names in those that do, and the doubt about them. Each reading on its
        own: a server may read either. A reading that does not start a ClientHello is not whole
        (a later copy of its first bytes may still make one, for a server that keeps the last)."""
        n = self.contiguous
        names: list = []
        doubt = None
        whole = True
        for which, r in enumerate((self.first, self.last)):
            if r is None:
                continue
            done = self.parsed[which]
            if done is not None:
                names.extend(done[0])
                doubt = doubt or done[1]
                continue
            if n and r[0] != 1:
                doubt = doubt or "quic:not-client-hello"     # the server aborts on it
                whole = False
                continue
            if n < 4:
                whole = False
                continue
            want = 4 + int.from_bytes(r[1:4], "big")
            if want > CRYPTO_MAX:
                doubt = doubt or "quic:too-big"
                continue
            if n < want:
                whole = False
                continue
            h = bytes(r[:want])
            name, problem = client_hello_sni(h)
            if problem is None:
                done = ((name,), None)
            else:
                done = (client_hello_names(h) or (None,), "quic:" + problem.replace("_", "-"))
            self.parsed[which] = done
            names.extend(done[0])
            doubt = doubt or done[1]
        if self.last is not None:
            doubt = doubt or "quic:overlap-differs"
        return whole, tuple(dict.fromkeys(names)), doubt


@dataclass(slots=True)
class _Conn:
    """One QUIC connection's client Initials, named by the first DCID the engine saw for it."""
    odcid: bytes
    stream: _Stream | None                           # None once decided
    expected: int = 0                                # the next packet number (RFC 9000 A.3)
    pns: dict | None = None                          # packet number -> hash of its protected bytes
    names: tuple | None = None                       # once decided: the names decided on
    seen: tuple = ()                                 # before: names its readings show (in doubt only)
    doubt: str | None = None                         # the first doubt about it: every later decision's

    @property
    def done(self) -> bool:
        return self.names is not None


@dataclass(slots=True)
class _Flow:
    """A client's 5-tuple (src, sport, dst, dport) with the connections read from it."""
    source: bytes
    conns: list
    evictable_after: float                           # time.monotonic() after which room may take it
    expires: float                                   # after which it is gone (JOIN_TTL from its last hold)
    held: int = 0                                    # stream bytes it holds against the bounds
    holding: bool = False                            # a datagram was held: its flow is in INSPECT


@dataclass(slots=True)
class _Source:
    flows: int = 0
    held: int = 0


_NO_SOURCE = _Source()


class QuicJoiner:
    """The QUIC handshakes one engine reads. Counts into ``stats`` (see :class:`QuicCounters`)."""

    def __init__(self, stats: QuicCounters):
        self.flows: dict[tuple, _Flow] = {}           # by last activity: the idle ones first
        self.sources: dict[bytes, _Source] = {}
        # flow -> (until, reason, the names decided on it), oldest first
        self.abandoned: dict[tuple, tuple[float, str, tuple]] = {}
        self.held = 0
        self.stats = stats
        self._keys: dict[tuple, _Keys] = {}

    def __len__(self) -> int:
        return len(self.flows)

    # -- the entry point ---------------------------------------------------------------------------
    def offer(self, pkt: Packet, block: bool = False, trusted: Callable[[], str | None] | None = None
              ) -> QuicResult:
        """Offer a UDP datagram with payload. ``block``: the rules say ``quic = "block"``.
        ``trusted``, asked only before a datagram's Initials are read: why its receiver may not
        get it as it is (a bad checksum, a low TTL), or None."""
        d = pkt.payload
        b0 = d[0]
        key = (pkt.src_bytes, pkt.sport, pkt.dst_bytes, pkt.dport)
        long = b0 & 0x80 and len(d) >= 5
        if block and long:
            version = int.from_bytes(d[1:5], "big")
            if version in _VERSIONS:
                pkts, _ = _packets(d)
                if any(h.initial for h in pkts):
                    return self._block()
            elif version and pkt.dport == QUIC_PORT:
                return self._block()
        flows = self.flows
        flow = flows.get(key) if flows else None
        now = time.monotonic()
        if flow is not None and flow.expires <= now:
            self._drop(key, flow)
            flow = None
        if self.abandoned:
            gone = self.abandoned.get(key)
            if gone is not None:
                if gone[0] > now:
                    pkt.doubt = "quic:" + gone[1]
                    return QuicResult(Step.DECIDE, gone[2])
                del self.abandoned[key]
        if flows and (pkt.dst_bytes, pkt.dport, pkt.src_bytes, pkt.sport) in flows:
            return PASS                                  # the server's side of a flow read
        if not long:
            return self._known(pkt, flow) if flow is not None else PASS
        version = int.from_bytes(d[1:5], "big")
        if version not in _VERSIONS:
            if version and (pkt.dport == QUIC_PORT or flow is not None):
                return self._decide(pkt, flow, "quic:unknown-version", persist=True)
            return self._known(pkt, flow) if flow is not None else PASS
        pkts, bad = _packets(d)
        if not any(h.initial for h in pkts):
            if flow is not None:
                return self._known(pkt, flow, "quic:malformed" if bad else None)
            return PASS                                  # no Initial: no connection starts here
        if pkt.fragment:
            return self._decide(pkt, flow, "ip:fragment", persist=True)
        if len(d) < MIN_INITIAL_DATAGRAM:
            return self._decide(pkt, flow, "quic:short-datagram", persist=False)
        why = trusted() if trusted is not None else None
        if why is not None:
            # not read: a bad checksum never reaches the server; a low TTL may or may not
            return self._decide(pkt, flow, why, persist=not why.endswith("checksum"))
        return self._read(pkt, key, flow, d, pkts, "quic:malformed" if bad else None, now)

    # -- reading a datagram's Initials ---------------------------------------------------------------
    def _read(self, pkt: Packet, key: tuple, flow: _Flow | None, d: bytes, pkts: list[_Header],
              doubt: str | None, now: float) -> QuicResult:
        touched: list[_Conn] = []
        grew = False
        first_dcid = None
        for h in pkts:
            if not h.initial:
                continue                                 # 0-RTT, Handshake: nothing to read
            if first_dcid is None:
                first_dcid = h.dcid
                if h is not pkts[0]:
                    doubt = doubt or "quic:coalesced"    # an Initial behind another packet
            elif h.dcid != first_dcid:
                doubt = doubt or "quic:coalesced"
            opened = self._open(pkt, key, flow, d, h, now)
            if opened.__class__ is str:
                return self._give_up(pkt, key, self.flows.get(key), opened)
            if opened is None:
                doubt = doubt or "quic:undecryptable"
                continue
            flow = self.flows[key]
            conn, plain, pn, b0, new = opened
            grew = grew or new
            self.stats.quic_initials += 1
            if conn not in touched:
                touched.append(conn)
            if b0 & 0x0C:                                # RFC 9000 17.2: the server closes
                doubt = doubt or "quic:reserved-bits"
            pns = conn.pns
            digest = hash(d[h.pn_off:h.end])
            if pn in pns:
                if pns[pn] != digest:
                    doubt = doubt or "quic:duplicate-packet"
                continue                                 # discarded, as the server does
            if len(pns) >= CONN_MAX_PACKETS:
                return self._give_up(pkt, key, flow, "packets")
            pns[pn] = digest
            if pn >= conn.expected:
                conn.expected = pn + 1
            if conn.done:
                continue                                 # decided already: its bytes change nothing
            r = self._frames(flow, conn, plain, now)
            if r.__class__ is str:
                return self._give_up(pkt, key, flow, r)
            changed, why = r
            grew = grew or changed
            doubt = doubt or why
        if flow is None:                                 # nothing opened, nothing to hold
            return self._decide(pkt, None, doubt or "quic:undecryptable", persist=False)
        ended = False
        for conn in touched:
            if conn.done:
                continue
            whole, names, why = conn.stream.hello()
            if whole:
                self._decided(flow, conn, names, why)
                ended = True
            else:
                conn.seen = names
                doubt = doubt or why
        if doubt is not None:
            for conn in touched:
                if conn.doubt is None:
                    conn.doubt = doubt
        if doubt is None and not any(c.done or c.doubt for c in touched):
            if grew or touched:
                return self._hold(key, flow, now)
        ended = ended and flow.holding
        return self._decide(pkt, flow, doubt, persist=True, ended=ended)

    def _open(self, pkt: Packet, key: tuple, flow: _Flow | None, d: bytes, h: _Header, now: float):
        """The connection an Initial belongs to and its plaintext: (conn, plain, pn, first byte,
        new conn?); None when no key opens it; a give-up reason when a new connection has no room."""
        conns = flow.conns if flow is not None else ()
        exact = next((c for c in conns if c.odcid == h.dcid), None)
        tries = [exact] if exact is not None else [None]        # None: a new connection named by its DCID
        tries += [c for c in conns if c is not exact]
        for conn in tries:
            odcid = h.dcid if conn is None else conn.odcid
            opened = _unprotect(self._keys_for(odcid, h.version), d, h, 0 if conn is None else conn.expected)
            if opened is None:
                continue
            new = conn is None
            if new:
                if flow is None:
                    why = self._room(pkt, now)
                    if why is not None:
                        return why
                    flow = _Flow(_source(pkt), [], now + HELLO_TIMEOUT, now + JOIN_TTL)
                    self.flows[key] = flow
                    self._account(flow, 0, 1)
                elif len(flow.conns) >= FLOW_MAX_CONNS:
                    return "connections"
                conn = _Conn(h.dcid, _Stream(), pns={})
                flow.conns.append(conn)
            return conn, opened[0], opened[1], opened[2], new
        return None

    def _frames(self, flow: _Flow, conn: _Conn, plain: bytes, now: float):
        """Walk an Initial's frames as the server does (RFC 9000 12.4, 19), putting CRYPTO bytes
        in the connection's stream: (bytes new or changed, doubt or None); a give-up reason."""
        stream = conn.stream
        n = len(plain)
        if not n:
            return False, "quic:malformed"               # a packet with no frames: refused
        i = 0
        changed = False
        differs = False
        while i < n:
            t, i = _varint(plain, i)
            if t is None:
                return changed, "quic:malformed"
            if t == 0x00:                                # PADDING: up to the next non-zero byte
                m = _NONZERO.search(plain, i)
                i = m.start() if m is not None else n
            elif t == 0x01:                              # PING
                continue
            elif t == 0x06:                              # CRYPTO
                off, i = _varint(plain, i)
                ln, i = _varint(plain, i) if off is not None else (None, i)
                if ln is None or i + ln > n:
                    return changed, "quic:malformed"
                if ln:
                    if off + ln > CRYPTO_MAX:
                        return "too-big"
                    grow = max(0, off + ln - len(stream.first)) * (2 if stream.last is not None else 1)
                    if grow:
                        why = self._grow_room(flow, grow, now)
                        if why is not None:
                            return why
                    before = stream.size
                    new, diff = stream.put(off, plain[i:i + ln])
                    self._account(flow, stream.size - before, 0)
                    changed = changed or new
                    differs = differs or diff
                    if len(stream.cover) > CONN_MAX_RANGES:
                        return "pieces"
                    if stream.differing > CONN_MAX_DIFFERING:
                        return "overlaps"
                i += ln
            elif t in (0x02, 0x03):                      # ACK (0x03: with ECN counts)
                vals = 4
                count = None
                k = 0
                while k < vals:
                    v, i = _varint(plain, i)
                    if v is None:
                        return changed, "quic:malformed"
                    if k == 2:
                        count = v
                        if count > n:                    # each range takes 2 bytes at least
                            return changed, "quic:malformed"
                        vals += 2 * count + (3 if t == 0x03 else 0)
                    k += 1
            elif t == 0x1C:                              # CONNECTION_CLOSE (transport)
                code, i = _varint(plain, i)
                frame, i = _varint(plain, i) if code is not None else (None, i)
                ln, i = _varint(plain, i) if frame is not None else (None, i)
                if ln is None or i + ln > n:
                    return changed, "quic:malformed"
                i += ln
            else:
                return changed, "quic:forbidden-frame"   # the server closes the connection
        return changed, ("quic:overlap-differs" if differs else None)

    # -- answers -------------------------------------------------------------------------------------
    def _known(self, pkt: Packet, flow: _Flow, doubt: str | None = None) -> QuicResult:
        """A datagram of a flow read before that carries no Initial to read (0-RTT, Handshake,
        1-RTT packets): held while the flow's ClientHellos are all unfinished and clean (no
        server can use these packets before its ClientHello), else decided on the flow's names."""
        if doubt is None and not any(c.done or c.doubt for c in flow.conns):
            return self._hold(None, flow, time.monotonic())
        return self._decide(pkt, flow, doubt, persist=doubt is not None)

    def _decide(self, pkt: Packet, flow: _Flow | None, doubt: str | None, *, persist: bool,
                ended: bool = False) -> QuicResult:
        """DECIDE on the names of the flow's decided connections, with ``doubt`` or the first of
        theirs; "several-connections" when another one is unfinished or in doubt. ``persist``:
        the doubt sticks to the flow's connections (the server may have read the datagram)."""
        names: tuple = ()
        if flow is not None:
            conns = flow.conns
            if doubt is not None and persist:
                for c in conns:
                    if c.doubt is None:
                        c.doubt = doubt
            names = _names(flow)
            if doubt is None:
                doubt = next((c.doubt for c in conns if c.doubt is not None), None)
            if doubt is None and any(not c.done for c in conns):
                doubt = "quic:several-connections"
        if doubt is not None:
            pkt.doubt = doubt
        return QuicResult(Step.DECIDE, names, ended and doubt is None)

    def _hold(self, key: tuple | None, flow: _Flow, now: float) -> QuicResult:
        flow.holding = True
        flow.evictable_after = now + HELLO_TIMEOUT
        flow.expires = now + JOIN_TTL                    # the INSPECT the engine writes lasts as long
        if key is not None:
            del self.flows[key]                          # to the end: the most recently active
            self.flows[key] = flow
        self.stats.quic_held += 1
        return HOLD

    def _block(self) -> QuicResult:
        self.stats.quic_blocked += 1
        return BLOCK

    def _decided(self, flow: _Flow, conn: _Conn, names: tuple, doubt: str | None) -> None:
        self._account(flow, -conn.stream.size, 0)
        conn.stream = None
        conn.names = names
        if doubt is not None and conn.doubt is None:
            conn.doubt = doubt
        self.stats.quic_snis += 1
        if all(c.done and c.doubt is None for c in flow.conns):
            flow.evictable_after = 0.0                   # decided clean: room may take it first

    def _give_up(self, pkt: Packet, key: tuple, flow: _Flow | None, why: str) -> QuicResult:
        """A bound or an eviction ends the flow's joins: it is remembered, its datagrams decided
        in doubt until JOIN_TTL (with the names decided so far)."""
        names = _names(flow) if flow is not None else ()
        if flow is not None:
            self._drop(key, flow)
        self._remember(key, why, names)
        pkt.doubt = "quic:" + why
        return QuicResult(Step.DECIDE, names)

    def _remember(self, key: tuple, why: str, names: tuple) -> None:
        mem = self.abandoned
        mem.pop(key, None)
        if len(mem) >= ABANDONED_MAX:
            del mem[next(iter(mem))]
        mem[key] = (time.monotonic() + JOIN_TTL, why, names)

    # -- keys and bounds -----------------------------------------------------------------------------
    def _keys_for(self, dcid: bytes, version: int) -> _Keys:
        k = (dcid, version)
        keys = self._keys.get(k)
        if keys is None:
            if len(self._keys) >= _KEYS_CACHED:
                del self._keys[next(iter(self._keys))]
            keys = self._keys[k] = _Keys(dcid, version)
        return keys

    def _room(self, pkt: Packet, now: float) -> str | None:
        """Why a new flow from this packet's source cannot be had (after evicting idle ones)."""
        source = _source(pkt)
        src = self.sources.get(source) or _NO_SOURCE
        if src.flows >= SOURCE_MAX_FLOWS:
            self._evict(now, source)
            if src.flows >= SOURCE_MAX_FLOWS:
                return "source-full"
        if len(self.flows) >= QUIC_MAX_FLOWS:
            self._evict(now)
            if len(self.flows) >= QUIC_MAX_FLOWS:
                return "table-full"
        return None

    def _grow_room(self, flow: _Flow, size: int, now: float) -> str | None:
        if self.sources[flow.source].held + size > SOURCE_MAX_BYTES:
            return "source-full"
        if self.held + size > HELD_MAX_BYTES:
            self._evict(now, keep=flow)
            if self.held + size > HELD_MAX_BYTES:
                return "bytes-full"
        return None

    def _evict(self, now: float, source: bytes | None = None, keep: _Flow | None = None) -> None:
        """Drop flows gone idle (all sources', or one source's), oldest activity first, looking at
        no more than _EVICT_SCAN of them. A flow with a ClientHello unfinished or in doubt is
        remembered as abandoned: its later datagrams are decided in doubt."""
        flows = self.flows
        for key in list(itertools.islice(flows, _EVICT_SCAN)):
            flow = flows[key]
            if (source is not None and flow.source != source) or flow is keep:
                continue
            if flow.evictable_after > now and flow.expires > now:
                continue
            self._drop(key, flow)
            if flow.expires > now and any(not c.done or c.doubt for c in flow.conns):
                self._remember(key, "evicted", _names(flow))

    def _account(self, flow: _Flow, size: int, flows: int) -> None:
        src = self.sources.get(flow.source)
        if src is None:
            src = self.sources[flow.source] = _Source()
        src.flows += flows
        src.held += size
        flow.held += size
        self.held += size

    def _drop(self, key: tuple, flow: _Flow) -> None:
        if self.flows.get(key) is flow:
            del self.flows[key]
        src = self.sources[flow.source]
        src.flows -= 1
        src.held -= flow.held
        self.held -= flow.held
        flow.held = 0
        if not src.flows:
            del self.sources[flow.source]


def _names(flow: _Flow) -> tuple:
    """The names decided on a flow's connections (or seen in one unfinished in doubt), in order,
    each once."""
    return tuple(dict.fromkeys(itertools.chain.from_iterable(c.names if c.done else c.seen for c in flow.conns)))


def _source(pkt: Packet) -> bytes:
    """A source for the bounds: its IPv4 address, or its IPv6 /64 (as join.py)."""
    src = pkt.src_bytes
    return src if len(src) == 4 else src[:8]
