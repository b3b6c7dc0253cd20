"""Offline replay of real lab traffic (issue 17): hybrid attached to the lab's gateway with an
engine, real clients and servers (curl and nginx over HTTP and TLS, dig and dnsmasq), the
gateway's links captured with dumpcap while it runs; then the capture replayed with the same
rules and options through ``hybridctl replay``. The servers' and clients' answers say what the
live gateway did; the replay must say the same per flow, and its counters and verdict log must
match the live engine's and the live datapath's.

:func:`record_session` is also how examples/rules-tests/ was made (see its README)."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
import os
import signal
import subprocess
import time

import pytest
from gwlab import HYBRIDCTL, IFACES, engine_stats, hctl, kernel_counters, start_engine, stats_file, wait_for

pytestmark = pytest.mark.integration

RULES = """\
default = "accept"
default_flow = "bypass"
flow_ttl = 300
on_doubt = "inspect"

[[rule]]
name = "block-http-host"
proto = "tcp"
http_host = ".blocked.example"
action = "reject"
flow = "block"

[[rule]]
name = "block-tls-sni"
proto = "tcp"
tls_sni = "*.tracker.example"
action = "reject"
flow = "block"
ttl = 600

[[rule]]
name = "block-dns-name"
proto = "udp"
dport = 53
dns_qname = ".ads.example"
action = "drop"
flow = "block"
ttl = 60

[[rule]]
name = "wait-for-payload"
proto = "tcp"
payload_len = 0
action = "accept"
flow = "none"
log = false
"""
RECORDS = {"a.example": "192.0.2.8", "x.ads.example": "192.0.2.10"}
CLIENT_NET = "198.18.1.0/24"
NAMES = ("www.example.test", "x.tracker.example")


@contextlib.contextmanager
def dumpcap_any(lab, path: str):
    """dumpcap on every interface of the gateway (Linux cooked capture: each packet once as
    received on its link, once as sent on the other, with its direction), stopped afterwards."""
    err = open(f"{path}.log", "wb")  # noqa: SIM115
    proc = lab.popen("gw", ["dumpcap", "-q", "-i", "any", "-w", path], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 10
        while not (os.path.exists(path) and os.path.getsize(path) > 0):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dumpcap did not start: {open(f'{path}.log').read()}")
            time.sleep(0.05)
        time.sleep(0.3)
        yield path
        time.sleep(0.3)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()


def curl(lab, url: str, *args) -> int:
    """curl's exit status from the client (0: a page came back)."""
    return lab.run("client", ["curl", "-s", "-o", "/dev/null", "--max-time", "3", *args, url],
                   check=False, timeout=20).returncode


def dig(lab, name: str) -> str:
    proc = lab.run("client", ["dig", "+short", "+tries=1", "+time=1", f"@{lab.info.server.ipv4}", name],
                   check=False, timeout=10)
    return "\n".join(ln for ln in proc.stdout.splitlines() if ln and not ln.startswith(";;"))


def web_session(lab, nginx) -> dict[str, bool]:
    """HTTP and TLS: an allowed and a blocked Host, an allowed and a blocked SNI; what the client
    got (True: the page)."""
    srv = lab.info.server.ipv4
    got = {}
    got["http ok.example"] = curl(lab, f"http://{srv}/", "-H", "Host: ok.example") == 0
    got["http www.blocked.example"] = curl(lab, f"http://{srv}/", "-H", "Host: www.blocked.example") == 0
    for name in NAMES:
        got[f"tls {name}"] = curl(lab, f"https://{name}/", "--cacert", nginx.cert, "--resolve",
                                  f"{name}:443:{srv}") == 0
    return got


def dns_session(lab) -> dict[str, bool]:
    """The same names asked several times (each dig: a new source port, a new flow)."""
    got = {}
    for i in range(3):
        got[f"dns a.example {i}"] = dig(lab, "a.example") == RECORDS["a.example"]
    for i in range(2):
        got[f"dns x.ads.example {i}"] = dig(lab, "x.ads.example") == RECORDS["x.ads.example"]
    return got


@contextlib.contextmanager
def attached_with_logging_engine(lab, tmp_path, *attach_args):
    """hybrid attached to the gateway's links and an engine running RULES with its verdict log
    (tmp_path/live.jsonl); both stopped and detached afterwards, also when the body fails."""
    rules_path = tmp_path / "rules.toml"
    rules_path.write_text(RULES)
    log_path = tmp_path / "live.jsonl"
    hctl(lab, "attach", *IFACES, *attach_args)
    proc = None
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stats_file(lab))
        proc = start_engine(lab, rules_path, log_path=str(log_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
        wait_for(lambda: os.path.exists(stats_file(lab)) or proc.poll() is not None, timeout=30,
                 what="the engine")
        assert proc.poll() is None, proc.communicate()[1]
        yield rules_path, log_path
    finally:
        err = ""
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        hctl(lab, "detach", "--all")
        assert "Traceback" not in err, err


def record_session(lab, tmp_path, capture: str, session, *attach_args) -> dict:
    """Attach with ``attach_args``, run an engine with RULES and its verdict log, capture the
    gateway while ``session(lab)`` runs; the clients' results, the live counters (of the
    capture's window) and the live verdict log."""
    with attached_with_logging_engine(lab, tmp_path, *attach_args) as (rules_path, log_path):
        with dumpcap_any(lab, capture):
            before = kernel_counters(lab)               # what the capture saw: from here
            got = session(lab)
            after = kernel_counters(lab)
        time.sleep(0.6)                                 # the engine publishes every 0.5 s
        live = {"got": got, "kernel": {k: after[k] - before.get(k, 0) for k in after},
                "engine": engine_stats(lab)}
    live["rules"] = str(rules_path)
    live["log"] = [json.loads(ln) for ln in log_path.read_text().splitlines()]
    return live


def log_entries(lines: list[dict]) -> list[tuple]:
    """A verdict log without its times, in order: what was decided for which packet, by whom."""
    return [(x["rule"], x["action"], x["flow"], x["proto"], x["src"], x["sport"], x["dst"], x["dport"],
             x.get("by", "engine"), x.get("name")) for x in lines]


def replay_json(capture: str, rules: str, *args) -> tuple[dict, list[dict]]:
    """The replay's report (--json) and its verdict log (--log)."""
    log = capture + ".replay.jsonl"
    proc = subprocess.run([*HYBRIDCTL, "replay", capture, "--rules", rules, "--json", "--log", log, *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    with open(log) as f:
        return json.loads(proc.stdout), [json.loads(ln) for ln in f]


def assert_flagged_match(rep: dict, live: dict) -> None:
    """The packets tc flagged: every one the replay's tc flagged that a router forwards went to
    its engine, as every one the live tc flagged went to the live engine (no overflow here). The
    lab's fresh links also send ICMPv6 router solicitations (flagged, never forwarded, so never
    queued) at moments the capture's window may or may not hold: they are the difference
    between the live and the replayed kernel totals, when there is one."""
    k, lk = rep["kernel"], live["kernel"]
    assert k["flagged"] - rep["flagged_not_forwarded"] == rep["engine"]["packets"] == live["engine"]["packets"], \
        (k, rep["flagged_not_forwarded"], live["engine"]["packets"])
    assert lk["flagged"] >= live["engine"]["packets"]
    assert k["flagged"] - lk["flagged"] in range(-2, rep["flagged_not_forwarded"] + 1), (k, lk)


def _flows(rep: dict, dport: int) -> list[dict]:
    return [f for f in rep["flows"] if f["b"].endswith(f":{dport}") and f["a"].startswith("198.18.1.2:")]


@pytest.fixture(scope="module")
def servers(lab):
    from hybrid.lab.servers import Dns, Nginx
    with Nginx(lab, tls_port=443, server_names=NAMES) as nginx, Dns(lab, records=RECORDS):
        yield nginx


def test_replay_of_web_traffic_says_what_the_live_gateway_did(lab, servers, tmp_path):
    capture = str(tmp_path / "web.pcapng")
    live = record_session(lab, tmp_path, capture, lambda lab: web_session(lab, servers))
    # the servers are the oracle: the allowed ones answered, the blocked ones did not
    assert live["got"] == {"http ok.example": True, "http www.blocked.example": False,
                           "tls www.example.test": True, "tls x.tracker.example": False}, live["got"]
    rep, log = replay_json(capture, live["rules"], "--client-net", CLIENT_NET)
    assert log_entries(log) == log_entries(live["log"]), (log, live["log"])
    http, tls = _flows(rep, 80), _flows(rep, 443)
    assert [(f["rule"], f["verdict"], f["flow_verdict"]) for f in http] == [
        (None, "passed", "bypass"), ("block-http-host", "dropped", "block")], http
    assert [(f["rule"], f["verdict"], f["flow_verdict"]) for f in tls] == [
        (None, "passed", "bypass"), ("block-tls-sni", "dropped", "block")], tls
    assert all(f["decided_by"] == "engine" for f in http + tls)
    # the same decisions as the live engine, rule by rule, and as many packets queued
    eng = live["engine"]
    assert {r: n for r, n in rep["engine"]["rules"].items() if n} == {r: n for r, n in eng["rules"].items() if n}
    assert rep["engine"]["actions"] == eng["actions"], (rep["engine"], eng)
    assert rep["engine"]["flow_verdicts"] == eng["flow_verdicts"]
    assert rep["engine"]["packets"] == eng["packets"]
    assert_flagged_match(rep, live)
    assert rep["skipped"].get("sent by the capturing host (a copy of a packet received on another link)", 0) > 0


def test_replay_of_dns_with_the_name_cache(lab, servers, tmp_path):
    capture = str(tmp_path / "dns.pcapng")
    live = record_session(lab, tmp_path, capture, dns_session, "--name-cache")
    assert live["got"] == {"dns a.example 0": True, "dns a.example 1": True, "dns a.example 2": True,
                           "dns x.ads.example 0": False, "dns x.ads.example 1": False}, live["got"]
    rep, log = replay_json(capture, live["rules"], "--client-net", CLIENT_NET, "--name-cache")
    # the cache's lines come from the live engine's reader thread, in its own time: as multisets
    assert Counter(log_entries(log)) == Counter(log_entries(live["log"])), (log, live["log"])
    dns = _flows(rep, 53)
    assert [(f["decided_by"], f["verdict"]) for f in dns] == [
        ("engine", "passed"), ("kernel cache", "passed"), ("kernel cache", "passed"),
        ("engine", "dropped"), ("kernel cache", "dropped")], dns
    assert [f["rule"] for f in dns] == [None, None, None, "block-dns-name", "block-dns-name"]
    assert [f["flagged"] for f in dns] == [2, 1, 1, 1, 0]       # query and answer; the answers only; ...
    k, lk = rep["kernel"], live["kernel"]
    assert_flagged_match(rep, live)
    for c in ("cache_passed", "cache_dropped", "cache_miss"):
        assert k[c] == lk[c], (c, k[c], lk[c])
    eng, nc = live["engine"], live["engine"]["name_cache"]
    assert rep["engine"]["packets"] == eng["packets"]
    assert rep["engine"]["name_cache"]["kernel_rules"] == nc["kernel_rules"], (rep["engine"]["name_cache"], nc)
