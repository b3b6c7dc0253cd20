"""The service configuration: one TOML file holding everything the command-line options hold.

A configuration file has five tables. Every key in ``[attach]`` is the ``hybridctl attach``
option of the same name with dashes written as underscores (``--mark-mask`` -> ``mark_mask``,
``--watch-port`` -> ``watch_port``); options that can be repeated take a list (or one value).

    [attach]    interfaces, xdp_mode, hook, mark, mark_mask, queues, fail_open, queue_cpu_fanout,
                flag, first_n, watch_port, watch_prefix, block_prefix, family, flow_table_size,
                source_rate, source_burst, global_rate, global_burst, over_budget
    [engine]    rules (the rules file), flow_ttl (overrides the rules file's), queue_len
    [log]       level, verdicts (the engine's verdict log)
    [service]   keep_attached_on_stop, standby_engines
    [metrics]   enabled, listen

Every key but ``attach.interfaces`` and ``engine.rules`` has a default, so a minimal file is
three lines. Relative paths are relative to the configuration file. Options given on the command
line override the file (:func:`load` ``overrides``).

Every error in a file is a :class:`ConfigFileError`, one line ``FILE:LINE: what is wrong and
what to write instead``, as hybrid/rules.py does for rules files.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from hybrid.datapath import attach as att
from hybrid.errors import ConfigError
from hybrid.tomlfile import TomlFileError, TomlFormat, TomlSource, suggest
from hybrid.kernel import abi

DEFAULT_PATH = "/etc/hybrid/hybrid.toml"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9469"
LOG_LEVELS = ("debug", "info", "warning", "error")
SECTIONS = ("attach", "engine", "log", "service", "metrics")
REQUIRED = object()   # a field without a default


class ConfigFileError(TomlFileError):
    """A configuration that cannot be used; ``str()`` is ``FILE:LINE: message`` (or, for a
    command-line override, ``--option: message``); ``where``, ``line`` and ``reason`` (the
    message alone) are kept."""

    @property
    def where(self) -> str:
        return self.filename


CONFIG_FILE = TomlFormat(ConfigFileError, "the configuration", "[section] headers",
                         missing_hint=" (write one from examples/hybrid.toml, or give --config)")


# -- value parsers: each returns the normalised value or raises ValueError(message) ---------------

def _int(lo: int, hi: int, example: str) -> Callable[[Any], int]:
    def parse(value) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip(), 0)
            except ValueError:
                raise ValueError(f"{value!r}: write a number, e.g. {example}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r}: write a number, e.g. {example}")
        if not lo <= value <= hi:
            raise ValueError(f"{value}: use {lo} to {hi}")
        return value
    return parse


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{value!r}: write true or false (no quotes)")


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError(f"{value!r}: write one of {', '.join(choices)}")
    return parse


def _list(item: Callable[[Any], Any], *, split_commas: bool = False, nonempty: bool = False,
          unique: bool = True) -> Callable[[Any], list]:
    def parse(value) -> list:
        if isinstance(value, str) and split_commas:
            value = [v.strip() for v in value.split(",") if v.strip()]
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        out = [item(v) for v in items]
        if nonempty and not out:
            raise ValueError("the list is empty; give at least one")
        if unique:
            dup = next((v for i, v in enumerate(out) if v in out[:i]), None)
            if dup is not None:
                raise ValueError(f"{dup!r} is given twice; keep one")
        return out
    return parse


def _ifname(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[^\s/:]{1,15}", value):
        raise ValueError(f"{value!r}: an interface name is 1-15 characters without spaces, '/' or ':', "
                         "e.g. \"eth0\"")
    return value


def _cidr(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r}: write a CIDR string like \"198.18.0.0/15\" or \"2001:db8::/32\"")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r}: not an IPv4 or IPv6 CIDR; write e.g. \"198.18.0.0/15\" or "
                         "\"2001:db8::/32\"") from None


def _queues(value) -> str:
    if isinstance(value, bool):
        raise ValueError(f"{value!r}: write a queue number or a range, e.g. 0 or \"0-1\"")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r}: write a queue number or a range, e.g. 0 or \"0-1\"")
    first, sep, last = value.partition("-")
    try:
        a, b = int(first), int(last if sep else first)
    except ValueError:
        raise ValueError(f"{value!r}: write a queue number or a range, e.g. 0 or \"0-1\"") from None
    if not 0 <= a <= b <= 65535:
        raise ValueError(f"{value!r}: need 0 <= first <= last <= 65535")
    return str(a) if a == b else f"{a}-{b}"


def _path(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r}: write a file path in quotes")
    return value


def _log_target(value) -> str:
    if value == "-":
        return value
    return _path(value)


def _listen(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r}: write \"HOST:PORT\", e.g. \"127.0.0.1:9469\"")
    host, port = split_listen(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9469"``, ``"[::1]:9469"`` or ``":9469"`` (all addresses) -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^\[\]:]*):(\d+)", value.strip())
    if not m:
        raise ValueError(f"{value!r}: write \"HOST:PORT\", e.g. \"127.0.0.1:9469\" or \"[::1]:9469\"")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: the port is 0-65535 (0: any free port)")
    if m.group(1) is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    return host or "0.0.0.0", port


# -- the schema -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    section: str
    key: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    cli: str                     # the override option of `hybridctl run` / `config show`
    kind: str = "value"          # value | list | flag (boolean with a --no form) | commas
    metavar: str | None = None
    hex: bool = False            # shown as 0x... by `config show`

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


_REASONS = tuple(abi.REASON_BITS)
FIELDS: tuple[Field, ...] = (
    Field("attach", "interfaces", _list(_ifname, nonempty=True), REQUIRED,
          "Interfaces to attach to (a gateway: both sides).", "--interface", "list", "IFACE"),
    Field("attach", "xdp_mode", _choice(att.XDP_MODES), "auto",
          "auto: native XDP on physical NICs, none on veth/virtual links; off: tc only.", "--xdp-mode", metavar="|".join(att.XDP_MODES)),
    Field("attach", "hook", _list(_choice(("forward", "input")), nonempty=True), ["forward"],
          "Netfilter hooks whose marked packets are queued (forward: a gateway; input: a host).", "--hook", "list", "forward|input"),
    Field("attach", "mark", _int(1, 0xFFFFFFFF, "0x100000"), att.DEFAULT_MARK,
          "Bit(s) set on flagged packets.", "--mark", hex=True),
    Field("attach", "mark_mask", _int(1, 0xFFFFFFFF, "0x100000"), att.DEFAULT_MASK,
          "Bits hybrid owns in the packet mark; others are never touched.", "--mark-mask", hex=True),
    Field("attach", "queues", _queues, "0",
          "NFQUEUE number, or a range spread with --queue-balance (one engine process per queue).",
          "--queues", metavar="N|A-B"),
    Field("attach", "fail_open", _bool, True,
          "With no engine bound or a full queue: let flagged packets pass (true) or drop them (false).",
          "--fail-open/--fail-closed", "flag"),
    Field("attach", "queue_cpu_fanout", _bool, False,
          "With a range of queues: pick the queue by the packet's CPU, not by a hash of its addresses.",
          "--queue-cpu-fanout/--queue-balance-by-address", "flag"),
    Field("attach", "flag", _list(_choice(_REASONS), split_commas=True), list(att.DEFAULT_REASONS),
          f"Flag reasons to enable ({', '.join(_REASONS)}).", "--flag", "commas", "R1,R2"),
    Field("attach", "first_n", _int(0, 1_000_000, "3"), att.DEFAULT_FIRST_N,
          "Payload-carrying packets queued per direction at the start of every flow.", "--first-n"),
    Field("attach", "watch_port", _list(_int(1, 65535, "53")), [],
          "Queue every packet of flows on these ports.", "--watch-port", "list", "PORT"),
    Field("attach", "watch_prefix", _list(_cidr), [],
          "Queue every packet from or to these prefixes.", "--watch-prefix", "list", "CIDR"),
    Field("attach", "block_prefix", _list(_cidr), [],
          "Drop every packet from or to these prefixes in the kernel.", "--block-prefix", "list", "CIDR"),
    Field("attach", "family", _list(_choice(("ipv4", "ipv6")), nonempty=True), ["ipv4", "ipv6"],
          "Netfilter families to install the queue rule in.", "--family", "list", "ipv4|ipv6"),
    Field("attach", "flow_table_size", _int(1024, 1 << 24, "131072"), 131072,
          "Entries in the kernel flow table (LRU).", "--flow-table-size"),
    Field("attach", "source_rate", _int(0, 100_000_000, "100"), 0,
          "Admission: new flows per second one source may send to the engine (0: off).", "--source-rate"),
    Field("attach", "source_burst", _int(0, 100_000_000, "200"), 0,
          "Admission: burst above source_rate (0: one second's worth).", "--source-burst"),
    Field("attach", "global_rate", _int(0, 100_000_000, "50000"), att.DEFAULT_GLOBAL_RATE,
          "Admission: flagged packets per second for the whole gateway (0: off).", "--global-rate"),
    Field("attach", "global_burst", _int(0, 100_000_000, "100000"), 0,
          "Admission: burst above global_rate (0: one second's worth).", "--global-burst"),
    Field("attach", "over_budget", _choice(att.OVER_BUDGET), "pass",
          "An over-budget flagged packet without payload: pass it unflagged, or drop it.", "--over-budget", metavar="pass|drop"),
    Field("engine", "rules", _path, REQUIRED,
          "The verdict engine's rules file (TOML; see examples/rules/).", "--rules", metavar="FILE"),
    Field("engine", "flow_ttl", _int(1, 10_000_000, "300"), None,
          "Seconds a flow verdict lasts when its rule gives no ttl (overrides the rules file's flow_ttl).",
          "--flow-ttl", metavar="SECONDS"),
    Field("engine", "queue_len", _int(1, 1 << 20, "4096"), 4096,
          "Packets the kernel holds for each engine before overflowing.", "--queue-len"),
    Field("log", "level", _choice(LOG_LEVELS), "info",
          "Least severe level of the JSON log lines on standard output.", "--log-level", metavar="|".join(LOG_LEVELS)),
    Field("log", "verdicts", _log_target, None,
          "The engines' verdict log, JSON lines, rate-limited ('-': standard output).", "--verdict-log",
          metavar="FILE"),
    Field("service", "keep_attached_on_stop", _bool, False,
          "On SIGTERM leave the kernel side in place (a restart then has no blind window) instead of detaching.",
          "--keep-attached/--detach-on-stop", "flag"),
    Field("service", "standby_engines", _bool, True,
          "Keep a spare engine per queue, started and waiting, so that a crashed engine's queue is bound "
          "again in milliseconds, not the 0.4 s a new engine process takes (one idle process per queue).",
          "--standby/--no-standby", "flag"),
    Field("metrics", "enabled", _bool, False,
          "Serve Prometheus metrics on /metrics.", "--metrics/--no-metrics", "flag"),
    Field("metrics", "listen", _listen, DEFAULT_METRICS_LISTEN,
          "Address and port of the metrics endpoint (localhost unless you open it).", "--metrics-listen",
          metavar="HOST:PORT"),
)
BY_NAME = {f.name: f for f in FIELDS}
PATH_FIELDS = ("engine.rules", "log.verdicts")


# -- the configuration ------------------------------------------------------------------------------

@dataclass
class Config:
    """The effective configuration: every field's value and where it came from."""

    path: str | None
    values: dict[str, Any]          # "section.key" -> normalised value (paths absolute)
    origin: dict[str, str]          # "section.key" -> "file" | "default" | "command line"

    def __getitem__(self, name: str):
        return self.values[name]

    @property
    def queues(self) -> tuple[int, int]:
        first, _, last = self.values["attach.queues"].partition("-")
        return int(first), int(last or first)

    def attach_options(self) -> att.AttachOptions:
        v = self.values
        first, last = self.queues
        return att.AttachOptions(
            interfaces=list(v["attach.interfaces"]), xdp_mode=v["attach.xdp_mode"], hooks=tuple(v["attach.hook"]),
            mark=v["attach.mark"], mark_mask=v["attach.mark_mask"], queue_first=first, queue_last=last,
            fail_open=v["attach.fail_open"], queue_cpu_fanout=v["attach.queue_cpu_fanout"],
            reasons=tuple(v["attach.flag"]), first_n=v["attach.first_n"],
            watch_ports=tuple(v["attach.watch_port"]), watch_prefixes=tuple(v["attach.watch_prefix"]),
            block_prefixes=tuple(v["attach.block_prefix"]), families=tuple(v["attach.family"]),
            flow_table_size=v["attach.flow_table_size"], source_rate=v["attach.source_rate"],
            source_burst=v["attach.source_burst"], global_rate=v["attach.global_rate"],
            global_burst=v["attach.global_burst"], over_budget=v["attach.over_budget"])

    def section(self, name: str) -> dict[str, Any]:
        return {f.key: self.values[f.name] for f in FIELDS if f.section == name}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {s: self.section(s) for s in SECTIONS}

    def to_toml(self, origins: bool = False) -> str:
        """The effective configuration as a TOML file that loads back to the same values.
        Unset optional keys are shown commented out; ``origins`` notes where each value came from."""
        out = []
        if self.path:
            out.append(f"# effective configuration: {self.path}, defaults and command-line options")
        for s in SECTIONS:
            out.append(f"\n[{s}]")
            for f in FIELDS:
                if f.section != s:
                    continue
                value = self.values[f.name]
                note = f"  # {self.origin[f.name]}" if origins else ""
                if value is None:
                    out.append(f"# {f.key} = (not set){note}")
                else:
                    out.append(f"{f.key} = {_toml_value(value, f.hex)}{note}")
        return "\n".join(out).lstrip("\n") + "\n"


def _toml_value(value, as_hex: bool = False) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"0x{value:x}" if as_hex else str(value)
    if isinstance(value, str):
        return json.dumps(value)          # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, as_hex) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def load(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> Config:
    """The effective configuration: ``path`` (None: no file, defaults only), then ``overrides``
    (``"section.key"`` -> value as given on the command line; None entries are ignored)."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    src = None
    if path is not None:
        path = os.path.abspath(os.fspath(path))
        src = CONFIG_FILE.read(path)
        doc = src.doc
        base = os.path.dirname(path)
        for section, table in doc.items():
            if section not in SECTIONS:
                owner = next((f.section for f in FIELDS if f.key == section), None)
                if owner is not None:
                    raise src.error(None, section, f"{section!r} belongs in the [{owner}] table: put it under "
                                                   f"a [{owner}] header")
                raise ConfigFileError(path, src.line(section) or src.line(None, section),
                                      f"unknown table {section!r}, {suggest(section, SECTIONS)}")
            if not isinstance(table, dict):
                raise src.error(None, section, f"{section!r} is a table: write [{section}] and its keys below it")
            keys = [f.key for f in FIELDS if f.section == section]
            for key, raw in table.items():
                f = BY_NAME.get(f"{section}.{key}")
                if f is None:
                    elsewhere = next((g.section for g in FIELDS if g.key == key), None)
                    hint = f"it belongs in [{elsewhere}]" if elsewhere else suggest(key, keys)
                    raise src.error(section, key, f"unknown key {key!r} in [{section}], {hint}")
                try:
                    value = f.parse(raw)
                except ValueError as exc:
                    raise src.error(section, key, f"{key} {exc}") from None
                if f.name in PATH_FIELDS and value != "-":
                    value = os.path.normpath(os.path.join(base, value))
                values[f.name], origin[f.name] = value, "file"
    for name, raw in (overrides or {}).items():
        if raw is None or (isinstance(raw, (list, tuple)) and not raw):
            continue
        f = BY_NAME[name]
        try:
            value = f.parse(raw)
        except ValueError as exc:
            raise ConfigFileError(f.cli.split("/")[0], None, str(exc)) from None
        if f.name in PATH_FIELDS and value != "-":
            value = os.path.abspath(value)
        values[name], origin[name] = value, "command line"
    for f in FIELDS:
        if f.name not in values:
            if f.default is REQUIRED:
                where = path or "the configuration"
                raise ConfigFileError(where, src.line(f.section) if src else None,
                                      f"{f.name} is required: set {f.key} under [{f.section}]"
                                      f" (or give {f.cli})")
            values[f.name] = list(f.default) if isinstance(f.default, list) else f.default
            origin[f.name] = "default"
    cfg = Config(path, values, origin)
    _check_whole(cfg, src)
    return cfg


def _check_whole(cfg: Config, src: TomlSource | None) -> None:
    """What only the whole configuration can tell: the mark inside its mask, and what
    AttachOptions itself refuses."""
    def error(section: str, key: str, message: str) -> ConfigFileError:
        if src is not None and cfg.origin[f"{section}.{key}"] == "file":
            return src.error(section, key, message)
        f = BY_NAME[f"{section}.{key}"]
        return ConfigFileError(cfg.path if cfg.origin[f.name] == "default" and cfg.path else f.cli.split("/")[0],
                               None, message)

    mark, mask = cfg["attach.mark"], cfg["attach.mark_mask"]
    if mark & ~mask:
        raise error("attach", "mark", f"mark 0x{mark:x} has bits outside mark_mask 0x{mask:x}: the mask must "
                                      "contain every bit of the mark")
    try:
        cfg.attach_options().validate()
    except ConfigError as exc:
        raise error("attach", "interfaces", str(exc)) from None
