"""Following a flow's messages after its first decision: every HTTP/1.x request head on a kept-alive
or pipelined connection, every DNS message on a TCP connection (issue 14, "no blind spot after a
bypass").

A flow is decided on its first payload and then bypassed in the kernel; without more, whatever it
carries later is never seen: a second request on the same connection, to a blocked Host, would
be served. So after deciding a request head the engine works out where the next one starts,
reading the stream as the server does (Content-Length, chunked transfer coding, pipelining), and
writes that sequence number into the flow entry (struct hybrid_flow, follow_seq and follow): tc
then queues the packet that reaches it and keeps the bytes before it (a body, a download) in the
kernel. UDP needs no walk: each DNS datagram is a message, and tc queues every one of a followed
direction.

:func:`walk_http` and :func:`walk_dns` read the bytes from a boundary on and say which messages
they hold whole (to decide), where the next boundary is and what starts there (the kernel keeps
it as a mode, so an engine that restarts can go on), the bytes it must keep because a message
is cut at the packet's end (the "carry"), or why it cannot be sure (a doubt: the engine never
bypasses then), or that the stream is no longer this protocol (stop following).

**As the server reads it** (nginx 1.22 is the oracle in tests/integration/test_follow_gateway.py):
anything nginx reads one way and another implementation may read another way is a doubt, never
a guess: both Content-Length and Transfer-Encoding, several Content-Length lines, a
Transfer-Encoding other than ``chunked``, a length that is not plain digits, folded header lines,
a chunk-size line with anything but hex digits and an extension, chunk data not followed by CRLF.
Bytes at a boundary that cannot start a request (nginx answers 400 and closes) end the following:
the stream is not HTTP (a tunnel after CONNECT or an Upgrade, or garbage the server refuses).

:class:`Streams` keeps, per followed direction, what the kernel's entry cannot: the carry and the
length left of a body longer than the kernel's window (:data:`AHEAD_MAX`), bounded in entries
and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid.engine.packet import _METHOD_CHARS, HttpRequest, _read_http
from hybrid.kernel import abi

__all__ = ["AHEAD_MAX", "BODY", "CARRY_MAX", "CHUNK", "CHUNK_END", "MESSAGE", "Streams", "Walk",
           "walk_dns", "walk_http"]

MESSAGE = abi.FOLLOW_M_MESSAGE      # a request head (or a DNS message) starts at the boundary
CHUNK = abi.FOLLOW_M_CHUNK          # a chunk-size line starts there
BODY = abi.FOLLOW_M_BODY            # a point inside a long body (Streams knows what is left)
CHUNK_END = 3                       # the CRLF after a chunk's data, then a chunk-size line

# The furthest ahead of the bytes decided a boundary is written: tc compares sequence numbers
# signed (32 bits), so a boundary must stay well within 2 GiB of the stream's bytes. A longer
# body gets a checkpoint every AHEAD_MAX bytes (one queued packet per GiB).
AHEAD_MAX = 1 << 30
HEAD_MAX = 32768                    # a request head's bytes at most (nginx: 4 x 8k buffers -> 400)
CHUNK_LINE_MAX = 4096               # a chunk-size line with its extensions
TRAILER_MAX = 8192                  # the trailer section after the last chunk
DNS_MESSAGE_MAX = 2 + 65535
CARRY_MAX = DNS_MESSAGE_MAX         # bytes kept for one direction (a cut head, line or message)
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX = frozenset(b"0123456789abcdefABCDEF")


@dataclass(slots=True)
class Walk:
    """What the bytes from a boundary hold (offsets from the boundary)."""
    messages: list = field(default_factory=list)   # (start, end, HttpRequest | None) of whole messages
    next: int = 0            # where the next boundary is (may lie beyond the bytes: a body goes on)
    mode: int = MESSAGE      # what starts there
    carry: bool = False      # a message starts at next but is cut at the bytes' end: keep them
    doubt: str | None = None
    stop: bool = False       # not this protocol at a message boundary: stop following


def walk_http(data: bytes, mode: int = MESSAGE, left: int = 0, after: int = MESSAGE) -> Walk:
    """Read ``data``, which starts at a boundary in ``mode`` (with ``left``/``after`` for BODY),
    as nginx reads a client's request stream. Never raises; cost linear in the bytes."""
    w = Walk()
    pos, n = 0, len(data)
    while True:
        if mode == BODY:
            if pos + left > n:
                w.next, w.mode = pos + left, after
                return w
            pos += left
            mode, left = after, 0
            continue
        if pos >= n:
            w.next, w.mode = pos, mode
            return w
        if mode == MESSAGE:
            r = _head(data, pos)
            if r.__class__ is str:
                if r == "more":
                    return _cut(w, pos, mode)
                if r == "stop":
                    w.stop, w.next = True, pos
                    return w
                w.doubt, w.next = r, pos
                return w
            start, end, req, body, length = r
            w.messages.append((start, end, req))
            pos = end
            if body == "length":
                mode, left, after = BODY, length, MESSAGE
            elif body == "chunked":
                mode = CHUNK
            elif req.method == "CONNECT" or body == "close":
                w.next, w.stop = pos, True      # a tunnel, or HTTP/0.9: the rest is not requests
                return w
            continue
        if mode == CHUNK_END:
            if n - pos < 2:
                if data[pos:] not in (b"", b"\r"):
                    w.doubt, w.next = "http:chunk-end", pos
                    return w
                return _cut(w, pos, mode)
            if data[pos:pos + 2] != b"\r\n":
                w.doubt, w.next = "http:chunk-end", pos
                return w
            pos += 2
            mode = CHUNK
            continue
        # CHUNK: a chunk-size line; the last chunk (size 0) and its trailer section
        eol = data.find(b"\r\n", pos, pos + CHUNK_LINE_MAX)
        if eol < 0:
            if n - pos >= CHUNK_LINE_MAX or b"\n" in data[pos:pos + CHUNK_LINE_MAX]:
                w.doubt, w.next = "http:chunk-line", pos
                return w
            return _cut(w, pos, mode)
        size = _chunk_size(data[pos:eol])
        if size is None:
            w.doubt, w.next = "http:chunk-line", pos
            return w
        if size:
            pos = eol + 2
            mode, left, after = BODY, size, CHUNK_END
            continue
        end = _trailer_end(data, eol)       # eol: the last chunk's CRLF, which may start "\r\n\r\n"
        if end is None:
            if n - eol > TRAILER_MAX:
                w.doubt, w.next = "http:trailer", pos
                return w
            return _cut(w, pos, mode)
        if end < 0:
            w.doubt, w.next = "http:trailer", pos
            return w
        pos, mode = end, MESSAGE


def _cut(w: Walk, pos: int, mode: int) -> Walk:
    w.next, w.mode, w.carry = pos, mode, True
    return w


def _head(data: bytes, pos: int):
    """The request head at data[pos:]: (start, end, request, body, length), with body "none",
    "length", "chunked" or "close"; or "more" (cut), "stop" (not a request) or a doubt."""
    n = len(data)
    start = pos
    while start < n and data[start] in b"\r\n":      # nginx skips empty lines before a request
        start += 1
    if start >= n:
        return "more" if n - pos < HEAD_MAX else "http:empty-lines"
    if data[start] not in _METHOD_CHARS:
        return "stop"
    hend = -1
    for blank in (b"\n\r\n", b"\n\n"):
        i = data.find(blank, start, start + HEAD_MAX)
        if i >= 0 and (hend < 0 or i + len(blank) < hend):
            hend = i + len(blank)
    if hend < 0:
        if n - start >= HEAD_MAX:
            return "http:head-too-long"
        eol = data.find(b"\n", start)
        if eol < 0:
            token = data[start:start + 17].split(b" ", 1)[0]
            if token.translate(None, _METHOD_CHARS) or len(token) > 16:
                return "stop"                        # not a method being typed: nginx's 400
            return "more"
        if len(data[start:eol].rstrip(b"\r").split(b" ")) == 2:
            return _one_line(data, start, eol)       # HTTP/0.9: no headers follow
        return "more"                                # header lines still coming
    head = data[start:hend]
    req = _read_http(head)
    if req.__class__ is not HttpRequest:
        return "http:" + req
    if req.doubt is not None:
        return "http:" + req.doubt
    body = _framing(head)
    if body.__class__ is str and body.startswith("http:"):
        return body
    kind, length = body
    return start, hend, req, kind, length


def _one_line(data: bytes, start: int, eol: int):
    """A request line with no headers after it: HTTP/0.9 ("GET /path"), which nginx serves and
    then closes; anything else on one line is not a request (400)."""
    req = _read_http(data[start:eol + 1])
    if req.__class__ is HttpRequest and req.doubt is None:
        return start, eol + 1, req, "close", 0
    return "stop"


def _framing(head: bytes):
    """("none" | "length" | "chunked", length) of a request head, or a doubt: where its body ends,
    as nginx 1.22 reads it, only when every reading agrees."""
    lines = head.split(b"\n")
    version = lines[0].rstrip(b"\r").rsplit(b" ", 1)[-1]
    lengths, codings = [], []
    for raw in lines[1:]:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            return "http:folded-header"
        name, colon, value = line.partition(b":")
        if not colon:
            return "http:header-without-colon"
        lname = name.lower()
        if lname in (b"content-length", b"transfer-encoding"):
            value = value.strip(b" \t")
            (lengths if lname == b"content-length" else codings).append(value)
        elif any(c not in _TOKEN for c in name) and (b"content" in lname or b"transfer" in lname):
            return "http:odd-framing-header"      # "Content-Length : 5", "Transfer-Encoding\t:"
    if codings:
        if lengths or len(codings) > 1 or codings[0].lower() != b"chunked" or version != b"HTTP/1.1":
            return "http:ambiguous-framing"
        return ("chunked", 0)
    if lengths:
        value = lengths[0]
        if len(lengths) > 1 or not value.isdigit() or not value.isascii() or len(value) > 18:
            return "http:bad-content-length"
        n = int(value)
        return ("length", n) if n else ("none", 0)
    return ("none", 0)


def _chunk_size(line: bytes) -> int | None:
    """The size of a chunk-size line (without CRLF): hex digits, then nothing or ";" and an
    extension without CR, LF or NUL; None otherwise."""
    size, semi, ext = line.partition(b";")
    if not size or len(size) > 15 or any(c not in _HEX for c in size):
        return None
    if semi and any(c in b"\r\n\0" for c in ext):
        return None
    return int(size, 16)


def _trailer_end(data: bytes, eol: int) -> int | None:
    """After the last chunk's line (its CRLF at ``eol``): the offset after the trailer section's
    empty line, None when it is cut, -1 when a trailer line is not a plain header line."""
    pos = eol + 2
    while True:
        nxt = data.find(b"\r\n", pos, pos + TRAILER_MAX)
        if nxt < 0:
            return None if b"\n" not in data[pos:pos + TRAILER_MAX] else -1
        if nxt == pos:
            return pos + 2
        name, colon, _ = data[pos:nxt].partition(b":")
        if not colon or not name or any(c not in _TOKEN for c in name):
            return -1
        pos = nxt + 2


def walk_dns(data: bytes) -> Walk:
    """DNS over TCP from a message boundary: each message is a 2-byte length and that many bytes
    (RFC 1035 4.2.2); a message of fewer than 12 bytes is not one (a doubt)."""
    w = Walk()
    pos, n = 0, len(data)
    while True:
        if n - pos < 2:
            return _cut(w, pos, MESSAGE) if n > pos else _at(w, pos)
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 12:
            w.doubt, w.next = "dns:short-message", pos
            return w
        if n - pos < 2 + length:
            return _cut(w, pos, MESSAGE)
        w.messages.append((pos, pos + 2 + length, None))
        pos += 2 + length


def _at(w: Walk, pos: int) -> Walk:
    w.next, w.mode = pos, MESSAGE
    return w


@dataclass(slots=True)
class _Stream:
    seq: int                 # the boundary the state belongs to (the kernel's follow_seq)
    carry: bytes = b""       # bytes from seq on, of a message cut at a packet's end
    left: int = 0            # BODY: body bytes left after seq
    after: int = MESSAGE     # BODY: what starts once they are read


class Streams:
    """Per followed direction (flow key, direction): what the kernel's entry cannot hold, bounded.
    The oldest state goes first when full; a state lost is noticed (the kernel's mode says a
    carry or a body length was needed) and decided in doubt, never guessed."""

    MAX_ENTRIES = 65536
    MAX_BYTES = 64 << 20

    def __init__(self):
        self._s: dict[tuple, _Stream] = {}
        self.bytes = 0
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._s)

    def get(self, key: tuple, seq: int) -> _Stream | None:
        s = self._s.get(key)
        return s if s is not None and s.seq == seq else None

    def put(self, key: tuple, seq: int, carry: bytes = b"", left: int = 0, after: int = MESSAGE) -> None:
        self.drop(key)
        if not carry and not left:
            return
        while self._s and (len(self._s) >= self.MAX_ENTRIES or self.bytes + len(carry) > self.MAX_BYTES):
            old = next(iter(self._s))
            self.drop(old)
            self.forgotten += 1
        self._s[key] = _Stream(seq & 0xFFFFFFFF, carry, left, after)
        self.bytes += len(carry)

    def drop(self, key: tuple) -> None:
        s = self._s.pop(key, None)
        if s is not None:
            self.bytes -= len(s.carry)
