"""``hybridctl rules test``: a directory holding a capture, a rules file and what replaying the one
with the other must give (``expect.toml``), checked against a replay.

The expectations file (docs/replay.md has a full example)::

    capture = "capture.pcapng"    # default: the directory's only *.pcap / *.pcapng
    rules_file = "rules.toml"     # default: rules.toml

    [options]                     # attach options that shape classification (hybridctl replay's)
    name_cache = true

    [sides]                       # how a packet's side is told (default: who sent the first SYN)
    client_net = ["198.18.1.0/24"]

    [totals]                      # replay totals that must be exactly these
    flows = 4
    dropped = 12
    queued = 5                    # packets the engine decided

    [kernel]                      # datapath counters (hybridctl status's names) that must be these
    flagged = 5

    [rules]
    fired = ["block-http-host"]   # each decided at least one packet (engine or kernel cache)
    not_fired = ["block-tls-sni"] # none of these decided any
    count = { "block-dns-name" = 2 }

    [[flow]]                      # flows selected by proto / to / from / nth; every one selected
    proto = "tcp"                 # must have what the other keys say
    to = "198.18.2.2:80"          # the endpoint its first packet went to (address or address:port)
    nth = 2                       # the 2nd such flow in capture order (default: all of them)
    count = 1                     # how many flows the selectors select (checked when given)
    verdict = "dropped"           # passed, dropped, rewritten, mixed
    rule = "block-http-host"      # "(default)" for the default; "" for none
    decided_by = "engine"         # engine, kernel cache, kernel, nothing
    flow_verdict = "block"        # bypass, block, inspect, "" for none

Every mismatch is one line of the diff; nothing is skipped silently (an unknown key is an error).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from hybrid.errors import ConfigError

EXPECT_FILE = "expect.toml"
TOP_KEYS = {"capture", "rules_file", "options", "sides", "totals", "kernel", "rules", "flow", "description"}
SIDE_KEYS = {"client_net", "client_mac", "client_iface", "server_iface"}
TOTAL_KEYS = {"flows", "packets", "replayed", "passed", "dropped", "rewritten", "queued", "cache", "skipped"}
RULE_KEYS = {"fired", "not_fired", "count"}
FLOW_SELECT = {"proto", "to", "from", "nth", "count"}
FLOW_CHECK = {"verdict", "rule", "decided_by", "flow_verdict", "flagged", "engine_packets", "cache_packets",
              "packets", "reasons"}
VERDICTS = {"passed", "dropped", "rewritten", "mixed"}
DECIDERS = {"engine", "kernel cache", "kernel", "nothing"}
PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58}


@dataclass
class Case:
    """One test directory, read."""
    directory: str
    capture: str
    rules: str
    options: dict[str, Any] = field(default_factory=dict)
    sides: dict[str, list[str]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    kernel: dict[str, int] = field(default_factory=dict)
    fired: list[str] = field(default_factory=list)
    not_fired: list[str] = field(default_factory=list)
    rule_counts: dict[str, int] = field(default_factory=dict)
    flows: list[dict] = field(default_factory=list)


def _unknown(where: str, got, allowed) -> None:
    extra = sorted(set(got) - set(allowed))
    if extra:
        raise ConfigError(f"{where}: unknown key{'s' if len(extra) > 1 else ''} {', '.join(extra)} "
                          f"(known: {', '.join(sorted(allowed))})")


def load_case(directory: str) -> Case:
    """A test directory's case; ConfigError (one line) for a missing or wrong file or key."""
    from hybrid.datapath.options import BY_KEY, BadValue
    from hybrid.kernel import abi
    path = os.path.join(directory, EXPECT_FILE)
    where = path
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{directory}: no {EXPECT_FILE} (a rules test directory holds a capture, a rules file "
                          f"and {EXPECT_FILE})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax: {exc}") from None
    _unknown(where, doc, TOP_KEYS)
    capture = doc.get("capture")
    if capture is None:
        found = sorted(n for n in os.listdir(directory) if n.endswith((".pcap", ".pcapng")))
        if len(found) != 1:
            raise ConfigError(f"{where}: name the capture (capture = \"...\"): the directory holds "
                              f"{len(found)} *.pcap/*.pcapng files")
        capture = found[0]
    case = Case(directory, os.path.join(directory, capture), os.path.join(directory, doc.get("rules_file", "rules.toml")))
    for what, p in (("capture", case.capture), ("rules file", case.rules)):
        if not os.path.isfile(p):
            raise ConfigError(f"{where}: the {what} {p} does not exist")
    from hybrid.replay.run import REPLAY_KEYS
    options = doc.get("options", {})
    _unknown(f"{where} [options]", options, REPLAY_KEYS)
    for key, value in options.items():
        try:
            case.options[key] = BY_KEY[key].parse(value)
        except BadValue as exc:
            raise ConfigError(f"{where} [options] {key} {exc}") from None
    sides = doc.get("sides", {})
    _unknown(f"{where} [sides]", sides, SIDE_KEYS)
    for key, value in sides.items():
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} [sides] {key}: write a string or a list of strings")
        case.sides[key] = value
    totals = doc.get("totals", {})
    _unknown(f"{where} [totals]", totals, TOTAL_KEYS)
    case.totals = _ints(f"{where} [totals]", totals)
    kernel = doc.get("kernel", {})
    _unknown(f"{where} [kernel]", kernel, abi.COUNTER_NAMES.values())
    case.kernel = _ints(f"{where} [kernel]", kernel)
    rules = doc.get("rules", {})
    if not isinstance(rules, dict):
        raise ConfigError(f"{where}: rules is the table of rule expectations; name the rules file with rules_file")
    _unknown(f"{where} [rules]", rules, RULE_KEYS)
    case.fired = _names(f"{where} [rules] fired", rules.get("fired", []))
    case.not_fired = _names(f"{where} [rules] not_fired", rules.get("not_fired", []))
    case.rule_counts = _ints(f"{where} [rules] count", rules.get("count", {}))
    flows = doc.get("flow", [])
    if not isinstance(flows, list):
        raise ConfigError(f"{where}: write flows as [[flow]] tables")
    for i, spec in enumerate(flows, 1):
        fw = f"{where} flow #{i}"
        _unknown(fw, spec, FLOW_SELECT | FLOW_CHECK)
        if "proto" in spec and spec["proto"] not in PROTOS:
            raise ConfigError(f"{fw}: proto {spec['proto']!r}: use one of {', '.join(PROTOS)}")
        for key in ("to", "from"):
            if key in spec:
                _endpoint(fw, key, spec[key])
        if "verdict" in spec and spec["verdict"] not in VERDICTS:
            raise ConfigError(f"{fw}: verdict {spec['verdict']!r}: use one of {', '.join(sorted(VERDICTS))}")
        if "decided_by" in spec and spec["decided_by"] not in DECIDERS:
            raise ConfigError(f"{fw}: decided_by {spec['decided_by']!r}: use one of {', '.join(sorted(DECIDERS))}")
        for key in ("nth", "count", "flagged", "engine_packets", "cache_packets"):
            if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < 0):
                raise ConfigError(f"{fw}: {key} must be a whole number")
        case.flows.append(dict(spec))
    return case


def _ints(where: str, table) -> dict[str, int]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: write a table of numbers")
    for k, v in table.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{where} {k}: write a whole number, not {v!r}")
    return dict(table)


def _names(where: str, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: write a list of rule names")
    return value


def _endpoint(where: str, key: str, text) -> tuple[str, int | None]:
    """(address, port or None) of "198.18.2.2", "198.18.2.2:80", "[2001:2::2]:443", "2001:2::2"."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: {key} must be a string like \"198.18.2.2:80\"")
    addr, port = text, None
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        if rest:
            port = rest.lstrip(":")
    elif text.count(":") == 1:
        addr, port = text.split(":")
    try:
        ip = ipaddress.ip_address(addr)
        p = int(port) if port is not None else None
    except ValueError:
        raise ConfigError(f"{where}: {key} {text!r}: write an address, optionally with :port") from None
    return str(ip), p


def _split(endpoint_text: str) -> tuple[str, int]:
    if endpoint_text.startswith("["):
        addr, _, port = endpoint_text[1:].partition("]:")
    else:
        addr, _, port = endpoint_text.rpartition(":")
    return str(ipaddress.ip_address(addr)), int(port)


def _matches(flow, key: str, text: str) -> bool:
    want_addr, want_port = _endpoint("", key, text)
    addr, port = _split(flow.b if key == "to" else flow.a)
    return addr == want_addr and (want_port is None or port == want_port)


def select(report, spec: dict) -> list:
    """The flows of ``report`` a [[flow]] table selects."""
    out = []
    for f in report.flows:
        if "proto" in spec and f.proto != PROTOS[spec["proto"]]:
            continue
        if "to" in spec and not _matches(f, "to", spec["to"]):
            continue
        if "from" in spec and not _matches(f, "from", spec["from"]):
            continue
        out.append(f)
    if "nth" in spec:
        n = spec["nth"]
        out = out[n - 1:n] if n >= 1 else []
    return out


def _describe(spec: dict) -> str:
    parts = [spec.get("proto", "any")]
    if "from" in spec:
        parts.append(f"from {spec['from']}")
    if "to" in spec:
        parts.append(f"to {spec['to']}")
    if "nth" in spec:
        parts.append(f"#{spec['nth']}")
    return " ".join(parts)


def fired_counts(report) -> dict[str, int]:
    """Packets each rule decided: by the engine (its counters) and by the kernel's name cache."""
    counts = dict(report.engine.get("rules", {}))
    nc = report.engine.get("name_cache") or {}
    for rule, n in (nc.get("kernel_rules") or {}).items():
        counts[rule] = counts.get(rule, 0) + n
    return counts


def check(case: Case, report) -> list[str]:
    """Every way ``report`` differs from ``case``, one line each (empty: all hold)."""
    diff: list[str] = []
    totals = {"flows": len(report.flows), "packets": report.packets, "replayed": report.replayed,
              "passed": report.outcomes["passed"], "dropped": report.outcomes["dropped"],
              "rewritten": report.outcomes["rewritten"], "queued": report.engine.get("packets", 0),
              "cache": report.kernel.get("cache_passed", 0) + report.kernel.get("cache_dropped", 0),
              "skipped": sum(report.skipped.values())}
    for key, want in case.totals.items():
        if totals[key] != want:
            diff.append(f"totals {key}: expected {want}, got {totals[key]}")
    for key, want in case.kernel.items():
        got = report.kernel.get(key, 0)
        if got != want:
            diff.append(f"kernel {key}: expected {want}, got {got}")
    fired = fired_counts(report)
    for rule in case.fired:
        if not fired.get(rule):
            diff.append(f"rule {rule}: expected to fire, it did not")
    for rule in case.not_fired:
        if fired.get(rule):
            diff.append(f"rule {rule}: expected not to fire, it decided {fired[rule]} packet(s)")
    for rule, want in case.rule_counts.items():
        if fired.get(rule, 0) != want:
            diff.append(f"rule {rule}: expected {want} packet(s), got {fired.get(rule, 0)}")
    for i, spec in enumerate(case.flows, 1):
        flows = select(report, spec)
        name = f"flow #{i} ({_describe(spec)})"
        if "count" in spec and len(flows) != spec["count"]:
            diff.append(f"{name}: expected {spec['count']} flow(s), got {len(flows)}")
        if not flows and "count" not in spec:
            diff.append(f"{name}: no such flow in the capture")
        for f in flows:
            got = f.as_dict()
            got["rule"] = f.rule if f.rule is not None else ("(default)" if f.decided_by in ("engine", "kernel cache")
                                                             else "")
            got["flow_verdict"] = f.flow_verdict or ""
            for key in sorted(FLOW_CHECK & set(spec)):
                want = spec[key]
                have = got[key]
                if have != want:
                    diff.append(f"{name} {f.a} -> {f.b}: {key} expected {want!r}, got {have!r}")
    return diff
