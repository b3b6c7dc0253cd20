"""hybridctl run in the lab: started from the example configuration, real traffic, metrics,
SIGHUP reloads (good and broken files), restarts with a connection flowing through the gateway
(kill -9, and stop/start with the kernel side kept), and a stop that leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from gwlab import HYBRIDCTL, attached_with_engine, engine_stats

from hybrid.datapath.maps import Maps, flow_key
from hybrid.kernel import abi, bpfsys, caps
from hybrid.lab.servers import Nginx
from hybrid.lab.topology import netns

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "hybrid.toml")
REALISTIC = os.path.join(ROOT, "examples", "rules", "realistic.toml")
IFACES = ("--interface", "to-client", "--interface", "to-server")
ALSO_BLOCKED = '\n[[rule]]\nname = "block-also"\nproto = "tcp"\nhttp_host = ".also-blocked.example"\n' \
               'action = "reject"\nflow = "block"\n'


def wait_for(cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def in_gw(lab, *argv) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *argv], capture_output=True, text=True,
                          timeout=120)


def hybrid_rules(lab) -> list[str]:
    """Every iptables/ip6tables line that mentions hybrid, in the gateway."""
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        proc = in_gw(lab, tool)
        assert proc.returncode == 0, proc.stderr
        out += [f"{tool}: {ln}" for ln in proc.stdout.splitlines() if "HYBRID" in ln or "hybrid" in ln]
    return out


def status(lab) -> dict:
    proc = in_gw(lab, *HYBRIDCTL, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


class Run:
    """One `hybridctl run` in the gateway namespace, its JSON log in a file."""

    def __init__(self, lab, tmp_path, *args: str, name: str = "run", wrap: tuple[str, ...] = ()):
        """``wrap``: a command that executes hybridctl in the same process (``exec "$@"``)."""
        self.lab = lab
        self.log_path = tmp_path / f"{name}.jsonl"
        self.err_path = tmp_path / f"{name}.stderr"
        with open(self.log_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(["ip", "netns", "exec", lab.netns("gw"), *wrap, *HYBRIDCTL, "run", *args],
                                         stdout=out, stderr=err, start_new_session=True)

    def lines(self) -> list[dict]:
        with open(self.log_path) as f:
            return [json.loads(ln) for ln in f if ln.strip()]

    def events(self, name: str) -> list[dict]:
        return [e for e in self.lines() if e["event"] == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 60.0) -> dict:
        def ready():
            if self.proc.poll() is not None and len(self.events(name)) < count:
                raise AssertionError(f"hybridctl run exited ({self.proc.returncode}) before {name}: "
                                     f"{self.err_path.read_text()} {self.log_path.read_text()}")
            got = self.events(name)
            return got[count - 1] if len(got) >= count else None
        return wait_for(ready, f"event {name} #{count}", timeout)

    def wait_running(self, count: int = 1) -> None:
        """Until hybrid is attached and ``count`` engines (in this run's life) decide packets."""
        self.wait_event("attached")
        self.wait_event("engine_running", count)

    def engine_pids(self) -> list[int]:
        """The engines that served a queue, in order: started, or spares promoted."""
        return [e["pid"] for e in self.lines() if e["event"] in ("engine_started", "engine_promoted")]

    def spare_pids(self) -> list[int]:
        return [e["pid"] for e in self.events("engine_standby")]

    def send(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.engine_pids() + self.spare_pids():
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def runs(lab):
    """Start `hybridctl run`s; whatever a test leaves running is killed and hybrid detached."""
    started: list[Run] = []
    yield started
    for r in started:
        r.kill()
    assert in_gw(lab, *HYBRIDCTL, "detach", "--all").returncode == 0
    for left in ("lock", "spares.json"):                              # left by a killed run
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/run/hybrid/run-{lab.netns('gw')}.{left}")


def curl(lab, host: str) -> subprocess.CompletedProcess:
    return lab.run("client", ["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://{lab.info.server.ipv4}/", "-H", f"Host: {host}"], check=False)


def test_run_from_the_example_configuration(lab, tmp_path, runs):
    """The issue's end-to-end check: the example configuration, traffic, metrics, SIGHUP with a
    changed, then a broken rules file and configuration, and SIGTERM leaving nothing behind."""
    conf = tmp_path / "hybrid.toml"
    shutil.copy(EXAMPLE, conf)
    rules = tmp_path / "rules.toml"
    shutil.copy(REALISTIC, rules)
    r = Run(lab, tmp_path, "--config", str(conf), *IFACES, "--rules", str(rules),
            "--metrics", "--metrics-listen", "127.0.0.1:0")
    runs.append(r)
    r.wait_running()
    start = r.events("starting")[0]
    assert start["pid"] == r.proc.pid and start["config"] == str(conf)
    attached = r.events("attached")[0]
    assert attached["interfaces"] == {"to-client": "off", "to-server": "off"} and attached["queues"] == "0"
    order = [e["event"] for e in r.lines() if e["event"] in ("engine_bound", "attached", "engine_running")]
    assert order == ["engine_bound", "attached", "engine_running"]     # the queue is bound before tc flags

    with Nginx(lab):
        assert curl(lab, "www.example.test").stdout == "200"
        assert curl(lab, "x.blocked.example").returncode == 56           # reset by the engine
        assert curl(lab, "x.also-blocked.example").stdout == "200"       # not yet

        # Metrics, served by run itself inside the gateway's namespace (localhost only).
        port = r.wait_event("metrics_serving")["port"]

        def scrape() -> str:
            proc = lab.run("gw", ["curl", "-s", "-m", "5", f"http://127.0.0.1:{port}/metrics"], check=False)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout

        rejected = re.compile(r'^hybrid_engine_actions_total\{[^}]*action="reject"[^}]*\} ([0-9.e+]+)$', re.M)
        def counted() -> str | None:
            text = scrape()
            m = rejected.search(text)
            return text if m and float(m[1]) >= 1 else None

        text = wait_for(counted, "the reject in the metrics", 10)
        assert re.search(r"^hybrid_attached(\{[^}]*\})? 1\.0$", text, re.M), text
        assert lab.run("client", ["curl", "-s", "-m", "2", f"http://{lab.info.gw_client.ipv4}:{port}/metrics"],
                       check=False).returncode != 0                              # not reachable from outside

        # A changed rules file: SIGHUP, and the engine decides with the new rules.
        rules.write_text(realistic_text() + ALSO_BLOCKED)
        r.send(signal.SIGHUP)
        r.wait_event("reloaded")
        wait_for(lambda: any(e["msg"].startswith("rules reloaded") for e in r.events("log")), "engine reload")
        assert curl(lab, "x.also-blocked.example").returncode == 56
        assert curl(lab, "www.example.test").stdout == "200"

        # A broken rules file: refused with its FILE:LINE, the running rules stay.
        rules.write_text(realistic_text() + ALSO_BLOCKED + '\n[[rule]]\nname = "oops"\nproto = "tcpp"\n')
        r.send(signal.SIGHUP)
        refused = r.wait_event("reload_refused")
        assert re.search(rf"{re.escape(str(rules))}:\d+: proto 'tcpp'", refused["error"]), refused
        assert curl(lab, "x.also-blocked.example").returncode == 56
        assert curl(lab, "www.example.test").stdout == "200"

        # A changed configuration: attached again with the new watch list, no engine restart.
        rules.write_text(realistic_text() + ALSO_BLOCKED)
        conf.write_text(conf.read_text().replace("watch_port = []", "watch_port = [10010]"))
        r.send(signal.SIGHUP)
        re_attached = r.wait_event("reattached")
        assert re_attached["changed"] == ["attach.watch_port"] and re_attached["reused_pins"] is True
        assert len(r.events("engine_started")) == 1

        # A changed engine setting: the engines are restarted with it.
        conf.write_text(conf.read_text().replace("queue_len = 4096", "queue_len = 2048"))
        r.send(signal.SIGHUP)
        assert r.wait_event("reloaded", 3)["changed"] == ["engine.queue_len"]
        r.wait_running(2)
        old_engine, new_engine = r.engine_pids()
        assert not alive(old_engine) and alive(new_engine)
        assert curl(lab, "x.also-blocked.example").returncode == 56

        # An engine that dies is replaced by the spare that waits for its queue, and a new spare
        # starts behind it. The spare was started with the engines, after the last rules reload:
        # it decides with the reloaded rules.
        spares = r.spare_pids()
        assert alive(spares[-1]) and not any(alive(p) for p in spares[:-1])
        assert status(lab)["spares"] == {"0": spares[-1]}
        assert f"spare engine queue 0 (waiting, pid {spares[-1]})" in in_gw(lab, *HYBRIDCTL, "status").stdout
        os.kill(new_engine, signal.SIGKILL)
        died = r.wait_event("engine_died")
        assert died["pid"] == new_engine and died["exit_status"] == -signal.SIGKILL
        assert r.wait_event("engine_promoted")["pid"] == spares[-1]
        r.wait_running(3)
        assert len(r.events("engine_started")) == 2           # no engine process started for it
        wait_for(lambda: len(r.spare_pids()) == len(spares) + 1, "a new spare")
        assert alive(r.spare_pids()[-1])
        assert curl(lab, "x.also-blocked.example").returncode == 56

        # A broken configuration: refused with its FILE:LINE, nothing changes.
        conf.write_text(conf.read_text().replace('queues = "0"', 'queues = "zero"'))
        r.send(signal.SIGHUP)
        refused = r.wait_event("reload_refused", 2)
        line = next(i for i, ln in enumerate(conf.read_text().splitlines(), 1) if ln.startswith("queues"))
        assert refused["error"].startswith(f"{conf}:{line}: queues 'zero'"), refused
        assert curl(lab, "x.blocked.example").returncode == 56

    # A second run in the same namespace is refused before it touches anything.
    conf.write_text(conf.read_text().replace('queues = "zero"', 'queues = "0"'))
    second = subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, "run", "--config", str(conf),
                             *IFACES, "--rules", str(rules), "--detach-on-stop"],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert second.stderr == f"Error: another 'hybridctl run' (pid {r.proc.pid}) serves this network namespace: " \
                            "stop it first (systemctl stop hybrid)\n"
    assert status(lab)["attached"] is True and all(alive(p) for p in r.engine_pids()[-1:])

    engines = r.engine_pids() + r.spare_pids()
    assert r.stop() == 0
    assert r.events("detached") and r.events("stopped")[0]["exit_status"] == 0
    # Nothing left: no process, no rule, no program, no pins, no state.
    assert not any(alive(pid) for pid in engines)
    assert hybrid_rules(lab) == []
    st = status(lab)
    assert st["attached"] is False and "warning" not in st
    assert not os.path.exists(f"/run/hybrid/instances/{lab.netns('gw')}")
    assert not os.path.exists(f"/run/hybrid/bpffs/{lab.netns('gw')}")
    assert not os.path.exists(f"/run/hybrid/run-{lab.netns('gw')}.lock")
    assert not os.path.exists(f"/run/hybrid/run-{lab.netns('gw')}.spares.json")
    for e in r.lines():                       # every line is one JSON object with the common fields
        assert {"ts", "level", "event", "msg"} <= set(e)
    assert "Traceback" not in r.err_path.read_text()


def test_a_spare_that_cannot_start_does_not_stop_the_service(lab, tmp_path, runs):
    """The rules file is broken on disk without a reload, then the spare is killed: it is
    replaced at once, but the replacement cannot load the rules and exits. That is logged and
    tried again 30 s later, not in a loop, and never counted towards the crash limit: the serving
    engine carries on. A reload with a good file brings a spare back at once."""
    rules = tmp_path / "rules.toml"
    rules.write_text(realistic_text())
    r = Run(lab, tmp_path, "--config", EXAMPLE, *IFACES, "--rules", str(rules))
    runs.append(r)
    r.wait_running()
    spare = r.wait_event("engine_standby")["pid"]
    rules.write_text(realistic_text() + '\n[[rule]]\nname = "oops"\nproto = "tcpp"\n')
    os.kill(spare, signal.SIGKILL)        # killed: replaced at once ...
    assert r.wait_event("standby_died")["exit_status"] == -signal.SIGKILL
    replacement = r.wait_event("engine_standby", 2)["pid"]
    died = r.wait_event("standby_died", 2)   # ... by one that reads the broken file and exits
    assert died["pid"] == replacement and died["exit_status"] > 0 and "trying again in 30 s" in died["msg"]
    time.sleep(2)
    assert not r.events("giving_up") and r.proc.poll() is None
    assert alive(r.engine_pids()[-1]) and len(r.events("engine_standby")) == 2     # no retry loop
    with Nginx(lab):
        assert curl(lab, "x.blocked.example").returncode == 56          # the engine still decides
    rules.write_text(realistic_text())
    r.send(signal.SIGHUP)
    r.wait_event("reloaded")
    assert alive(r.wait_event("engine_standby", 3)["pid"])
    assert r.stop() == 0


# A mount namespace of its own in which the bpffs is not mounted: hybridctl run then reaches it
# (and mounts it, if need be) in the initial namespace through /proc/2/root, as when it is the
# first run since boot from a private namespace, on a host without shared mount propagation.
BPFFS_HIDDEN = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                'umount /run/hybrid/bpffs 2>/dev/null; exec "$@"', "sh")


@pytest.mark.parametrize("bpffs", ["visible", "only-through-proc-2"])
def test_engines_keep_only_the_capabilities_they_use(lab, tmp_path, runs, bpffs):
    """The engine and its spare give up everything but CAP_NET_ADMIN, CAP_NET_RAW and CAP_BPF,
    bounding set included, with no_new_privs; the supervisor keeps what the attach needs. They
    still decide: a reject (a raw socket), a flow verdict in the pinned maps, and the spare,
    which opens the maps only once promoted, long after it gave up its capabilities; also when
    the pins can only be reached through /proc/2/root, which a process holding fewer
    capabilities than kthreadd may not follow."""
    r = Run(lab, tmp_path, "--config", EXAMPLE, *IFACES, "--rules", REALISTIC, name=f"caps-{bpffs}",
            wrap=() if bpffs == "visible" else BPFFS_HIDDEN)
    runs.append(r)
    r.wait_running()
    engine, spare = r.engine_pids()[-1], r.wait_event("engine_standby")["pid"]
    if bpffs != "visible":
        with open(f"/proc/{r.proc.pid}/mountinfo") as f:
            assert " /run/hybrid/bpffs " not in f.read()

    def dropped(pid: int) -> bool:
        return any(e["pid"] == pid for e in r.events("engine_capabilities"))

    engine_set = caps.mask(caps.ENGINE)
    wait_for(lambda: dropped(spare), "the spare to give up its capabilities")
    for pid in (engine, spare):
        held = caps.Sets.of(pid)
        assert (held.effective, held.permitted, held.bounding) == (engine_set,) * 3, (pid, held)
        assert (held.inheritable, held.ambient, held.no_new_privs) == (0, 0, True), (pid, held)
    assert caps.Sets.of(r.proc.pid) == caps.Sets.of()          # the supervisor: as started
    logged = {e["pid"]: (e["kept"], e["bounding"]) for e in r.events("engine_capabilities")}
    assert logged == {pid: (caps.names(engine_set),) * 2 for pid in (engine, spare)}

    with Nginx(lab):
        assert curl(lab, "www.example.test").stdout == "200"
        assert curl(lab, "x.blocked.example").returncode == 56          # reset through a raw socket
        os.kill(engine, signal.SIGKILL)
        assert r.wait_event("engine_promoted")["pid"] == spare
        r.wait_running(2)
        assert curl(lab, "x.blocked.example").returncode == 56          # decided by the spare
        st = engine_stats(lab, until=lambda st: st["pid"] == spare and st["flow_verdicts"]["block"] >= 1)
        assert st["pid"] == spare and st["flow_verdicts"]["block"] >= 1 and st["flow_write_errors"] == 0, st
        assert st["actions"]["reject"] >= 1 and st["errors"] == 0, st
    new_spare = wait_for(lambda: r.spare_pids()[-1] if len(r.spare_pids()) == 2 else None, "a new spare")
    wait_for(lambda: dropped(new_spare), "the new spare to give up its capabilities")
    assert caps.Sets.of(new_spare).effective == engine_set
    assert r.stop() == 0 and r.events("detached")
    assert not [e for e in r.lines() if e["level"] == "error" and e["event"] != "engine_died"], r.lines()


def test_a_standalone_engine_keeps_only_the_capabilities_it_uses(lab, tmp_path):
    """`hybridctl engine` (runner.serve_one, one process per queue) gives up the same
    capabilities once it has opened the maps, and still decides; the process that started it
    keeps its own."""
    with attached_with_engine(lab, tmp_path, realistic_text()) as eng, Nginx(lab):
        pid = engine_stats(lab)["pid"]
        assert pid != eng.proc.pid
        held = caps.Sets.of(pid)
        assert (held.effective, held.permitted, held.bounding) == (caps.mask(caps.ENGINE),) * 3, held
        assert (held.inheritable, held.ambient, held.no_new_privs) == (0, 0, True), held
        assert caps.Sets.of(eng.proc.pid) == caps.Sets.of()
        assert curl(lab, "x.blocked.example").returncode == 56
        st = engine_stats(lab, until=lambda st: st["flow_verdicts"]["block"] >= 1)
        assert st["flow_verdicts"]["block"] >= 1 and st["flow_write_errors"] == 0 and st["errors"] == 0, st


def realistic_text() -> str:
    with open(REALISTIC) as f:
        return f.read()


class Stream:
    """One TCP connection client -> server through the gateway, sending without pause; counts
    what arrives and records any error on either side."""

    PORT = 5599

    def __init__(self, lab):
        self.lab = lab
        with netns(lab.netns("server")):
            self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((lab.info.server.ipv4, self.PORT))
        self.listener.listen(1)
        with netns(lab.netns("client")):
            self.client = socket.socket()
        self.client.settimeout(10)
        self.client.connect((lab.info.server.ipv4, self.PORT))
        self.server, _ = self.listener.accept()
        self.server.settimeout(30)
        self.sport = self.client.getsockname()[1]
        self.received = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]
        for t in self._threads:
            t.start()

    def _send(self):
        chunk = b"x" * 65536
        try:
            while not self._stop.is_set():
                self.client.sendall(chunk)
            self.client.shutdown(socket.SHUT_WR)
        except BaseException as exc:   # noqa: BLE001 - recorded for the test to judge
            self.errors.append(exc)

    def _recv(self):
        try:
            while True:
                data = self.server.recv(1 << 20)
                if not data:
                    return
                self.received += len(data)
        except BaseException as exc:   # noqa: BLE001
            self.errors.append(exc)

    def flowing(self, more: int = 20_000_000, timeout: float = 30.0) -> None:
        """Wait until ``more`` further bytes arrived."""
        target = self.received + more
        wait_for(lambda: self.received >= target or self.errors, "bytes to keep flowing", timeout)
        assert not self.errors, self.errors

    def close(self) -> int:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        for s in (self.client, self.server, self.listener):
            s.close()
        return self.received


def flow_state(lab, stream: Stream) -> tuple[int, int, int]:
    """(id of the pinned flow table, the stream's verdict, packets the kernel counted for it)."""
    pin = f"/run/hybrid/bpffs/{lab.netns('gw')}"
    fd = bpfsys.obj_get(os.path.join(pin, "hybrid_flows"))
    try:
        map_id = bpfsys.map_info(fd).id
    finally:
        os.close(fd)
    with Maps.open_pinned(pin) as maps:
        key, _ = flow_key(lab.info.client.ipv4, lab.info.server.ipv4, stream.sport, Stream.PORT, 6)
        flow = maps.get_flow(key)
    assert flow is not None, "the stream is not in the flow table"
    return map_id, flow.verdict, flow.packets[0] + flow.packets[1]


def test_restart_with_traffic_flowing_cuts_no_connection(lab, tmp_path, runs):
    """kill -9 and restart, then stop and start with keep_attached_on_stop: the connection
    never breaks, the flow table (and the stream's bypass verdict and counters) carries on, and
    no rule is duplicated. Then a stop that detaches and a fresh start mid-stream: the stream
    still never breaks. The last run leaves nothing behind."""
    args = ("--config", EXAMPLE, *IFACES, "--rules", REALISTIC, "--keep-attached")
    first = Run(lab, tmp_path, *args, name="first")
    runs.append(first)
    first.wait_running()
    rules_before = hybrid_rules(lab)
    assert len([ln for ln in rules_before if "-j NFQUEUE" in ln]) == 2          # one per family

    stream = Stream(lab)
    try:
        stream.flowing()
        table, verdict, packets = flow_state(lab, stream)
        assert verdict == abi.VERDICT_BYPASS          # decided once, then kept in the kernel

        # kill -9: the supervisor dies at once; its engines follow (PR_SET_PDEATHSIG), and its
        # spare reads EOF on its pipe and exits without binding.
        engines = first.engine_pids() + first.spare_pids()
        assert len(engines) == 2
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        wait_for(lambda: not any(alive(p) for p in engines), "the engines to follow their supervisor")
        stream.flowing()
        assert status(lab)["attached"] is True

        second = Run(lab, tmp_path, *args, name="second")
        runs.append(second)
        second.wait_running()
        assert second.events("attached")[0]["reused_pins"] is True
        stream.flowing()
        table2, verdict2, packets2 = flow_state(lab, stream)
        assert (table2, verdict2) == (table, abi.VERDICT_BYPASS) and packets2 > packets
        assert hybrid_rules(lab) == rules_before                                  # nothing duplicated

        # stop (SIGTERM) with the kernel side kept, then start again.
        assert second.stop() == 0
        assert second.events("kept_attached") and not second.events("detached")
        stream.flowing()
        assert hybrid_rules(lab) == rules_before

        third = Run(lab, tmp_path, *args[:-1], "--detach-on-stop", name="third")
        runs.append(third)
        third.wait_running()
        assert third.events("attached")[0]["reused_pins"] is True
        stream.flowing()
        table3, verdict3, packets3 = flow_state(lab, stream)
        assert (table3, verdict3) == (table, abi.VERDICT_BYPASS) and packets3 > packets2
        assert hybrid_rules(lab) == rules_before

        assert third.stop() == 0
        assert third.events("detached")
        stream.flowing()                                  # hybrid gone: the connection carries on

        # A fresh start mid-stream (a new flow table): the stream is not cut.
        fourth = Run(lab, tmp_path, *args[:-1], "--detach-on-stop", name="fourth")
        runs.append(fourth)
        fourth.wait_running()
        assert fourth.events("attached")[0]["reused_pins"] is False
        stream.flowing()
        assert flow_state(lab, stream)[0] != table
        assert hybrid_rules(lab) == rules_before
        assert fourth.stop() == 0 and fourth.events("detached")
        stream.flowing()
    finally:
        total = stream.close()
    assert not stream.errors, stream.errors                 # no reset, no broken pipe, ever
    assert total > 100_000_000
    assert hybrid_rules(lab) == [] and status(lab)["attached"] is False
    assert not os.path.exists(f"/run/hybrid/run-{lab.netns('gw')}.lock")
