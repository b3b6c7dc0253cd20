"""The verdict engine's rule language: a TOML file compiled once into fast per-packet matchers.

A rules file is a list of ``[[rule]]`` tables tried in order; the first rule whose every matcher
holds decides the packet, and ``default``/``default_flow`` decide the rest. Everything that can
be computed before the first packet is (CIDRs as integers, port sets, lower-cased name suffixes,
compiled regexes, the :class:`Decision` each rule returns), and matchers are ordered so the
packet's cheap fields are tested before the lazily parsed ones (HTTP, TLS SNI, DNS name, then a
plugin).

Every error is a :class:`RulesError` with a one-line message ``FILE:LINE: what is wrong and what
to write instead``. See ``examples/rules/`` for complete files.

Packets are read through a fixed set of attributes (``version``, ``proto``, ``src_int``,
``dst_int``, ``sport``, ``dport``, ``tcp_flags``, ``icmp_type``, ``icmp_code``, ``payload``,
``payload_len``, ``fragment``, ``indev``, ``http``, ``tls_sni``, ``dns_qname``): see
``hybrid/packet.py``.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import logging
import os
import re
import sys
import time
import tomllib
from typing import Any, Callable, NamedTuple

from hybrid.errors import ConfigError
from hybrid.kernel.abi import ICMP_PROTOS, PROTO_NAMES, PROTO_NUMBERS
from hybrid.plugin import Verdict

log = logging.getLogger(__name__)

ACTIONS = ("accept", "drop", "reject", "rewrite", "mark")
DEFAULT_ACTIONS = ("accept", "drop")
FLOWS = ("none", "bypass", "block", "inspect")
PORT_PROTOS = (6, 17, 132, 136)          # tcp, udp, sctp, udplite: the ones with ports
PAYLOAD_PROTOS = (6, 17, 1, 58)          # where a payload rewrite makes sense
REJECT_WITH = ("tcp-reset", "icmp-port-unreachable", "icmp-admin-prohibited")
DEFAULT_FLOW_TTL = 300
TCP_FLAG_BITS = {"F": 1, "S": 2, "R": 4, "P": 8, "A": 16, "U": 32, "E": 64, "C": 128}
LOGGED_ACTIONS = ("drop", "reject", "rewrite")
PLUGIN_ERROR_LOG_INTERVAL = 10.0         # seconds between two log lines about one failing plugin

TOP_KEYS = ("default", "default_flow", "flow_ttl", "plugin_paths", "rule")
RULE_KEYS = ("name", "proto", "src", "dst", "sport", "dport", "port", "tcp_flags", "iif", "fragment",
             "icmp_type", "icmp_code", "payload_len", "payload_contains", "payload_hex", "payload_regex",
             "http_method", "http_host", "http_path", "tls_sni", "dns_qname", "action", "reject_with",
             "rewrite", "mark", "flow", "ttl", "plugin", "log")
REWRITE_KEYS = ("fill", "end", "replace", "set", "set_hex")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END_RE = re.compile(r"\s*\(at end of document\)$")
_RULE_HEADER_RE = re.compile(r"^\s*\[\[\s*rule\s*\]\]")
_TABLE_HEADER_RE = re.compile(r"^\s*\[")


class RulesError(ConfigError):
    """A rules file that cannot be used; ``str()`` is ``FILE:LINE: message``."""

    def __init__(self, filename: str, line: int | None, message: str):
        where = f"{filename}:{line}" if line else filename
        super().__init__(f"{where}: {message}")
        self.filename = filename
        self.line = line
        self.reason = message


class Decision(NamedTuple):
    """What the engine does with one packet. ``rule`` is None when the default decided.

    ``mark`` is ``(value, mask)``; ``rewrite`` is ``("fill", byte, end)``, ``("replace", old,
    new)`` or ``("set", data)`` for hybrid/rewrite.py; ``flow`` and ``ttl`` go to the kernel's
    flow table (``ttl`` in seconds)."""

    rule: str | None
    action: str
    mark: tuple[int, int] | None
    rewrite: tuple | None
    reject_with: str | None
    flow: str
    ttl: int
    log: bool


class _Source:
    """Finds the line of a rule's header or of one of its keys in the raw text, for messages."""

    def __init__(self, filename: str, text: str):
        self.filename = filename
        self.lines = text.splitlines()
        self.headers = [i for i, ln in enumerate(self.lines) if _RULE_HEADER_RE.match(ln)]
        first_table = next((i for i, ln in enumerate(self.lines) if _TABLE_HEADER_RE.match(ln)), len(self.lines))
        self.top_end = first_table

    def _span(self, index: int | None) -> tuple[int, int]:
        if index is None:
            return 0, self.top_end
        if index >= len(self.headers):
            return 0, len(self.lines)
        start = self.headers[index]
        end = self.headers[index + 1] if index + 1 < len(self.headers) else len(self.lines)
        return start, end

    def line(self, index: int | None, key: str | None = None) -> int | None:
        """1-based line of ``key`` in rule ``index`` (None: the top level), else of its header."""
        start, end = self._span(index)
        if key is not None:
            pat = re.compile(r'^\s*(?:%s|"%s"|\'%s\')\s*[=.]' % ((re.escape(key),) * 3))
            for i in range(start, end):
                if pat.match(self.lines[i]):
                    return i + 1
        if index is None:
            return 1 if self.lines else None
        return start + 1 if index < len(self.headers) else None

    def error(self, index: int | None, key: str | None, message: str) -> RulesError:
        return RulesError(self.filename, self.line(index, key), message)


def _suggest(word: str, choices) -> str:
    swapped = [c for c in choices if sorted(c) == sorted(word)]      # transposed letters first
    close = swapped or difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(choices)}"


def _listify(value) -> list:
    return value if isinstance(value, list) else [value]


# ---------------------------------------------------------------------------------------------
# value parsers: each returns the compiled form or raises ValueError(message without location)


def _parse_proto(value) -> int:
    if isinstance(value, bool):
        raise ValueError("proto: use tcp, udp, icmp, icmpv6 or an IP protocol number 0-255")
    if isinstance(value, int):
        if 0 <= value <= 255:
            return value
        raise ValueError(f"proto {value}: an IP protocol number is 0-255")
    if isinstance(value, str) and value.lower() in PROTO_NUMBERS:
        return PROTO_NUMBERS[value.lower()]
    raise ValueError(f"proto {value!r}: use tcp, udp, icmp, icmpv6 or an IP protocol number 0-255")


def _parse_cidrs(key: str, value) -> tuple[dict[int, tuple[tuple[int, int], ...]], list[str]]:
    by_version: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    shown = []
    for item in _listify(value):
        if not isinstance(item, str):
            raise ValueError(f"{key} {item!r}: write a CIDR string like \"198.18.1.0/24\" or \"2001:2::/48\"")
        try:
            net = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            try:
                fixed = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{key} {item!r}: not a CIDR ({exc}); write e.g. \"198.18.1.0/24\" or "
                                 f"\"2001:2::/48\"") from None
            raise ValueError(f"{key} {item!r}: host bits are set; write \"{fixed}\"") from None
        bits = net.max_prefixlen
        mask = ((1 << bits) - 1) ^ ((1 << (bits - net.prefixlen)) - 1)
        by_version[net.version].append((int(net.network_address), mask))
        shown.append(str(net))
    if not shown:
        raise ValueError(f"{key}: the list is empty; give at least one CIDR or remove the key")
    return {v: tuple(nets) for v, nets in by_version.items() if nets}, shown


def _parse_range(key: str, value, lo: int, hi: int, example: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{key} {value!r}: write {example}")
    if isinstance(value, int):
        a = b = value
    elif isinstance(value, str):
        first, sep, last = value.partition("-")
        try:
            a, b = int(first.strip()), int(last.strip() if sep else first.strip())
        except ValueError:
            raise ValueError(f"{key} {value!r}: write {example}") from None
    else:
        raise ValueError(f"{key} {value!r}: write {example}")
    if not lo <= a <= hi or not lo <= b <= hi:
        raise ValueError(f"{key} {value!r}: values must be {lo}-{hi}")
    if a > b:
        raise ValueError(f"{key} {value!r}: the range is backwards; write \"{b}-{a}\"")
    return a, b


def _parse_ports(key: str, value) -> tuple[frozenset[int], tuple[tuple[int, int], ...], list[str]]:
    singles, ranges, shown = set(), [], []
    items = _listify(value)
    if not items:
        raise ValueError(f"{key}: the list is empty; give at least one port or remove the key")
    for item in items:
        a, b = _parse_range(key, item, 0, 65535, 'a port like 443, a range like "1000-2000", or a list of them')
        if a == b:
            singles.add(a)
            shown.append(str(a))
        else:
            ranges.append((a, b))
            shown.append(f"{a}-{b}")
    return frozenset(singles), tuple(ranges), shown


def _parse_tcp_flags(value) -> tuple[int, int]:
    example = 'flags/mask letters from FSRPAUEC, e.g. "S/SA" (SYN set, ACK clear) or "R"'
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"tcp_flags {value!r}: write {example}")
    flags_s, sep, mask_s = value.strip().partition("/")

    def bits(s: str) -> int:
        out = 0
        for ch in s.upper():
            if ch not in TCP_FLAG_BITS:
                raise ValueError(f"tcp_flags {value!r}: unknown flag {ch!r}; write {example}")
            out |= TCP_FLAG_BITS[ch]
        return out

    flags = bits(flags_s)
    mask = bits(mask_s) if sep else flags
    if not mask:
        raise ValueError(f"tcp_flags {value!r}: the mask is empty; write {example}")
    if flags & ~mask:
        raise ValueError(f"tcp_flags {value!r}: every flag must also be in the mask; write {example}")
    return flags, mask


def _parse_names(key: str, value) -> tuple[frozenset[str], tuple[str, ...], list[str]]:
    """Exact names, and suffixes: ".x" = x and its subdomains, "*.x" = subdomains only."""
    exact, suffixes, shown = set(), [], []
    items = _listify(value)
    if not items:
        raise ValueError(f"{key}: the list is empty; give at least one name or remove the key")
    for item in items:
        if not isinstance(item, str) or not item.strip(".* ") or " " in item.strip():
            raise ValueError(f"{key} {item!r}: write a name like \"example.com\", \".example.com\" (it and "
                             f"its subdomains) or \"*.example.com\" (subdomains only)")
        name = item.strip().lower().rstrip(".")
        if name.startswith("*."):
            suffixes.append(name[1:])
        elif name.startswith("."):
            suffixes.append(name)
            exact.add(name[1:])
        elif "*" in name:
            raise ValueError(f"{key} {item!r}: a wildcard is only allowed as a leading \"*.\", "
                             f"e.g. \"*.example.com\"")
        else:
            exact.add(name)
        shown.append(name)
    return frozenset(exact), tuple(suffixes), shown


def _parse_strings(key: str, value, example: str) -> tuple[str, ...]:
    items = _listify(value)
    if not items or not all(isinstance(i, str) and i for i in items):
        raise ValueError(f"{key} {value!r}: write {example}")
    return tuple(items)


def _parse_hex(key: str, value) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{key} {value!r}: write hex digits like \"deadbeef\"")
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{key} {value!r}: not hex; write pairs of hex digits like \"de ad be ef\"") from None
    if not data:
        raise ValueError(f"{key}: empty; write at least one byte like \"00\"")
    return data


def _parse_mark(value) -> tuple[int, int]:
    example = 'a mark like "0x10/0xff" (value/mask) or 16'
    if isinstance(value, bool):
        raise ValueError(f"mark {value!r}: write {example}")
    if isinstance(value, int):
        val, mask = value, 0xFFFFFFFF
    elif isinstance(value, str):
        v, sep, m = value.partition("/")
        try:
            val, mask = int(v.strip(), 0), (int(m.strip(), 0) if sep else 0xFFFFFFFF)
        except ValueError:
            raise ValueError(f"mark {value!r}: write {example}") from None
    else:
        raise ValueError(f"mark {value!r}: write {example}")
    if not (0 <= val <= 0xFFFFFFFF and 0 < mask <= 0xFFFFFFFF):
        raise ValueError(f"mark {value!r}: value and mask are 32-bit, the mask non-zero")
    if val & ~mask:
        raise ValueError(f"mark {value!r}: the value has bits outside the mask; write \"{hex(val)}/{hex(mask | val)}\"")
    return val, mask


def _text(key: str, value) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{key} {value!r}: write a string")
    return value.encode("utf-8")


def _parse_rewrite(value) -> tuple:
    example = ('{ fill = "h", end = "\\n" }, { replace = ["from", "to"] }, { set = "text" } or '
               '{ set_hex = "0a0b" }')
    if not isinstance(value, dict):
        raise ValueError(f"rewrite: write an inline table: {example}")
    for k in value:
        if k not in REWRITE_KEYS:
            raise ValueError(f"rewrite: unknown key {k!r}, {_suggest(k, REWRITE_KEYS)}")
    kinds = [k for k in ("fill", "replace", "set", "set_hex") if k in value]
    if len(kinds) != 1:
        raise ValueError(f"rewrite: give exactly one of fill, replace, set, set_hex: {example}")
    kind = kinds[0]
    if "end" in value and kind != "fill":
        raise ValueError("rewrite: end only goes with fill, e.g. { fill = \"h\", end = \"\\n\" }")
    if kind == "fill":
        fill = _text("rewrite.fill", value["fill"])
        if len(fill) != 1:
            raise ValueError(f"rewrite.fill {value['fill']!r}: write one byte, e.g. \"h\"")
        return ("fill", fill, _text("rewrite.end", value.get("end", "")))
    if kind == "replace":
        pair = value["replace"]
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)) or not pair[0]:
            raise ValueError('rewrite.replace: write two strings, the first non-empty: ["from", "to"]')
        return ("replace", pair[0].encode("utf-8"), pair[1].encode("utf-8"))
    if kind == "set":
        return ("set", _text("rewrite.set", value["set"]))
    return ("set", _parse_hex("rewrite.set_hex", value["set_hex"]))


def _positive_int(key: str, value, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} {value!r}: write {example}")
    return value


# ---------------------------------------------------------------------------------------------
# matchers: tiny closures over precomputed values; each takes the packet and returns a bool


def _m_eq(attr: str, want):
    def match(pkt, _attr=attr, _want=want):
        return getattr(pkt, _attr) == _want
    return match


def _m_in(attr: str, want: tuple):
    def match(pkt, _attr=attr, _want=want):
        return getattr(pkt, _attr) in _want
    return match


def _m_range(attr: str, lo: int, hi: int):
    def match(pkt, _attr=attr, _lo=lo, _hi=hi):
        return _lo <= getattr(pkt, _attr) <= _hi
    return match


def _port_test(singles: frozenset[int], ranges: tuple[tuple[int, int], ...]) -> Callable[[int], bool]:
    if not ranges:
        return singles.__contains__

    def test(port, _s=singles, _r=ranges):
        if port in _s:
            return True
        for a, b in _r:
            if a <= port <= b:
                return True
        return False
    return test


def _m_port(attr: str | None, singles, ranges):
    test = _port_test(singles, ranges)
    if attr is None:        # either side
        return lambda pkt, _t=test: _t(pkt.sport) or _t(pkt.dport)
    return lambda pkt, _t=test, _a=attr: _t(getattr(pkt, _a))


def _m_cidr(attr: str, by_version: dict):
    def match(pkt, _attr=attr, _nets=by_version):
        nets = _nets.get(pkt.version)
        if nets:
            addr = getattr(pkt, _attr)
            for net, mask in nets:
                if addr & mask == net:
                    return True
        return False
    return match


def _m_tcp_flags(flags: int, mask: int):
    return lambda pkt, _f=flags, _m=mask: pkt.tcp_flags & _m == _f


def _m_contains(needle: bytes):
    return lambda pkt, _n=needle: _n in pkt.payload


def _m_regex(rx: re.Pattern):
    return lambda pkt, _s=rx.search: _s(pkt.payload) is not None


def _name_test(exact: frozenset[str], suffixes: tuple[str, ...]):
    if not suffixes:
        return exact.__contains__
    return lambda name, _e=exact, _s=suffixes: name in _e or name.endswith(_s)


def _m_http(field: str, values):
    if field == "method":
        def match(pkt, _v=values):
            http = pkt.http
            return http is not None and http.method in _v
    elif field == "path":
        def match(pkt, _v=values):
            http = pkt.http
            return http is not None and http.path is not None and http.path.startswith(_v)
    else:
        test = _name_test(*values)

        def match(pkt, _t=test):
            http = pkt.http
            if http is None or not http.host:
                return False
            host = http.host.lower()
            if not host.startswith("[") and ":" in host:      # strip the port; leave [v6]:port alone
                host = host.rsplit(":", 1)[0]
            return _t(host.rstrip("."))
    return match


def _m_sni(exact, suffixes):
    test = _name_test(exact, suffixes)

    def match(pkt, _t=test):
        sni = pkt.tls_sni
        return sni is not None and _t(sni.lower().rstrip("."))
    return match


def _m_qname(exact, suffixes):
    test = _name_test(exact, suffixes)

    def match(pkt, _t=test):
        q = pkt.dns_qname
        return q is not None and _t(q)
    return match


# ---------------------------------------------------------------------------------------------


class _Rule:
    __slots__ = ("index", "name", "line", "checks", "decision", "decision_tcp", "plugin", "plugin_ref",
                 "shown", "decision_parts", "protos")


class RuleSet:
    """Compiled rules. :meth:`decide` is the per-packet entry point; ``counters`` maps each rule
    name to the packets it decided, ``plugin_errors`` each plugin rule's name to its failures."""

    def __init__(self, filename: str, rules: list[_Rule], default: Decision, plugin_paths: list[str]):
        self.filename = filename
        self._rules = rules
        self._fast = tuple((r.name, tuple(r.checks), r.decision, r.decision_tcp, r.plugin) for r in rules)
        # Per-protocol index, order kept: a packet only walks the rules that can match its
        # protocol (a UDP packet never tries the TCP-only Host and SNI rules).
        known = set().union(*(r.protos for r in rules if r.protos is not None))
        self._by_proto = {p: tuple(f for f, r in zip(self._fast, rules) if r.protos is None or p in r.protos)
                          for p in known}
        self._fast_other = tuple(f for f, r in zip(self._fast, rules) if r.protos is None)
        # Whether any rule reads the input interface (resolving its name costs per packet).
        self.needs_indev = any(key == "iif" for r in rules for key, _ in r.shown)
        # Whether any rule reads the TLS SNI, or the HTTP request (a plugin may read either): the
        # engine then joins ClientHellos and request heads split over TCP segments.
        plugins = any(r.plugin is not None for r in rules)
        self.needs_sni = plugins or any(key == "tls_sni" for r in rules for key, _ in r.shown)
        self.needs_http = plugins or any(key.startswith("http_") for r in rules for key, _ in r.shown)
        self.needs_join = self.needs_sni or self.needs_http
        # Whether a bare TCP SYN can be decided anything but "accept, leave the flow alone"; when
        # not, the engine tells the kernel not to queue SYNs (they would only cost a round trip).
        self.needs_syn = _needs_syn(rules, default)
        self.default = default
        self.plugin_paths = plugin_paths
        self.counters: dict[str, int] = {r.name: 0 for r in rules}
        self.default_count = 0
        self.plugin_errors: dict[str, int] = {r.name: 0 for r in rules if r.plugin is not None}
        self._plugin_last_log: dict[str, float] = {}
        self._plugin_suppressed: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._rules)

    def decide(self, pkt) -> Decision:
        """The first matching rule's Decision, else the default one. Never raises for a plugin's
        sake: a plugin that fails counts as not matching."""
        for name, checks, decision, decision_tcp, plugin in self._by_proto.get(pkt.proto, self._fast_other):
            for check in checks:
                if not check(pkt):
                    break
            else:
                if plugin is not None:
                    decision = self._run_plugin(name, plugin, decision, pkt)
                    if decision is None:
                        continue
                elif decision_tcp is not None and pkt.proto == 6:
                    decision = decision_tcp
                self.counters[name] += 1
                return decision
        self.default_count += 1
        return self.default

    def _run_plugin(self, name: str, plugin, base: Decision, pkt) -> Decision | None:
        try:
            verdict = plugin(pkt)
            if verdict is None:
                return None
            return _merge_verdict(base, verdict, pkt)
        except Exception as exc:  # a plugin must never take the engine down
            self.plugin_errors[name] += 1
            now = time.monotonic()
            last = self._plugin_last_log.get(name)
            if last is None or now - last >= PLUGIN_ERROR_LOG_INTERVAL:
                skipped = self._plugin_suppressed.pop(name, 0)
                self._plugin_last_log[name] = now
                log.warning("rule %s: plugin failed, rule treated as not matching: %s: %s%s", name,
                            type(exc).__name__, exc,
                            f" ({skipped} more failures not logged)" if skipped else "")
            else:
                self._plugin_suppressed[name] = self._plugin_suppressed.get(name, 0) + 1
            return None

    def describe(self) -> list[dict[str, Any]]:
        """The compiled rules in order, then the default, as plain dicts (for printing/JSON)."""
        out = []
        for r in self._rules:
            d = r.decision
            out.append({"order": r.index + 1, "name": r.name, "line": r.line, "match": dict(r.shown),
                        "plugin": r.plugin_ref, "action": d.action, "reject_with": d.reject_with,
                        "mark": None if d.mark is None else f"{d.mark[0]:#x}/{d.mark[1]:#x}",
                        "rewrite": None if d.rewrite is None else _show_rewrite(d.rewrite),
                        "flow": d.flow, "ttl": d.ttl, "log": d.log})
        dd = self.default
        out.append({"order": None, "name": None, "line": None, "match": {}, "plugin": None,
                    "action": dd.action, "reject_with": None, "mark": None, "rewrite": None,
                    "flow": dd.flow, "ttl": dd.ttl, "log": dd.log})
        return out


# Keys that only match a packet with payload: a bare SYN never satisfies them.
_PAYLOAD_ONLY_KEYS = frozenset({"payload_hex", "http_method", "http_host", "http_path", "tls_sni", "dns_qname"})
# Every bare TCP SYN (with or without ECN bits) the kernel flags with REASON_SYN.
_SYN_FLAG_VARIANTS = (0x02, 0x42, 0x82, 0xC2)


def _syn_fit(rule: _Rule) -> str:
    """How a rule's matchers meet bare TCP SYNs: "none" (it can match none), "all" (it matches
    every one) or "some" (it may match some: addresses, ports, interfaces, regexes ...)."""
    if rule.protos is not None and 6 not in rule.protos:
        return "none"
    fit = "all"
    for key, value in rule.shown:
        if key in ("proto", "name"):
            continue
        if key in _PAYLOAD_ONLY_KEYS or (key == "payload_contains" and value not in ("''", '""')):
            return "none"
        if key == "fragment":
            if value == "true":
                return "none"
            continue
        if key == "payload_len":
            lo = int(value.split("-")[0])
            if lo > 0:
                return "none"
            continue
        if key == "tcp_flags":
            flags, mask = _parse_tcp_flags(value)
            hits = [(f & mask) == flags for f in _SYN_FLAG_VARIANTS]
            if not any(hits):
                return "none"
            if not all(hits):
                fit = "some"
            continue
        fit = "some"          # src, dst, ports, iif, payload_regex, payload_contains "": may match
    return fit


def _is_noop(d: Decision) -> bool:
    return d.action == "accept" and d.flow == "none" and d.mark is None and d.rewrite is None and not d.log


def _needs_syn(rules: list[_Rule], default: Decision) -> bool:
    """False when no bare TCP SYN can get a decision other than a silent accept that leaves
    its flow alone: then queueing SYNs costs a kernel-user round trip per connection and
    decides nothing (the engine still sees each flow's first payload). Conservative: a plugin,
    a logging rule or anything else that might act on some SYN means True."""
    for r in rules:
        fit = _syn_fit(r)
        if fit == "none":
            continue
        if r.plugin is not None or not _is_noop(r.decision):
            return True
        if fit == "all":
            return False
    return not _is_noop(default)


def _show_rewrite(spec: tuple) -> str:
    kind, *args = spec
    return kind + " " + " ".join(repr(a)[1:] for a in args)


def _merge_verdict(base: Decision, v, pkt) -> Decision:
    if not isinstance(v, Verdict):
        raise TypeError(f"returned {type(v).__name__}, expected hybrid.plugin.Verdict or None")
    action = v.action if v.action is not None else base.action
    if action not in ACTIONS:
        raise ValueError(f"Verdict action {action!r} is not one of {', '.join(ACTIONS)}")
    flow = v.flow if v.flow is not None else base.flow
    if flow not in FLOWS:
        raise ValueError(f"Verdict flow {flow!r} is not one of {', '.join(FLOWS)}")
    mark = v.mark if v.mark is not None else base.mark
    if isinstance(mark, int):
        mark = (mark, 0xFFFFFFFF)
    if action == "mark" and mark is None:
        raise ValueError("Verdict action 'mark' without a mark")
    rewrite = v.rewrite if v.rewrite is not None else base.rewrite
    if action == "rewrite" and rewrite is None:
        raise ValueError("Verdict action 'rewrite' without a rewrite spec")
    reject_with = v.reject_with if v.reject_with is not None else base.reject_with
    if action == "reject" and reject_with is None:
        reject_with = "tcp-reset" if pkt.proto == 6 else "icmp-port-unreachable"
    ttl = v.ttl if v.ttl is not None else base.ttl
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
        raise ValueError(f"Verdict ttl {ttl!r} is not a positive number of seconds")
    logged = v.log if v.log is not None else (base.log or action in LOGGED_ACTIONS)
    return Decision(base.rule, action, mark if action == "mark" else None,
                    rewrite if action == "rewrite" else None, reject_with if action == "reject" else None,
                    flow, ttl, bool(logged))


# ---------------------------------------------------------------------------------------------
# compiler


def load_rules(path: str | os.PathLike, flow_ttl: int | None = None) -> RuleSet:
    """Read and compile a rules file; RulesError (a ConfigError) if it cannot be used.
    ``flow_ttl``, when given, replaces the file's ``flow_ttl`` (the service configuration's)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise RulesError(path, None, f"cannot read the rules file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise RulesError(path, line, "not UTF-8 text; save the file as UTF-8") from None
    return compile_rules(text, path, flow_ttl=flow_ttl)


def compile_rules(text: str, filename: str = "<rules>", flow_ttl: int | None = None) -> RuleSet:
    """Compile rules from TOML ``text``; ``filename`` names it in errors and anchors plugin_paths."""
    src = _Source(filename, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(filename, text, exc) from None

    for key in doc:
        if key not in TOP_KEYS:
            if key in RULE_KEYS:
                raise src.error(None, key, f"{key!r} is a rule key: put it under a [[rule]] header")
            raise src.error(None, key, f"unknown top-level key {key!r}, {_suggest(key, TOP_KEYS)}")

    default_action = doc.get("default", "accept")
    if default_action not in DEFAULT_ACTIONS:
        raise src.error(None, "default", f"default {default_action!r}: write \"accept\" or \"drop\"")
    default_flow = doc.get("default_flow", "none")
    if default_flow not in FLOWS:
        raise src.error(None, "default_flow", f"default_flow {default_flow!r}: write one of {', '.join(FLOWS)}")
    try:
        file_ttl = _positive_int("flow_ttl", doc.get("flow_ttl", DEFAULT_FLOW_TTL), "seconds, e.g. 300")
    except ValueError as exc:
        raise src.error(None, "flow_ttl", str(exc)) from None
    flow_ttl = file_ttl if flow_ttl is None else flow_ttl

    base_dir = os.path.dirname(os.path.abspath(filename))
    plugin_paths = []
    pp = doc.get("plugin_paths", [])
    if not isinstance(pp, list) or not all(isinstance(p, str) and p for p in pp):
        raise src.error(None, "plugin_paths", 'plugin_paths: write a list of directories, e.g. ["plugins"]')
    for p in pp:
        full = os.path.normpath(os.path.join(base_dir, p))
        if not os.path.isdir(full):
            raise src.error(None, "plugin_paths", f"plugin_paths {p!r}: no such directory ({full}); create it or "
                                                  f"fix the path (relative to the rules file)")
        plugin_paths.append(full)

    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise src.error(None, "rule", "rules are an array of tables: write each one under a [[rule]] header")

    default = Decision(None, default_action, None, None, None, default_flow, flow_ttl,
                       default_action in LOGGED_ACTIONS)
    loader = _PluginLoader(plugin_paths)
    rules: list[_Rule] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_rules):
        rule = _compile_rule(src, index, raw, flow_ttl, loader)
        if rule.name in seen:
            raise src.error(index, "name", f"duplicate rule name {rule.name!r} (first at line {seen[rule.name]}); "
                                           f"give every rule a unique name")
        seen[rule.name] = rule.line or 0
        rules.append(rule)
    return RuleSet(filename, rules, default, plugin_paths)


def _toml_error(filename: str, text: str, exc: tomllib.TOMLDecodeError) -> RulesError:
    msg = str(exc)
    line = None
    m = _TOML_POS_RE.search(msg)
    if m:
        line, col = int(m.group(1)), int(m.group(2))
        msg = msg[:m.start()] + f" at column {col}"
    else:
        m = _TOML_END_RE.search(msg)
        if m:
            line = max(1, len(text.splitlines()))
            msg = msg[:m.start()] + " at the end of the file"
    hint = "check the TOML syntax (strings in quotes, one key = value per line, [[rule]] headers)"
    if msg.startswith("Cannot overwrite a value") or msg.startswith("Cannot declare"):
        hint = "a key or table is given twice; keep one"
    return RulesError(filename, line, f"TOML syntax: {msg[0].lower() + msg[1:]}; {hint}")


def _compile_rule(src: _Source, index: int, raw, flow_ttl: int, loader: "_PluginLoader") -> _Rule:
    if not isinstance(raw, dict):
        raise src.error(index, None, "each rule is a table under a [[rule]] header")

    def err(key: str | None, message: str) -> RulesError:
        return src.error(index, key, message)

    for key in raw:
        if key not in RULE_KEYS:
            raise err(key, f"unknown rule key {key!r}, {_suggest(key, RULE_KEYS)}")

    name = raw.get("name")
    if name is None:
        raise err(None, 'rule without a name: add name = "..." (unique, letters, digits, -_.:)')
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise err("name", f"name {name!r}: use 1-64 letters, digits or -_.: starting with a letter or digit")

    r = _Rule()
    r.index, r.name, r.line = index, name, src.line(index)
    checks: list[tuple[int, Callable]] = []     # (cost, matcher): sorted cheap-first below
    shown: list[tuple[str, str]] = []

    def parse(key, fn, *args):
        try:
            return fn(*args)
        except ValueError as exc:
            raise err(key, str(exc)) from None

    proto = None
    if "proto" in raw:
        proto = parse("proto", _parse_proto, raw["proto"])
        checks.append((0, _m_eq("proto", proto)))
        shown.append(("proto", PROTO_NAMES.get(proto, str(proto))))

    if "iif" in raw:
        names = parse("iif", _parse_strings, "iif", raw["iif"], 'an interface name like "eth0" or a list')
        checks.append((1, _m_eq("indev", names[0]) if len(names) == 1 else _m_in("indev", names)))
        shown.append(("iif", ",".join(names)))

    if "fragment" in raw:
        if not isinstance(raw["fragment"], bool):
            raise err("fragment", f"fragment {raw['fragment']!r}: write true or false")
        checks.append((1, _m_eq("fragment", raw["fragment"])))
        shown.append(("fragment", str(raw["fragment"]).lower()))

    port_keys = [k for k in ("sport", "dport", "port") if k in raw]
    if port_keys:
        if proto is None:
            checks.append((0, _m_in("proto", PORT_PROTOS)))
        elif proto not in PORT_PROTOS:
            raise err(port_keys[0], f"{port_keys[0]} needs a protocol with ports: write proto = \"tcp\" or "
                                    f"\"udp\", or remove the port")
        for key in port_keys:
            singles, ranges, s = parse(key, _parse_ports, key, raw[key])
            checks.append((2, _m_port(None if key == "port" else key, singles, ranges)))
            shown.append((key, ",".join(s)))

    if "tcp_flags" in raw:
        if proto is None:
            checks.append((0, _m_eq("proto", 6)))
        elif proto != 6:
            raise err("tcp_flags", 'tcp_flags only match TCP: write proto = "tcp" or remove tcp_flags')
        flags, mask = parse("tcp_flags", _parse_tcp_flags, raw["tcp_flags"])
        checks.append((2, _m_tcp_flags(flags, mask)))
        shown.append(("tcp_flags", raw["tcp_flags"].strip().upper()))

    icmp_keys = [k for k in ("icmp_type", "icmp_code") if k in raw]
    if icmp_keys:
        if proto is None:
            checks.append((0, _m_in("proto", ICMP_PROTOS)))
        elif proto not in ICMP_PROTOS:
            raise err(icmp_keys[0], f"{icmp_keys[0]} needs proto = \"icmp\" or \"icmpv6\"")
        for key in icmp_keys:
            a, b = parse(key, _parse_range, key, raw[key], 0, 255, 'a number 0-255 or a range like "3-5"')
            checks.append((2, _m_eq(key, a) if a == b else _m_range(key, a, b)))
            shown.append((key, str(a) if a == b else f"{a}-{b}"))

    for key in ("src", "dst"):
        if key in raw:
            by_version, s = parse(key, _parse_cidrs, key, raw[key])
            checks.append((3, _m_cidr(f"{key}_int", by_version)))
            shown.append((key, ",".join(s)))

    payload_len = None
    if "payload_len" in raw:
        payload_len = parse("payload_len", _parse_range, "payload_len", raw["payload_len"], 0, 65535,
                            'a byte count like 32 or a range like "1-100"')
        a, b = payload_len
        checks.append((3, _m_eq("payload_len", a) if a == b else _m_range("payload_len", a, b)))
        shown.append(("payload_len", str(a) if a == b else f"{a}-{b}"))

    if "payload_contains" in raw and "payload_hex" in raw:
        raise err("payload_hex", "give payload_contains (text) or payload_hex (bytes), not both; "
                                 "use payload_regex for more than one pattern")
    if "payload_contains" in raw:
        v = raw["payload_contains"]
        if not isinstance(v, str) or not v:
            raise err("payload_contains", f"payload_contains {v!r}: write non-empty text, e.g. \"GET /secret\"")
        checks.append((4, _m_contains(v.encode("utf-8"))))
        shown.append(("payload_contains", repr(v)))
    if "payload_hex" in raw:
        data = parse("payload_hex", _parse_hex, "payload_hex", raw["payload_hex"])
        checks.append((4, _m_contains(data)))
        shown.append(("payload_hex", data.hex()))
    if "payload_regex" in raw:
        v = raw["payload_regex"]
        if not isinstance(v, str) or not v:
            raise err("payload_regex", f"payload_regex {v!r}: write a regex in single quotes, e.g. '^\\x16\\x03'")
        try:
            rx = re.compile(v.encode("utf-8"), re.DOTALL)
        except re.error as exc:
            raise err("payload_regex", f"payload_regex {v!r} does not compile: {exc}; fix the pattern "
                                       f"(use single quotes so backslashes stay as written)") from None
        checks.append((5, _m_regex(rx)))
        shown.append(("payload_regex", repr(v)))

    if "http_method" in raw:
        methods = parse("http_method", _parse_strings, "http_method", raw["http_method"],
                        'a method like "POST" or a list of them')
        checks.append((6, _m_http("method", tuple(m.upper() for m in methods))))
        shown.append(("http_method", ",".join(m.upper() for m in methods)))
    if "http_host" in raw:
        exact, suffixes, s = parse("http_host", _parse_names, "http_host", raw["http_host"])
        checks.append((6, _m_http("host", (exact, suffixes))))
        shown.append(("http_host", ",".join(s)))
    if "http_path" in raw:
        paths = parse("http_path", _parse_strings, "http_path", raw["http_path"],
                      'a path prefix like "/admin" or a list of them')
        checks.append((6, _m_http("path", paths)))
        shown.append(("http_path", ",".join(paths)))
    if "tls_sni" in raw:
        exact, suffixes, s = parse("tls_sni", _parse_names, "tls_sni", raw["tls_sni"])
        checks.append((7, _m_sni(exact, suffixes)))
        shown.append(("tls_sni", ",".join(s)))
    if "dns_qname" in raw:
        exact, suffixes, s = parse("dns_qname", _parse_names, "dns_qname", raw["dns_qname"])
        checks.append((7, _m_qname(exact, suffixes)))
        shown.append(("dns_qname", ",".join(s)))

    # sorted() is stable: equal costs keep the order above
    r.checks = [fn for _, fn in sorted(checks, key=lambda c: c[0])]
    # The protocols this rule can match at all (None: any), for RuleSet's per-protocol index.
    protos = None
    for present, allowed in ((proto is not None, (proto,)), (bool(port_keys), PORT_PROTOS),
                             ("tcp_flags" in raw, (6,)), (bool(icmp_keys), ICMP_PROTOS)):
        if present:
            protos = frozenset(allowed) if protos is None else protos & frozenset(allowed)
    r.protos = protos
    r.shown = shown

    # --- what the rule does
    r.plugin, r.plugin_ref = None, None
    if "plugin" in raw:
        r.plugin_ref = raw["plugin"]
        try:
            r.plugin = loader.load(raw["plugin"])
        except ValueError as exc:
            raise err("plugin", str(exc)) from None

    if "action" not in raw and r.plugin is None:
        raise err(None, f"rule {name!r} has no action: add action = \"drop\" (one of {', '.join(ACTIONS)})")
    action = raw.get("action", "accept")
    if action not in ACTIONS:
        hint = [a for a in ACTIONS if sorted(a) == sorted(str(action))] or \
            difflib.get_close_matches(str(action), ACTIONS, n=1)
        raise err("action", f"action {action!r}: write one of {', '.join(ACTIONS)}" +
                  (f" (did you mean {hint[0]!r}?)" if hint else ""))

    reject_with = None
    if "reject_with" in raw:
        if action != "reject":
            raise err("reject_with", f"reject_with only goes with action = \"reject\" (this rule's is {action!r})")
        reject_with = raw["reject_with"]
        if reject_with not in REJECT_WITH:
            raise err("reject_with", f"reject_with {reject_with!r}: write one of {', '.join(REJECT_WITH)}")
        if reject_with == "tcp-reset" and proto != 6:
            raise err("reject_with", 'reject_with = "tcp-reset" only answers TCP: add proto = "tcp" or use '
                                     '"icmp-port-unreachable"')
    decision_tcp = None
    if action == "reject" and reject_with is None:
        if proto == 6:
            reject_with = "tcp-reset"
        else:
            reject_with = "icmp-port-unreachable"
            if proto is None:
                decision_tcp = "tcp-reset"

    rewrite = None
    if "rewrite" in raw:
        if action != "rewrite":
            raise err("rewrite", f"rewrite only goes with action = \"rewrite\" (this rule's is {action!r})")
        rewrite = parse("rewrite", _parse_rewrite, raw["rewrite"])
    if action == "rewrite":
        if rewrite is None and r.plugin is None:
            raise err("action", 'action = "rewrite" needs a rewrite: add rewrite = { fill = "h", end = "\\n" }, '
                                '{ replace = ["from", "to"] } or { set = "text" }')
        if proto is not None and proto not in PAYLOAD_PROTOS:
            raise err("rewrite", f"rewrite needs a packet with a payload: proto {proto} is not rewritable; "
                                 f"use proto = \"tcp\", \"udp\", \"icmp\" or \"icmpv6\"")
        if payload_len == (0, 0):
            raise err("rewrite", "rewrite on a rule that only matches empty payloads (payload_len = 0): "
                                 "change payload_len or the action")

    mark = None
    if "mark" in raw:
        if action != "mark":
            raise err("mark", f"mark only goes with action = \"mark\" (this rule's is {action!r})")
        mark = parse("mark", _parse_mark, raw["mark"])
    elif action == "mark" and r.plugin is None:
        raise err("action", 'action = "mark" needs a mark: add mark = "0x10/0xff" (value/mask)')

    flow = raw.get("flow", "none")
    if flow not in FLOWS:
        raise err("flow", f"flow {flow!r}: write one of {', '.join(FLOWS)}")
    ttl = flow_ttl
    if "ttl" in raw:
        ttl = parse("ttl", _positive_int, "ttl", raw["ttl"], "seconds the flow verdict lasts, e.g. 600")
        if flow == "none" and r.plugin is None:
            raise err("ttl", "ttl is how long the flow verdict lasts: add flow = \"bypass\", \"block\" or "
                             "\"inspect\", or remove ttl")
    logged = raw.get("log", action in LOGGED_ACTIONS)
    if not isinstance(logged, bool):
        raise err("log", f"log {logged!r}: write true or false")

    r.decision = Decision(name, action, mark, rewrite, reject_with, flow, ttl, logged)
    r.decision_tcp = r.decision._replace(reject_with=decision_tcp) if decision_tcp else None
    return r


class _PluginLoader:
    """Imports ``module:function`` by file from the declared plugin directories only."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.modules: dict[str, Any] = {}

    def load(self, ref) -> Callable:
        example = 'write "module:function", with module.py in one of plugin_paths'
        if not isinstance(ref, str) or ref.count(":") != 1:
            raise ValueError(f"plugin {ref!r}: {example}")
        mod_name, func_name = ref.split(":")
        if not mod_name.isidentifier() or not func_name.isidentifier():
            raise ValueError(f"plugin {ref!r}: module and function must be plain names (no dots or paths); {example}")
        if not self.paths:
            raise ValueError(f"plugin {ref!r}: no plugin_paths declared; add plugin_paths = [\"plugins\"] at the "
                             f"top of the file and put {mod_name}.py there")
        file = next((os.path.join(p, mod_name + ".py") for p in self.paths
                     if os.path.isfile(os.path.join(p, mod_name + ".py"))), None)
        if file is None:
            raise ValueError(f"plugin {ref!r}: {mod_name}.py not found in plugin_paths "
                             f"({', '.join(self.paths)}); put it there or fix the name")
        module = self.modules.get(file)
        if module is None:
            unique = f"hybrid_plugin_{abs(hash(file)):x}_{mod_name}"
            spec = importlib.util.spec_from_file_location(unique, file)
            if spec is None or spec.loader is None:
                raise ValueError(f"plugin {ref!r}: cannot load {file}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[unique] = module          # dataclasses and pickling look modules up there
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                sys.modules.pop(unique, None)
                raise ValueError(f"plugin {ref!r}: importing {file} failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}; fix the module") from None
            self.modules[file] = module
        func = getattr(module, func_name, None)
        if func is None:
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            close = difflib.get_close_matches(func_name, names, n=1)
            raise ValueError(f"plugin {ref!r}: {file} has no {func_name!r}" +
                             (f"; did you mean {mod_name}:{close[0]}?" if close else "; define it"))
        if not callable(func):
            raise ValueError(f"plugin {ref!r}: {func_name} in {file} is not callable; point at a function")
        return func
