"""The service configuration: one TOML file holding everything the command-line options hold.

A configuration file has five tables. Every key in ``[attach]`` is the ``hybridctl attach``
option of the same name with dashes written as underscores (``--mark-mask`` -> ``mark_mask``,
``--watch-port`` -> ``watch_port``); options that can be repeated take a list (or one value).
Those keys, their parsers, defaults and help are hybrid.datapath.options.ATTACH; this module
declares the other tables with the same record (:class:`~hybrid.datapath.options.Option`).

    [attach]    hybrid.datapath.options.ATTACH (interfaces, xdp_mode, hook, mark, queues, ...)
    [engine]    rules (the rules file), flow_ttl (overrides the rules file's), queue_len
    [log]       level, verdicts (the engine's verdict log)
    [service]   keep_attached_on_stop, standby_engines
    [metrics]   enabled, listen, socket_group, token_file
    [crowdsec]  lapi_url, bouncer_key_file, machine_id, machine_password_file, poll_interval, scopes,
                origins, types, never_block, min_prefix_v4, min_prefix_v6, ca_file, timeout, share_per_minute

Every key but ``attach.interfaces`` and ``engine.rules`` has a default, so a minimal file is
three lines. Relative paths are relative to the configuration file. Options given on the command
line override the file (:func:`load` ``overrides``).

Every error in a file is a :class:`ConfigFileError`, one line ``FILE:LINE: what is wrong and
what to write instead``, through the TOML front-end rules files use too (hybrid/tomlfile.py).
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from hybrid import instance as inst
from hybrid.datapath.options import (
    ATTACH,
    REQUIRED,
    AttachOptions,
    BadValue,
    Choice,
    Int,
    List,
    Option,
    Subset,
    boolean,
    cidr,
    queue_range,
)
from hybrid.errors import ConfigError
from hybrid.tomlfile import TomlFileError, TomlFormat, TomlSource, suggest

DEFAULT_PATH = "/etc/hybrid/hybrid.toml"
DEFAULT_METRICS_LISTEN = f"unix:{inst.RUN_ROOT}/metrics.sock"
LOG_LEVELS = ("debug", "info", "warning", "error")
SECTIONS = ("attach", "engine", "log", "service", "metrics", "crowdsec")


class ConfigFileError(TomlFileError):
    """A configuration that cannot be used; ``str()`` is ``FILE:LINE: message`` (or, for a
    command-line override, ``--option: message``); ``where``, ``line`` and ``reason`` (the
    message alone) are kept."""

    @property
    def where(self) -> str:
        return self.filename


CONFIG_FILE = TomlFormat(ConfigFileError, "the configuration", "[section] headers",
                         missing_hint=" (write one from examples/hybrid.toml, or give --config)")


# -- value parsers of the other tables (the shared ones are in hybrid.datapath.options) ---------

def _path(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r}: write a file path in quotes")
    return value


def _log_target(value) -> str:
    if value == "-":
        return value
    return _path(value)


_LISTEN_HINT = ('write "unix:/PATH" for a socket, e.g. "unix:/run/hybrid/metrics.sock", or "HOST:PORT", '
                'e.g. "127.0.0.1:9469" or "[::1]:9469"')


def _listen(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r}: {_LISTEN_HINT}")
    if value.startswith("unix:"):
        return "unix:" + unix_path(value)
    host, port = split_listen(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unix_path(listen: str) -> str | None:
    """The socket path of a ``"unix:/PATH"`` listen value (normalised), None for ``HOST:PORT``."""
    if not listen.startswith("unix:"):
        return None
    path = listen[len("unix:"):]
    if not path.startswith("/"):
        raise ValueError(f"{listen!r}: write an absolute path after unix:, e.g. \"unix:/run/hybrid/metrics.sock\"")
    path = os.path.normpath(path)
    if "\0" in path or len(os.fsencode(path)) > 107:          # sun_path: 108 bytes with the NUL
        raise ValueError(f"{listen!r}: a socket path has at most 107 bytes and no NUL; choose a shorter one")
    return path


def split_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9469"``, ``"[::1]:9469"`` or ``":9469"`` (all addresses) -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^\[\]:]*):(\d+)", value.strip())
    if not m:
        raise ValueError(f"{value!r}: write \"HOST:PORT\", e.g. \"127.0.0.1:9469\" or \"[::1]:9469\", "
                         f"or \"unix:/PATH\" for a socket")
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


def is_loopback(host: str) -> bool:
    """``host`` (of a HOST:PORT listen value) only reaches this machine: 127.0.0.0/8, ::1 or
    the name localhost. Any other name counts as reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _group(value) -> str | int:
    """A group that exists here, by name or number (the metrics socket's group)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"{value!r}: write a group name in quotes, e.g. \"prometheus\", or a group id")
    try:
        grp.getgrgid(value) if isinstance(value, int) else grp.getgrnam(value)
    except (KeyError, OverflowError):
        raise ValueError(f"{value!r}: no such group on this host: create it (groupadd) or name "
                         "another") from None
    return value


def group_id(group: str | int) -> int:
    """The gid of a ``socket_group`` value (it exists: :func:`_group` checked)."""
    return group if isinstance(group, int) else grp.getgrnam(group).st_gid


# Secret files (the metrics token, CrowdSec's bouncer key and machine password): root's, and nobody
# else may read or write them. A token is what RFC 6750 allows in an Authorization header (b64token),
# long enough not to be guessed; a CrowdSec key or password is any word of printable ASCII.
TOKEN_OWNER_UID = 0
TOKEN_MIN_LENGTH = 16
_TOKEN_RE = re.compile(rb"[A-Za-z0-9._~+/-]+=*")
_SECRET_RE = re.compile(rb"[!-~]+")


def _secret_file_problem(path: str, st: os.stat_result, key: str = "token_file") -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"{key} {path} is not a regular file"
    if st.st_uid != TOKEN_OWNER_UID:
        return f"{key} {path} is owned by uid {st.st_uid}: it must be root's (chown root: {path})"
    if st.st_mode & 0o077:
        return (f"{key} {path} has mode {stat.S_IMODE(st.st_mode):04o}: group and others must have no "
                f"access to it (chmod 600 {path})")
    if st.st_size == 0:
        return f"{key} {path} is empty: write the secret into it"
    return None


def check_token_file(path: str, key: str = "token_file") -> None:
    """ConfigError unless ``path`` is a non-empty regular file owned by root that group and
    others cannot read or write. Reads only its status: ``config check`` works unprivileged."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {exc.strerror}") from None
    problem = _secret_file_problem(path, st, key)
    if problem:
        raise ConfigError(problem)


def _read_secret_file(path: str, key: str) -> bytes:
    """The file's content (surrounding whitespace stripped, at most 4097 bytes read), after the
    checks of :func:`check_token_file` on the file actually opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read it: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        problem = _secret_file_problem(path, os.fstat(fd), key)
        if problem:
            raise ConfigError(problem)
        return f.read(4097).strip()


def read_secret(path: str, key: str) -> bytes:
    """The secret in ``path``: one word of printable ASCII (no message ever quotes it)."""
    secret = _read_secret_file(path, key)
    if not 0 < len(secret) <= 4096 or not _SECRET_RE.fullmatch(secret):
        raise ConfigError(f"{key} {path}: write the secret alone, one word of printable ASCII (no spaces) "
                          "of at most 4096 characters")
    return secret


def read_token(path: str) -> bytes:
    """The metrics bearer token in ``path``: a b64token of at least TOKEN_MIN_LENGTH characters."""
    token = _read_secret_file(path, "token_file")
    if len(token) > 4096 or len(token) < TOKEN_MIN_LENGTH or not _TOKEN_RE.fullmatch(token):
        raise ConfigError(f"token_file {path}: the token must be one word of at least {TOKEN_MIN_LENGTH} letters, "
                          f"digits or -._~+/ (e.g. openssl rand -hex 32 > {path})")
    return token


def _lapi_url(value) -> str:
    """An http(s) URL of a CrowdSec Local API: "http://127.0.0.1:8080" (hybrid.fleet.lapi checks it)."""
    from hybrid.fleet.lapi import split_url
    try:
        u = split_url(value)
    except ConfigError as exc:
        raise BadValue(f"{str(exc).removeprefix('LAPI URL ')}; e.g. \"http://127.0.0.1:8080\"") from None
    return f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}"


def _seconds(lo: float, hi: float):
    def parse(value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise BadValue(f"{value!r}: write seconds, e.g. 1 or 0.5")
        try:
            v = float(value)
        except ValueError:
            raise BadValue(f"{value!r}: write seconds, e.g. 1 or 0.5") from None
        if not lo <= v <= hi:
            raise BadValue(f"{value!r}: write {lo:g} to {hi:g} seconds")
        return v
    return parse


def _machine_id(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", value):
        raise BadValue(f"{value!r}: write the machine's name as registered with cscli machines add "
                       "(letters, digits, ._-)")
    return value


def _decision_word(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._:/-]{1,64}", value):
        raise BadValue(f"{value!r}: write a name as CrowdSec writes it, e.g. \"ban\", \"crowdsec\", \"cscli\"")
    return value


# -- the schema: the attach options, then the other tables -----------------------------------------

FIELDS: tuple[Option, ...] = ATTACH + (
    Option("rules", "--rules", _path, REQUIRED,
           "The verdict engine's rules file (TOML; see examples/rules/).", metavar="FILE", section="engine"),
    Option("flow_ttl", "--flow-ttl", Int(1, 10_000_000, 300), None,
           "Seconds a flow verdict lasts when its rule gives no ttl (overrides the rules file's flow_ttl).",
           metavar="SECONDS", section="engine"),
    Option("queue_len", "--queue-len", Int(1, 1 << 20, 4096), 4096,
           "Packets the kernel holds for each engine before overflowing.", section="engine"),
    Option("level", "--log-level", Choice(LOG_LEVELS), "info",
           "Least severe level of the JSON log lines on standard output.", section="log"),
    Option("verdicts", "--verdict-log", _log_target, None,
           "The engines' verdict log, JSON lines, rate-limited ('-': standard output).", metavar="FILE",
           section="log"),
    Option("keep_attached_on_stop", "--keep-attached/--detach-on-stop", boolean, False,
           "On SIGTERM leave the kernel side in place (a restart then has no blind window) instead of detaching.",
           "flag", section="service"),
    Option("standby_engines", "--standby/--no-standby", boolean, True,
           "Keep a spare engine per queue, started and waiting, so that a crashed engine's queue is bound "
           "again in milliseconds, not the fraction of a second a new engine process takes (one idle process per queue; hybridctl bench --takeover measures both).",
           "flag", section="service"),
    Option("enabled", "--metrics/--no-metrics", boolean, False,
           "Serve Prometheus metrics on /metrics.", "flag", section="metrics"),
    Option("listen", "--metrics-listen", _listen, DEFAULT_METRICS_LISTEN,
           "Where the metrics endpoint listens: \"unix:/PATH\", a socket only root (or socket_group) can "
           "connect to, or HOST:PORT (any address but loopback needs token_file).", metavar="unix:PATH|HOST:PORT",
           section="metrics"),
    Option("socket_group", "--metrics-socket-group", _group, None,
           "Group that may connect to the metrics socket (mode 0660); not set: root only (0600).",
           metavar="GROUP", section="metrics"),
    Option("token_file", "--metrics-token-file", _path, None,
           "File holding the bearer token scrapes must send (root's, mode 0600); required for a TCP listen "
           "on an address other than loopback.", metavar="FILE", section="metrics"),
    # [crowdsec]: hybrid in a CrowdSec deployment (hybrid/fleet/; docs/crowdsec.md)
    Option("lapi_url", "--crowdsec-url", _lapi_url, None,
           "CrowdSec Local API to pull bans from and share blocks with; not set: no CrowdSec link.",
           metavar="URL", section="crowdsec"),
    Option("bouncer_key_file", "--crowdsec-bouncer-key-file", _path, None,
           "File holding the bouncer API key (cscli bouncers add; root's, mode 0600): bans are pulled and "
           "dropped in the kernel.", metavar="FILE", section="crowdsec"),
    Option("machine_id", "--crowdsec-machine-id", _machine_id, None,
           "Machine name (cscli machines add) under which rules with share = {...} report their blocks.",
           metavar="NAME", section="crowdsec"),
    Option("machine_password_file", "--crowdsec-machine-password-file", _path, None,
           "File holding the machine's password (root's, mode 0600).", metavar="FILE", section="crowdsec"),
    Option("poll_interval", "--crowdsec-poll-interval", _seconds(0.2, 3600), 1.0,
           "Seconds between two pulls of the decision stream.", metavar="SECONDS", section="crowdsec"),
    Option("scopes", "--crowdsec-scopes", Subset(("ip", "range")), ["ip", "range"],
           "Decision scopes to enforce (comma-separated: ip, range).", "commas", metavar="SCOPES",
           section="crowdsec"),
    Option("origins", "--crowdsec-origin", List(_decision_word), [],
           "Decision origins to enforce (e.g. crowdsec, cscli, lists); none given: every origin.", "list",
           metavar="ORIGIN", section="crowdsec"),
    Option("types", "--crowdsec-type", List(_decision_word, nonempty=True), ["ban"],
           "Decision types enforced as a drop (a gateway shows no captcha: list \"captcha\" to drop those too).",
           "list", metavar="TYPE", section="crowdsec"),
    Option("never_block", "--crowdsec-never-block", List(cidr), [],
           "Prefixes no decision may cover or touch, besides the gateway's own addresses, loopback, "
           "link-local and the Local API's address.", "list", metavar="CIDR", section="crowdsec"),
    Option("min_prefix_v4", "--crowdsec-min-prefix-v4", Int(0, 32, 12), 12,
           "Shortest IPv4 prefix a decision may ban; shorter ones are refused as a blackhole risk.",
           metavar="BITS", section="crowdsec"),
    Option("min_prefix_v6", "--crowdsec-min-prefix-v6", Int(0, 128, 32), 32,
           "Shortest IPv6 prefix a decision may ban.", metavar="BITS", section="crowdsec"),
    Option("ca_file", "--crowdsec-ca-file", _path, None,
           "CA certificates to verify an https Local API with (default: the system's).", metavar="FILE",
           section="crowdsec"),
    Option("timeout", "--crowdsec-timeout", _seconds(0.5, 120), 5.0,
           "Seconds a Local API request may take.", metavar="SECONDS", section="crowdsec"),
    Option("share_per_minute", "--crowdsec-share-per-minute", Int(1, 100_000, 120), 120,
           "Most blocks reported to the Local API per minute (the rest are counted, not sent).",
           section="crowdsec"),
)
BY_NAME = {f.name: f for f in FIELDS}
PATH_FIELDS = ("engine.rules", "log.verdicts", "metrics.token_file", "crowdsec.bouncer_key_file",
               "crowdsec.machine_password_file", "crowdsec.ca_file")


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
        return queue_range(self.values["attach.queues"])

    def attach_options(self) -> AttachOptions:
        return AttachOptions.from_values(self.section("attach"))

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
    if isinstance(value, float):
        return repr(value)
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
            raise ConfigFileError(f.option, None, str(exc)) from None
        if f.name in PATH_FIELDS and value != "-":
            value = os.path.abspath(value)
        values[name], origin[name] = value, "command line"
    for f in FIELDS:
        if f.name not in values:
            if f.default is REQUIRED:
                where = path or "the configuration"
                raise ConfigFileError(where, src.line(f.section) if src else None,
                                      f"{f.name} is required: set {f.key} under [{f.section}]"
                                      f" (or give {f.option})")
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
        return ConfigFileError(cfg.path if cfg.origin[f.name] == "default" and cfg.path else f.option,
                               None, message)

    mark, mask = cfg["attach.mark"], cfg["attach.mark_mask"]
    if mark & ~mask:
        raise error("attach", "mark", f"mark 0x{mark:x} has bits outside mark_mask 0x{mask:x}: the mask must "
                                      "contain every bit of the mark")
    try:
        cfg.attach_options().validate()
    except ConfigError as exc:
        raise error("attach", "interfaces", str(exc)) from None
    _check_metrics(cfg, error)
    _check_crowdsec(cfg, error)


def _check_crowdsec(cfg: Config, error) -> None:
    """The link has a URL and something to do with it; its secret files are root's alone."""
    url = cfg["crowdsec.lapi_url"]
    key_file, machine, pw_file = (cfg["crowdsec.bouncer_key_file"], cfg["crowdsec.machine_id"],
                                  cfg["crowdsec.machine_password_file"])
    if url is None:
        for k in ("bouncer_key_file", "machine_id", "machine_password_file"):
            if cfg[f"crowdsec.{k}"] is not None:
                raise error("crowdsec", k, f"{k} is set but lapi_url is not: set lapi_url, e.g. "
                                           "\"http://127.0.0.1:8080\"")
        return
    if key_file is None and machine is None:
        raise error("crowdsec", "lapi_url", "lapi_url is set but neither bouncer_key_file (pull bans) nor "
                                            "machine_id (share blocks) is: set one or both")
    if (machine is None) != (pw_file is None):
        k = "machine_password_file" if machine is not None else "machine_id"
        raise error("crowdsec", k, "machine_id and machine_password_file go together: set both")
    for k, path in (("bouncer_key_file", key_file), ("machine_password_file", pw_file)):
        if path is not None:
            try:
                check_token_file(path, k)
            except ConfigError as exc:
                raise error("crowdsec", k, str(exc)) from None


def _check_metrics(cfg: Config, error) -> None:
    """The endpoint is not readable by whoever can reach it: a TCP listen beyond loopback needs a
    token; the token file must be root's alone; a socket group goes with a socket."""
    listen, token_file = cfg["metrics.listen"], cfg["metrics.token_file"]
    if token_file is not None:
        try:
            check_token_file(token_file)
        except ConfigError as exc:
            raise error("metrics", "token_file", str(exc)) from None
    if unix_path(listen) is not None:
        return
    if cfg["metrics.socket_group"] is not None:
        raise error("metrics", "socket_group", f"socket_group applies to a socket, and listen is {listen}: "
                                               "remove socket_group, or listen on \"unix:/PATH\"")
    host, _ = split_listen(listen)
    if cfg["metrics.enabled"] and token_file is None and not is_loopback(host):
        raise error("metrics", "listen", f"listen {listen} is reachable from other hosts and no token_file is "
                                         "set: set token_file (a root-only file with the bearer token "
                                         "Prometheus sends), or listen on loopback or \"unix:/PATH\"")
