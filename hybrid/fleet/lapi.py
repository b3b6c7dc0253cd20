"""A client of CrowdSec's Local API (LAPI), stdlib only: the bouncer side (decision stream) and
the machine side (login, alerts carrying ban decisions).

Protocol, as CrowdSec 1.4.6 (Debian 12) speaks it, read from its source (pkg/apiserver) and
checked against the real LAPI in tests/integration/test_lapi.py:

- ``GET /v1/decisions/stream?startup=true|false`` with ``X-Api-Key``: ``{"new": [...] | null,
  "deleted": [...] | null}`` (``null`` is an empty list). The LAPI keeps each bouncer's last
  pull time itself; ``startup=true`` answers every active decision in ``new`` and every expired
  one still in the database in ``deleted``; otherwise ``new`` holds the decisions created
  since the last pull and ``deleted`` those that expired or were deleted (a delete expires a
  decision now) since 2 s before the last pull. So ``deleted`` repeats an entry for about 2 s
  (also one the bouncer never saw), ``new`` may repeat one created while the previous answer
  was being made, and a pull that failed half-way may have moved the bouncer's pull time:
  after any failure, pull with ``startup=true`` again. The answer is deduplicated per (value,
  scope, type): only the longest-lasting decision is shown, an expiry is reported only when no
  later decision of the same value and type remains (deleting the longest of two changes no
  delta: the value stays banned until the shorter one's expiry is reported), and a value with
  a ban and a captcha appears twice. Apply ``deleted`` before ``new``, by (value, type).
- A decision is ``{"id", "origin", "type", "scope", "value", "duration", "scenario"}``; the
  duration is Go's ``time.Duration.String()`` of what remains ("3h59m58.7s"; negative once
  expired). Scopes "ip"/"range" of the filter mean the LAPI's "Ip"/"Range"; other scopes are
  passed verbatim.
- ``POST /v1/watchers/login`` (machine id, password, scenarios; the User-Agent must be
  ``name/version``) answers a JWT valid one hour; a LAPI restart invalidates it (new secret).
- ``POST /v1/alerts`` with the JWT stores alerts; an alert's decisions are kept as given
  (origin, type, scope, value; ``until = stop_at + duration``) and reach every bouncer.

Errors are :class:`LapiError` with a ``kind``: ``unreachable`` (connect, timeout, the LAPI
went away mid-answer), ``auth`` (a key, password or token refused; an untrusted certificate),
``protocol`` (not the answer the protocol promises) and ``server`` (the LAPI's own 5xx).
Secrets (API key, password, token) never appear in a message, a ``repr`` or a log line.
The client is not thread-safe; each request uses a fresh connection (the LAPI may restart
between two polls) with a ``timeout`` per network operation, a longer ``answer_timeout`` for the
LAPI to compute its answer (seconds for a 100,000-decision snapshot) and a ``deadline`` for the
whole request.
"""

from __future__ import annotations

import calendar
import http.client
import ipaddress
import json
import logging
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from hybrid import __version__
from hybrid.errors import ConfigError, HybridError

log = logging.getLogger(__name__)

KINDS = ("unreachable", "auth", "protocol", "server")
DEFAULT_USER_AGENT = f"hybrid/{__version__}"
MAX_ANSWER = 256 << 20           # bytes: a 100,000-decision snapshot is ~14 MB
TOKEN_MARGIN_S = 60.0            # log in again this long before the JWT expires
_READ_CHUNK = 1 << 20
# Go's time.Duration is an int64 of nanoseconds
_GO_DURATION_MAX_S = (2 ** 63 - 1) / 1e9


class LapiError(HybridError):
    """Talking to the LAPI failed. ``kind`` is one of :data:`KINDS`; ``status`` the HTTP status
    when there was one. The message is one line and says what to check."""

    def __init__(self, kind: str, message: str, status: int | None = None):
        if kind not in KINDS:
            raise ValueError(f"LapiError kind {kind!r} is not one of {', '.join(KINDS)}")
        super().__init__(message)
        self.kind = kind
        self.status = status


# -- durations -----------------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|\u00b5s|\u03bcs|ms|h|m|s)"
_DURATION = re.compile(rf"[+-]?(?:{_PART})+")
_PART_RE = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|\u00b5s|\u03bcs|ms|h|m|s)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string, as Go's ``time.ParseDuration`` reads it: "4h",
    "3h59m58.123456789s", "-1.5s" (an expired decision), "1h30m", "250ms", "0". Raises
    ValueError (one line) for anything else, and for more than Go's int64 nanoseconds."""
    if type(text) is not str:
        raise ValueError(f"duration {_short(text)} is not a string")
    if len(text) > 64 or not _DURATION.fullmatch(text):
        if text in ("0", "+0", "-0"):
            return 0.0
        raise ValueError(f"duration {_short(text)} is not a Go duration (e.g. \"4h\", \"3h59m58.5s\", \"-1.5s\")")
    sign = -1.0 if text[0] == "-" else 1.0
    total = 0.0
    for number, unit in _PART_RE.findall(text.lstrip("+-")):
        total += float(number) * _UNITS[unit]
    if total > _GO_DURATION_MAX_S:
        raise ValueError(f"duration {_short(text)} is longer than Go's longest ({_GO_DURATION_MAX_S:.0f}s)")
    return sign * total


def format_go_duration(seconds: float) -> str:
    """A duration Go parses: whole seconds ("3600s"), else milliseconds ("1500ms")."""
    if not seconds > 0 or seconds > _GO_DURATION_MAX_S:
        raise ValueError(f"duration {seconds!r}s must be positive and finite")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


def _short(v: object, limit: int = 60) -> str:
    """repr of a value from the network, cut to ``limit`` characters: one line, bounded."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


# -- decisions -----------------------------------------------------------------------------------

ADDRESS_SCOPES = ("ip", "range")


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision as the LAPI sent it. ``scope``, ``type``, ``origin`` are the LAPI's strings
    ("Ip", "Range", "ban", "cscli", ...). ``duration_s`` is what remained when the LAPI answered
    (negative when expired). For scopes Ip and Range, ``packed`` is the network address (4 or 16
    bytes, host bits cleared) and ``prefixlen`` its length; an IPv4-mapped IPv6 value
    (::ffff:a.b.c.d) is IPv4, as the LAPI itself stores it; an Ip-scope value with a /prefix is
    that range (``cscli decisions import`` makes those). Other scopes: ``packed`` is b""."""

    id: int
    origin: str
    type: str
    scope: str
    value: str
    duration_s: float
    scenario: str
    simulated: bool = False
    packed: bytes = field(default=b"", repr=False)
    prefixlen: int = field(default=0, repr=False)

    @property
    def family(self) -> int | None:
        """4, 6, or None for a scope that is not an address."""
        return {4: 4, 16: 6}.get(len(self.packed))

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        if not self.packed:
            return None
        return ipaddress.ip_network((self.packed, self.prefixlen))


@dataclass(frozen=True, slots=True)
class BadDecision:
    """A decision of the answer that was skipped: where it was (``new``/``deleted`` and index),
    its id when it had one, and why (one line)."""

    where: str
    index: int
    id: int | None
    reason: str


@dataclass(frozen=True)
class Stream:
    """One answer of the decision stream. ``bad`` lists the decisions skipped (see
    :func:`parse_stream`); ``size`` is the answer's length in bytes."""

    new: list[Decision]
    deleted: list[Decision]
    bad: list[BadDecision] = field(default_factory=list)
    size: int = 0


class _Bad(Exception):
    pass


def _parse_prefix(value: str) -> tuple[bytes, int]:
    """(network address bytes, prefix length) of an IP or CIDR as the LAPI parses them (Go
    1.19's net.ParseIP / net.ParseCIDR: no zone, no leading zeros in an IPv4 address, a decimal
    prefix length that may have them); raises _Bad."""
    addr, slash, plen_text = value.partition("/")
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
    except (OSError, ValueError):
        raise _Bad(f"value {_short(value)} is not an IP address or range") from None
    bits = len(packed) * 8
    if slash:
        if not plen_text.isascii() or not plen_text.isdigit() or len(plen_text) > 8 or int(plen_text) > bits:
            raise _Bad(f"value {_short(value)} has a bad prefix length")
        plen = int(plen_text)
    else:
        plen = bits
    if bits == 128 and packed[:12] == b"\0" * 10 + b"\xff\xff":     # IPv4-mapped: IPv4 to the LAPI
        if plen < 96:
            raise _Bad(f"value {_short(value)} is an IPv4-mapped range shorter than /96")
        packed, plen, bits = packed[12:], plen - 96, 32
    if plen < bits:
        n = int.from_bytes(packed, "big") & (((1 << plen) - 1) << (bits - plen))
        packed = n.to_bytes(len(packed), "big")
    return packed, plen


def _decision(d: dict, intern: dict) -> Decision:
    try:
        did, origin, dtype, scope = d["id"], d["origin"], d["type"], d["scope"]
        value, duration, scenario = d["value"], d["duration"], d["scenario"]
    except KeyError as exc:
        raise _Bad(f"no {exc.args[0]!r} field") from None
    if type(did) is not int or did <= 0:
        raise _Bad(f"id {_short(did)} is not a positive integer")
    if not (type(origin) is str and type(dtype) is str and type(scope) is str and type(value) is str
            and type(scenario) is str):
        for name in ("origin", "type", "scope", "value", "scenario"):
            if type(d[name]) is not str:
                raise _Bad(f"{name} {_short(d[name])} is not a string")
    if not dtype or not scope or not value:
        raise _Bad("empty " + ("type" if not dtype else "scope" if not scope else "value"))
    simulated = d.get("simulated", False)
    if type(simulated) is not bool:
        raise _Bad(f"simulated {_short(simulated)} is not true or false")
    try:
        seconds = parse_go_duration(duration)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    if scope == "Ip" or scope == "Range" or scope.lower() in ADDRESS_SCOPES:
        packed, plen = _parse_prefix(value)
    else:
        packed, plen = b"", 0
    # the same few origins, types, scopes and scenarios repeat over 100,000 decisions: share them
    return Decision(did, intern.setdefault(origin, origin), intern.setdefault(dtype, dtype),
                    intern.setdefault(scope, scope), value, seconds, intern.setdefault(scenario, scenario),
                    simulated, packed, plen)


def parse_stream(body: bytes) -> Stream:
    """Parse an answer of ``/v1/decisions/stream``.

    The answer as a whole must be what the protocol promises: JSON, an object with ``new`` and
    ``deleted``, each a list of objects or null. Anything else raises LapiError(protocol) and
    nothing of the answer is used: a proxy's error page or a truncated body must never be read
    as "no decisions".

    One decision object that is wrong (a field missing or of the wrong type, a duration or an
    address that does not parse) is skipped and listed in ``Stream.bad``, and the pull
    succeeds. Failing the whole pull for it instead would let one decision the LAPI accepted
    but we cannot read (it keeps appearing in every snapshot until it expires) stop every
    other ban and unban on every gateway; skipped, it costs only itself, and is counted and
    logged by the caller. The cost of skipping a bad entry of ``deleted`` is a ban kept until
    its own TTL ends."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError("parse_stream takes the answer's bytes")
    try:
        doc = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise LapiError("protocol", f"the decision stream answer is not JSON ({len(body)} bytes, "
                                    f"starting {_short(bytes(body[:24]))}): is the URL a CrowdSec LAPI?") from None
    if not isinstance(doc, dict):
        raise LapiError("protocol", f"the decision stream answer is a JSON {type(doc).__name__}, not an object")
    lists = {}
    for where in ("new", "deleted"):
        if where not in doc:
            raise LapiError("protocol", f"the decision stream answer has no {where!r} list")
        items = doc[where]
        if items is None:
            items = []
        if not isinstance(items, list):
            raise LapiError("protocol", f"the decision stream's {where!r} is a JSON {type(items).__name__}, not a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise LapiError("protocol", f"the decision stream's {where}[{i}] is a JSON "
                                            f"{type(item).__name__}, not an object")
        lists[where] = items
    intern: dict[str, str] = {}
    out: dict[str, list[Decision]] = {"new": [], "deleted": []}
    bad: list[BadDecision] = []
    for where, items in lists.items():
        append = out[where].append
        for i, item in enumerate(items):
            try:
                append(_decision(item, intern))
            except _Bad as exc:
                did = item.get("id")
                did = did if type(did) is int and did > 0 else None
                bad.append(BadDecision(where, i, did, f"{where}[{i}]{f' (id {did})' if did else ''}: {exc}"))
    return Stream(out["new"], out["deleted"], bad, len(body))


# -- alerts --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alert:
    """An alert carrying one decision about an IP or a range, as a machine pushes it.

    ``value`` is an address (scope Ip) or a network (scope Range; host bits must be clear; a
    full-length prefix is sent as the bare address, scope Ip, as CrowdSec's agents do).
    ``duration_s`` counts from ``at`` (epoch seconds of the block; now by default): the LAPI
    ends the decision at ``at + duration_s`` by its own clock, so the gateway's clock must be
    synchronised. ``origin`` is kept by the LAPI as given (1.4.6 stores and serves it)."""

    value: str
    duration_s: float
    scenario: str
    message: str = ""
    origin: str = "hybrid"
    type: str = "ban"
    events_count: int = 1
    scenario_version: str = ""
    scenario_hash: str = ""
    at: float = field(default_factory=time.time)

    def __post_init__(self):
        try:
            net = ipaddress.ip_network(self.value, strict=True)
        except ValueError as exc:
            raise ValueError(f"alert value {_short(self.value)}: {exc}") from None
        format_go_duration(self.duration_s)                 # raises for a bad duration
        for name in ("scenario", "origin", "type"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ValueError(f"alert {name} must be a non-empty string")
        if not isinstance(self.events_count, int) or not 0 < self.events_count < 2 ** 31:
            raise ValueError("alert events_count must be a positive int32")
        full = net.prefixlen == net.max_prefixlen
        object.__setattr__(self, "_scope", "Ip" if full else "Range")
        object.__setattr__(self, "_value", str(net.network_address) if full else str(net))

    @property
    def scope(self) -> str:
        return self._scope

    def to_json(self) -> dict:
        """The alert object LAPI 1.4.6 validates (every field its model requires)."""
        when = _rfc3339(self.at)
        value, scope = self._value, self._scope
        source = {"scope": scope, "value": value, ("ip" if scope == "Ip" else "range"): value}
        return {
            "scenario": self.scenario,
            "scenario_hash": self.scenario_hash,
            "scenario_version": self.scenario_version,
            "message": self.message or f"{self.scenario}: {self.type} {value}",
            "events_count": self.events_count,
            "start_at": when,
            "stop_at": when,
            "capacity": 0,
            "leakspeed": "0",
            "simulated": False,
            "remediation": True,
            "source": source,
            "events": [],
            "decisions": [{
                "duration": format_go_duration(self.duration_s),
                "origin": self.origin,
                "scenario": self.scenario,
                "scope": scope,
                "type": self.type,
                "value": value,
            }],
        }


# -- secrets (read from their files by hybrid.service.config.read_secret) -------------------------

def _check_header_secret(value: str | None, what: str) -> None:
    """http.client would quote a bad header value in its error: refuse it here without it."""
    if value is None:
        return
    if not isinstance(value, str) or not value or any(not (0x21 <= ord(c) <= 0x7e) for c in value):
        raise ConfigError(f"the {what} must be printable ASCII without spaces (check the file it came from)")


# -- the client ----------------------------------------------------------------------------------

def split_url(url) -> urllib.parse.SplitResult:
    """A LAPI URL, checked: http(s), a host, a valid port, no credentials, query or fragment
    (ConfigError, one line, otherwise)."""
    parts = urllib.parse.urlsplit(url.strip()) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"LAPI URL {_short(url)}: write http://HOST:PORT or https://HOST:PORT")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("LAPI URL: credentials do not belong in the URL (give the API key in a key file)")
    if parts.query or parts.fragment:
        raise ConfigError(f"LAPI URL {_short(url)}: no ?query or #fragment")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"LAPI URL {_short(url)}: bad port") from None
    return parts


class LapiClient:
    """Talk to one LAPI. Give ``api_key`` to pull decisions, ``machine_id`` and ``password``
    to push alerts (either or both). ``ca_file``: a PEM CA bundle for an https URL (else the
    system's). ``timeout``: seconds for connecting and for each read; ``answer_timeout``: seconds
    the LAPI may take to compute an answer before its first byte (1.4.6 takes ~6 s for a
    100,000-decision snapshot here, ~0.5 s for 10,000 new decisions); ``deadline``: seconds for
    a whole request (default ``answer_timeout + 12 * timeout``). Bad arguments raise
    ConfigError."""

    def __init__(self, url: str, *, api_key: str | None = None, machine_id: str | None = None,
                 password: str | None = None, timeout: float = 5.0, ca_file: str | None = None,
                 user_agent: str = DEFAULT_USER_AGENT, answer_timeout: float = 60.0,
                 deadline: float | None = None, max_answer: int = MAX_ANSWER):
        parts = split_url(url)
        port = parts.port
        self._host = parts.hostname
        self._port = port or (443 if parts.scheme == "https" else 80)
        self._base = parts.path.rstrip("/")
        self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, self._base, "", ""))
        for name, v in (("timeout", timeout), ("answer_timeout", answer_timeout), ("deadline", deadline)):
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 3600):
                raise ConfigError(f"LAPI {name} {v!r}: give seconds, 0 < {name} <= 3600")
        self.timeout, self.answer_timeout = float(timeout), float(answer_timeout)
        self.deadline = float(deadline) if deadline is not None else self.answer_timeout + 12 * self.timeout
        self.max_answer = int(max_answer)
        if not isinstance(user_agent, str) or user_agent.count("/") != 1 or not all(user_agent.split("/")) \
                or any(not (0x21 <= ord(c) <= 0x7e) for c in user_agent):
            # LAPI 1.4.6 refuses a machine login unless the User-Agent is exactly NAME/VERSION
            raise ConfigError(f"user agent {_short(user_agent)}: write NAME/VERSION (one '/', no spaces)")
        self.user_agent = user_agent
        _check_header_secret(api_key, "LAPI API key")
        if (machine_id is None) != (password is None):
            raise ConfigError("a LAPI machine needs both machine_id and password")
        if machine_id is not None and (not isinstance(machine_id, str) or not machine_id):
            raise ConfigError("the LAPI machine id must be a non-empty string")
        if password is not None and (not isinstance(password, str) or not password):
            raise ConfigError("the LAPI machine password must be a non-empty string")
        self._api_key, self.machine_id, self._password = api_key, machine_id, password
        self._token: str | None = None
        self._token_expires = 0.0             # epoch seconds (the LAPI's "expire")
        self._login_scenarios: list[str] = []
        self._ctx = None
        if parts.scheme == "https":
            try:
                self._ctx = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"LAPI CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
        elif ca_file is not None:
            raise ConfigError(f"a CA file was given but the LAPI URL {self.url} is http://: use https:// or drop the CA file")
        self.ca_file = ca_file

    def __repr__(self) -> str:
        who = []
        if self._api_key is not None:
            who.append("api_key=***")
        if self.machine_id is not None:
            who.append(f"machine_id={self.machine_id!r}, password=***")
        return f"LapiClient({self.url!r}{', ' if who else ''}{', '.join(who)})"

    # -- bouncer -------------------------------------------------------------------------------

    def stream(self, startup: bool, scopes: Sequence[str] | None = ("ip", "range"),
               origins: Sequence[str] | None = None, scenarios_containing: Sequence[str] | None = None,
               scenarios_not_containing: Sequence[str] | None = None) -> Stream:
        """One pull of ``/v1/decisions/stream`` (see the module docstring for what ``startup``
        changes). ``scopes``: "ip" and "range" are the LAPI's Ip and Range, other names are
        matched exactly; None or empty leaves the LAPI's default (ip, range). ``origins``:
        only decisions of these origins ("cscli", "crowdsec", "CAPI", "lists", "hybrid", ...).
        ``scenarios_containing``/``_not_containing``: substrings of the scenario, any of."""
        if self._api_key is None:
            raise ConfigError("pulling decisions needs the bouncer's API key (cscli bouncers add NAME)")
        query = {"startup": "true" if startup else "false"}
        for name, items in (("scopes", scopes), ("origins", origins),
                            ("scenarios_containing", scenarios_containing),
                            ("scenarios_not_containing", scenarios_not_containing)):
            if items:
                if isinstance(items, str):
                    items = [items]
                for it in items:
                    if not isinstance(it, str) or not it or "," in it:
                        raise ConfigError(f"decision filter {name}: {_short(it)} must be a non-empty name without ','")
                query[name] = ",".join(items)
        path = "/v1/decisions/stream?" + urllib.parse.urlencode(query)
        t0 = time.monotonic()
        status, body = self._request("GET", path, {"X-Api-Key": self._api_key}, what="pulling decisions")
        if status != 200:
            raise self._status_error(status, body, "pulling decisions", auth_hint="the bouncer's API key was refused: "
                                     "check the key file, or register the bouncer again (cscli bouncers add)")
        if self._api_key.encode() in body:
            # parse_stream quotes bits of a bad answer in its messages: never a secret
            raise LapiError("protocol", f"pulling decisions: the answer from {self.url} contains this bouncer's "
                                        "API key (a proxy echoing requests?): refused", status)
        result = parse_stream(body)
        log.debug("decision stream (startup=%s): %d new, %d deleted, %d bad, %d bytes in %.3fs",
                  startup, len(result.new), len(result.deleted), len(result.bad), len(body), time.monotonic() - t0)
        return result

    # -- machine -------------------------------------------------------------------------------

    def login(self, scenarios: Iterable[str] = ()) -> None:
        """Log the machine in (``POST /v1/watchers/login``) and keep its token. ``scenarios``:
        the scenarios this machine reports (the LAPI lists them for ``cscli machines``)."""
        if self.machine_id is None:
            raise ConfigError("pushing alerts needs a LAPI machine (cscli machines add NAME)")
        scenarios = list(scenarios)
        if not all(isinstance(s, str) for s in scenarios):
            raise ConfigError("login scenarios must be strings")
        body = json.dumps({"machine_id": self.machine_id, "password": self._password,
                           "scenarios": scenarios}).encode()
        status, answer = self._request("POST", "/v1/watchers/login", {"Content-Type": "application/json"},
                                       body=body, what="logging the machine in")
        if status != 200:
            raise self._status_error(status, answer, "logging the machine in",
                                     auth_hint=f"machine {self.machine_id!r} was refused: check its password file, "
                                               "or register it (cscli machines add) and validate it")
        try:
            doc = json.loads(answer)
            token, expire = doc["token"], doc["expire"]
            if not isinstance(token, str) or not token or not isinstance(expire, str):
                raise TypeError
            expires = _parse_rfc3339(expire)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise LapiError("protocol", "the login answer has no token and expiry: is the URL a CrowdSec LAPI?",
                            status) from None
        if any(not (0x21 <= ord(c) <= 0x7e) for c in token):
            raise LapiError("protocol", "the login answer's token is not printable ASCII", status)
        self._token, self._token_expires = token, expires
        self._login_scenarios = scenarios
        log.debug("machine %s logged in, token valid until %s", self.machine_id, expire)

    def push_alerts(self, alerts: Sequence[Alert]) -> list[int]:
        """Store alerts (``POST /v1/alerts``), logging in first when there is no token or it
        expires within a minute, and once again if the LAPI refuses the token (a restarted LAPI
        has a new secret). Returns the new alerts' ids. After an ``unreachable`` or ``server``
        error the alerts may or may not be stored: pushing them again may duplicate them (the
        LAPI's deduplication shows bouncers one decision per value)."""
        alerts = list(alerts)
        if not alerts:
            return []
        if not all(isinstance(a, Alert) for a in alerts):
            raise TypeError("push_alerts takes Alert objects")
        body = json.dumps([a.to_json() for a in alerts]).encode()
        for attempt in (0, 1):
            if self._token is None or time.time() >= self._token_expires - TOKEN_MARGIN_S:
                self.login(self._login_scenarios)
            status, answer = self._request("POST", "/v1/alerts", {"Content-Type": "application/json",
                                                                 "Authorization": f"Bearer {self._token}"},
                                           body=body, what="pushing alerts")
            if status == 401 and attempt == 0:
                self._token = None           # expired or from before a LAPI restart: log in again
                continue
            break
        if status not in (200, 201):
            raise self._status_error(status, answer, "pushing alerts",
                                     auth_hint=f"machine {self.machine_id!r}'s token was refused after a fresh login")
        try:
            ids = json.loads(answer)
            if not isinstance(ids, list) or len(ids) != len(alerts):
                raise TypeError
            out = []
            for i in ids:
                if type(i) is int or (isinstance(i, str) and i.isascii() and i.isdigit()):
                    out.append(int(i))
                else:
                    raise TypeError
        except (ValueError, TypeError):
            shown = _short(self._scrub(answer[:4096].decode("utf-8", "replace")), 40)
            raise LapiError("protocol", f"the LAPI stored {len(alerts)} alert(s) but did not answer their ids "
                                        f"({shown})", status) from None
        return out

    # -- HTTP ----------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for secret in (self._api_key, self._password, self._token):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _status_error(self, status: int, body: bytes, what: str, auth_hint: str) -> LapiError:
        message = ""
        try:
            doc = json.loads(body)
            if isinstance(doc, dict) and isinstance(doc.get("message"), str):
                message = doc["message"]
        except (ValueError, UnicodeDecodeError):
            message = body[:4096].decode("utf-8", "replace")
        said = f" (LAPI: {_short(self._scrub(message), 120)})" if message else ""
        if status in (401, 403):
            return LapiError("auth", f"{what} at {self.url}: HTTP {status}, {auth_hint}{said}", status)
        if 500 <= status <= 599:
            return LapiError("server", f"{what} at {self.url}: the LAPI failed (HTTP {status}){said}: see its log", status)
        if status == 404:
            return LapiError("protocol", f"{what}: {self.url} has no CrowdSec LAPI v1 (HTTP 404): check the URL", status)
        if status == 400 and "HTTPS server" in message:
            return LapiError("protocol", f"{what}: {self.url} is an https server: write https:// in the URL", status)
        return LapiError("protocol", f"{what} at {self.url}: unexpected HTTP {status}{said}", status)

    def _request(self, method: str, path: str, headers: dict, *, body: bytes | None = None,
                 what: str) -> tuple[int, bytes]:
        where = f"{self.url}"
        deadline = time.monotonic() + self.deadline
        if self._ctx is not None:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout, context=self._ctx)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        hdrs = {"User-Agent": self.user_agent, "Accept": "application/json", "Connection": "close", **headers}
        try:
            conn.request(method, self._base + path, body=body, headers=hdrs)
            # the LAPI computes the whole answer before its first byte: wait longer for that one.
            # (keep the socket: http.client drops conn.sock once a "Connection: close" answer
            # starts; the answer reads from the same socket)
            sock = conn.sock
            sock.settimeout(min(self.answer_timeout, max(0.001, deadline - time.monotonic())))
            waited = time.monotonic()
            try:
                resp = conn.getresponse()
            except TimeoutError:
                raise LapiError("unreachable", f"{what}: {where} did not answer within {self.answer_timeout:g}s "
                                               "(a LAPI busy with a huge answer? raise answer_timeout)") from None
            sock.settimeout(self.timeout)
            log.debug("%s %s: HTTP %d after %.3fs", method, path.partition("?")[0], resp.status,
                      time.monotonic() - waited)
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.max_answer:
                raise LapiError("protocol", f"{what}: the answer from {where} is {int(length)} bytes, more than "
                                            f"the {self.max_answer} allowed", resp.status)
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise LapiError("unreachable", f"{what}: {where} did not finish answering within "
                                                   f"{self.deadline:g}s (slow network or LAPI?)")
                chunk = resp.read1(_READ_CHUNK)     # what has arrived: the deadline is checked often
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_answer:
                    raise LapiError("protocol", f"{what}: the answer from {where} is more than "
                                                f"{self.max_answer} bytes", resp.status)
                chunks.append(chunk)
            if resp.length:              # bytes the Content-Length promised and never came
                raise LapiError("unreachable", f"{what}: {where} closed the connection {resp.length} bytes "
                                               f"before the end of its answer (LAPI stopped?)")
            return resp.status, b"".join(chunks)
        except LapiError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise LapiError("auth", f"{what}: the TLS certificate of {where} is not trusted "
                                    f"({exc.verify_message}): give the CA that signed it as the CA file") from None
        except ssl.SSLError as exc:
            raise LapiError("protocol", f"{what}: TLS with {where} failed ({exc.reason or exc}): "
                                        "does it serve https? check the URL's scheme") from None
        except (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionResetError,
                BrokenPipeError, ConnectionAbortedError):
            raise LapiError("unreachable", f"{what}: {where} closed the connection before answering "
                                           "completely (LAPI stopped?)") from None
        except ConnectionRefusedError:
            raise LapiError("unreachable", f"{what}: connection to {where} refused: is the LAPI running, "
                                           "and is the URL's port its api.server.listen_uri?") from None
        except socket.gaierror as exc:
            raise LapiError("unreachable", f"{what}: cannot resolve {self._host} ({exc.strerror}): "
                                           "check the URL's host") from None
        except TimeoutError:
            raise LapiError("unreachable", f"{what}: {where} did not answer within {self.timeout:g}s") from None
        except http.client.HTTPException as exc:
            raise LapiError("protocol", f"{what}: {where} did not answer HTTP ({type(exc).__name__}): "
                                        "check the URL") from None
        except OSError as exc:
            raise LapiError("unreachable", f"{what}: {where}: {exc.strerror or exc}") from None
        finally:
            conn.close()


def _rfc3339(epoch: float) -> str:
    """RFC 3339 UTC with microseconds, which Go's time.Parse(time.RFC3339, ...) reads."""
    whole = int(epoch // 1)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((epoch - whole) * 1e6):06d}Z"


def _parse_rfc3339(text: str) -> float:
    """Epoch seconds of an RFC 3339 time as Go writes it ("2026-12-01T23:24:05Z", fractions,
    "+02:00" offsets)."""
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)", text)
    if not m:
        raise ValueError(f"time {_short(text)} is not RFC 3339")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    t = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) + float(m[7] or 0)
    if m[8] not in ("Z", "z"):
        sign = 1 if m[8][0] == "+" else -1
        t -= sign * (int(m[8][1:3]) * 3600 + int(m[8][4:6]) * 60)
    return t
