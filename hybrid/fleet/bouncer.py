"""The bouncer: CrowdSec's decision stream into the kernel's ban table.

One :meth:`Bouncer.pull` is one request of the Local API's stream protocol. The first after a
start, and the first after any failure, asks for a snapshot (``startup=true``: every active
decision); the others get what changed since the previous pull (new and deleted decisions).
Each pull ends with the kernel holding exactly what the decisions say (BanTable.diff against
what was last written; against the pinned map itself after a snapshot, so that a restart, a
crash or a change made behind the bouncer's back is reconciled, never duplicated).

What a failure does (the Local API down, a revoked key, an answer that is not the protocol):
nothing in the kernel changes. The bans there keep dropping until their own expiry, which the
kernel checks per packet; the bouncer drops expired decisions from its table and the map on
every tick; and the next successful pull is a fresh snapshot. A half-read answer is never
applied (the client parses the whole answer before returning it).

Every decision is accounted for (hybrid/fleet/policy.py): applied (a gauge by origin and scope),
filtered (type, scope or origin not enforced) or refused (invalid, too broad, protected), and the
first few of each kind per pull are logged with the decision's value and id.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from hybrid.fleet.bantable import BanTable
from hybrid.fleet.policy import APPLY, Policy

log = logging.getLogger(__name__)

LOG_PER_PULL = 5          # decisions of each refused/filtered kind named in the log per pull
# Scopes asked for only to be counted as not enforced (the LAPI serves a scope only when asked):
# CrowdSec's own scopes that the kernel cannot match on an address.
COUNTED_SCOPES = ("Country", "AS")
RESYNC_EVERY = 300.0
SETTLE_S = 3.0             # seconds without new decisions before a burst's snapshot (Bouncer._settled)       # seconds between two snapshots while the link is healthy
SAME_EXPIRY_NS = 1_000_000_000   # a snapshot does not rewrite an entry whose expiry moved by less


def _key(d) -> tuple:
    """A decision's identity in the stream: the LAPI serves one entry per value and type (the
    longest decision), and its deletes name the value and type again, under the id of the
    decision that ended."""
    return (d.type, d.packed, d.prefixlen)


class Bouncer:
    """Pulls ``client`` (hybrid.fleet.lapi.LapiClient) into ``maps`` (hybrid.datapath.maps.Maps),
    through ``policy``. ``clock``: CLOCK_MONOTONIC nanoseconds, the kernel's bpf_ktime_get_ns.

    Deltas repeat themselves (a delete is served again for a few pulls after it happened; a new
    decision can be served twice), so both are idempotent: a new entry replaces what was held
    for its value and type, and a delete ends what is held only when it names the very decision
    held (a repeated delete of an earlier decision must not end a ban given since, and the end
    of a shorter decision must not end the longer one held). A delta can thus leave a ban in
    place longer than the LAPI means (it shows only the longest decision of a value and type,
    and says nothing when that one is deleted while a shorter one lasts), never shorter; a
    snapshot every ``resync_every`` seconds puts that right, and one after each burst of new
    decisions catches those the deltas miss (:meth:`_settled`)."""

    def __init__(self, client, maps, policy: Policy, *, clock: Callable[[], int] = time.monotonic_ns,
                 resync_every: float = RESYNC_EVERY):
        self.client, self.maps, self.policy, self.clock = client, maps, policy, clock
        self.resync_every = resync_every
        self.table = BanTable()
        self.held: dict[tuple, tuple[int, str, str]] = {}  # _key -> (decision id, origin, scope)
        self.applied: Counter = Counter()               # (origin, scope) -> decisions in the kernel
        self.synced = False                              # a snapshot has been applied since the last failure
        self._snapshot_at = 0.0
        self._activity_at = 0.0                          # the last delta that carried new decisions
        self.counts: Counter = Counter()                 # pulls, snapshots, added, removed, expired, kernel_writes
        self.filtered: Counter = Counter()               # unsupported_type|unsupported_scope|origin -> decisions
        self.refused: Counter = Counter()                # invalid|too_broad|protected -> decisions
        self.unsupported: Counter = Counter()            # "type:captcha", "scope:country" -> decisions
        self.last_snapshot: dict | None = None          # {"decisions", "seconds", "at"}

    # -- the stream ------------------------------------------------------------------------------
    def pull(self) -> dict:
        """One pull; returns what it changed. Raises the client's LapiError (nothing changed)."""
        t0 = time.monotonic()
        startup = not self.synced or t0 - self._snapshot_at > self.resync_every or self._settled(t0)
        stream = self.client.stream(startup=startup, scopes=(*sorted(self.policy.scopes), *COUNTED_SCOPES),
                                    origins=tuple(sorted(self.policy.origins)) or None)
        t_fetched = time.monotonic()
        now = self.clock()
        logged: Counter = Counter()
        if startup:                                      # a snapshot replaces everything we knew
            self.table = BanTable()
            self.held.clear()
            self.applied.clear()
        removed = 0
        if not startup:                                  # a snapshot's deletes are history
            for d in stream.deleted:
                removed += self._end(d)
        added = 0
        for d in stream.new:
            added += self._take(d, now, logged)
        for bad in stream.bad:
            self._not_enforced("invalid", logged, f"decision {bad.reason}", {"id": bad.id, "where": bad.where})
        expired = self._expire(now)
        t_applied = time.monotonic()
        written = self._sync(snapshot=startup) if startup or added or removed or expired else 0
        self.synced = True
        self.counts["pulls"] += 1
        self.counts["added"] += added
        self.counts["removed"] += removed
        if not startup and stream.new:
            self._activity_at = t0
        if startup:
            self._snapshot_at = t0
            self.counts["snapshots"] += 1
            self.last_snapshot = {"decisions": len(stream.new), "seconds": round(time.monotonic() - t0, 3),
                                  "bytes": stream.size, "at": time.time()}
        t_end = time.monotonic()
        return {"startup": startup, "new": len(stream.new), "deleted": len(stream.deleted), "added": added,
                "removed": removed, "expired": expired, "written": written, "bad": len(stream.bad),
                "bytes": stream.size, "fetch_s": round(t_fetched - t0, 3), "table_s": round(t_applied - t_fetched, 3),
                "kernel_s": round(t_end - t_applied, 3)}

    def _settled(self, now: float) -> bool:
        """A snapshot is due after a burst of new decisions has settled. The LAPI (1.4.6) serves as
        new the decisions *created* since the bouncer's last pull; one stored by a transaction
        that was still open during that pull (``cscli decisions import``, an alert with many
        decisions) is created before the pull and committed after it, and no delta ever serves
        it (measured: 5,500 of a 10,000-decision import). So a burst is followed by a snapshot
        once SETTLE_S has passed without new decisions, at most every max(10 s, 1 s per 1,000
        decisions held) (a snapshot costs the LAPI ~8 s for 100,000)."""
        return (self._activity_at > self._snapshot_at and now - self._activity_at >= SETTLE_S
                and now - self._snapshot_at >= max(10.0, len(self.table) / 1000))

    def failed(self) -> None:
        """The link failed: the kernel keeps its bans; the next pull is a snapshot."""
        self.synced = False

    def tick(self) -> int:
        """Between pulls (and while the Local API is unreachable): expired decisions leave the table
        and the map. Returns how many expired."""
        n = self._expire(self.clock())
        if n:
            self._sync(snapshot=False)
        return n

    # -- one decision ------------------------------------------------------------------------------
    def _take(self, d, now: int, logged: Counter) -> int:
        verdict = self.policy.judge(d.scope, d.type, d.origin, d.network)
        if verdict != APPLY:
            if verdict in ("unsupported_type", "unsupported_scope"):
                what = "type" if verdict == "unsupported_type" else "scope"
                self.unsupported[f"{what}:{(d.type if what == 'type' else d.scope).lower()}"] += 1
            self._not_enforced(verdict, logged, f"crowdsec decision {d.id} ({d.type} {d.scope} {d.value}, "
                               f"origin {d.origin})", {"id": d.id, "value": d.value, "scope": d.scope,
                                                        "type": d.type, "origin": d.origin})
            return 0
        if d.duration_s <= 0:
            self.counts["arrived_expired"] += 1
            return 0
        key = _key(d)
        old = self.held.get(key)
        if old is not None:
            self._uncount(old)
        self.table.add(key, d.network, now + int(d.duration_s * 1e9))   # replaces the key's entry
        self.held[key] = entry = (d.id, d.origin, d.scope.lower())
        self.applied[entry[1:]] += 1
        return 1

    def _end(self, d) -> int:
        key = _key(d)
        held = self.held.get(key)
        if held is None or d.id != held[0]:          # never held, or not the decision held
            return 0
        self.table.remove(key)
        self._uncount(self.held.pop(key))
        return 1

    def _uncount(self, held: tuple[int, str, str]) -> None:
        k = held[1:]
        self.applied[k] -= 1
        if not self.applied[k]:
            del self.applied[k]

    def _not_enforced(self, verdict: str, logged: Counter, what: str, fields: dict) -> None:
        if verdict in ("unsupported_type", "unsupported_scope", "origin"):
            self.filtered[verdict] += 1
            level = logging.INFO
        else:
            self.refused[verdict] += 1
            level = logging.WARNING
        logged[verdict] += 1
        if logged[verdict] <= LOG_PER_PULL:
            log.log(level, "%s not enforced: %s", what, _WHY[verdict],
                    extra={"event": "crowdsec_not_enforced", "fields": {**fields, "why": verdict}})

    def _expire(self, now: int) -> int:
        keys = self.table.expire(now)
        for k in keys:
            held = self.held.pop(k, None)
            if held is not None:
                self._uncount(held)
        self.counts["expired"] += len(keys)
        return len(keys)

    def _sync(self, snapshot: bool) -> int:
        """Write what the kernel lacks or holds in excess; returns the entries written. After a
        snapshot, against the pinned map itself (entries whose expiry moved by less than a
        second are left alone: each snapshot reads every remaining duration afresh)."""
        if snapshot:
            current = self.maps.bans()
            upserts, deletes = self.table.diff(current)
            upserts = {c: e for c, e in upserts.items()
                       if c not in current or abs(current[c] - e) >= SAME_EXPIRY_NS or not (current[c] and e)}
        else:
            upserts, deletes = self.table.take_changes()
        if upserts or deletes:
            self.maps.write_bans(upserts, deletes)
        self.counts["kernel_writes"] += len(upserts) + len(deletes)
        return len(upserts) + len(deletes)

    # -- reporting ------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"synced": self.synced, "decisions": len(self.table), "kernel_entries": self.table.counts()["entries"],
                "applied": {f"{o}/{s}": n for (o, s), n in sorted(self.applied.items())},
                "filtered": dict(self.filtered), "refused": dict(self.refused),
                "unsupported": dict(self.unsupported), "counts": dict(self.counts),
                "last_snapshot": self.last_snapshot}


_WHY = {
    "unsupported_type": "its type is not in [crowdsec] types",
    "unsupported_scope": "its scope is not in [crowdsec] scopes (hybrid enforces ip and range)",
    "origin": "its origin is not in [crowdsec] origins",
    "invalid": "its value is not an address or prefix",
    "too_broad": "the prefix is shorter than [crowdsec] min_prefix_v4/min_prefix_v6 (or covers all of IPv4)",
    "protected": "it covers or touches a protected prefix (this gateway's addresses, loopback, link-local, "
                 "the Local API, never_block)",
}
