"""The fleet's ban decisions, and what the kernel's ban trie must hold for them.

Pure (no kernel): the bouncer feeds it decisions and writes what it says through
``Maps.write_bans`` (hybrid/datapath/maps.py) into ``hybrid_bans`` (bpf/hybrid_common.h, "Bans").

Why a table and not one map entry per decision: the trie answers with the LONGEST matching
prefix only. A /32 banned until t1 inside a /24 banned until t2 > t1 would, written as is, stop
dropping the /32 at t1 while the /24 still bans it: a hole. So the kernel entry of a network N
carries N's *effective* expiry, the latest expiry of every decision on N or on any network
covering N, and a lookup that lands on N is right whichever ban it stands for. Several decisions
may name one network (different origins, scenarios, a re-ban); the network stays until the last
of them goes.

    table = BanTable()
    table.add(1, ipaddress.ip_network("198.18.5.0/24"), expires_ns)   # CLOCK_MONOTONIC, 0 = never
    table.add(2, ipaddress.ip_network("198.18.5.7/32"), sooner_ns)
    maps.write_bans(*table.diff(maps.bans()))      # at start: reconcile with the pinned trie
    ...
    table.remove(1); table.expire(time.monotonic_ns())
    maps.write_bans(*table.take_changes())         # then: only what changed

Addresses live in the kernel's one 128-bit space (IPv4 as ::ffff:a.b.c.d, so 198.18.0.0/15 is
the same entry as ::ffff:198.18.0.0/111, and ::/0 covers every IPv4 address too), and CIDRs come
out as ``format_prefix`` writes them, so :meth:`diff` compares with ``Maps.bans()`` as is.

Cost: decisions are kept per network, networks in one list sorted by (start, length), in which
every network's covering networks come before it and the networks it covers follow it as one
run. A change to network N recomputes N and that run only (the nearest covering network is
found among the prefix lengths in use), so a 10,000-decision delta on a 100,000-decision table
costs the networks it touches, not the table; a 100,000-decision snapshot is one sort and one
sweep (tests/unit/test_bantable.py prints the figures). A network is one integer, start << 8 |
length: it sorts as (start, length) does and hashes faster than a tuple (every dictionary
operation of a snapshot hashes one).
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import socket
from collections import Counter
from collections.abc import Hashable

from hybrid.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED = 0xFFFF << 32          # ::ffff:0:0, where IPv4 lives in the 128-bit space
_NEVER = 1 << 64                # the rank of "never expires": later than any u64 expiry
_REBUILD = 64                   # more network additions/removals than this: re-sort, don't insert


def _key(network: Network) -> int:
    """A network as one integer: its first address in the 128-bit space (IPv4 mapped) << 8 | its
    length there."""
    if network.version == 4:
        return (_MAPPED | int(network.network_address)) << 8 | (96 + network.prefixlen)
    return int(network.network_address) << 8 | network.prefixlen


def _key_of_cidr(cidr: str) -> int | None:
    """:func:`_key` of a plain CIDR or address string ("a.b.c.d/n", "x:y::/n", host bits
    cleared) without building an ipaddress object (five times faster: a snapshot's 100,000
    decisions come as strings); None for anything else, which ipaddress then reads or refuses."""
    addr, slash, length = cidr.partition("/")
    if slash and not (length.isascii() and length.isdigit() and len(length) <= 3):
        return None
    try:
        if ":" in addr:
            start, width, base = int.from_bytes(socket.inet_pton(socket.AF_INET6, addr), "big"), 128, 0
        else:
            start, width, base = int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big"), 32, 96
    except OSError:
        return None
    plen = int(length) if slash else width
    if plen > width:
        return None
    start = start >> (width - plen) << (width - plen)
    return (_MAPPED | start if base else start) << 8 | (base + plen)


def _end(key: int) -> int:
    """The last address of a key's network."""
    return key >> 8 | ((1 << (128 - (key & 255))) - 1)


def _is_v4(key: int) -> bool:
    return key & 255 >= 96 and key >> 40 == 0xFFFF


def format_key(key: int) -> str:
    """The CIDR of a key, as hybrid.datapath.maps.format_prefix writes the kernel's (IPv4-mapped
    prefixes of length 96 or more as IPv4)."""
    start, length = key >> 8, key & 255
    if length >= 96 and start >> 32 == 0xFFFF:
        return f"{start >> 24 & 255}.{start >> 16 & 255}.{start >> 8 & 255}.{start & 255}/{length - 96}"
    return f"{ipaddress.IPv6Address(start)}/{length}"


def _out(rank: int) -> int:
    """A rank back to the kernel's expiry (0 = never)."""
    return 0 if rank == _NEVER else rank


class BanTable:
    """Ban decisions: id -> (network, expiry), and the kernel entries they need.

    Expiries are CLOCK_MONOTONIC nanoseconds (``time.monotonic_ns()``, the clock of
    bpf_ktime_get_ns()); 0 means never. A decision past its expiry stays until :meth:`expire`
    (or :meth:`remove`) drops it: the kernel stops dropping for it at its expiry anyway."""

    def __init__(self) -> None:
        self._decisions: dict[Hashable, tuple[int, int, int]] = {}   # id -> (key, rank, seq)
        self._on: dict[int, dict[Hashable, int]] = {}     # network -> {id: rank} of its decisions
        # The settled networks (the kernel's entries): network -> [own rank (the latest of its
        # own decisions), effective rank, CIDR], and the same networks sorted.
        self._nets: dict[int, list] = {}
        self._sorted: list[int] = []
        self._lengths: Counter[int] = Counter()   # prefix lengths of the settled networks
        self._dirty: set[int] = set()       # networks whose decisions changed since the last settle
        # networks whose kernel entry changed since take_changes -> whether the kernel had one then
        self._changed: dict[int, bool] = {}
        self._expiries: list[tuple[int, int, Hashable]] = []   # heap of (rank, seq, id), lazily pruned
        self._seq = 0
        self._v4 = 0                        # decisions on IPv4 (or IPv4-mapped) networks

    # -- decisions -----------------------------------------------------------------------------------
    def add(self, decision_id: Hashable, network: Network | str, expires_ns: int) -> None:
        """Add a decision (replacing one with the same id). ``network``: an IPv4Network or
        IPv6Network, or a CIDR string (host bits cleared); ``expires_ns``: CLOCK_MONOTONIC ns,
        0 = never."""
        if isinstance(network, str):
            key = _key_of_cidr(network)
            if key is None:
                try:
                    key = _key(ipaddress.ip_network(network.strip(), strict=False))
                except ValueError as exc:
                    raise ConfigError(f"ban decision {decision_id!r}: '{network}' is not an IPv4 or IPv6 CIDR") from exc
        elif isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            key = _key(network)
        else:
            raise ConfigError(f"ban decision {decision_id!r}: {network!r} is not an IPv4 or IPv6 network")
        if isinstance(expires_ns, bool) or not isinstance(expires_ns, int) or not 0 <= expires_ns < _NEVER:
            raise ConfigError(f"ban decision {decision_id!r}: expiry {expires_ns!r} is not an integer of "
                              "0 (never) to 2^64-1 nanoseconds")
        if decision_id in self._decisions:
            self.remove(decision_id)
        rank = expires_ns or _NEVER
        self._seq = seq = self._seq + 1
        self._decisions[decision_id] = (key, rank, seq)
        on = self._on.get(key)
        if on is None:
            self._on[key] = {decision_id: rank}
        else:
            on[decision_id] = rank
        self._dirty.add(key)
        if key & 255 >= 96 and key >> 40 == 0xFFFF:
            self._v4 += 1
        if rank != _NEVER:
            heapq.heappush(self._expiries, (rank, seq, decision_id))

    def remove(self, decision_id: Hashable) -> bool:
        """Drop a decision; False when there was none with that id."""
        entry = self._decisions.pop(decision_id, None)
        if entry is None:
            return False
        key = entry[0]
        on = self._on[key]
        del on[decision_id]
        if not on:
            del self._on[key]
        self._dirty.add(key)
        if _is_v4(key):
            self._v4 -= 1
        if len(self._expiries) > 2 * len(self._decisions) + 1024:     # mostly removed decisions
            self._expiries = [e for e in self._expiries if self._live_expiry(e)]
            heapq.heapify(self._expiries)
        return True

    def _live_expiry(self, entry: tuple[int, int, Hashable]) -> bool:
        current = self._decisions.get(entry[2])
        return current is not None and current[2] == entry[1]

    def expire(self, now_ns: int) -> list[Hashable]:
        """Drop the decisions whose expiry is ``now_ns`` or earlier; their ids."""
        gone = []
        heap = self._expiries
        while heap and heap[0][0] <= now_ns:
            entry = heapq.heappop(heap)
            if self._live_expiry(entry):
                self.remove(entry[2])
                gone.append(entry[2])
        return gone

    def __len__(self) -> int:
        return len(self._decisions)

    def __contains__(self, decision_id: Hashable) -> bool:
        return decision_id in self._decisions

    def counts(self) -> dict[str, int]:
        """Decisions by family (as the kernel files them: an IPv4-mapped IPv6 network is IPv4),
        and ``entries``: the kernel entries they need (distinct networks)."""
        return {"ipv4": self._v4, "ipv6": len(self._decisions) - self._v4, "entries": len(self._on)}

    # -- what the kernel holds -------------------------------------------------------------------------
    def kernel_view(self) -> dict[str, int]:
        """CIDR -> effective expiry (0 = never): exactly what the ban trie must hold."""
        self._settle()
        return {net[2]: _out(net[1]) for net in self._nets.values()}

    def diff(self, current: dict[str, int]) -> tuple[dict[str, int], list[str]]:
        """(upserts, deletes) that make a trie holding ``current`` (CIDR -> expiry, as
        ``Maps.bans()`` reads it) equal :meth:`kernel_view`: for reconciling with whatever the
        pinned trie holds (after a restart, or when in doubt). Counts as taken: a following
        :meth:`take_changes` returns only later changes."""
        self._settle()
        self._changed.clear()
        upserts = {}
        for _, rank, cidr in self._nets.values():
            e = _out(rank)
            if current.get(cidr) != e:
                upserts[cidr] = e
        wanted = {net[2] for net in self._nets.values()}
        return upserts, [c for c in current if c not in wanted]

    def take_changes(self) -> tuple[dict[str, int], list[str]]:
        """(upserts, deletes) of the kernel entries that changed since the last
        :meth:`take_changes` or :meth:`diff` (since the table was made, the first time): what
        to write after a delta, in time proportional to what changed."""
        self._settle()
        upserts, deletes = {}, []
        nets = self._nets
        for key, had in self._changed.items():
            net = nets.get(key)
            if net is not None:
                rank = net[1]
                upserts[net[2]] = 0 if rank == _NEVER else rank
            elif had:                        # not one that came and went since the last call
                deletes.append(format_key(key))
        self._changed.clear()
        return upserts, deletes

    # -- keeping the effective expiries ------------------------------------------------------------------
    def _settle(self) -> None:
        """Bring the settled networks (sorted, own and effective ranks) up to date with the
        decisions."""
        if not self._dirty:
            return
        roots, added, removed = [], [], []
        nets, ons = self._nets, self._on
        for key in self._dirty:
            on = ons.get(key)
            net = nets.get(key)
            if on is None:
                if net is not None:
                    removed.append(key)
                    roots.append(key)
                continue
            own = max(on.values()) if len(on) > 1 else next(iter(on.values()))
            if net is None:
                nets[key] = [own, None, format_key(key)]
                added.append(key)
            elif net[0] == own:
                continue                     # a decision replaced by one no later: nothing moves
            else:
                net[0] = own
            roots.append(key)
        self._dirty.clear()
        self._resort(added, removed)
        for key in removed:
            del nets[key]
            self._changed.setdefault(key, True)
        if len(roots) * 8 > len(self._sorted):
            self._sweep(0, 1 << 128, 0)      # a snapshot, or close to one: one pass over all
            return
        roots.sort()
        lengths = sorted(self._lengths, reverse=True)
        covered_to = -1
        for root in roots:
            if root >> 8 <= covered_to:
                continue                     # inside the run of a root already swept
            self._sweep(bisect.bisect_left(self._sorted, root), _end(root), self._covering_rank(root, lengths))
            covered_to = _end(root)

    def _resort(self, added: list[int], removed: list[int]) -> None:
        for key in removed:
            self._lengths[key & 255] -= 1
            if not self._lengths[key & 255]:
                del self._lengths[key & 255]
        for key in added:
            self._lengths[key & 255] += 1
        lst = self._sorted
        if len(added) + len(removed) > _REBUILD:
            if removed:
                gone = set(removed)
                lst = [k for k in lst if k not in gone]
            added.sort()
            lst.extend(added)
            lst.sort()                       # two sorted runs: a merge
            self._sorted = lst
            return
        for key in removed:
            del lst[bisect.bisect_left(lst, key)]
        for key in added:
            bisect.insort(lst, key)

    def _covering_rank(self, key: int, lengths: list[int]) -> int:
        """The effective rank of the longest settled network strictly covering ``key`` (0:
        none). Only called for a network none of whose covering networks changed in this settle,
        so their ranks are current."""
        start, length = key >> 8, key & 255
        for plen in lengths:
            if plen >= length:
                continue
            net = self._nets.get((start >> (128 - plen) << (128 - plen)) << 8 | plen)
            if net is not None:
                return net[1]
        return 0

    def _sweep(self, i: int, end: int, inherited: int) -> None:
        """Recompute the effective rank of the networks from position ``i`` of the sorted list
        that start at or before address ``end`` (a root network, if still there, and the run of
        those it covers): each is the latest of its own rank and its nearest covering network's,
        ``inherited`` for those with no covering network in the run."""
        lst, nets, changed = self._sorted, self._nets, self._changed
        stack: list[tuple[int, int]] = []   # (last address, effective rank) of the enclosing networks
        top_end, top_rank = -1, inherited   # the innermost open network (-1: none)
        for i in range(i, len(lst)):
            key = lst[i]
            start = key >> 8
            if start > end:
                break
            while start > top_end and stack:
                top_end, top_rank = stack.pop()
            if start > top_end:
                top_end, top_rank = -1, inherited
            net = nets[key]
            rank = net[0] if net[0] > top_rank else top_rank
            old = net[1]
            if old != rank:
                net[1] = rank
                changed.setdefault(key, old is not None)
            if top_end >= 0:
                stack.append((top_end, top_rank))
            top_end, top_rank = start | ((1 << (128 - (key & 255))) - 1), rank
