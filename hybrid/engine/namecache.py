"""Which decisions the kernel may make from a name alone (issue 13, the name-verdict cache).

The tc program reads one name from a flow's first payload packet (a DNS question name, a TLS
server_name, an HTTP Host) exactly as the engine reads it, and looks it up in a cache the engine
fills. A cached decision must be the one the engine would make for *every* packet that carries
that name, so the key holds everything the decision may depend on: the name's kind, the name,
the protocol and the destination port (:class:`NameKey`). :func:`cached_decision` works out,
from the compiled rules, whether the key alone decides:

- the rules are walked in order, as :meth:`RuleSet.decide` walks them;
- each match key of a rule is *determined* by the key (true or false for every packet with that
  key: the protocol, the destination port, the name of the key's kind, the views a packet of
  that kind can never have) or *open* (the source port, addresses, the path, the method, sizes,
  payload bytes, TCP flags, interfaces, a plugin: they may differ between packets with the same
  key), except a payload length of 0 only ("wait for the payload"), which no packet that
  carries a name has;
- a rule with a determined false key cannot match: the walk goes on; a rule whose keys are all
  determined true decides; a rule that may or may not match ends the walk: the key does not
  decide (None), and the engine keeps deciding such packets itself.

Only decisions the kernel can carry out are cacheable: accept or drop (the engine's side,
kernelcache.py, writes only pass+bypass, pass, drop+block and drop).
A reject (it sends a RST or an ICMP error from userspace), a rewrite and a mark stay with the
engine. Proved against :meth:`RuleSet.decide` by tests/unit/test_namecache.py (random rule sets
x random packets, the engine's own parse giving the key)."""

from __future__ import annotations

from typing import Any, NamedTuple

from hybrid.engine.rules import MATCH_KEYS, Decision, RuleSet

__all__ = ["KINDS", "NameKey", "cached_decision", "kernel_can_apply"]

KINDS = ("dns", "sni", "host")
_MATCH_KEY = {k.name: k for k in MATCH_KEYS}
DNS_PORT = 53


class NameKey(NamedTuple):
    """What the kernel keys a cached decision on. ``name`` as the engine reads it: the DNS
    question name (lower-cased ASCII, no final dot), the server_name (lower-cased, no final dot),
    the HTTP host as nginx compares it (lower-cased, no port, no final dot)."""
    kind: str                 # one of KINDS
    name: str
    proto: int                # 6 or 17
    dport: int


class _Http(NamedTuple):
    host: str
    hosts: tuple = ()


class _View:
    """A packet as far as the key tells: the fields a determined match key reads."""
    __slots__ = ("proto", "dport", "http", "tls_sni", "dns_qname")

    def __init__(self, key: NameKey):
        self.proto, self.dport = key.proto, key.dport
        self.http = _Http(key.name) if key.kind == "host" else None
        self.tls_sni = key.name if key.kind == "sni" else None
        self.dns_qname = key.name if key.kind == "dns" else None


# Match keys the key alone decides, by kind (their matchers then run on a _View). The others:
#   http_method, http_path: a request's, not in the key (open for "host"; for "sni" and "dns"
#     the packet is no HTTP request: false);
#   tls_sni for "host"/"dns", http_* for "sni"/"dns": a ClientHello never parses as a request
#     head, nor a head as a ClientHello, and a whole DNS-over-TCP message starts with a length
#     below 0x0600 (neither a method letter nor 0x16): false;
#   dns_qname for "host"/"sni": the engine reads DNS on either port 53, and the source port is
#     not in the key: open, unless proto/dport rule it out first.
_BY_KIND = {"host": frozenset(("dport", "http_host")), "sni": frozenset(("dport", "tls_sni")),
            "dns": frozenset(("dport", "dns_qname"))}
_NEVER = {"host": frozenset(("tls_sni",)), "sni": frozenset(("http_host", "http_method", "http_path")),
          "dns": frozenset(("http_host", "http_method", "http_path", "tls_sni"))}


def _determined(key_name: str, value: Any, key: NameKey, view: _View) -> bool | None:
    """True or False when every packet with ``key`` gives this match key that answer; None
    when packets with ``key`` may differ."""
    if key_name == "proto":
        return True                           # RuleSet indexes by protocol: checked by the caller
    if key_name == "fragment":
        return not value                      # the kernel reads names from whole packets only
    if key_name in _NEVER[key.kind]:
        return False
    if key_name in _BY_KIND[key.kind]:
        return bool(_MATCH_KEY[key_name].build(key_name, value)(view))
    if key_name == "port":                    # either port: the destination decides only a match
        return True if _MATCH_KEY["port"].build("dport", value)(view) else None
    if key_name == "payload_len" and value[1] < 1:
        return False                          # a packet with a name has payload ("wait for payload")
    return None


def kernel_can_apply(d: Decision) -> bool:
    """Whether the tc program can carry the decision out: accept or drop (no reject: its RST or
    ICMP error is sent from userspace; no rewrite, no mark, no byte budget to write; no block
    shared with the fleet: each one is reported from the engine, hybrid/fleet/share.py)."""
    return (d.action in ("accept", "drop") and d.mark is None and d.rewrite is None and d.inspect_bytes is None
            and d.share is None)


def cached_decision(rules: RuleSet, key: NameKey) -> Decision | None:
    """The decision :meth:`RuleSet.decide` gives every packet that carries ``key`` (see the
    module docstring), or None when the key alone does not decide, or the kernel cannot apply
    the decision."""
    if key.kind not in KINDS:
        raise ValueError(f"name kind {key.kind!r}: one of {', '.join(KINDS)}")
    view = _View(key)
    for rule in rules.compiled:
        if rule.protos is not None and key.proto not in rule.protos:
            continue
        outcome: bool | None = True
        for key_name, value in rule.match.items():
            got = _determined(key_name, value, key, view)
            if got is False:
                outcome = False
                break
            if got is None:
                outcome = None
        if outcome is False:
            continue
        if outcome is None or rule.plugin is not None:
            return None
        d = rule.decision_tcp if rule.decision_tcp is not None and key.proto == 6 else rule.decision
        return d if kernel_can_apply(d) else None
    return rules.default if kernel_can_apply(rules.default) else None
