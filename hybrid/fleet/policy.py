"""What a CrowdSec decision may do to this gateway: which decisions the bouncer enforces, and
which it refuses because they would cut the gateway off (a blackhole).

A decision is enforced when its type is one of ``types`` (each enforced as a drop: the kernel has
no captcha), its scope one of ``scopes`` and, when ``origins`` is given, its origin one of them.
Everything else is *counted by what it is* (``unsupported_type``, ``unsupported_scope``,
``origin``), never dropped silently.

A decision that passes those filters is still *refused* when its prefix:

- is not an address or prefix at all (``invalid``);
- is shorter than ``min_prefix_v4`` / ``min_prefix_v6`` (``too_broad``): 0.0.0.0/0, ::/0, a /4;
  an IPv6 prefix that contains ``::ffff:0:0/96`` covers every IPv4 address too, because the
  kernel keys IPv4 as IPv4-mapped IPv6, and is refused the same way;
- touches a protected prefix (``protected``): the gateway's own addresses, loopback, link-local,
  the Local API's address and ``never_block``. "Touches" is both ways: a /16 that contains the
  gateway's address is refused as surely as the address itself.

The same check guards what this gateway *shares* (hybrid/fleet/share.py): it never reports its
own or a protected address to the fleet.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Always protected: the gateway talks to itself and to its link neighbours there.
ALWAYS_PROTECTED = ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

# What happens to one decision (Policy.judge); "apply" is the only one enforced.
APPLY = "apply"
FILTERED = ("unsupported_type", "unsupported_scope", "origin")
REFUSED = ("invalid", "too_broad", "protected")


def _unmapped(net: Network) -> Network:
    """An IPv4-mapped IPv6 network as the IPv4 network the kernel keys it as."""
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


class Intervals:
    """Disjoint, sorted integer intervals per IP version, for an O(log n) "does this prefix
    touch any of them" test."""

    def __init__(self, networks: Iterable[Network]):
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in networks:
            spans[net.version].append((int(net.network_address), int(net.broadcast_address)))
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version, items in spans.items():
            merged: list[list[int]] = []
            for lo, hi in sorted(items):
                if merged and lo <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            self._starts[version] = [lo for lo, _ in merged]
            self._ends[version] = [hi for _, hi in merged]

    def touches(self, net: Network) -> bool:
        starts, ends = self._starts[net.version], self._ends[net.version]
        lo, hi = int(net.network_address), int(net.broadcast_address)
        i = bisect.bisect_right(starts, hi) - 1
        return i >= 0 and ends[i] >= lo


def _singles(addresses: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({str(_unmapped(ipaddress.ip_network(a, strict=False))) for a in addresses}))


class Policy:
    """The bouncer's filters and refusals (module docstring). ``own`` is refreshed with
    :meth:`set_own` (the gateway's addresses change at run time), the Local API's addresses with
    :meth:`set_lapi` (a host name may resolve elsewhere later)."""

    def __init__(self, *, scopes: Iterable[str] = ("ip", "range"), types: Iterable[str] = ("ban",),
                 origins: Iterable[str] = (), never_block: Iterable[str] = (), min_prefix_v4: int = 12,
                 min_prefix_v6: int = 32, lapi_addresses: Iterable[str] = (), own: Iterable[str] = ()):
        self.scopes = frozenset(s.lower() for s in scopes)
        self.types = frozenset(types)
        self.origins = frozenset(origins)
        self.min_prefix = {4: min_prefix_v4, 6: min_prefix_v6}
        self._fixed = [_unmapped(ipaddress.ip_network(n, strict=False)) for n in (*ALWAYS_PROTECTED, *never_block)]
        self.own: tuple[str, ...] = ()
        self.lapi: tuple[str, ...] = ()
        self.set_lapi(lapi_addresses)
        self.set_own(own)

    def set_own(self, addresses: Iterable[str]) -> None:
        """The gateway's own addresses (each protected as a single address)."""
        self.own = _singles(addresses)
        self._rebuild()

    def set_lapi(self, addresses: Iterable[str]) -> None:
        """The Local API's addresses (each protected as a single address: a ban on it would cut
        the link that could lift the ban)."""
        self.lapi = _singles(addresses)
        self._rebuild()

    def _rebuild(self) -> None:
        self._protected = Intervals([*self._fixed, *(ipaddress.ip_network(a) for a in (*self.own, *self.lapi))])

    def refusal(self, net: Network) -> str | None:
        """Why the kernel must not drop ``net`` (a REFUSED word), or None."""
        net = _unmapped(net)
        if net.version == 6 and net.overlaps(_MAPPED):
            return "too_broad"                 # it would hold every IPv4 address (IPv4-mapped keys)
        if net.prefixlen < self.min_prefix[net.version]:
            return "too_broad"
        if self._protected.touches(net):
            return "protected"
        return None

    def judge(self, scope: str, type_: str, origin: str, net: Network | None) -> str:
        """APPLY for a decision the kernel enforces, else the FILTERED or REFUSED word. ``net``:
        the decision's value as a network (hybrid.fleet.lapi.Decision.network: IPv4-mapped IPv6
        read as IPv4, as the LAPI reads it), None when it is not one."""
        if type_ not in self.types:
            return "unsupported_type"
        if scope.lower() not in self.scopes:
            return "unsupported_scope"
        if self.origins and origin not in self.origins:
            return "origin"
        if net is None:
            return "invalid"
        return self.refusal(net) or APPLY
