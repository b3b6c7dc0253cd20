"""Helpers for integration tests that attach hybrid in a lab's gateway namespace and run the real
verdict engine there: hybridctl in the gateway, an engine process, a metrics server process, and
Prometheus text parsed by prometheus_client's own parser.

Every test runs hybridctl as ``HYBRIDCTL`` and starts engines with :func:`start_engine`, both the
library's own way (hybrid.engine.runner), so the tests start processes exactly as hybrid does."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from hybrid.engine import runner
from hybrid.lab.topology import netns

HYBRIDCTL = runner.hybridctl_argv()     # the command that runs hybridctl: [*HYBRIDCTL, "status"]
IFACES = ["to-client", "to-server"]


def start_engine(lab, rules, **kw) -> subprocess.Popen:
    """``hybridctl engine --rules RULES`` in the lab's gateway; ``kw``: the options of
    runner.start_engine (log_path, queue_len, cpu, ...) and subprocess.Popen's."""
    return runner.start_engine(str(rules), netns=lab.netns("gw"), **kw)


def hctl(lab, *args, check=True, timeout=120):
    proc = subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, *args],
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"hybridctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def status(lab) -> dict:
    return json.loads(hctl(lab, "status", "--json").stdout)


def stats_file(lab, queue=0) -> str:
    return f"/run/hybrid/instances/{lab.netns('gw')}/engine-{queue}.json"


def kernel_counters(lab) -> dict:
    """The tc/XDP counters of every attached interface, summed (hybridctl status --json)."""
    out: dict[str, int] = {}
    for e in status(lab)["interfaces"].values():
        for k, v in e["counters"].items():
            out[k] = out.get(k, 0) + v
    return out


def engine_stats(lab, queue=0, until=None, timeout=5.0) -> dict:
    """The engine's published counters; with ``until``, wait until ``until(stats)`` holds (they
    are published every 0.5 s) and return them either way for the assertions to judge."""
    deadline = time.monotonic() + timeout
    while True:
        with open(stats_file(lab, queue)) as f:
            st = json.load(f)
        if until is None or until(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pin_dir(lab) -> str:
    """The bpffs directory of the lab gateway's attachment."""
    from hybrid.kernel import bpffs
    return os.path.join(bpffs.locate(), lab.netns("gw"))


def clear_flows(lab) -> None:
    """Empty the flow table and the pinned verdicts of the gateway's attachment: the flow state
    of a fresh attach (configuration, prefixes, ports and counters are kept). For tests that
    share one attachment, so that no verdict one of them left (a UDP tuple bypassed or blocked
    for a minute) decides a flow of the next."""
    from hybrid.datapath.maps import Maps
    with Maps.open_pinned(pin_dir(lab)) as maps:
        for key, _ in list(maps.pinned()):
            maps.unpin_verdict(key)
        for key, _ in list(maps.flows()):
            maps.delete_flow(key)
        assert maps.flow_count() == 0 and maps.pinned_count() == 0


@contextlib.contextmanager
def attachment(lab, *attach_args):
    """hybrid attached to the gateway's two veths with ``attach_args``, detached afterwards (also
    when the body fails), nothing of it left in the gateway's netfilter tables."""
    from hybrid.kernel import netfilter as nf
    hctl(lab, "attach", *IFACES, *attach_args)
    try:
        yield lab
    finally:
        hctl(lab, "detach", "--all")
    assert nf.leftovers(lab.netns("gw")) == []


def nfqueue_counters(lab) -> dict[int, list[int]]:
    """/proc/net/netfilter/nfnetlink_queue of the gateway: queue -> its columns."""
    out = lab.run("gw", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return {int(v[0]): [int(x) for x in v] for v in (ln.split() for ln in out.splitlines()) if v}


class Engine:
    """``hybridctl engine`` in the gateway with a rules file; stop() returns its stderr."""

    def __init__(self, lab, rules_path):
        self.lab = lab
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stats_file(lab))
        self.proc = start_engine(lab, rules_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(stats_file(lab)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("engine did not start")
            time.sleep(0.05)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@contextlib.contextmanager
def attached_with_engine(lab, tmp_path, rules: str, *attach_args):
    """hybrid attached to the gateway's two veths and an engine running ``rules``; both removed
    afterwards, also when the body fails."""
    rules_path = tmp_path / "rules.toml"
    rules_path.write_text(rules)
    hctl(lab, "attach", *IFACES, *attach_args)
    eng = None
    try:
        eng = Engine(lab, rules_path)
        yield eng
    finally:
        err = eng.stop() if eng is not None else ""
        hctl(lab, "detach", "--all")
        assert "Traceback" not in err, err


@contextlib.contextmanager
def engine_running(lab, tmp_path, rules: str):
    """An engine running ``rules`` against the gateway's attachment (made by the caller),
    stopped afterwards, also when the body fails; it must not have printed a traceback. Its
    rules file is written in ``tmp_path`` (made if missing)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rules_path = tmp_path / "rules.toml"
    rules_path.write_text(rules)
    eng = Engine(lab, rules_path)
    try:
        yield eng
    finally:
        err = eng.stop()
        assert "Traceback" not in err, err


_SERVE = """\
import json, sys
from hybrid.observe import metrics
from hybrid.service.config import read_token
a = json.loads(sys.argv[1])
token = read_token(a.pop("token_file")) if a.get("token_file") else None
limits = {k: a.pop(k) for k in ("cache_seconds", "max_concurrent", "request_timeout") if k in a}
if a.get("path"):
    h = metrics.serve_metrics_unix(a["path"], group=a.get("group"), token=token, **limits)
else:
    h = metrics.serve_metrics(a["host"], a["port"], token=token, **limits)
print(h.port or 0, flush=True)
sys.stdin.read()
h.stop()
"""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class MetricsProcess:
    """serve_metrics() in a Python process of the gateway namespace, as ``hybridctl run`` does:
    on ``host``:``port``, or with ``path`` on a Unix socket (``group``: its group). With
    ``token_file``, the server requires that token and :meth:`get` sends it unless told
    otherwise. ``limits``: serve_metrics' cache_seconds, max_concurrent, request_timeout;
    ``prefix``: a command to run it under (e.g. setpriv). It stops when its standard input
    closes (also if the test process dies)."""

    def __init__(self, lab, host="127.0.0.1", port=0, *, path=None, group=None, token_file=None, prefix=(),
                 **limits):
        self.lab = lab
        args = {"host": host, "port": port, "path": path and str(path), "group": group,
                "token_file": token_file and str(token_file), **limits}
        self.proc = subprocess.Popen([*prefix, "ip", "netns", "exec", lab.netns("gw"), sys.executable, "-c", _SERVE,
                                      json.dumps(args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            raise AssertionError(f"metrics server did not start: {self.close()}")
        self.port = int(line)
        self.host = host
        self.path = path and str(path)
        self.token = None
        if token_file:
            with open(token_file) as f:
                self.token = f.read().strip()

    def connection(self, timeout=20) -> http.client.HTTPConnection:
        """An HTTP connection to the endpoint (made in the gateway's namespace for TCP)."""
        if self.path:
            return _UnixHTTPConnection(self.path, timeout)
        with netns(self.lab.netns("gw")):
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            conn.connect()
        return conn

    def get(self, path="/metrics", token: str | None = "default") -> tuple[int, str]:
        """(status, body) of one GET; ``token``: the bearer token to send (None: no
        Authorization header; by default the server's own, if any)."""
        token = self.token if token == "default" else token
        conn = self.connection()
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token is not None else {})
            r = conn.getresponse()
            return r.status, r.read().decode()
        finally:
            conn.close()

    def scrape(self) -> dict[tuple, float]:
        """{(sample name, sorted label items): value} of one scrape."""
        code, text = self.get()
        assert code == 200, text
        return parse(text)

    def close(self) -> str:
        err = ""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            err = self.proc.stderr.read()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                pipe.close()
        return err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        err = self.close()
        assert "Traceback" not in err, err


def parse(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(scrape: dict, name: str, **labels) -> float:
    return scrape[(name, tuple(sorted(labels.items())))]
