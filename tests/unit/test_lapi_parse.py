"""hybrid.fleet.lapi without a network: Go durations, the decision stream's answers (real ones
captured from CrowdSec 1.4.6, and garbage), alerts as the LAPI's model wants them, and secrets
kept out of every message and repr (the secret files: tests/unit/test_config_crowdsec.py)."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid.errors import ConfigError, HybridError
from hybrid.fleet.lapi import (
    Alert,
    Decision,
    LapiClient,
    LapiError,
    _parse_rfc3339,
    format_go_duration,
    parse_go_duration,
    parse_stream,
)

pytestmark = pytest.mark.unit

# Answers of the real LAPI (crowdsec 1.4.6, this machine), byte for byte.
SNAPSHOT_EMPTY = b'{"deleted":null,"new":null}'
DELTA = (b'{"deleted":null,"new":[{"duration":"8.704169898s","id":3,"origin":"cscli","scenario":"manual '
         b'\'ban\' from \'test\'","scope":"Ip","type":"ban","value":"2001:2::5"},{"duration":"59m58.704166541s",'
         b'"id":1,"origin":"cscli","scenario":"test1","scope":"Ip","type":"ban","value":"198.18.0.5"},'
         b'{"duration":"1h59m58.70416543s","id":2,"origin":"cscli","scenario":"manual \'ban\' from \'test\'",'
         b'"scope":"Range","type":"ban","value":"198.18.1.0/24"},{"duration":"3h59m58.704164267s","id":4,'
         b'"origin":"cscli","scenario":"manual \'ban\' from \'test\'","scope":"Range","type":"ban","value":'
         b'"2001:2:0:1::/64"},{"duration":"3h59m59.704163326s","id":6,"origin":"cscli","scenario":"manual '
         b'\'captcha\' from \'test\'","scope":"Ip","type":"captcha","value":"198.18.0.6"}]}')
EXPIRED = (b'{"deleted":[{"duration":"-2.059525605s","id":3,"origin":"cscli","scenario":"manual \'ban\' from '
           b'\'test\'","scope":"Ip","type":"ban","value":"2001:2::5"}],"new":null}')

KEY = "d4d2e0530645c73b14468592cf3ebe22"
PASSWORD = "9Ju6TVLBIv4zhhXW5Xqk9nW7FdptNGBVg0DmGOdWHzJr7PfMTWX88oJVena6eYUM"


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text, text
    return text


# -- Go durations --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("4h", 14400), ("1h0m0s", 3600), ("3h59m58.704164267s", 14398.704164267), ("-2.059525605s", -2.059525605),
    ("-23.337971ms", -0.023337971), ("59m58.704166541s", 3598.704166541), ("8.704169898s", 8.704169898),
    ("500\u00b5s", 0.0005), ("1.5\u03bcs", 1.5e-6), ("7us", 7e-6), ("100ns", 1e-7), ("0s", 0), ("0", 0),
    ("-0", 0), ("+5s", 5), (".5s", 0.5), ("5.s", 5), ("1h1h", 7200), ("30m", 1800), ("1m1.5s", 61.5),
    ("2562047h47m16.854775807s", 9223372036.854775807),
])
def test_go_duration(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("text", [
    "", "4", "h", "-", "+", ".", ".s", "1.2.3s", "4 h", " 4h", "4h ", "1hh", "1d", "1w", "+-1s", "--1s",
    "\u0661s", "1e3s", "nan", "inf", "s1", "1H", "1S", "1h\n", "0x10s", "2562048h", "9" * 70 + "s", "1_000s",
])
def test_go_duration_garbage(text):
    with pytest.raises(ValueError) as exc:
        parse_go_duration(text)
    assert one_line(exc.value).startswith("duration ")


@pytest.mark.parametrize("value", [None, 4, 4.0, b"4h", ["4h"]])
def test_go_duration_not_a_string(value):
    with pytest.raises(ValueError, match="is not a string"):
        parse_go_duration(value)


def go_string(ns: int) -> str:
    """Go's time.Duration.String(), written from its documented format: the reference."""
    if ns == 0:
        return "0s"
    sign, u = ("-" if ns < 0 else ""), abs(ns)

    def frac(v: int, digits: int) -> str:
        whole, rest = divmod(v, 10 ** digits)
        tail = f"{rest:0{digits}d}".rstrip("0")
        return f"{whole}.{tail}" if tail else f"{whole}"

    if u < 1_000_000_000:
        if u < 1000:
            return f"{sign}{u}ns"
        if u < 1_000_000:
            return f"{sign}{frac(u, 3)}\u00b5s"
        return f"{sign}{frac(u, 6)}ms"
    secs, rest = divmod(u, 1_000_000_000)
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    out = frac(s * 1_000_000_000 + rest, 9) + "s"
    if h or m:
        out = f"{m}m" + out
    if h:
        out = f"{h}h" + out
    return sign + out


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-(2 ** 63) + 1, max_value=2 ** 63 - 1))
def test_go_duration_reads_what_go_writes(ns):
    assert parse_go_duration(go_string(ns)) == pytest.approx(ns / 1e9, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seconds, text", [(3600, "3600s"), (1.5, "1500ms"), (0.0001, "1ms"), (14400.0, "14400s")])
def test_format_go_duration(seconds, text):
    assert format_go_duration(seconds) == text
    assert parse_go_duration(text) == pytest.approx(max(seconds, 0.001))


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), 1e12])
def test_format_go_duration_refuses(seconds):
    with pytest.raises(ValueError):
        format_go_duration(seconds)


# -- decision stream answers ---------------------------------------------------------------------

def test_empty_snapshot_null_lists_are_empty():
    s = parse_stream(SNAPSHOT_EMPTY)
    assert (s.new, s.deleted, s.bad, s.size) == ([], [], [], len(SNAPSHOT_EMPTY))


def test_real_delta():
    s = parse_stream(DELTA)
    assert s.deleted == [] and s.bad == []
    assert [(d.id, d.scope, d.type, d.value, str(d.network), d.family) for d in s.new] == [
        (3, "Ip", "ban", "2001:2::5", "2001:2::5/128", 6),
        (1, "Ip", "ban", "198.18.0.5", "198.18.0.5/32", 4),
        (2, "Range", "ban", "198.18.1.0/24", "198.18.1.0/24", 4),
        (4, "Range", "ban", "2001:2:0:1::/64", "2001:2:0:1::/64", 6),
        (6, "Ip", "captcha", "198.18.0.6", "198.18.0.6/32", 4),
    ]
    d = s.new[1]
    assert d == Decision(1, "cscli", "ban", "Ip", "198.18.0.5", 3598.704166541, "test1", False,
                         bytes([198, 18, 0, 5]), 32)
    assert d.duration_s == pytest.approx(3598.704166541)


def test_expired_decision_is_in_deleted_with_negative_duration():
    s = parse_stream(EXPIRED)
    assert s.new == [] and [(d.id, d.value) for d in s.deleted] == [(3, "2001:2::5")]
    assert s.deleted[0].duration_s == pytest.approx(-2.059525605)


def decision(**over):
    d = {"duration": "4h", "id": 7, "origin": "cscli", "scenario": "manual", "scope": "Ip", "type": "ban",
         "value": "198.18.0.7"}
    d.update(over)
    return {k: v for k, v in d.items() if v is not KeyError}


def answer(new=(), deleted=()) -> bytes:
    return json.dumps({"new": list(new), "deleted": list(deleted)}).encode()


@pytest.mark.parametrize("scope, value, packed, plen", [
    ("Ip", "198.18.0.7", "198.18.0.7", 32),
    ("Ip", "2001:2::7", "2001:2::7", 128),
    ("Range", "198.18.4.0/22", "198.18.4.0", 22),
    ("Range", "198.18.4.9/22", "198.18.4.0", 22),            # host bits: the LAPI (Go) masks them
    ("Range", "198.18.4.0/022", "198.18.4.0", 22),           # Go's ParseCIDR reads leading zeros
    ("Range", "2001:2:0:ab::/56", "2001:2::", 56),
    ("Range", "198.18.0.7", "198.18.0.7", 32),
    ("Ip", "198.18.77.0/24", "198.18.77.0", 24),             # what `cscli decisions import` stores
    ("Ip", "::ffff:198.18.0.7", "198.18.0.7", 32),           # IPv4 to the LAPI (Addr2Ints)
    ("Range", "::ffff:198.18.0.0/112", "198.18.0.0", 16),
    ("range", "198.18.0.0/16", "198.18.0.0", 16),
    ("ip", "0.0.0.0/0", "0.0.0.0", 0),                       # parsed; refusing it is the bouncer's job
])
def test_address_values(scope, value, packed, plen):
    [d] = parse_stream(answer([decision(scope=scope, value=value)])).new
    assert (d.packed, d.prefixlen) == (ipaddress.ip_address(packed).packed, plen)
    assert d.value == value and d.scope == scope


def test_other_scopes_are_kept_without_an_address():
    [d] = parse_stream(answer([decision(scope="username", value="bob")])).new
    assert (d.scope, d.value, d.packed, d.family, d.network) == ("username", "bob", b"", None, None)


def test_extra_fields_of_newer_lapis_are_ignored_and_simulated_is_read():
    [d] = parse_stream(answer([decision(uuid="5c3e...", until="2026-12-01T23:00:00Z", simulated=True)])).new
    assert d.simulated is True and d.id == 7


@pytest.mark.parametrize("over, reason", [
    ({"id": KeyError}, "no 'id' field"),
    ({"value": KeyError}, "no 'value' field"),
    ({"duration": KeyError}, "no 'duration' field"),
    ({"origin": KeyError}, "no 'origin' field"),
    ({"scenario": KeyError}, "no 'scenario' field"),
    ({"type": KeyError}, "no 'type' field"),
    ({"scope": KeyError}, "no 'scope' field"),
    ({"id": True}, "id True is not a positive integer"),
    ({"id": 0}, "id 0 is not a positive integer"),
    ({"id": -4}, "id -4 is not a positive integer"),
    ({"id": "7"}, "id '7' is not a positive integer"),
    ({"id": 7.0}, "id 7.0 is not a positive integer"),
    ({"value": None}, "value None is not a string"),
    ({"value": ""}, "empty value"),
    ({"type": ""}, "empty type"),
    ({"scope": ""}, "empty scope"),
    ({"origin": 3}, "origin 3 is not a string"),
    ({"duration": "forever"}, "duration 'forever' is not a Go duration"),
    ({"duration": 14400}, "duration 14400 is not a string"),
    ({"simulated": "false"}, "simulated 'false' is not true or false"),
    ({"value": "198.18.0.256"}, "value '198.18.0.256' is not an IP address or range"),
    ({"value": "198.018.0.1"}, "is not an IP address"),                  # Go refuses leading zeros
    ({"value": "198.18.0.1 "}, "is not an IP address"),
    ({"value": "fe80::1%eth0"}, "is not an IP address"),
    ({"value": "example.test"}, "is not an IP address"),
    ({"value": "198.18.0.0/33"}, "bad prefix length"),
    ({"value": "198.18.0.0/0330"}, "bad prefix length"),
    ({"value": "198.18.0.0/-1"}, "bad prefix length"),
    ({"value": "198.18.0.0/"}, "bad prefix length"),
    ({"value": "2001:2::/129"}, "bad prefix length"),
    ({"value": "::ffff:0.0.0.0/95"}, "IPv4-mapped range shorter than /96"),
    ({"scope": "Range", "value": "198.18.0.0/\u0662\u0664"}, "bad prefix length"),
])
def test_one_bad_decision_is_skipped_and_listed(over, reason):
    s = parse_stream(answer(new=[decision(id=1), decision(**over), decision(id=3, value="198.18.0.9")],
                            deleted=[decision(id=4, duration="-1s")]))
    assert [d.id for d in s.new] == [1, 3] and [d.id for d in s.deleted] == [4]
    [bad] = s.bad
    assert (bad.where, bad.index) == ("new", 1)
    assert reason in bad.reason and bad.reason.startswith("new[1]")
    assert "\n" not in bad.reason and len(bad.reason) < 200
    assert bad.id == (None if "id" in over else 7)


def test_bad_deleted_entry_is_listed_too():
    s = parse_stream(answer(deleted=[decision(duration="?")]))
    assert s.deleted == [] and [(b.where, b.index, b.id) for b in s.bad] == [("deleted", 0, 7)]


def test_long_garbage_values_are_cut_in_reasons():
    s = parse_stream(answer([decision(value="x" * 100_000, scope="Ip")]))
    assert len(s.bad[0].reason) < 200


@pytest.mark.parametrize("body, says", [
    (b"", "is not JSON"),
    (b"<html><body>502 Bad Gateway</body></html>", "is not JSON"),
    (b'{"deleted":null,"new":[{"duration":"4h","id":1', "is not JSON"),     # truncated
    (b"\xff\xfe{}", "is not JSON"),
    (b"[" * 100_000, "is not JSON"),                                          # nesting bomb
    (b"null", "is a JSON NoneType, not an object"),
    (b"[]", "is a JSON list, not an object"),
    (b'"new"', "is a JSON str, not an object"),
    (b'{"new":null}', "has no 'deleted' list"),
    (b'{"deleted":null}', "has no 'new' list"),
    (b'{"message":"access forbidden"}', "has no 'new' list"),
    (b'{"new":{},"deleted":null}', "'new' is a JSON dict, not a list"),
    (b'{"new":"x","deleted":null}', "'new' is a JSON str, not a list"),
    (b'{"new":null,"deleted":3}', "'deleted' is a JSON int, not a list"),
    (b'{"new":[null],"deleted":null}', "new[0] is a JSON NoneType, not an object"),
    (b'{"new":[],"deleted":[[]]}', "deleted[0] is a JSON list, not an object"),
])
def test_garbage_answers_fail_the_whole_pull(body, says):
    with pytest.raises(LapiError) as exc:
        parse_stream(body)
    assert exc.value.kind == "protocol" and isinstance(exc.value, HybridError)
    assert says in one_line(exc.value) and len(str(exc.value)) < 300


def test_parse_stream_takes_bytes():
    with pytest.raises(TypeError):
        parse_stream('{"new":null,"deleted":null}')


def test_lapi_error_kinds():
    assert LapiError("auth", "x").kind == "auth"
    with pytest.raises(ValueError):
        LapiError("weird", "x")


# -- alerts --------------------------------------------------------------------------------------

def test_alert_json_for_an_ip_has_every_field_the_model_requires():
    a = Alert("198.18.9.9", 3600, "hybrid/block-evil", at=1796163845.25)
    j = a.to_json()
    required = {"scenario", "scenario_hash", "scenario_version", "message", "events_count", "start_at",
                "stop_at", "capacity", "leakspeed", "simulated", "source", "events"}
    assert required <= set(j) and j["events"] == [] and j["simulated"] is False
    assert j["source"] == {"scope": "Ip", "value": "198.18.9.9", "ip": "198.18.9.9"}
    assert j["decisions"] == [{"duration": "3600s", "origin": "hybrid", "scenario": "hybrid/block-evil",
                               "scope": "Ip", "type": "ban", "value": "198.18.9.9"}]
    assert j["start_at"] == j["stop_at"] == "2026-12-01T22:24:05.250000Z"
    assert _parse_rfc3339(j["stop_at"]) == pytest.approx(1796163845.25)
    assert json.loads(json.dumps(j)) == j


@pytest.mark.parametrize("value, scope, sent", [
    ("2001:2:0:9::/64", "Range", "2001:2:0:9::/64"),
    ("198.18.4.0/24", "Range", "198.18.4.0/24"),
    ("198.18.4.1/32", "Ip", "198.18.4.1"),
    ("2001:2::1/128", "Ip", "2001:2::1"),
    ("2001:2::1", "Ip", "2001:2::1"),
])
def test_alert_scope(value, scope, sent):
    j = Alert(value, 60, "hybrid/r").to_json()
    assert (j["source"]["scope"], j["source"]["value"]) == (scope, sent)
    assert j["source"]["ip" if scope == "Ip" else "range"] == sent
    assert (j["decisions"][0]["scope"], j["decisions"][0]["value"]) == (scope, sent)


@pytest.mark.parametrize("kw, says", [
    ({"value": "198.18.4.1/24"}, "has host bits set"),
    ({"value": "example.test"}, "does not appear to be an IPv4 or IPv6"),
    ({"duration_s": 0}, "must be positive"),
    ({"duration_s": float("nan")}, "must be positive"),
    ({"scenario": ""}, "scenario must be a non-empty string"),
    ({"origin": ""}, "origin must be a non-empty string"),
    ({"events_count": 0}, "events_count"),
])
def test_alert_refuses(kw, says):
    args = {"value": "198.18.0.1", "duration_s": 60, "scenario": "hybrid/r", **kw}
    with pytest.raises(ValueError) as exc:
        Alert(**args)
    assert says in one_line(exc.value)


def test_rfc3339_as_go_writes_it():
    assert _parse_rfc3339("2026-12-01T23:24:05Z") == 1796167445
    assert _parse_rfc3339("2026-12-01T23:24:05.5+01:00") == 1796167445.5 - 3600
    with pytest.raises(ValueError):
        _parse_rfc3339("tomorrow")


def test_repr_hides_secrets():
    c = LapiClient("http://127.0.0.1:8080/", api_key=KEY, machine_id="gw-a", password=PASSWORD)
    r = repr(c)
    assert KEY not in r and PASSWORD not in r and "api_key=***" in r and "'gw-a'" in r
    assert c.url == "http://127.0.0.1:8080"


@pytest.mark.parametrize("url, says", [
    ("127.0.0.1:8080", "write http://HOST:PORT"),
    ("ftp://127.0.0.1", "write http://HOST:PORT"),
    ("http://", "write http://HOST:PORT"),
    (None, "write http://HOST:PORT"),
    ("http://127.0.0.1:8080/?x=1", "no ?query"),
    ("http://127.0.0.1:99999", "bad port"),
    (f"http://user:{PASSWORD}@127.0.0.1:8080", "credentials do not belong in the URL"),
    (f"http://{KEY}@127.0.0.1:8080", "credentials do not belong in the URL"),
])
def test_bad_urls(url, says):
    with pytest.raises(ConfigError) as exc:
        LapiClient(url, api_key=KEY)
    text = one_line(exc.value)
    assert says in text and KEY not in text and PASSWORD not in text


@pytest.mark.parametrize("key", [KEY + "\n", KEY + " x", "", "k\u00e9y", "a\r\nX-Evil: 1"])
def test_bad_api_key_is_refused_without_quoting_it(key):
    with pytest.raises(ConfigError) as exc:
        LapiClient("http://127.0.0.1:8080", api_key=key)
    text = one_line(exc.value)
    assert "printable ASCII" in text and (not key.strip() or key.strip()[:8] not in text)


@pytest.mark.parametrize("kw, says", [
    ({"user_agent": "hybrid"}, "write NAME/VERSION"),
    ({"user_agent": "hybrid/0.1/x"}, "write NAME/VERSION"),
    ({"user_agent": "hy brid/0.1"}, "write NAME/VERSION"),
    ({"timeout": 0}, "0 < timeout"),
    ({"timeout": "5"}, "0 < timeout"),
    ({"machine_id": "gw-a"}, "needs both machine_id and password"),
    ({"password": PASSWORD}, "needs both machine_id and password"),
    ({"machine_id": "", "password": PASSWORD}, "machine id must be a non-empty string"),
    ({"ca_file": "/etc/ssl/certs/ca-certificates.crt"}, "is http://"),
])
def test_bad_client_arguments(kw, says):
    with pytest.raises(ConfigError) as exc:
        LapiClient("http://127.0.0.1:8080", **kw)
    text = one_line(exc.value)
    assert says in text and PASSWORD not in text


def test_missing_ca_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        LapiClient("https://127.0.0.1:8080", ca_file=str(tmp_path / "ca.pem"))
    assert "LAPI CA file" in one_line(exc.value)


def test_pulling_without_a_key_and_pushing_without_a_machine_are_config_errors():
    c = LapiClient("http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="needs the bouncer's API key"):
        c.stream(startup=True)
    with pytest.raises(ConfigError, match="needs a LAPI machine"):
        c.push_alerts([Alert("198.18.0.1", 60, "hybrid/r")])
    assert c.push_alerts([]) == []


@pytest.mark.parametrize("kw", [{"scopes": ["ip,range"]}, {"origins": [""]}, {"scenarios_containing": [3]}])
def test_bad_filters(kw):
    with pytest.raises(ConfigError, match="decision filter"):
        LapiClient("http://127.0.0.1:1", api_key=KEY).stream(True, **kw)
