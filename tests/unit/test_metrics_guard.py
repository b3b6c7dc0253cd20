"""The metrics endpoint's guards without a network namespace: the snapshot cache (a fake clock),
the bearer-token check, the token file and the [metrics] keys at config load."""

from __future__ import annotations

import hmac
import os
import threading
import time

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from hybrid.errors import ConfigError
from hybrid.observe import metrics
from hybrid.service import config as hcfg

pytestmark = pytest.mark.unit

MINIMAL = '[attach]\ninterfaces = ["eth0"]\n[engine]\nrules = "rules.toml"\n'
TOKEN = "0123456789abcdef0123456789abcdef"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the snapshot cache ------------------------------------------------------------------------------

def test_cache_reads_once_per_second_however_many_scrapes():
    clock, calls = Clock(), []

    def read():
        calls.append(clock.now)
        return {"n": len(calls)}

    cache = metrics.SnapshotCache(read, 1.0, clock)
    for _ in range(100):
        assert cache.get() == {"n": 1}
    clock.now += 0.999
    assert cache.get() == {"n": 1} and len(calls) == 1
    clock.now += 0.001                     # one second after the read
    assert cache.get() == {"n": 2}
    for step in range(50):                 # 5 s of scrapes every 0.1 s: one read per second
        clock.now += 0.1
        cache.get()
    assert len(calls) == 2 + 5 and cache.reads == len(calls)


def test_cache_pause_counts_from_the_end_of_a_slow_read():
    clock = Clock()

    def read():
        clock.now += 0.7                   # the read itself takes 0.7 s
        return clock.now

    cache = metrics.SnapshotCache(read, 1.0, clock)
    first = cache.get()
    clock.now += 0.5
    assert cache.get() == first and cache.reads == 1


def test_concurrent_scrapes_wait_for_one_read():
    started, release = threading.Event(), threading.Event()
    calls = []

    def read():
        calls.append(1)
        started.set()
        release.wait(5)
        return "snapshot"

    cache = metrics.SnapshotCache(read, 1.0, Clock())
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get())) for _ in range(8)]
    threads[0].start()
    assert started.wait(5)
    for t in threads[1:]:
        t.start()
    time.sleep(0.05)                        # the others are waiting on the reader
    assert results == []
    release.set()
    for t in threads:
        t.join(5)
    assert results == ["snapshot"] * 8 and calls == [1]


def test_collector_counts_refusals_and_reads(monkeypatch):
    clock, reads = Clock(), []
    monkeypatch.setattr(metrics.views, "snapshot", lambda instance: reads.append(instance) or
                        {"attached": False, "interfaces": {}, "unregistered": {}, "flows": None, "queues": {},
                         "engines": []})
    col = metrics.InstanceCollector("lab-gw", clock=clock)
    col.count_refused("busy")
    col.count_refused("unauthorized")
    col.count_refused("unauthorized")
    for _ in range(3):
        fams = {f.name: f for f in col.collect()}
    assert reads == ["lab-gw"]
    assert {s.labels["reason"]: s.value for s in fams["hybrid_metrics_refused"].samples} == \
        {"unauthorized": 2, "busy": 1, "timeout": 0}
    assert fams["hybrid_metrics_snapshots"].samples[0].value == 1


def test_fail_open_and_doubts_are_exported(monkeypatch):
    """Every fail-open way, every doubt reason (old stats files' and new ones'), the actions, the
    policy and the scoped verdicts reach the exposition, under the names the docs give."""
    old = {"queue": 0, "errors": 3, "hellos_abandoned": 2, "http_unparsed": {"host_conflict": 4},
           "hellos_unparsed": {"no-sni": 0}}
    new = {"queue": 1, "doubts": {"tls:records-interleaved": 5}, "doubt_policy": "reset",
           "doubt_actions": {"inspect": 0, "drop": 0, "reset": 5}, "scoped": {"responder-side": 2}}
    rep = {"fail_open": True, "passed_overflow": 17, "queues": [{"queue": 0, "bound": True}]}
    snap = {"attached": True, "interfaces": {"eth0": {"over_pass": 6}}, "unregistered": {}, "flows": None,
            "queues": {}, "engines": [old, new]}
    snap["fail_open"] = metrics.views.fail_open([snap["interfaces"]["eth0"]], snap["engines"], rep)
    snap["doubts"] = metrics.views.doubts(snap["engines"])
    monkeypatch.setattr(metrics.views, "snapshot", lambda instance: snap)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.InstanceCollector("lab-gw"))
    text = generate_latest(registry).decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}
    ways = {dict(k[1])["way"]: v for k, v in got.items() if k[0] == "hybrid_fail_open_total"}
    assert ways == {"queue-overflow": 17, "over-budget": 6, "flow-table-full": 0, "decode-error": 3,
                    "join-abandoned": 2, "flow-write-error": 0, "block-not-pinned": 0}
    reasons = {dict(k[1])["reason"]: v for k, v in got.items() if k[0] == "hybrid_doubts_total"}
    assert reasons == {"http:host_conflict": 4, "tls:no-sni": 0, "tls:records-interleaved": 5}
    assert got[("hybrid_doubt_actions_total", (("action", "reset"),))] == 5
    assert got[("hybrid_engine_doubt_policy", (("policy", "reset"), ("queue", "1")))] == 1
    assert got[("hybrid_scoped_verdicts_total", (("scope", "responder-side"),))] == 2
    for way in metrics.views.FAIL_OPEN_WAYS:          # the help names every way
        assert f"{way}: " in text.split("# HELP hybrid_fail_open_total", 1)[1].split("\n", 1)[0]
    # a way that cannot be counted now is absent, not 0
    snap["fail_open"] = metrics.views.fail_open([], [], {**rep, "passed_overflow": None})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.InstanceCollector("lab-gw"))
    assert 'way="queue-overflow"' not in generate_latest(registry).decode()


# -- the bearer token --------------------------------------------------------------------------------

@pytest.mark.parametrize("header, ok", [
    (f"Bearer {TOKEN}", True),
    (f"bearer {TOKEN}", True),               # the scheme is case-insensitive (RFC 9110)
    (f"  Bearer   {TOKEN} ", True),
    (f"Bearer {TOKEN[:-1]}", False),
    (f"Bearer {TOKEN}0", False),
    (f"Basic {TOKEN}", False),
    (TOKEN, False),
    ("Bearer ", False),
    ("", False),
    (None, False),
    ("Bearer \u00e9t\u00e9", False),
])
def test_check_bearer(header, ok):
    assert metrics.check_bearer(header, TOKEN.encode()) is ok


def test_check_bearer_compares_in_constant_time(monkeypatch):
    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(metrics.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    assert not metrics.check_bearer("Basic x", b"secret-token-0123")     # compared even so
    assert seen == [(b"x", b"secret-token-0123")]


@pytest.fixture
def token_file(tmp_path, monkeypatch):
    """A token file owned by the user running the tests, who counts as root here."""
    monkeypatch.setattr(hcfg, "TOKEN_OWNER_UID", os.geteuid())
    path = tmp_path / "metrics.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def test_read_token(token_file):
    assert hcfg.read_token(str(token_file)) == TOKEN.encode()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660])
def test_token_file_open_to_others_is_refused(token_file, mode):
    token_file.chmod(mode)
    msg = f"token_file {token_file} has mode {mode:04o}: group and others must have no access to it " \
          f"(chmod 600 {token_file})"
    for check in (hcfg.check_token_file, hcfg.read_token):
        with pytest.raises(ConfigError) as exc:
            check(str(token_file))
        assert str(exc.value) == msg


def test_token_file_of_another_owner_is_refused(token_file, monkeypatch):
    monkeypatch.setattr(hcfg, "TOKEN_OWNER_UID", os.geteuid() + 1)
    with pytest.raises(ConfigError, match=rf"^token_file {token_file} is owned by uid {os.geteuid()}: it must "
                                          rf"be root's \(chown root: {token_file}\)$"):
        hcfg.check_token_file(str(token_file))


@pytest.mark.parametrize("text", ["", "short\n", "has space in the middle of it\n", "x" * 5000,
                                  "two\nlines-of-token-text\n"])
def test_token_must_be_one_long_word(token_file, text):
    token_file.write_text(text)
    with pytest.raises(ConfigError, match="token must be one word|is empty"):
        hcfg.read_token(str(token_file))


# -- the [metrics] keys at config load ---------------------------------------------------------------

@pytest.fixture
def write(tmp_path):
    (tmp_path / "rules.toml").write_text('default = "accept"\n')

    def write(metrics_table: str) -> str:
        p = tmp_path / "hybrid.toml"
        p.write_text(MINIMAL + "[metrics]\n" + metrics_table)
        return str(p)
    return write


def error_of(path, overrides=None) -> str:
    with pytest.raises(hcfg.ConfigFileError) as exc:
        hcfg.load(path, overrides)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_default_is_a_root_only_socket(write):
    cfg = hcfg.load(write("enabled = true\n"))
    assert cfg["metrics.listen"] == "unix:/run/hybrid/metrics.sock"
    assert hcfg.unix_path(cfg["metrics.listen"]) == "/run/hybrid/metrics.sock"
    assert cfg["metrics.socket_group"] is None and cfg["metrics.token_file"] is None


def test_socket_with_group_and_tcp_with_token(write, token_file):
    cfg = hcfg.load(write('enabled = true\nlisten = "unix:/run/hybrid-metrics//metrics.sock"\n'
                          'socket_group = "root"\n'))
    assert cfg["metrics.listen"] == "unix:/run/hybrid-metrics/metrics.sock" and cfg["metrics.socket_group"] == "root"
    assert hcfg.load(write('socket_group = 0\n'))["metrics.socket_group"] == 0
    cfg = hcfg.load(write(f'enabled = true\nlisten = "0.0.0.0:9469"\ntoken_file = "{token_file.name}"\n'))
    assert cfg["metrics.token_file"] == str(token_file)        # relative to the configuration file


@pytest.mark.parametrize("listen", ["127.0.0.1:9469", "127.0.0.2:0", "[::1]:9469", "localhost:9469"])
def test_loopback_without_token_is_allowed(write, listen):
    assert hcfg.load(write(f'enabled = true\nlisten = "{listen}"\n'))["metrics.token_file"] is None


@pytest.mark.parametrize("listen", ["0.0.0.0:9469", ":9469", "[::]:9469", "192.0.2.1:9469", "gw.example:9469"])
def test_tcp_beyond_loopback_without_token_is_refused(write, listen):
    shown = hcfg.load(write(f'listen = "{listen}"\n'))["metrics.listen"]     # disabled: nothing to guard
    path = write(f'enabled = true\nlisten = "{listen}"\n')
    assert error_of(path) == (
        f"{path}:7: listen {shown} is reachable from other hosts and no token_file is set: set token_file "
        "(a root-only file with the bearer token Prometheus sends), or listen on loopback or \"unix:/PATH\"")


def test_tcp_beyond_loopback_refused_on_the_command_line_too(write):
    err = error_of(write(""), {"metrics.enabled": True, "metrics.listen": "0.0.0.0:9469"})
    assert err.startswith("--metrics-listen: listen 0.0.0.0:9469 is reachable from other hosts")


def test_token_file_checked_at_load(write, token_file):
    token_file.chmod(0o644)
    path = write(f'enabled = true\nlisten = "0.0.0.0:9469"\ntoken_file = "{token_file}"\n')
    assert error_of(path) == f"{path}:8: token_file {token_file} has mode 0644: group and others must have no " \
                             f"access to it (chmod 600 {token_file})"
    path = write('token_file = "missing.token"\n')
    assert error_of(path) == f"{path}:6: token_file {token_file.parent}/missing.token: No such file or directory"


@pytest.mark.parametrize("table, line, message", [
    ('listen = "unix:run/metrics.sock"\n', 6,
     "listen 'unix:run/metrics.sock': write an absolute path after unix:, e.g. \"unix:/run/hybrid/metrics.sock\""),
    (f'listen = "unix:/{"x" * 120}"\n', 6, "listen 'unix:/xxxx"),
    ('listen = "localhost"\n', 6, ("listen 'localhost': write \"HOST:PORT\", e.g. \"127.0.0.1:9469\" or "
                                   "\"[::1]:9469\", or \"unix:/PATH\" for a socket")),
    ('listen = 9469\n', 6, "listen 9469: write \"unix:/PATH\" for a socket"),
    ('socket_group = "no-such-group-here"\n', 6,
     "socket_group 'no-such-group-here': no such group on this host: create it (groupadd) or name another"),
    ('socket_group = true\n', 6, "socket_group True: write a group name in quotes"),
    ('listen = "127.0.0.1:9469"\nsocket_group = "root"\n', 7,
     ("socket_group applies to a socket, and listen is 127.0.0.1:9469: remove socket_group, or listen on "
      "\"unix:/PATH\"")),
    ('tokenfile = "x"\n', 6, "unknown key 'tokenfile' in [metrics], did you mean 'token_file'?"),
])
def test_metrics_key_errors(write, table, line, message):
    path = write(table)
    assert error_of(path).startswith(f"{path}:{line}: {message}")


def test_effective_configuration_round_trips(write, token_file, tmp_path):
    cfg = hcfg.load(write(f'enabled = true\nlisten = "[::]:9469"\ntoken_file = "{token_file}"\n'))
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert hcfg.load(str(again)).values == cfg.values
