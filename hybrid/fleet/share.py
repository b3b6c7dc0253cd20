"""Sharing blocks with the fleet: a rule with ``share = {...}`` reports the address it blocked to
the CrowdSec Local API as an alert carrying a ban decision, so that every gateway's bouncer
(hybrid's, or CrowdSec's own) drops it.

Two halves, one datagram socket between them (a socketpair the supervisor makes; engines inherit
one end):

- :class:`ShareSender`, in each engine: after a block by a sharing rule, one small JSON datagram,
  never blocking (a full socket counts ``dropped``: the packet path never waits for the network).
  The engine remembers what it sent for the ban's duration, so a flood from one source is one
  datagram, not one per packet.
- :class:`SharePusher`, in the supervisor's CrowdSec link (hybrid/fleet/link.py): the same
  address is pushed once while its ban lasts (``deduplicated``), never an address the bouncer's
  policy protects (``protected``: this gateway's own, loopback, never_block), at most
  ``per_minute`` a minute (``rate_limited``: counted, not queued without end); alerts wait in a
  bounded queue while the Local API is unreachable and go with the next successful push, with
  what is left of their duration.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

from hybrid.fleet.policy import Policy

log = logging.getLogger(__name__)

MAX_DATAGRAM = 1024
SENDER_MEMORY = 4096        # addresses an engine remembers having sent
PENDING_MAX = 1000          # alerts waiting for an unreachable Local API
BATCH_MAX = 100             # alerts per POST


@dataclass(frozen=True)
class ShareRequest:
    """One block to share: ban ``value`` (one address) for ``duration_s`` seconds."""

    value: str
    duration_s: int
    reason: str
    rule: str
    at: float               # CLOCK_MONOTONIC seconds of the block

    def to_bytes(self) -> bytes:
        return json.dumps({"value": self.value, "duration_s": self.duration_s, "reason": self.reason,
                           "rule": self.rule}).encode()

    @classmethod
    def from_bytes(cls, data: bytes, now: float) -> ShareRequest:
        """ValueError for anything but what :meth:`to_bytes` writes (the engines parse what the
        network sends: a datagram from one is checked, not trusted)."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or set(doc) != {"value", "duration_s", "reason", "rule"}:
            raise ValueError("not a share request")
        value, duration, reason, rule = doc["value"], doc["duration_s"], doc["reason"], doc["rule"]
        ip = ipaddress.ip_address(value)
        if (not isinstance(duration, int) or isinstance(duration, bool) or not 0 < duration <= 10 * 365 * 86400
                or not isinstance(reason, str) or not isinstance(rule, str) or len(reason) > 256 or len(rule) > 64):
            raise ValueError("bad share request fields")
        return cls(str(ip), duration, reason, rule, now)


class ShareSender:
    """An engine's end: :meth:`offer` after each block by a sharing rule."""

    def __init__(self, sock: socket.socket | None):
        self.sock = sock
        if sock is not None:
            sock.setblocking(False)
        self._until: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.sent = self.repeated = self.dropped = self.unsent = 0

    @classmethod
    def from_fd(cls, fd: int | None) -> ShareSender:
        return cls(socket.socket(fileno=fd) if fd is not None else None)

    def offer(self, address: str, rule: str, duration_s: int, reason: str) -> None:
        now = time.monotonic()
        until = self._until.get(address)
        if until is not None and until > now:
            self.repeated += 1
            return
        if self.sock is None:
            self.unsent += 1
            if self.unsent == 1:
                log.warning("rule %s shares its blocks, but this engine has no CrowdSec link (hybridctl run "
                            "with [crowdsec] machine_id): not shared", rule)
            return
        try:
            self.sock.send(ShareRequest(address, duration_s, reason, rule, now).to_bytes())
        except (BlockingIOError, OSError):
            self.dropped += 1
            return
        self.sent += 1
        self._until[address] = now + duration_s
        self._until.move_to_end(address)
        while len(self._until) > SENDER_MEMORY:
            self._until.popitem(last=False)

    def snapshot(self) -> dict:
        return {"sent": self.sent, "repeated": self.repeated, "dropped": self.dropped, "unsent": self.unsent}


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(the link's end, the engines' end): datagrams, close-on-exec on the link's end only."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    os.set_inheritable(b.fileno(), True)
    return a, b


class SharePusher:
    """The link's end: what arrives from the engines, deduplicated, checked, rate-limited, then
    pushed by ``push`` (a callable taking a list of ShareRequest and a "now"; the Local API
    client's push, which raises its LapiError)."""

    def __init__(self, policy: Policy, per_minute: int, *, clock=time.monotonic):
        self.policy, self.clock = policy, clock
        self.rate = per_minute / 60.0
        self.burst = float(max(1, min(per_minute, 60)))
        self._tokens = self.burst
        self._stamp = clock()
        self._until: dict[str, float] = {}           # address -> when our pushed ban ends
        self.pending: collections.deque[ShareRequest] = collections.deque()
        self.counts: collections.Counter = collections.Counter()

    def receive(self, data: bytes) -> None:
        now = self.clock()
        try:
            req = ShareRequest.from_bytes(data, now)
        except (ValueError, TypeError, UnicodeDecodeError):
            self.counts["malformed"] += 1
            return
        self.counts["received"] += 1
        until = self._until.get(req.value)
        if until is not None and until > now:
            self.counts["deduplicated"] += 1
            return
        net = ipaddress.ip_network(req.value)
        if self.policy.refusal(net) is not None:
            self.counts["protected"] += 1
            if self.counts["protected"] <= 10:
                log.warning("rule %s blocked %s, which the CrowdSec policy protects: not shared", req.rule,
                            req.value, extra={"event": "crowdsec_share_refused",
                                              "fields": {"rule": req.rule, "value": req.value}})
            return
        self._refill(now)
        if self._tokens < 1:
            self.counts["rate_limited"] += 1
            return
        self._tokens -= 1
        if len(self.pending) >= PENDING_MAX:
            self.pending.popleft()
            self.counts["lost_while_down"] += 1
        self.pending.append(req)
        self._until[req.value] = now + req.duration_s
        if len(self._until) > 4 * PENDING_MAX:
            self._until = {a: u for a, u in self._until.items() if u > now}

    def flush(self, push) -> int:
        """Push what waits (in batches); returns how many were pushed. On the client's error the
        batch stays pending (the caller logs and backs off) and the error propagates."""
        pushed = 0
        while self.pending:
            now = self.clock()
            batch = []
            while self.pending and len(batch) < BATCH_MAX:
                req = self.pending[0]
                left = int(req.duration_s - (now - req.at))
                if left <= 0:
                    self.pending.popleft()
                    self.counts["expired_unsent"] += 1
                    continue
                batch.append((req, left))
                self.pending.popleft()
            if not batch:
                break
            try:
                push(batch)
            except Exception:
                self.pending.extendleft(req for req, _ in reversed(batch))
                raise
            pushed += len(batch)
            self.counts["pushed"] += len(batch)
        return pushed

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def snapshot(self) -> dict:
        return {**{k: self.counts.get(k, 0) for k in ("received", "pushed", "deduplicated", "rate_limited",
                                                       "protected", "malformed", "lost_while_down",
                                                       "expired_unsent")},
                "pending": len(self.pending)}
