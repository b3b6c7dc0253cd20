"""The verdict engine's rule language: a TOML file compiled once into fast per-packet matchers.

A rules file is a list of ``[[rule]]`` tables tried in order; the first rule whose every matcher
holds decides the packet, and ``default``/``default_flow`` decide the rest. Everything that can
be computed before the first packet is (CIDRs as integers, port sets, lower-cased name suffixes,
compiled regexes, the :class:`Decision` each rule returns), and matchers are ordered so the
packet's cheap fields are tested before the lazily parsed ones (HTTP, TLS SNI, DNS name, then a
plugin).

The compiler is driven by one table, :data:`MATCH_KEYS`: a row per match key says how its value
is parsed (into a typed value the compiled rule keeps), which matcher it builds, which protocols
it implies, whether it needs a payload, and how ``hybridctl rules check`` shows it. What a rule
does (``action``, ``flow``, ``mark`` ...) is compiled after its matchers, by
:func:`_compile_decision`, since those keys depend on each other.

Every error is a :class:`RulesError` with a one-line message ``FILE:LINE: what is wrong and what
to write instead`` (the file is read through hybrid/tomlfile.py, as the service configuration
is). See ``examples/rules/`` for complete files.

Plugins (``plugin = "module:function"``) are Python code run inside the engine, which runs as
root. So a directory in ``plugin_paths``, a plugin module and every directory between the two
are checked as sshd checks authorized_keys, symlinks resolved first: each must be owned by root
and not writable by group or others, or the file is refused (a module that is a symlink must
lead to a file inside its plugin directory). When hybrid itself does not run as root (a
developer's ``hybridctl rules check``), the user it runs as may own them too; see
:func:`plugin_owners`. ``import_plugins=False`` checks plugins without running any of their
code: the module is parsed, and the function must be defined at its top level.

Hybrid's own mark bits (``mark_mask``, the attachment's ``--mark-mask``) are not a rule's to
set: the engine accepts a packet by clearing them and re-running the hook, so a rule's ``mark``
whose mask overlaps them could send the packet back to the queue for ever. Such a rule is
refused when compiled with the mask, and a plugin's Verdict carrying such a mark counts as the
plugin failing.

Packets are read through a fixed set of attributes (``version``, ``proto``, ``src_int``,
``dst_int``, ``sport``, ``dport``, ``tcp_flags``, ``icmp_type``, ``icmp_code``, ``payload``,
``payload_len``, ``fragment``, ``indev``, ``http``, ``tls_sni``, ``dns_qname``): see
``hybrid/engine/packet.py``. ``tls_sni`` is also the server_name of a QUIC ClientHello, read from
a UDP datagram's Initial packets (``hybrid/engine/quic.py``): a ``tls_sni`` rule applies to QUIC
unless its ``proto`` is "tcp"; the top-level ``quic = "block"`` drops QUIC handshakes instead.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import ipaddress
import logging
import os
import pwd
import re
import shlex
import stat
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from hybrid.engine.packet import Packet, normalize_http_path
from hybrid.engine.regexcheck import problem as regex_problem
from hybrid.kernel.abi import ICMP_PROTOS, PROTO_NAMES, PROTO_NUMBERS
from hybrid.plugin import Verdict
from hybrid.tomlfile import TomlFileError, TomlFormat, TomlSource, close_match, suggest

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

TOP_KEYS = ("default", "default_flow", "flow_ttl", "on_doubt", "plugin_paths", "quic", "dns_ports", "rule")
# What the engine does with a packet it would have bypassed its flow on but cannot be sure the
# server reads as it did (loop.py): keep the flow inspected and pass the packet, or drop it, or
# reset it (a TCP RST both ways; an ICMP error otherwise). The flow is never bypassed on it.
ON_DOUBT = ("inspect", "drop", "reset")
# What the engine does with QUIC (HTTP/3) handshakes (hybrid/engine/quic.py): read the SNI of each
# Initial's ClientHello so that tls_sni rules without proto = "tcp" apply to it, or drop every
# Initial (versions 1 and 2 on any port, any other long-header version on UDP 443), so that
# browsers fall back to TCP, where the TCP rules apply. The drop's flow verdict is a BLOCK of the
# 5-tuple under the name QUIC_BLOCK_RULE (not a rule name: those have no "=").
QUIC_MODES = ("inspect", "block")
QUIC_BLOCK_RULE = "quic=block"
RULE_KEYS = ("name", "proto", "src", "dst", "sport", "dport", "port", "tcp_flags", "iif", "fragment",
             "icmp_type", "icmp_code", "payload_len", "payload_contains", "payload_hex", "payload_regex",
             "http_method", "http_host", "http_path", "tls_sni", "dns_qname", "action", "reject_with",
             "rewrite", "mark", "flow", "ttl", "inspect_bytes", "share", "plugin", "log")
DECISION_KEYS = ("action", "reject_with", "rewrite", "mark", "flow", "ttl", "inspect_bytes", "share", "plugin", "log")
SHARE_SIDES = ("source", "destination")
SHARE_MAX = 365 * 86400          # a shared ban lasts a year at most
_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
INSPECT_BYTES_MAX = 1 << 30     # a budget's bytes at most per direction (the kernel compares sequence numbers)
REWRITE_KEYS = ("fill", "end", "replace", "set", "set_hex")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class RulesError(TomlFileError):
    """A rules file that cannot be used; ``str()`` is ``FILE:LINE: message``; ``filename``,
    ``line`` and ``reason`` (the message alone) are kept."""


RULES_FILE = TomlFormat(RulesError, "the rules file", "[[rule]] headers")


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
    # inspect_bytes: (client, server) bytes of each direction's stream the engine goes on seeing
    # after this decision, whatever the flow verdict (the kernel queues them); None: no budget.
    inspect_bytes: tuple[int, int] | None = None
    # share: ("source" | "destination", seconds, reason): the blocked packet's address that
    # the fleet bans through CrowdSec (hybrid/fleet/share.py); None: the block stays local.
    share: tuple[str, int, str] | None = None


def _listify(value) -> list:
    return value if isinstance(value, list) else [value]


# ---------------------------------------------------------------------------------------------
# value parsers: each returns the typed value a compiled rule keeps, or raises
# ValueError(message without location). Match-key parsers take (key, value).


class TcpFlags(NamedTuple):
    """A parsed ``tcp_flags``: the bits that must be set among ``mask``, and the text as written
    (upper-cased) for ``rules check``."""

    flags: int
    mask: int
    text: str


def _parse_proto(key: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError("proto: use tcp, udp, icmp, icmpv6 or an IP protocol number 0-255")
    if isinstance(value, int):
        if 0 <= value <= 255:
            return value
        raise ValueError(f"proto {value}: an IP protocol number is 0-255")
    if isinstance(value, str) and value.lower() in PROTO_NUMBERS:
        return PROTO_NUMBERS[value.lower()]
    raise ValueError(f"proto {value!r}: use tcp, udp, icmp, icmpv6 or an IP protocol number 0-255")


def _parse_cidrs(key: str, value) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks, in the order written."""
    nets = []
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
        nets.append(net)
    if not nets:
        raise ValueError(f"{key}: the list is empty; give at least one CIDR or remove the key")
    return tuple(nets)


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


def _ranged(lo: int, hi: int, example: str) -> Callable[[str, Any], tuple[int, int]]:
    return lambda key, value: _parse_range(key, value, lo, hi, example)


def _parse_ports(key: str, value) -> tuple[tuple[int, int], ...]:
    """(first, last) per port or range, in the order written (a port is (p, p))."""
    items = _listify(value)
    if not items:
        raise ValueError(f"{key}: the list is empty; give at least one port or remove the key")
    return tuple(_parse_range(key, item, 0, 65535, 'a port like 443, a range like "1000-2000", or a list of them')
                 for item in items)


def _parse_tcp_flags(key: str, value) -> TcpFlags:
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
    return TcpFlags(flags, mask, value.strip().upper())


def _parse_names(key: str, value) -> tuple[str, ...]:
    """Lower-cased names without a final dot, in the order written: "x" is exactly x, ".x" x and
    its subdomains, "*.x" its subdomains only (see :func:`_name_sets`)."""
    names = []
    items = _listify(value)
    if not items:
        raise ValueError(f"{key}: the list is empty; give at least one name or remove the key")
    for item in items:
        if not isinstance(item, str) or not item.strip(".* ") or " " in item.strip():
            raise ValueError(f"{key} {item!r}: write a name like \"example.com\", \".example.com\" (it and "
                             f"its subdomains) or \"*.example.com\" (subdomains only)")
        name = item.strip().lower().rstrip(".")
        if "*" in name and not name.startswith(("*.", ".")):
            raise ValueError(f"{key} {item!r}: a wildcard is only allowed as a leading \"*.\", "
                             f"e.g. \"*.example.com\"")
        names.append(name)
    return tuple(names)


def _parse_strings(key: str, value, example: str) -> tuple[str, ...]:
    items = _listify(value)
    if not items or not all(isinstance(i, str) and i for i in items):
        raise ValueError(f"{key} {value!r}: write {example}")
    return tuple(items)


def _strings(example: str) -> Callable[[str, Any], tuple[str, ...]]:
    return lambda key, value: _parse_strings(key, value, example)


def _parse_methods(key: str, value) -> tuple[str, ...]:
    return tuple(m.upper() for m in _parse_strings(key, value, 'a method like "POST" or a list of them'))


def _parse_bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} {value!r}: write true or false")
    return value


def _parse_contains(key: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} {value!r}: write non-empty text, e.g. \"GET /secret\"")
    return value


# A payload_regex runs on at most the first REGEX_WINDOW bytes of a payload, as if they were all
# of it (``$`` matches at the cut). 1500 holds a whole TCP or UDP payload at the usual Ethernet
# MTU (1460/1472 bytes), so ordinary traffic is read whole and no padding trick opens; only
# jumbo-MTU or loopback segments are cut. The bound is for what regexcheck misses and for what it
# accepts: a search tries every start, so even an accepted pattern (`a.*b` on a payload of `a`)
# costs up to the square of the bytes searched, about 1 ms here for 1500 bytes (64 KiB would be ~2 s).
REGEX_WINDOW = 1500


def _parse_regex(key: str, value) -> re.Pattern:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} {value!r}: write a regex in single quotes, e.g. '^\\x16\\x03'")
    try:
        rx = re.compile(value.encode("utf-8"), re.DOTALL)
    except re.error as exc:
        raise ValueError(f"{key} {value!r} does not compile: {exc}; fix the pattern (use single quotes so "
                         f"backslashes stay as written)") from None
    why = regex_problem(rx.pattern, rx.flags)
    if why is not None:
        raise ValueError(f"{key} {value!r} {why}")
    return rx


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


def _mark_overlap(written, mark: tuple[int, int], hybrid_mask: int) -> str | None:
    """Why a rule's parsed ``mark`` may not be used beside hybrid's own ``hybrid_mask``, or None."""
    val, mask = mark
    if not mask & hybrid_mask:
        return None
    whose = (f"a bare number means mask {mask:#x}, which" if isinstance(written, int) else f"its mask {mask:#x}")
    rest = mask & ~hybrid_mask
    fix = (f'leave them out: mark = "{val:#x}/{rest:#x}"' if rest and not val & hybrid_mask
           else f"use bits outside {hybrid_mask:#x}")
    return (f"mark {written!r}: {whose} overlaps hybrid's mark mask {hybrid_mask:#x}, bits the engine owns "
            f"(setting them would send the packet back to the queue for ever); {fix}")


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
            raise ValueError(f"rewrite: unknown key {k!r}, {suggest(k, REWRITE_KEYS)}")
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
    # endpos bounds the search without copying the payload (see REGEX_WINDOW)
    return lambda pkt, _s=rx.search, _w=REGEX_WINDOW: _s(pkt.payload, 0, _w) is not None


def _name_test(exact: frozenset[str], suffixes: tuple[str, ...]):
    if not suffixes:
        return exact.__contains__
    return lambda name, _e=exact, _s=suffixes: name in _e or name.endswith(_s)


def _m_http(field: str, values):
    """HTTP matchers, on the request as the server reads it (hybrid.engine.packet.HttpRequest):
    ``path`` prefixes are compared with the normalised path (nginx's location matching:
    case-sensitive, decoded, dot segments and repeated slashes resolved), so the rule's prefixes
    are normalised the same way; ``host`` names match the server's host, or any candidate of an
    ambiguous head (several Host lines, pipelined requests), which the engine also never
    bypasses."""
    if field == "method":
        def match(pkt, _v=values):
            http = pkt.http
            return http is not None and http.method in _v
    elif field == "path":
        prefixes = tuple(dict.fromkeys(normalize_http_path(v) for v in values))

        def match(pkt, _v=prefixes):
            http = pkt.http
            if http is None:
                return False
            paths = getattr(http, "paths", None)              # pipelined requests: any of them
            if paths:
                return any(p.startswith(_v) for p in paths if p)
            return http.path is not None and http.path.startswith(_v)
    else:
        test = _name_test(*values)

        def match(pkt, _t=test):
            http = pkt.http
            if http is None:
                return False
            hosts = getattr(http, "hosts", None)              # a stand-in may have none
            if hosts:                                        # ambiguous: any candidate
                return any(_t(_canon_host(h)) for h in hosts if h)
            return bool(http.host) and _t(_canon_host(http.host))
    return match


def _canon_host(host: str) -> str:
    """A host as nginx's server_name matching compares it (the parser's hosts already are; a
    plugin's or a test's may not be): lowercase, no port, no final dot."""
    host = host.lower()
    if not host.startswith("[") and ":" in host:         # strip the port; leave [v6]:port alone
        host = host.split(":", 1)[0]
    return host.removesuffix(".")


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
# matcher builders: (key, typed value) -> matcher; the lookup structures are made here, once


def _name_sets(names: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    """(exact names, suffixes) of parsed names: ".x" is x exactly and the suffix ".x"; "*.x"
    the suffix ".x" only."""
    exact, suffixes = set(), []
    for name in names:
        if name.startswith("*."):
            suffixes.append(name[1:])
        elif name.startswith("."):
            suffixes.append(name)
            exact.add(name[1:])
        else:
            exact.add(name)
    return frozenset(exact), tuple(suffixes)


def _build_ports(key: str, ports: tuple[tuple[int, int], ...]):
    singles = frozenset(a for a, b in ports if a == b)
    ranges = tuple((a, b) for a, b in ports if a != b)
    return _m_port(None if key == "port" else key, singles, ranges)


def _build_range(key: str, value: tuple[int, int]):
    a, b = value
    return _m_eq(key, a) if a == b else _m_range(key, a, b)


def _build_cidrs(key: str, nets) -> Callable:
    by_version: dict[int, list[tuple[int, int]]] = {}
    for net in nets:
        bits = net.max_prefixlen
        mask = ((1 << bits) - 1) ^ ((1 << (bits - net.prefixlen)) - 1)
        by_version.setdefault(net.version, []).append((int(net.network_address), mask))
    return _m_cidr(f"{key}_int", {v: tuple(n) for v, n in by_version.items()})


def _build_iif(key: str, names: tuple[str, ...]):
    return _m_eq("indev", names[0]) if len(names) == 1 else _m_in("indev", names)


def _show_range(value: tuple[int, int]) -> str:
    a, b = value
    return str(a) if a == b else f"{a}-{b}"


def _show_ports(value: tuple[tuple[int, int], ...]) -> str:
    return ",".join(map(_show_range, value))


def _show_all(value: tuple) -> str:
    return ",".join(map(str, value))


# Every bare TCP SYN (with or without ECN bits) the kernel flags with REASON_SYN.
_SYN_FLAG_VARIANTS = (0x02, 0x42, 0x82, 0xC2)


def _syn_tcp_flags(value: TcpFlags) -> str:
    hits = [(f & value.mask) == value.flags for f in _SYN_FLAG_VARIANTS]
    return "none" if not any(hits) else "all" if all(hits) else "some"


def _syn_all(value) -> str:
    return "all"


class MatchKey(NamedTuple):
    """One match key of a rule: how its value is read, matched, shown and reasoned about."""

    name: str
    parse: Callable[[str, Any], Any]              # (key, TOML value) -> typed value, or ValueError
    build: Callable[[str, Any], Callable] | None  # (key, typed value) -> matcher(pkt) -> bool
    cost: int                                     # matchers run cheapest first
    show: Callable[[Any], str]                    # typed value -> its text in `rules check`
    protos: frozenset[int] | None = None          # the protocols it can match (None: any); implied
    wrong_proto: str = ""                         # the error when proto is not one of them ({key})
    payload: bool = False                         # only a packet with payload can match (no SYN can)
    syn: Callable[[Any], str] | None = None       # typed value -> how it meets bare TCP SYNs: "none",
                                                  # "all" or "some" (None: "some", it may match some)
    reads: str | None = None                      # the packet view it reads that costs to compute
    excludes: tuple[str, str] | None = None       # (key, error): the two are not given together


_PORTS = frozenset(PORT_PROTOS)
_NEEDS_PORTS = '{key} needs a protocol with ports: write proto = "tcp" or "udp", or remove the port'
_ICMP = frozenset(ICMP_PROTOS)
_NEEDS_ICMP = '{key} needs proto = "icmp" or "icmpv6"'
_ICMP_NUMBER = _ranged(0, 255, 'a number 0-255 or a range like "3-5"')

# The order of the rows is the order keys are checked in (so which error a rule with several
# gets), the order `rules check` shows them, and, within one cost, the order matchers run.
# `proto` has no matcher: RuleSet indexes rules by the protocols their keys allow, so a rule is
# only ever tried on packets of those protocols.
MATCH_KEYS: tuple[MatchKey, ...] = (
    MatchKey("proto", _parse_proto, None, 0, lambda p: PROTO_NAMES.get(p, str(p)), syn=_syn_all),
    MatchKey("iif", _strings('an interface name like "eth0" or a list'), _build_iif, 1, _show_all, reads="indev"),
    MatchKey("fragment", _parse_bool, _m_eq, 1, lambda v: str(v).lower(),
             syn=lambda v: "none" if v else "all"),          # SYNs are never fragments
    MatchKey("sport", _parse_ports, _build_ports, 2, _show_ports, _PORTS, _NEEDS_PORTS),
    MatchKey("dport", _parse_ports, _build_ports, 2, _show_ports, _PORTS, _NEEDS_PORTS),
    MatchKey("port", _parse_ports, _build_ports, 2, _show_ports, _PORTS, _NEEDS_PORTS),
    MatchKey("tcp_flags", _parse_tcp_flags, lambda k, v: _m_tcp_flags(v.flags, v.mask), 2, lambda v: v.text,
             frozenset((6,)), 'tcp_flags only match TCP: write proto = "tcp" or remove tcp_flags',
             syn=_syn_tcp_flags),
    MatchKey("icmp_type", _ICMP_NUMBER, _build_range, 2, _show_range, _ICMP, _NEEDS_ICMP),
    MatchKey("icmp_code", _ICMP_NUMBER, _build_range, 2, _show_range, _ICMP, _NEEDS_ICMP),
    MatchKey("src", _parse_cidrs, _build_cidrs, 3, _show_all),
    MatchKey("dst", _parse_cidrs, _build_cidrs, 3, _show_all),
    MatchKey("payload_len", _ranged(0, 65535, 'a byte count like 32 or a range like "1-100"'), _build_range, 3,
             _show_range, syn=lambda v: "none" if v[0] > 0 else "all"),
    MatchKey("payload_contains", _parse_contains, lambda k, v: _m_contains(v.encode("utf-8")), 4, repr,
             payload=True, reads="payload",
             excludes=("payload_hex", ("give payload_contains (text) or payload_hex (bytes), not both; "
                                       "use payload_regex for more than one pattern"))),
    MatchKey("payload_hex", _parse_hex, lambda k, v: _m_contains(v), 4, bytes.hex, payload=True, reads="payload"),
    MatchKey("payload_regex", _parse_regex, lambda k, v: _m_regex(v), 5, lambda v: repr(v.pattern.decode("utf-8")),
             reads="payload"),                       # it may match an empty payload too
    MatchKey("http_method", _parse_methods, lambda k, v: _m_http("method", v), 6, _show_all, payload=True,
             reads="http"),
    MatchKey("http_host", _parse_names, lambda k, v: _m_http("host", _name_sets(v)), 6, _show_all, payload=True,
             reads="http"),
    MatchKey("http_path", _strings('a path prefix like "/admin" or a list of them'),
             lambda k, v: _m_http("path", v), 6, _show_all, payload=True, reads="http"),
    MatchKey("tls_sni", _parse_names, lambda k, v: _m_sni(*_name_sets(v)), 7, _show_all, payload=True, reads="tls_sni"),
    MatchKey("dns_qname", _parse_names, lambda k, v: _m_qname(*_name_sets(v)), 7, _show_all, payload=True,
             reads="dns_qname"),
)
_MATCH_KEY = {k.name: k for k in MATCH_KEYS}
_CONTENT_VIEWS = frozenset(("payload", "http", "tls_sni", "dns_qname"))


# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Rule:
    """One compiled rule. ``match`` keeps each match key's typed value, in MATCH_KEYS order."""

    index: int
    name: str
    line: int | None
    match: dict[str, Any]
    checks: tuple[Callable, ...]          # the matchers, cheapest first
    protos: frozenset[int] | None         # the protocols it can match (None: any)
    decision: Decision
    decision_tcp: Decision | None         # for TCP packets, when it differs (reject by protocol)
    plugin: Callable | None
    plugin_ref: str | None

    def reads(self, view: str) -> bool:
        """Whether one of its matchers reads ``view`` ("indev", "http", "tls_sni", ...)."""
        return any(_MATCH_KEY[key].reads == view for key in self.match)

    def reads_content(self) -> bool:
        """Whether one of its matchers reads the transport payload (or a view parsed from it)."""
        return any(_MATCH_KEY[key].reads in _CONTENT_VIEWS for key in self.match)


class RuleSet:
    """Compiled rules. :meth:`decide` is the per-packet entry point; ``counters`` maps each rule
    name to the packets it decided, ``plugin_errors`` each plugin rule's name to its failures."""

    def __init__(self, filename: str, rules: list[_Rule], default: Decision, plugin_paths: list[str], *,
                 mark_mask: int = 0, plugins_imported: bool = True, on_doubt: str = "inspect",
                 quic: str = "inspect", dns_ports: frozenset = frozenset((53,))):
        self.digest = 1     # set by the compiler: which rules these are (kernelcache.py)
        # The ports whose UDP datagrams and TCP messages are DNS (the dns_qname view, and the
        # engine's following of every message); Packet reads them when a rule reads the view.
        self.dns_ports = dns_ports
        self.filename = filename
        self.on_doubt = on_doubt                    # ON_DOUBT: what a doubtful packet gets
        self.quic = quic                            # QUIC_MODES: read QUIC Initials, or drop them
        self.mark_mask = mark_mask                  # hybrid's bits: a plugin's mark may not touch them
        self.plugins_imported = plugins_imported    # False: plugins were only checked (rules check)
        self._rules = rules
        self._fast = tuple((r.name, r.checks, r.decision, r.decision_tcp, r.plugin) for r in rules)
        # Per-protocol index, order kept: a packet only walks the rules that can match its
        # protocol (a UDP packet never tries the TCP-only Host and SNI rules). This is the only
        # protocol test: rules carry no matcher for proto or for the protocols keys imply.
        known = set().union(*(r.protos for r in rules if r.protos is not None))
        self._by_proto = {p: tuple(f for f, r in zip(self._fast, rules) if r.protos is None or p in r.protos)
                          for p in known}
        self._fast_other = tuple(f for f, r in zip(self._fast, rules) if r.protos is None)
        # Whether any rule reads the input interface (resolving its name costs per packet).
        self.needs_indev = any(r.reads("indev") for r in rules)
        # Whether any rule reads the TLS SNI, or the HTTP request (a plugin may read either): the
        # engine then joins ClientHellos and request heads split over TCP segments.
        self.has_plugins = plugins = any(r.plugin is not None for r in rules)
        self.needs_sni = plugins or any(r.reads("tls_sni") for r in rules)
        self.needs_http = plugins or any(r.reads("http") for r in rules)
        self.needs_join = self.needs_sni or self.needs_http
        # Whether any rule reads the DNS question: the engine then decides every DNS message of a
        # flow, not only its first (hybrid.engine.follow).
        self.needs_dns = plugins or any(r.reads("dns_qname") for r in rules)
        # The rules that decide on bytes a client sends (payload, HTTP, SNI, DNS question; any
        # plugin): their flow verdicts are scoped to the side that sent them (loop.py).
        self.content_rules = frozenset(r.name for r in rules if r.plugin is not None or r.reads_content())
        # QUIC (quic.py): whether a rule that UDP packets meet reads the SNI (a tls_sni rule with
        # no proto or proto = "udp", or a plugin), so that the engine reads QUIC Initials; and,
        # with quic = "block", the decision every Initial gets (scoped like a content rule's).
        self.needs_quic_sni = quic != "block" and any(
            (r.plugin is not None or r.reads("tls_sni")) and (r.protos is None or 17 in r.protos) for r in rules)
        self.quic_block = (Decision(QUIC_BLOCK_RULE, "drop", None, None, None, "block", default.ttl, True)
                           if quic == "block" else None)
        if self.quic_block is not None:
            self.content_rules |= {QUIC_BLOCK_RULE}
        self.reads_quic = self.needs_quic_sni or self.quic_block is not None
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

    @property
    def compiled(self) -> tuple[_Rule, ...]:
        """The compiled rules in order (``match``, ``protos``, ``decision``, ``decision_tcp``,
        ``plugin``): for analyses of the rule set such as hybrid.engine.namecache."""
        return tuple(self._rules)

    def decide(self, pkt) -> Decision:
        """The first matching rule's Decision, else the default one. Never raises for a plugin's
        sake: a plugin that fails counts as not matching."""
        if Packet.dns_ports is not self.dns_ports:      # these rules' DNS ports (one set per process)
            Packet.dns_ports = self.dns_ports
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
            return _merge_verdict(base, verdict, pkt, self.mark_mask)
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
            out.append({"order": r.index + 1, "name": r.name, "line": r.line,
                        "match": {key: _MATCH_KEY[key].show(value) for key, value in r.match.items()},
                        "plugin": r.plugin_ref, "action": d.action, "reject_with": d.reject_with,
                        "mark": None if d.mark is None else f"{d.mark[0]:#x}/{d.mark[1]:#x}",
                        "rewrite": None if d.rewrite is None else _show_rewrite(d.rewrite),
                        "flow": d.flow, "ttl": d.ttl, "log": d.log,
                        "inspect_bytes": None if d.inspect_bytes is None else
                        {"client": d.inspect_bytes[0], "server": d.inspect_bytes[1]},
                        "share": None if d.share is None else
                        {"ban": d.share[0], "duration": d.share[1], "reason": d.share[2]}})
        dd = self.default
        out.append({"order": None, "name": None, "line": None, "match": {}, "plugin": None,
                    "action": dd.action, "reject_with": None, "mark": None, "rewrite": None,
                    "flow": dd.flow, "ttl": dd.ttl, "log": dd.log, "inspect_bytes": None, "share": None})
        return out


def _syn_fit(rule: _Rule) -> str:
    """How a rule's matchers meet bare TCP SYNs: "none" (it can match none), "all" (it matches
    every one) or "some" (it may match some: addresses, ports, interfaces, regexes ...)."""
    if rule.protos is not None and 6 not in rule.protos:
        return "none"
    fit = "all"
    for key, value in rule.match.items():
        row = _MATCH_KEY[key]
        key_fit = "none" if row.payload else row.syn(value) if row.syn else "some"
        if key_fit == "none":
            return "none"
        if key_fit == "some":
            fit = "some"
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


def _merge_verdict(base: Decision, v, pkt, mark_mask: int = 0) -> Decision:
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
    if action == "mark" and mark_mask and mark[1] & mark_mask:
        raise ValueError(f"Verdict mark {mark[0]:#x}/{mark[1]:#x} overlaps hybrid's mark mask {mark_mask:#x} (the "
                         f"packet would be queued again for ever); not applied")
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
                    flow, ttl, bool(logged), share=base.share if action in ("drop", "reject") else None)


# ---------------------------------------------------------------------------------------------
# compiler


def load_rules(path: str | os.PathLike, flow_ttl: int | None = None, *, mark_mask: int = 0,
               import_plugins: bool = True) -> RuleSet:
    """Read and compile a rules file; RulesError (a ConfigError) if it cannot be used.
    ``flow_ttl``, when given, replaces the file's ``flow_ttl`` (the service configuration's).
    ``mark_mask``: hybrid's own mark bits, which no rule's or plugin's mark may touch (0: not
    checked). ``import_plugins=False``: check each plugin (ownership, modes, the function defined
    at the module's top level) without running its code; the RuleSet then only describes the
    rules (deciding a packet with such a plugin counts as the plugin failing)."""
    return _compile(RULES_FILE.read(path), flow_ttl, mark_mask, import_plugins)


def compile_rules(text: str, filename: str = "<rules>", flow_ttl: int | None = None, *, mark_mask: int = 0,
                  import_plugins: bool = True) -> RuleSet:
    """Compile rules from TOML ``text``; ``filename`` names it in errors and anchors plugin_paths.
    The keyword arguments are :func:`load_rules`'s."""
    return _compile(RULES_FILE.parse(text, filename), flow_ttl, mark_mask, import_plugins)


def _compile(src: TomlSource, flow_ttl: int | None, mark_mask: int, import_plugins: bool) -> RuleSet:
    doc, filename = src.doc, src.filename
    for key in doc:
        if key not in TOP_KEYS:
            if key in RULE_KEYS:
                raise src.error(None, key, f"{key!r} is a rule key: put it under a [[rule]] header")
            raise src.error(None, key, f"unknown top-level key {key!r}, {suggest(key, TOP_KEYS)}")

    default_action = doc.get("default", "accept")
    if default_action not in DEFAULT_ACTIONS:
        raise src.error(None, "default", f"default {default_action!r}: write \"accept\" or \"drop\"")
    default_flow = doc.get("default_flow", "none")
    if default_flow not in FLOWS:
        raise src.error(None, "default_flow", f"default_flow {default_flow!r}: write one of {', '.join(FLOWS)}")
    on_doubt = doc.get("on_doubt", "inspect")
    if on_doubt not in ON_DOUBT:
        raise src.error(None, "on_doubt", f"on_doubt {on_doubt!r}: write one of {', '.join(ON_DOUBT)}")
    quic = doc.get("quic", "inspect")
    if quic not in QUIC_MODES:
        raise src.error(None, "quic", f"quic {quic!r}: write \"inspect\" (tls_sni rules read QUIC's SNI) or "
                                      f"\"block\" (drop every QUIC handshake; browsers fall back to TCP)")
    dns_ports = doc.get("dns_ports", [53])
    if (not isinstance(dns_ports, list) or not dns_ports or
            not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in dns_ports)):
        raise src.error(None, "dns_ports", f"dns_ports {dns_ports!r}: write a list of ports, e.g. [53, 5353] "
                                           "(the ports whose traffic is DNS; 53 only when absent)")
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
        unsafe = _unsafe(full, os.path.realpath(full))
        if unsafe:
            raise src.error(None, "plugin_paths", f"plugin_paths {p!r}: {unsafe}")
        plugin_paths.append(full)

    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise src.error(None, "rule", "rules are an array of tables: write each one under a [[rule]] header")

    default = Decision(None, default_action, None, None, None, default_flow, flow_ttl,
                       default_action in LOGGED_ACTIONS)
    loader = _PluginLoader(plugin_paths, import_plugins)
    rules: list[_Rule] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_rules):
        rule = _compile_rule(src, index, raw, flow_ttl, loader, mark_mask)
        if rule.name in seen:
            raise src.error(("rule", index), "name", f"duplicate rule name {rule.name!r} (first at line "
                                                     f"{seen[rule.name]}); give every rule a unique name")
        seen[rule.name] = rule.line or 0
        rules.append(rule)
    rs = RuleSet(filename, rules, default, plugin_paths, mark_mask=mark_mask, plugins_imported=import_plugins,
                 on_doubt=on_doubt, quic=quic, dns_ports=frozenset(dns_ports))
    # Which rules these are, for the kernel's name cache (hybrid/engine/kernelcache.py): 32 bits of
    # the SHA-256 of the very text compiled and the TTL override, never 0.
    h = hashlib.sha256(src.text.encode() + repr(flow_ttl).encode())
    rs.digest = int.from_bytes(h.digest()[:4], "little") or 1
    return rs


def _compile_rule(src: TomlSource, index: int, raw, flow_ttl: int, loader: _PluginLoader, mark_mask: int) -> _Rule:
    place = ("rule", index)
    if not isinstance(raw, dict):
        raise src.error(place, None, "each rule is a table under a [[rule]] header")

    def err(key: str | None, message: str) -> RulesError:
        return src.error(place, key, message)

    for key in raw:
        if key not in RULE_KEYS:
            raise err(key, f"unknown rule key {key!r}, {suggest(key, RULE_KEYS)}")

    name = raw.get("name")
    if name is None:
        raise err(None, 'rule without a name: add name = "..." (unique, letters, digits, -_.:)')
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise err("name", f"name {name!r}: use 1-64 letters, digits or -_.: starting with a letter or digit")

    match = _compile_match(raw, err)
    plugin = None
    if "plugin" in raw:
        try:
            plugin = loader.load(raw["plugin"])
        except ValueError as exc:
            raise err("plugin", str(exc)) from None
    decision, decision_tcp = _compile_decision(raw, err, name, match, plugin, flow_ttl, mark_mask)

    checks, protos = _matchers(match)
    return _Rule(index, name, src.line(place), match, checks, protos, decision, decision_tcp, plugin,
                 raw.get("plugin"))


def _compile_match(raw: dict, err: Callable[[str | None, str], RulesError]) -> dict[str, Any]:
    """Each match key of the rule, parsed into its typed value, in MATCH_KEYS order."""
    match: dict[str, Any] = {}
    for row in MATCH_KEYS:
        if row.name not in raw:
            continue
        if row.excludes is not None and row.excludes[0] in raw:
            raise err(*row.excludes)
        proto = match.get("proto")          # proto is the first row: set when the rule gives one
        if row.protos is not None and proto is not None and proto not in row.protos:
            raise err(row.name, row.wrong_proto.format(key=row.name))
        try:
            match[row.name] = row.parse(row.name, raw[row.name])
        except ValueError as exc:
            raise err(row.name, str(exc)) from None
    return match


def _matchers(match: dict[str, Any]) -> tuple[tuple[Callable, ...], frozenset[int] | None]:
    """The rule's matchers, cheapest first, and the protocols it can match at all (None: any),
    for RuleSet's per-protocol index."""
    checks: list[tuple[int, Callable]] = []
    protos = frozenset((match["proto"],)) if "proto" in match else None
    for key, value in match.items():
        row = _MATCH_KEY[key]
        if row.build is not None:
            checks.append((row.cost, row.build(key, value)))
        if row.protos is not None:
            protos = row.protos if protos is None else protos & row.protos
    checks.sort(key=lambda c: c[0])         # stable: equal costs keep the table's order
    return tuple(fn for _, fn in checks), protos


def _compile_decision(raw: dict, err: Callable[[str | None, str], RulesError], name: str, match: dict[str, Any],
                      plugin: Callable | None, flow_ttl: int, mark_mask: int) -> tuple[Decision, Decision | None]:
    """What the rule does: its Decision and, when a reject answers TCP differently, the one for
    TCP packets. These keys depend on each other (action says which of reject_with, rewrite and
    mark belong), so they are checked in this order, not through a table. A mark may not touch
    ``mark_mask``, hybrid's own bits."""
    def parse(key, fn, *args):
        try:
            return fn(*args)
        except ValueError as exc:
            raise err(key, str(exc)) from None

    proto, payload_len = match.get("proto"), match.get("payload_len")
    if "action" not in raw and plugin is None:
        raise err(None, f"rule {name!r} has no action: add action = \"drop\" (one of {', '.join(ACTIONS)})")
    action = raw.get("action", "accept")
    if action not in ACTIONS:
        hint = close_match(str(action), ACTIONS)
        raise err("action", f"action {action!r}: write one of {', '.join(ACTIONS)}" +
                  (f" (did you mean {hint!r}?)" if hint else ""))

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
        if rewrite is None and plugin is None:
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
        overlap = _mark_overlap(raw["mark"], mark, mark_mask)
        if overlap:
            raise err("mark", overlap)
    elif action == "mark" and plugin is None:
        raise err("action", 'action = "mark" needs a mark: add mark = "0x10/0xff" (value/mask)')

    flow = raw.get("flow", "none")
    if flow not in FLOWS:
        raise err("flow", f"flow {flow!r}: write one of {', '.join(FLOWS)}")
    ttl = flow_ttl
    if "ttl" in raw:
        ttl = parse("ttl", _positive_int, "ttl", raw["ttl"], "seconds the flow verdict lasts, e.g. 600")
        if flow == "none" and plugin is None:
            raise err("ttl", "ttl is how long the flow verdict lasts: add flow = \"bypass\", \"block\" or "
                             "\"inspect\", or remove ttl")
    logged = raw.get("log", action in LOGGED_ACTIONS)
    if not isinstance(logged, bool):
        raise err("log", f"log {logged!r}: write true or false")

    budget = None
    if "inspect_bytes" in raw:
        budget = parse("inspect_bytes", _parse_inspect_bytes, raw["inspect_bytes"])
        if action in ("drop", "reject") or flow == "block":
            raise err("inspect_bytes", "inspect_bytes keeps a flow's first bytes in view after the decision; "
                                       "a rule that drops or blocks has nothing left to see: remove one of them")
        if proto is not None and proto != 6:
            raise err("inspect_bytes", 'inspect_bytes counts a TCP stream\'s bytes: add proto = "tcp" or remove it')

    share = None
    if "share" in raw:
        share = parse("share", _parse_share, raw["share"], name)
        if action not in ("drop", "reject"):
            raise err("share", f"share reports a block to the fleet: it goes with action = \"drop\" or \"reject\" "
                               f"(this rule's is {action!r})")

    decision = Decision(name, action, mark, rewrite, reject_with, flow, ttl, logged, budget, share)
    return decision, (decision._replace(reject_with=decision_tcp) if decision_tcp else None)


def _parse_inspect_bytes(value) -> tuple[int, int]:
    """``inspect_bytes = 65536`` (the client's bytes) or ``{ client = 65536, server = 4096 }``."""
    def count(v, what):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= INSPECT_BYTES_MAX:
            raise ValueError(f"{what} {v!r}: write a number of bytes from 0 to {INSPECT_BYTES_MAX}")
        return v
    if isinstance(value, dict):
        unknown = set(value) - {"client", "server"}
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r}: write {{ client = 65536, server = 0 }}")
        budget = (count(value.get("client", 0), "client"), count(value.get("server", 0), "server"))
    else:
        budget = (count(value, "inspect_bytes"), 0)
    if budget == (0, 0):
        raise ValueError("a budget of 0 bytes both ways sees nothing: remove inspect_bytes")
    return budget


def parse_duration(value) -> int:
    """Seconds: an integer, or "4h", "30m", "1h30m", "2d", "90s"."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and value and (m := _DURATION_RE.fullmatch(value.strip())) and any(m.groups()):
        d, h, mi, sec = (int(g or 0) for g in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + sec
    else:
        raise ValueError(f"{value!r}: write seconds or a duration like \"4h\", \"30m\", \"1h30m\", \"2d\"")
    if not 0 < seconds <= SHARE_MAX:
        raise ValueError(f"{value!r}: a duration from 1 second to 365 days")
    return seconds


def _parse_share(value, rule: str) -> tuple[str, int, str]:
    """``share = { ban = "source", duration = "4h", reason = "..." }``: which address of the
    blocked packet the fleet bans, for how long, and why (the alert's message)."""
    example = '{ ban = "source", duration = "4h", reason = "scanner" }'
    if not isinstance(value, dict):
        raise ValueError(f"write a table, e.g. share = {example}")
    unknown = set(value) - {"ban", "duration", "reason"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} in share: write {example}")
    side = value.get("ban")
    if side not in SHARE_SIDES:
        raise ValueError(f"ban {side!r}: write ban = \"source\" or \"destination\" (the blocked packet's "
                         "address the fleet bans; there is no default: a name rule's destination may be a CDN)")
    if "duration" not in value:
        raise ValueError(f"share needs a duration, e.g. share = {example}")
    try:
        seconds = parse_duration(value["duration"])
    except ValueError as exc:
        raise ValueError(f"duration {exc}") from None
    reason = value.get("reason", f"blocked by hybrid rule {rule}")
    if not isinstance(reason, str) or not reason or len(reason) > 256 or not reason.isprintable():
        raise ValueError("reason: write a short text (at most 256 printable characters)")
    return side, seconds, reason


def plugin_owners() -> tuple[int, ...]:
    """The user ids a plugin directory or module may be owned by: root; and, when hybrid does not
    run as root (a developer checking a rules file), also the user it runs as."""
    euid = os.geteuid()
    return (0,) if euid == 0 else (0, euid)


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _unsafe(named: str, real: str) -> str | None:
    """Why ``real`` (``named`` with its symlinks resolved) may not hold plugin code, with the
    command that fixes it; None when it may: owned by one of :func:`plugin_owners` and not
    writable by group or others."""
    try:
        st = os.stat(real)
    except OSError as exc:
        return f"cannot check {real}: {exc.strerror}"
    owners = plugin_owners()
    foreign, writable = st.st_uid not in owners, st.st_mode & 0o022
    if not foreign and not writable:
        return None
    faults = []
    if foreign:
        faults.append(f"owned by {_user(st.st_uid)}, not root" +
                      (f" or you ({_user(owners[1])})" if len(owners) > 1 else ""))
    if writable:
        who = {0o020: "group", 0o002: "others"}.get(writable, "group and others")
        faults.append(f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})")
    quoted = shlex.quote(real)
    fix = f"chown root: {quoted} && chmod go-w {quoted}" if foreign else f"chmod go-w {quoted}"
    shown = real if real == named else f"{real} (where {named} leads)"
    return f"{shown} is {' and '.join(faults)}; plugins run as root in the engine: run {fix}"


def _top_level_names(body: list[ast.stmt]) -> list[str]:
    """The names a module's statements bind at its top level (also inside top-level if, try,
    with and loops: ``try: import x``), in order."""
    names: list[str] = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names += _bound(target)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            names += _bound(node.target)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [a.asname or a.name.split(".")[0] for a in node.names if a.name != "*"]
        elif isinstance(node, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try,
                               getattr(ast, "TryStar", ast.Try))):
            for part in ("body", "orelse", "finalbody"):
                names += _top_level_names(getattr(node, part, []))
            for handler in getattr(node, "handlers", []):
                names += _top_level_names(handler.body)
    return names


def _bound(target: ast.expr) -> list[str]:
    """The names an assignment target binds: ``a``, ``a, (b, *c)``; not ``a.x`` or ``a[0]``."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Starred):
        return _bound(target.value)
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for elt in target.elts for n in _bound(elt)]
    return []


class _Unimported:
    """Stands for a plugin that was checked, not imported (``hybridctl rules check``): its
    RuleSet describes the rules; a packet decided with it counts as the plugin failing."""

    def __init__(self, ref: str):
        self.ref = ref

    def __call__(self, pkt):
        raise RuntimeError(f"plugin {self.ref!r} was checked, not imported")


class _PluginLoader:
    """Finds ``module:function`` by file in the declared plugin directories only, refuses a file
    that is not safe to run as root (see :func:`_unsafe`), then imports it, or, with
    ``import_plugins=False``, only checks that the function is defined at its top level."""

    def __init__(self, paths: list[str], import_plugins: bool = True):
        self.paths = paths
        self.import_plugins = import_plugins
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
        found = next(((p, os.path.join(p, mod_name + ".py")) for p in self.paths
                      if os.path.isfile(os.path.join(p, mod_name + ".py"))), None)
        if found is None:
            raise ValueError(f"plugin {ref!r}: {mod_name}.py not found in plugin_paths "
                             f"({', '.join(self.paths)}); put it there or fix the name")
        real = self._checked(ref, *found)
        file = found[1]
        if not self.import_plugins:
            return self._parsed(ref, file, real, mod_name, func_name)
        module = self.modules.get(real)
        if module is None:
            unique = f"hybrid_plugin_{abs(hash(real)):x}_{mod_name}"
            spec = importlib.util.spec_from_file_location(unique, real)
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
            self.modules[real] = module
        func = getattr(module, func_name, None)
        if func is None:
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise ValueError(self._missing(ref, file, mod_name, func_name, names))
        if not callable(func):
            raise ValueError(f"plugin {ref!r}: {func_name} in {file} is not callable; point at a function")
        return func

    @staticmethod
    def _checked(ref: str, plugin_dir: str, file: str) -> str:
        """The module's real path, once it and every directory from it up to its plugin
        directory are safe (sshd's check of authorized_keys); ValueError otherwise."""
        real, top = os.path.realpath(file), os.path.realpath(plugin_dir)
        if not real.startswith(top.rstrip(os.sep) + os.sep):
            raise ValueError(f"plugin {ref!r}: {file} leads to {real}, outside its plugin directory {top}; "
                             f"put the module itself there, or add its directory to plugin_paths")
        path, named = real, file
        while True:
            unsafe = _unsafe(named, path)
            if unsafe:
                raise ValueError(f"plugin {ref!r}: {unsafe}")
            if path == top:
                return real
            path = named = os.path.dirname(path)

    @staticmethod
    def _parsed(ref: str, file: str, real: str, mod_name: str, func_name: str) -> Callable:
        """Check without running anything: ``func_name`` is bound at the module's top level."""
        try:
            with open(real, "rb") as fh:
                tree = ast.parse(fh.read(), filename=file)
        except OSError as exc:
            raise ValueError(f"plugin {ref!r}: cannot read {file}: {exc.strerror}") from None
        except (SyntaxError, ValueError) as exc:
            where = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
            raise ValueError(f"plugin {ref!r}: {file} does not parse: {type(exc).__name__}: "
                             f"{getattr(exc, 'msg', None) or exc}{where}; fix the module") from None
        names = _top_level_names(tree.body)
        if func_name not in names:
            raise ValueError(_PluginLoader._missing(ref, file, mod_name, func_name,
                                                    [n for n in names if not n.startswith("_")]))
        return _Unimported(ref)

    @staticmethod
    def _missing(ref: str, file: str, mod_name: str, func_name: str, names: list[str]) -> str:
        close = close_match(func_name, names)
        return (f"plugin {ref!r}: {file} has no {func_name!r}" +
                (f"; did you mean {mod_name}:{close}?" if close else "; define it"))
