"""The Prometheus endpoint, scraped: hybrid attached in the lab's gateway, the real engine
deciding real traffic, serve_metrics() in a process of the gateway namespace. The figures must
be the ones `hybridctl status --json`, the engine's stats file and the kernel's queue counters
give for the same moment."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pathlib
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time

import pytest
from gwlab import (
    IFACES,
    MetricsProcess,
    attached_with_engine,
    attachment,
    clear_flows,
    engine_running,
    engine_stats,
    hctl,
    nfqueue_counters,
    parse,
    sample,
    start_engine,
    stats_file,
    status,
    wait_for,
)
from traffic import udp_send

from hybrid.errors import ConfigError, HybridError
from hybrid.kernel import nfq
from hybrid.lab.topology import netns
from hybrid.observe import metrics as hmetrics
from hybrid.observe.metrics import serve_metrics, serve_metrics_unix
from hybrid.service import config as hcfg
from hybrid.service.supervisor import Service

pytestmark = pytest.mark.integration

RULES = """default = "accept"
default_flow = "none"

[[rule]]
name = "drop-10086"
proto = "udp"
dport = 10086
action = "drop"

[[rule]]
name = "bypass-10010"
proto = "udp"
dport = 10010
action = "accept"
flow = "bypass"
ttl = 60
"""


def _between(low: float, value: float, high: float) -> bool:
    return low <= value <= high


@pytest.fixture(scope="class")
def attached(lab):
    """One attachment (xdp generic) for a class of tests, detached afterwards."""
    with attachment(lab, "--xdp-mode", "generic"):
        yield lab


@pytest.fixture
def engine(attached, tmp_path):
    """An engine running RULES against the class's attachment, on an emptied flow table (the
    flow state of a fresh attach), stopped after the test."""
    clear_flows(attached)
    with engine_running(attached, tmp_path, RULES) as eng:
        yield eng


class TestOneAttachment:
    """The tests that need an attachment with nothing special share one (an attach compiles the
    datapath, 6-10 s on CI); each has an engine of its own."""

    def test_scrape_agrees_with_status_engine_and_queue(self, lab, engine):
        # cache_seconds=0: every scrape reads the instance, so that it falls between the status reads
        # around it and sees traffic sent a moment before (the shared snapshot is tested below).
        with MetricsProcess(lab, cache_seconds=0) as metrics:
            assert udp_send(lab, [b"first"], dport=10010, sport=41000) == 1          # decided: bypass
            assert udp_send(lab, [b"pass"] * 4, dport=10010, sport=41000) == 4       # kept in the kernel
            assert udp_send(lab, [b"drop"] * 3, dport=10086, sport=41001) == 0
            eng = engine_stats(lab, until=lambda st: st["rules"].get("drop-10086") == 3)
            assert eng["rules"]["drop-10086"] == 3

            before, q_before = status(lab), nfqueue_counters(lab)
            m = metrics.scrape()
            after, q_after = status(lab), nfqueue_counters(lab)

            assert sample(m, "hybrid_attached", instance=lab.netns("gw")) == 1
            # kernel counters: every counter of every interface, between two status reads
            for ifname in ("to-client", "to-server"):
                c0, c1 = before["interfaces"][ifname]["counters"], after["interfaces"][ifname]["counters"]
                for name, value in c1.items():
                    if name.startswith("reason_"):
                        got = sample(m, "hybrid_kernel_flagged_by_reason_total", interface=ifname,
                                     reason=name[len("reason_"):])
                    else:
                        got = sample(m, f"hybrid_kernel_{name}_total", interface=ifname)
                    assert _between(c0[name], got, value), (ifname, name, c0[name], got, value)
            client = after["interfaces"]["to-client"]["counters"]
            assert client["xdp_packets"] > 0 and client["flagged"] >= 4 and client["bypassed"] >= 4

            # flows: the total between two reads; the UDP flow to 10010 is in BYPASS
            flows = sum(v for (name, _), v in m.items() if name == "hybrid_flows")
            assert _between(before["flows"], flows, after["flows"])
            assert sample(m, "hybrid_flows", verdict="bypass") == 1

            # the netfilter queue's own counters
            assert sample(m, "hybrid_nfqueue_queued_total", queue="0") == q_before[0][7] == q_after[0][7]
            assert sample(m, "hybrid_nfqueue_queued_total", queue="0") >= 4
            assert sample(m, "hybrid_nfqueue_dropped_total", queue="0") == q_after[0][5]
            assert sample(m, "hybrid_nfqueue_user_dropped_total", queue="0") == q_after[0][6]
            assert sample(m, "hybrid_nfqueue_waiting", queue="0") == 0
            # fail-open overflow, derived as status derives it (nothing overflowed here)
            assert sample(m, "hybrid_nfqueue_passed_overflow_total") == after["queue"]["passed_overflow"] == 0
            # no way of passing uninspected moved, and both say so
            assert after["fail_open"]["moved"] == [] and before["fail_open"]["moved"] == []
            assert {dict(k)["way"]: v for (name, k), v in m.items() if name == "hybrid_fail_open_total"} == \
                dict.fromkeys(after["fail_open"]["ways"], 0)
            assert "fail-open: none" in hctl(lab, "status").stdout.splitlines()

            # the engine: exactly what it published (it is idle now)
            eng = engine_stats(lab)
            assert sample(m, "hybrid_engine_up", queue="0") == 1
            assert sample(m, "hybrid_engine_packets_total", queue="0") == eng["packets"]
            assert sample(m, "hybrid_engine_actions_total", queue="0", action="drop") == 3
            assert sample(m, "hybrid_engine_actions_total", queue="0", action="accept") == eng["actions"]["accept"] >= 1
            assert sample(m, "hybrid_engine_rule_verdicts_total", queue="0", rule="drop-10086") == 3
            assert sample(m, "hybrid_engine_rule_verdicts_total", queue="0", rule="bypass-10010") == \
                eng["rules"]["bypass-10010"] >= 1
            assert sample(m, "hybrid_engine_flow_verdicts_total", queue="0", verdict="bypass") == \
                eng["flow_verdicts"]["bypass"] >= 1
            # every packet the engine handled is in the decision-time histogram, once
            assert sample(m, "hybrid_engine_decision_seconds_count", queue="0") == eng["packets"]
            assert sample(m, "hybrid_engine_decision_seconds_bucket", queue="0", le="+Inf") == eng["packets"]
            assert 0 < sample(m, "hybrid_engine_decision_seconds_sum", queue="0") == eng["decision_ns_sum"] / 1e9
            buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in m.items()
                             if name == "hybrid_engine_decision_seconds_bucket")
            assert [v for _, v in buckets] == sorted(v for _, v in buckets)      # cumulative
            # a packet handled in Python takes more than half a microsecond and less than a second
            assert buckets[0][1] < eng["packets"] and sample(
                m, "hybrid_engine_decision_seconds_bucket", queue="0", le="1.073741824") == eng["packets"]

            # more traffic moves the counters by what was sent
            m0 = sample(m, "hybrid_kernel_bypassed_total", interface="to-client")
            assert udp_send(lab, [b"more"] * 7, dport=10010, sport=41000) == 7
            m2 = metrics.scrape()
            assert sample(m2, "hybrid_kernel_bypassed_total", interface="to-client") == m0 + 7


    def test_a_burst_of_scrapes_reads_the_instance_once_a_second(self, lab, engine, socket_dir):
        sock = socket_dir / "metrics.sock"
        with MetricsProcess(lab, path=sock) as metrics:
            assert udp_send(lab, [b"first"], dport=10010, sport=41000) == 1
            first = metrics.scrape()
            assert sample(first, "hybrid_attached", instance=lab.netns("gw")) == 1
            codes: list[int] = []
            snapshots: list[float] = []
            deadline = time.monotonic() + 3.0

            def scraper():
                while time.monotonic() < deadline:
                    try:
                        code, text = metrics.get()
                    except (BrokenPipeError, ConnectionResetError):
                        code = 0        # refused before this client had sent its request (a slow thread)
                    codes.append(code)
                    if code == 200:
                        snapshots.append(sample(parse(text), "hybrid_metrics_snapshots_total"))
            start = time.monotonic()
            threads = [threading.Thread(target=scraper) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            reads = max(snapshots) - sample(first, "hybrid_metrics_snapshots_total")
            assert set(codes) <= {200, 503, 0}
            assert codes.count(200) >= 20, codes.count(200)
            assert 1 <= reads <= elapsed + 1, (reads, elapsed, len(codes))
            # every refusal is counted, and nearly every refused client got its 503
            last = metrics.scrape()
            assert sample(last, "hybrid_metrics_refused_total", reason="busy") == codes.count(503) + codes.count(0)
            assert codes.count(0) <= codes.count(503) // 10 + 1, (codes.count(0), codes.count(503))


# ---- fail-open made to move for real: status and the metrics say so -----------------------------------
QUEUE_LEN = 4
WATCHED = 10020          # every packet to this port is flagged (--watch-port)


def _line(text: str, start: str) -> str:
    return next((ln for ln in text.splitlines() if ln.startswith(start)), f"<no line {start!r} in:\n{text}>")


def test_queue_overflow_is_fail_open_in_status_and_metrics(lab, tmp_path):
    """The engine hung (SIGSTOP) on a 4-packet queue, fail-open: of 20 flagged datagrams the
    queue holds 4 and lets 16 through uninspected. The server counts what arrived; status
    (JSON and text) and the metrics must name that figure as the queue-overflow way."""
    hctl(lab, "attach", *IFACES, "--fail-open", "--watch-port", str(WATCHED))
    rules = tmp_path / "rules.toml"
    rules.write_text('default = "accept"\ndefault_flow = "none"\n')
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stats_file(lab))
    engine = start_engine(lab, rules, queue_len=QUEUE_LEN, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
    child = None
    try:
        wait_for(lambda: os.path.exists(stats_file(lab)) or engine.poll() is not None, 30, "the engine's stats")
        assert engine.poll() is None, engine.stderr.read()
        child = engine_stats(lab)["pid"]                  # the process bound to the queue
        with MetricsProcess(lab, cache_seconds=0) as metrics:
            quiet = status(lab)
            assert quiet["fail_open"]["ways"]["queue-overflow"] == 0 and quiet["fail_open"]["moved"] == []
            os.kill(child, signal.SIGSTOP)
            arrived = udp_send(lab, [b"x"] * 20, dport=WATCHED, sport=41100)
            st = status(lab)
            m = metrics.scrape()
            text = hctl(lab, "status").stdout
        assert arrived == 20 - QUEUE_LEN                 # the server is the oracle: 16 went past the engine
        fo = st["fail_open"]
        assert fo["ways"]["queue-overflow"] == st["queue"]["passed_overflow"] == arrived, (fo, st["queue"])
        assert "queue-overflow" in fo["moved"]
        assert sample(m, "hybrid_fail_open_total", way="queue-overflow") == arrived
        assert sample(m, "hybrid_nfqueue_passed_overflow_total") == arrived
        head = _line(text, "fail-open:")
        assert "moved since attach" in head and f"queue-overflow {arrived:,}" in head, text
        assert _line(text, "  queue-overflow").split()[1] == f"{arrived:,}", text
    finally:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGCONT)
            # let it drain its queue first: a SIGTERM that lands while it handles a packet is
            # swallowed (see test_overflow.py), and the stop below would wait for the timeout
            with contextlib.suppress(OSError, KeyError, AssertionError):
                wait_for(lambda: not nfq.counters(f"/proc/{child}/net/netfilter/nfnetlink_queue")[0].waiting,
                         10, "the engine to drain its queue")
            time.sleep(0.2)
        if engine.poll() is None:
            engine.send_signal(signal.SIGTERM)
            try:
                engine.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(engine.pid, signal.SIGKILL)
                engine.wait()
        engine.stderr.close()
        hctl(lab, "detach", "--all")


# a rule that decides on a SYN, so that SYNs are flagged (the engine has the kernel skip them otherwise)
SYN_RULES = 'default = "accept"\n[[rule]]\nname = "drop-9"\nproto = "tcp"\ndport = 9\naction = "drop"\n'


def test_over_budget_is_fail_open_in_status_and_metrics(lab, tmp_path):
    """A source allowed one new flow per second opens five connections at once: the SYNs over its
    budget pass unflagged (--over-budget pass), and status and the metrics count them as the
    over-budget way, as many as the kernel's over_pass."""
    with attached_with_engine(lab, tmp_path, SYN_RULES, "--source-rate", "1", "--source-burst", "1",
                              "--over-budget", "pass"), MetricsProcess(lab, cache_seconds=0) as metrics:
        refused = 0
        with netns(lab.netns("client")):
            for port in range(5):
                with socket.socket() as s:
                    s.settimeout(5)
                    if s.connect_ex((lab.info.server.ipv4, 10030 + port)) != 0:   # nothing listens: RST
                        refused += 1
        assert refused == 5
        before = status(lab)
        m = metrics.scrape()
        after = status(lab)
        text = hctl(lab, "status").stdout
    kernel = sum(e["counters"].get("over_pass", 0) for e in after["interfaces"].values())
    assert kernel >= 4, after["interfaces"]          # one SYN within the budget, the others over it
    assert after["fail_open"]["ways"]["over-budget"] == kernel and "over-budget" in after["fail_open"]["moved"]
    assert before["fail_open"]["ways"]["over-budget"] <= sample(m, "hybrid_fail_open_total", way="over-budget") \
        <= kernel
    assert f"over-budget {kernel:,}" in _line(text, "fail-open:"), text


def test_endpoint_without_attachment_and_paths(lab):
    with MetricsProcess(lab) as metrics:
        m = metrics.scrape()
        assert sample(m, "hybrid_attached", instance=lab.netns("gw")) == 0
        assert not [k for k in m if k[0].startswith("hybrid_kernel_") and not k[0].endswith("_created")]
        assert metrics.get("/")[0] == 200
        assert metrics.get("/nothing")[0] == 404


def test_bad_address_and_busy_port_are_one_line_errors(lab):
    with netns(lab.netns("gw")):
        with pytest.raises(ConfigError, match=r"^metrics address 'no such host\.invalid' is not"):
            serve_metrics("no such host.invalid", 0)
        with pytest.raises(ConfigError, match="metrics port 70000"):
            serve_metrics("127.0.0.1", 70000)
        busy = socket.socket()
        try:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(HybridError, match=rf"^cannot serve metrics on 127.0.0.1:{port}: Address already in use"):
                serve_metrics("127.0.0.1", port)
        finally:
            busy.close()
        with serve_metrics("::1", 0) as h:       # IPv6 loopback works too
            assert h.port > 0 and h.url == f"http://[::1]:{h.port}/metrics"


# ---- the guards: who may read, and how much a scrape may cost ---------------------------------------

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
AS_NOBODY_OTHER_GROUP = ["setpriv", "--reuid=nobody", "--regid=65533", "--clear-groups"]


@pytest.fixture
def socket_dir():
    """A directory under /run for sockets, searchable by everyone (so that only the socket's own
    mode keeps other users out), removed afterwards."""
    d = pathlib.Path(tempfile.mkdtemp(dir="/run", prefix="hybrid-test-metrics-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def curl_unix(path, as_user=()) -> subprocess.CompletedProcess:
    return subprocess.run([*as_user, "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                           "--unix-socket", str(path), "http://localhost/metrics"], capture_output=True, text=True)


def connect_as(user: list[str], path) -> str:
    """What a plain connect() to the socket gives ``user``: "ok" or the exception's name."""
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\n"
            "    print('ok')\nexcept OSError as e:\n    print(type(e).__name__)\n")
    return subprocess.run([*user, "/usr/bin/python3", "-c", code, str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_socket_is_root_only(lab, socket_dir):
    sock = socket_dir / "metrics.sock"
    with MetricsProcess(lab, path=sock) as metrics:
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
        assert sample(metrics.scrape(), "hybrid_attached", instance=lab.netns("gw")) == 0
        assert curl_unix(sock).stdout == "200"
        assert connect_as(AS_NOBODY, sock) == "PermissionError"
        denied = curl_unix(sock, AS_NOBODY)
        assert denied.returncode == 7 and denied.stdout == "000", denied     # curl: could not connect
    assert not sock.exists()                                                  # removed on stop


def test_socket_group_may_connect(lab, socket_dir):
    sock = socket_dir / "metrics.sock"
    with MetricsProcess(lab, path=sock, group="nogroup"):
        st = os.stat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam("nogroup").gr_gid
        assert curl_unix(sock, AS_NOBODY).stdout == "200"                    # nobody, group nogroup
        assert connect_as(AS_NOBODY_OTHER_GROUP, sock) == "PermissionError"   # nobody, another group


def test_group_socket_without_cap_chown(lab, socket_dir):
    """The systemd unit leaves the service no CAP_CHOWN: a setgid directory of the group gives the
    socket its group (docs/deployment.md); without one the start fails with a line saying so."""
    nogroup = grp.getgrnam("nogroup").gr_gid
    no_chown = ["setpriv", "--bounding-set=-chown"]
    shared = socket_dir / "shared"
    shared.mkdir()
    os.chown(shared, 0, nogroup)
    shared.chmod(0o2750)
    with MetricsProcess(lab, path=shared / "metrics.sock", group="nogroup", prefix=no_chown):
        st = os.stat(shared / "metrics.sock")
        assert st.st_gid == nogroup and stat.S_IMODE(st.st_mode) == 0o660
        assert curl_unix(shared / "metrics.sock", AS_NOBODY).stdout == "200"
    with pytest.raises(AssertionError, match=rf"HybridError: cannot give the metrics socket {socket_dir}/m.sock "
                                             "to group nogroup: operation not permitted"):
        MetricsProcess(lab, path=socket_dir / "m.sock", group="nogroup", prefix=no_chown)
    assert not (socket_dir / "m.sock").exists()


def test_socket_errors_are_one_line(lab, socket_dir):
    private = socket_dir / "private"
    private.mkdir(mode=0o700)
    open_dir = socket_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o1777)
    sock = str(socket_dir / "metrics.sock")
    with netns(lab.netns("gw")):
        with pytest.raises(ConfigError, match=rf"^cannot serve metrics on {private}/m.sock for group nogroup: the "
                                              rf"group cannot reach it, {private} has mode 0700: put the socket"):
            serve_metrics_unix(str(private / "m.sock"), group="nogroup")
        with pytest.raises(ConfigError, match=rf"^cannot serve metrics on {open_dir}/m.sock: {open_dir} is "
                                              r"writable by other users \(mode 1777, uid 0\)"):
            serve_metrics_unix(str(open_dir / "m.sock"))
        with serve_metrics_unix(sock):
            with pytest.raises(HybridError, match=rf"^cannot serve metrics on {sock}: another process serves "
                                                  "there"):
                serve_metrics_unix(sock)
        stale = socket.socket(socket.AF_UNIX)           # a socket left by a killed server
        stale.bind(sock)
        stale.close()
        with serve_metrics_unix(sock) as h:              # is replaced
            assert h.url == f"unix:{sock}" and curl_unix(sock).stdout == "200"
        pathlib.Path(sock).write_text("")
        with pytest.raises(HybridError, match=rf"^cannot serve metrics on {sock}: a file that is not a socket"):
            serve_metrics_unix(sock)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "metrics.token"
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32) + "\n")
    return path


def test_tcp_requires_the_token(lab, token_file):
    with MetricsProcess(lab, token_file=token_file) as metrics:
        assert metrics.get(token=None)[0] == 401
        assert metrics.get(token="0" * 64)[0] == 401
        assert metrics.get(token=metrics.token[:-1])[0] == 401
        assert metrics.get("/", token=None)[0] == 401
        m = metrics.scrape()                                   # with the token
        assert sample(m, "hybrid_metrics_refused_total", reason="unauthorized") == 4
        assert sample(m, "hybrid_attached", instance=lab.netns("gw")) == 0
        curl = ["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{metrics.port}/"]
        assert lab.run("gw", curl, check=False).stdout == "401"
        assert lab.run("gw", [*curl, "-H", f"Authorization: Bearer {metrics.token}"], check=False).stdout == "200"


def _idle(metrics: MetricsProcess) -> socket.socket:
    """A TCP connection to the endpoint that sends nothing."""
    with netns(metrics.lab.netns("gw")):
        return socket.create_connection((metrics.host, metrics.port), timeout=20)


def _read_all(conn: socket.socket) -> bytes:
    out = b""
    while chunk := conn.recv(4096):
        out += chunk
    return out


def test_requests_beyond_the_limit_get_503(lab):
    with MetricsProcess(lab) as metrics:
        held = [_idle(metrics) for _ in range(hmetrics.MAX_CONCURRENT)]        # every slot taken
        try:
            time.sleep(0.3)
            for _ in range(3):
                code, text = metrics.get()
                assert code == 503 and text.startswith("busy:"), (code, text)
        finally:
            for conn in held:
                conn.close()
        time.sleep(0.3)                                          # their threads see the close
        m = metrics.scrape()
        assert sample(m, "hybrid_metrics_refused_total", reason="busy") == 3


def test_silent_and_trickling_clients_are_dropped(lab):
    with MetricsProcess(lab) as metrics:
        silent, trickle = _idle(metrics), _idle(metrics)
        stop = threading.Event()

        def trickler():                      # a byte every half second: never a whole request
            for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"x" * 100:
                if stop.wait(0.5):
                    return
                try:
                    trickle.send(bytes([byte]))
                except OSError:
                    return
        t = threading.Thread(target=trickler)
        start = time.monotonic()
        t.start()
        try:
            assert _read_all(silent).startswith(b"HTTP/1.0 408 ")
            silent_s = time.monotonic() - start
            assert _read_all(trickle).startswith(b"HTTP/1.0 408 ")
            trickle_s = time.monotonic() - start
        finally:
            stop.set()
            t.join()
            silent.close()
            trickle.close()
        timeout = hmetrics.REQUEST_TIMEOUT
        assert timeout - 0.5 < silent_s < timeout + 1.5 and timeout - 0.5 < trickle_s < timeout + 1.5
        assert sample(metrics.scrape(), "hybrid_metrics_refused_total", reason="timeout") == 2


def test_run_serves_the_configured_endpoint(lab, socket_dir, token_file, caplog):
    """hybridctl run's _start_metrics: the socket by default, TCP with the token of token_file."""
    service = Service(load_config=None, argv_for_child=None)
    sock = socket_dir / "metrics.sock"
    caplog.set_level(logging.INFO, logger="hybrid.service.supervisor")
    with netns(lab.netns("gw")):
        base = {"attach.interfaces": ["to-client"], "engine.rules": "r.toml", "metrics.enabled": True}
        service._start_metrics(hcfg.load(None, {**base, "metrics.listen": f"unix:{sock}"}))
        try:
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600 and curl_unix(sock).stdout == "200"
        finally:
            service._stop_metrics()
        assert not sock.exists()
        service._start_metrics(hcfg.load(None, {**base, "metrics.listen": "127.0.0.1:0",
                                                "metrics.token_file": str(token_file)}))
        try:
            port = service.metrics.port
        finally:
            service._stop_metrics()
    events = [(r.levelname, r.event, r.fields) for r in caplog.records if getattr(r, "event", None) == "metrics_serving"]
    assert events == [("INFO", "metrics_serving", {"listen": f"unix:{sock}", "port": None, "path": str(sock),
                                                   "auth": "socket"}),
                      ("INFO", "metrics_serving", {"listen": "127.0.0.1:0", "port": port, "path": None,
                                                   "auth": "token"})]
