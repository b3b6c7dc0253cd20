"""The attach options, declared once.

One record per option (:class:`Option`) says everything there is to say about it: its key in the
configuration file's ``[attach]`` table, its command-line spelling, the parser that validates and
normalises a value, its default and its help text. Everything else is derived from :data:`ATTACH`:

- the ``[attach]`` fields of the configuration file (hybrid.service.config), whose other
  sections are declared with the same record;
- the options of ``hybridctl attach``, and the override options of ``hybridctl run`` and
  ``hybridctl config show`` (cli/config.py), with the same help text;
- :class:`AttachOptions`, what :func:`hybrid.datapath.attach.attach` takes: its defaults, and
  its :meth:`~AttachOptions.validate`.

A parser takes a value as the configuration file gives it (a TOML string, number, boolean or
list), as the command line gives it (a string), or already normalised (parsing again changes
nothing), and returns the normalised value or raises :class:`BadValue`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hybrid.errors import ConfigError
from hybrid.kernel import abi, netfilter

XDP_MODES = ("auto", "native", "generic", "off")
OVER_BUDGET = ("pass", "drop")
DEFAULT_MARK = 0x00100000   # bit 20: clear of kube-proxy (0x4000/0x8000), Cilium (0x0F00-0xFF00),
DEFAULT_MASK = 0x00100000   # Istio (0x539) and Weave (0x20000/0x40000); configurable for the rest
# Flagged packets per second for the whole gateway, on by default: about half of what one engine
# decides per second with realistic rules on the reference machine (docs/benchmarks.md, "the
# verdict engine against a bare consumer"), leaving room for a slower box and for the kernel's
# own work on the queue. 0 turns it off.
DEFAULT_GLOBAL_RATE = 40_000
DEFAULT_FIRST_N = 3         # payload packets per direction; see docs/design.md for why 3
DEFAULT_REASONS = tuple(abi.REASON_BITS)   # every reason, as written on the command line
REQUIRED = object()         # the default of an option that has none


# -- value parsers ----------------------------------------------------------------------------------

class BadValue(ValueError):
    """A value a parser refuses. ``str()`` says what is wrong in the configuration file's terms
    (``'x': write a queue number or a range, e.g. 0 or "0-1"``); ``arg``, when set, says it in
    the command line's, where strings need no quotes and lists are written differently
    (``'x': use N or FIRST-LAST, e.g. 0 or 0-1``)."""

    def __init__(self, message: str, arg: str | None = None):
        super().__init__(message)
        self.arg = arg


class Int:
    """An integer from ``lo`` to ``hi``; a string may be decimal or 0x-hex. ``hex``: written as
    0x... (by ``config show``, in examples and in defaults)."""

    def __init__(self, lo: int, hi: int, example: int, *, hex: bool = False):
        self.lo, self.hi, self.example, self.hex = lo, hi, example, hex

    def __call__(self, value) -> int:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text, 10 if text.isdigit() else 0)
            except ValueError:
                raise self._not_a_number(value) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._not_a_number(value)
        if not self.lo <= value <= self.hi:
            raise BadValue(f"{value}: use {self.lo} to {self.hi}")
        return value

    def _not_a_number(self, value) -> BadValue:
        if self.hex:
            return BadValue(f"{value!r}: write a number, e.g. {self.example:#x}",
                            arg=f"{value!r}: expected a number like {self.example} or {self.example:#x}")
        return BadValue(f"{value!r}: write a number, e.g. {self.example}")


def boolean(value) -> bool:
    if isinstance(value, bool):
        return value
    raise BadValue(f"{value!r}: write true or false (no quotes)")


class Choice:
    def __init__(self, choices: tuple[str, ...]):
        self.choices = tuple(choices)

    def __call__(self, value) -> str:
        if isinstance(value, str) and value in self.choices:
            return value
        raise BadValue(f"{value!r}: write one of {', '.join(self.choices)}")


def _first_twice(items: list):
    return next((v for i, v in enumerate(items) if v in items[:i]), None)


class List:
    """A list of ``item`` values (a single value is a list of one)."""

    def __init__(self, item: Callable[[Any], Any], *, nonempty: bool = False):
        self.item, self.nonempty = item, nonempty

    def __call__(self, value) -> list:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        out = [self.item(v) for v in items]
        if self.nonempty and not out:
            raise BadValue("the list is empty; give at least one")
        dup = _first_twice(out)
        if dup is not None:
            raise BadValue(f"{dup!r} is given twice; keep one")
        return out


class Subset:
    """Some of ``choices``: a list, or one string of comma-separated names."""

    def __init__(self, choices: tuple[str, ...]):
        self.choices = tuple(choices)

    def __call__(self, value) -> list[str]:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if not (isinstance(v, str) and v in self.choices):
                names = ", ".join(self.choices)
                raise BadValue(f"{v!r}: write one of {names}", arg=f"{v!r}: use a comma-separated list of {names}")
        dup = _first_twice(items)
        if dup is not None:
            raise BadValue(f"{dup!r} is given twice; keep one")
        return items


def ifname(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[^\s/:]{1,15}", value):
        raise BadValue(f"{value!r}: an interface name is 1-15 characters without spaces, '/' or ':', "
                       "e.g. \"eth0\"")
    return value


def cidr(value) -> str:
    """An IPv4 or IPv6 prefix, normalised (host bits cleared: "203.0.113.7/24" -> "203.0.113.0/24")."""
    if not isinstance(value, str):
        raise BadValue(f"{value!r}: write a CIDR string like \"198.18.0.0/15\" or \"2001:db8::/32\"")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise BadValue(f"{value!r}: not an IPv4 or IPv6 CIDR; write e.g. \"198.18.0.0/15\" or \"2001:db8::/32\"",
                       arg=f"{value!r} is not an IPv4 or IPv6 CIDR (e.g. 198.18.0.0/15 or 2001:db8::/32)") from None


def queues(value) -> str:
    """An NFQUEUE number or range: 0, "2", "0-3" -> "0", "2", "0-3"."""
    syntax = BadValue(f"{value!r}: write a queue number or a range, e.g. 0 or \"0-1\"",
                      arg=f"{value!r}: use N or FIRST-LAST, e.g. 0 or 0-1")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise syntax
    first, sep, last = str(value).partition("-")
    try:
        a, b = int(first), int(last if sep else first)
    except ValueError:
        raise syntax from None
    if not 0 <= a <= b <= 65535:
        raise BadValue(f"{value!r}: need 0 <= first <= last <= 65535",
                       arg=f"{value!r}: need 0 <= FIRST <= LAST <= 65535")
    return str(a) if a == b else f"{a}-{b}"


def queue_range(queues: str) -> tuple[int, int]:
    """(first, last) of a normalised queues value."""
    first, _, last = queues.partition("-")
    return int(first), int(last or first)


# -- the option record, and the attach options -------------------------------------------------------

@dataclass(frozen=True)
class Option:
    key: str                     # in the configuration file's table ``section``
    cli: str                     # the command-line option: "--mark-mask", "--fail-open/--fail-closed"
    parse: Callable[[Any], Any]  # the one validator: value -> normalised value, or BadValue
    default: Any                 # normalised, or REQUIRED
    help: str
    kind: str = "value"          # value | list (repeatable; a TOML list) | flag (--x/--no-x) | commas (a,b)
    metavar: str | None = None   # None: derived from the parser
    section: str = "attach"

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def option(self) -> str:
        """The command-line option that sets it (the first spelling of a flag)."""
        return self.cli.split("/")[0]

    @property
    def hex(self) -> bool:
        return getattr(self.parse, "hex", False)


ATTACH: tuple[Option, ...] = (
    Option("interfaces", "--interface", List(ifname, nonempty=True), REQUIRED,
           "Interfaces to attach to (a gateway: both sides).", "list", "IFACE"),
    Option("xdp_mode", "--xdp-mode", Choice(XDP_MODES), "auto",
           "auto: native XDP on physical NICs, none on veth/virtual links (measured: XDP costs throughput "
           "there and tc drops just as early); off: tc only."),
    Option("hook", "--hook", List(Choice(tuple(netfilter.HOOKS)), nonempty=True), ["forward"],
           "Netfilter hooks whose marked packets are queued (forward: a gateway; input: a host).", "list"),
    Option("mark", "--mark", Int(1, 0xFFFFFFFF, DEFAULT_MARK, hex=True), DEFAULT_MARK,
           "Bit(s) set on flagged packets (decimal or 0x-hex)."),
    Option("mark_mask", "--mark-mask", Int(1, 0xFFFFFFFF, DEFAULT_MASK, hex=True), DEFAULT_MASK,
           "Bits hybrid owns in the packet mark; others are never touched."),
    Option("queues", "--queues", queues, "0",
           "NFQUEUE number, or a range spread with --queue-balance (one engine process per queue).",
           metavar="N|A-B"),
    Option("fail_open", "--fail-open/--fail-closed", boolean, True,
           "With no engine bound or a full queue: let flagged packets pass (--queue-bypass) or drop them.",
           "flag"),
    Option("queue_cpu_fanout", "--queue-cpu-fanout/--queue-balance-by-address", boolean, False,
           "With a range of queues: pick the queue by the CPU the packet is on, not by a hash of its "
           "addresses (which sends every connection between two hosts to one engine). Needs a NIC that "
           "keeps each flow on one CPU (RSS) for split ClientHellos and request heads to be joined.", "flag"),
    Option("flag", "--flag", Subset(DEFAULT_REASONS), list(DEFAULT_REASONS),
           f"Flag reasons to enable, comma-separated ({', '.join(DEFAULT_REASONS)}).", "commas", "R1,R2"),
    Option("first_n", "--first-n", Int(0, 1_000_000, DEFAULT_FIRST_N), DEFAULT_FIRST_N,
           "Payload-carrying packets queued per direction at the start of every flow."),
    Option("watch_port", "--watch-port", List(Int(1, 65535, 53)), [],
           "Queue every packet of flows on these ports.", "list", "PORT"),
    Option("watch_prefix", "--watch-prefix", List(cidr), [],
           "Queue every packet from or to these prefixes.", "list", "CIDR"),
    Option("block_prefix", "--block-prefix", List(cidr), [],
           "Drop every packet from or to these prefixes in the kernel.", "list", "CIDR"),
    Option("family", "--family", List(Choice(tuple(netfilter.FAMILIES)), nonempty=True), ["ipv4", "ipv6"],
           "Netfilter families to install the queue rule in.", "list"),
    Option("flow_table_size", "--flow-table-size", Int(1024, 1 << 24, abi.FLOW_TABLE_SIZE), abi.FLOW_TABLE_SIZE,
           "Entries in the kernel flow table (LRU)."),
    Option("source_rate", "--source-rate", Int(0, 100_000_000, 100), 0,
           "Admission: new flows per second one source may send to the engine (0: off)."),
    Option("source_burst", "--source-burst", Int(0, 100_000_000, 200), 0,
           "Admission: burst allowed above the source rate (0: one second's worth)."),
    Option("global_rate", "--global-rate", Int(0, 100_000_000, 50000), DEFAULT_GLOBAL_RATE,
           "Admission: flagged packets per second for the whole gateway, so the engine is never flooded "
           "(0: off)."),
    Option("global_burst", "--global-burst", Int(0, 100_000_000, 100000), 0,
           "Admission: burst allowed above the global rate (0: one second's worth)."),
    Option("name_cache", "--name-cache/--no-name-cache", boolean, False,
           "Read the DNS name, TLS SNI or HTTP Host of each new flow's first payload in the kernel and "
           "decide names the engine has already decided there (the name-verdict cache; docs/design.md).",
           "flag"),
    Option("over_budget", "--over-budget", Choice(OVER_BUDGET), "pass",
           "An over-budget flagged packet without payload: pass it unflagged, or drop it. One with payload "
           "is always dropped (never passed uninspected)."),
)
BY_KEY = {o.key: o for o in ATTACH}

# The AttachOptions field of each key whose name differs (queues fills queue_first and queue_last).
_FIELD = {"hook": "hooks", "flag": "reasons", "watch_port": "watch_ports", "watch_prefix": "watch_prefixes",
          "block_prefix": "block_prefixes", "family": "families"}


def _fields_of(opt: Option, value) -> dict[str, Any]:
    """The AttachOptions fields that one option's normalised value fills."""
    if opt.key == "queues":
        first, last = queue_range(value)
        return {"queue_first": first, "queue_last": last}
    if opt.key == "interfaces":
        return {"interfaces": list(value)}
    if isinstance(value, list):
        value = tuple(value)
    return {_FIELD.get(opt.key, opt.key): value}


_DEFAULTS = {name: value for o in ATTACH if o.default is not REQUIRED
             for name, value in _fields_of(o, o.default).items()}


@dataclass
class AttachOptions:
    """What attach() does, as typed fields; the defaults are ATTACH's."""

    interfaces: list[str]
    xdp_mode: str = _DEFAULTS["xdp_mode"]
    hooks: tuple[str, ...] = _DEFAULTS["hooks"]
    mark: int = _DEFAULTS["mark"]
    mark_mask: int = _DEFAULTS["mark_mask"]
    queue_first: int = _DEFAULTS["queue_first"]
    queue_last: int = _DEFAULTS["queue_last"]
    fail_open: bool = _DEFAULTS["fail_open"]
    queue_cpu_fanout: bool = _DEFAULTS["queue_cpu_fanout"]
    reasons: tuple[str, ...] = _DEFAULTS["reasons"]
    first_n: int = _DEFAULTS["first_n"]
    watch_ports: tuple[int, ...] = _DEFAULTS["watch_ports"]
    watch_prefixes: tuple[str, ...] = _DEFAULTS["watch_prefixes"]
    block_prefixes: tuple[str, ...] = _DEFAULTS["block_prefixes"]
    families: tuple[str, ...] = _DEFAULTS["families"]
    flow_table_size: int = _DEFAULTS["flow_table_size"]
    # Admission control (docs/design.md): budgets on flagged packets, so the engine can never be
    # flooded. 0 = off. source_rate: flows a single source may start per second (flagged SYNs and
    # first packets of new flows); global_rate: flagged packets per second for the whole gateway.
    # A burst of 0 means "one second's worth". over_budget: what happens to a flagged packet
    # over budget that carries no payload ("pass" it unflagged, or "drop" it); one that carries
    # payload is always dropped, so a flood can never push payload past the engine uninspected.
    source_rate: int = _DEFAULTS["source_rate"]
    source_burst: int = _DEFAULTS["source_burst"]
    global_rate: int = _DEFAULTS["global_rate"]
    global_burst: int = _DEFAULTS["global_burst"]
    over_budget: str = _DEFAULTS["over_budget"]
    name_cache: bool = _DEFAULTS["name_cache"]

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> AttachOptions:
        """From ``{key: normalised value}`` (as ATTACH's parsers return them; ``interfaces``
        required); a key left out takes its default."""
        fields: dict[str, Any] = {}
        for opt in ATTACH:
            if opt.key in values:
                fields.update(_fields_of(opt, values[opt.key]))
        return cls(**fields)

    def values(self) -> dict[str, Any]:
        """``{key: value}``, the form ATTACH's parsers take."""
        out = {}
        for opt in ATTACH:
            if opt.key == "queues":
                out[opt.key] = f"{self.queue_first}-{self.queue_last}"
                continue
            value = getattr(self, _FIELD.get(opt.key, opt.key))
            out[opt.key] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    def validate(self) -> None:
        """ConfigError unless every option is one its parser accepts and together they make a
        queue rule."""
        if not self.interfaces:
            raise ConfigError("name at least one interface to attach to")
        if len(set(self.interfaces)) != len(self.interfaces):
            raise ConfigError("an interface is named twice")
        for key, value in self.values().items():
            try:
                BY_KEY[key].parse(value)
            except BadValue as exc:
                raise ConfigError(f"{key} {exc}") from None
        self.queue_rule()  # the mark inside its mask, queue-cpu-fanout with a range

    def queue_rule(self) -> netfilter.QueueRule:
        return netfilter.QueueRule(self.mark, self.mark_mask, self.queue_first, self.queue_last,
                                   self.fail_open, self.queue_cpu_fanout, tuple(self.hooks), tuple(self.families))

    def config(self) -> abi.Config:
        cfg = abi.Config()
        cfg.mark_value = self.mark
        cfg.mark_mask = self.mark_mask
        cfg.reasons = sum(abi.REASON_BITS[r] for r in set(self.reasons))
        cfg.first_n = self.first_n
        if self.over_budget == "drop":
            cfg.flags |= abi.CFG_OVER_DROP
        if self.name_cache:
            cfg.flags |= abi.CFG_NAMES
        if self.source_rate:
            cfg.source_interval_ns, cfg.source_tolerance_ns = gcra_params(self.source_rate, self.source_burst)
        if self.global_rate:
            cfg.global_interval_ns, cfg.global_tolerance_ns = gcra_params(self.global_rate, self.global_burst)
        return cfg


def gcra_params(rate: int, burst: int) -> tuple[int, int]:
    """(interval, tolerance) in ns of a GCRA bucket admitting ``rate`` packets per second with
    bursts of ``burst`` packets (0: one second's worth)."""
    interval = max(1, 1_000_000_000 // rate)
    burst = burst or rate
    return interval, interval * (max(1, burst) - 1)
