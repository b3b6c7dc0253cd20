"""Benchmarks: ways of feeding a userspace engine, side by side on one lab, in one run.

Every figure is a median over repetitions, and every mode's figure is also given as a ratio to
the ``baseline`` (nothing attached) measured in the same run, with repetitions interleaved across
modes so that drift of the machine hits every mode alike. Nothing here asserts a time: this is
measurement, reported; tests only check that the harness works.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from . import sysutil
from .demo import hybridctl, iperf3
from .errors import ConfigError, HybridError
from .lab import Lab

# A bare NetfilterQueue consumer that accepts everything: the cheapest possible userspace side.
BARE_CONSUMER = r"""
import signal, sys
from netfilterqueue import NetfilterQueue
seen = 0
def accept(pkt):
    global seen
    seen += 1
    pkt.accept()
class Stop(Exception):
    pass
def stop(*_):
    raise Stop
q = NetfilterQueue()
q.bind(int(sys.argv[1]), accept, max_len=int(sys.argv[2]))
signal.signal(signal.SIGTERM, stop)
print("bound", flush=True)
try:
    q.run()
except Stop:
    pass
finally:
    q.unbind()
    print(f"seen {seen}", flush=True)
"""


@dataclass
class Mode:
    name: str
    description: str
    setup: Callable[[Lab], contextlib.AbstractContextManager]


@dataclass
class Workload:
    name: str
    unit: str
    run: Callable[[Lab, float], float]
    higher_is_better: bool = True


@dataclass
class Result:
    mode: str
    workload: str
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")


@dataclass
class Report:
    command: str
    machine: dict
    repetitions: int
    seconds: float
    results: list[Result]

    def ratio(self, mode: str, workload: str) -> float:
        base = self.get("baseline", workload)
        r = self.get(mode, workload)
        if base is None or r is None or not base.median:
            return float("nan")
        return r.median / base.median

    def get(self, mode: str, workload: str) -> Result | None:
        return next((r for r in self.results if r.mode == mode and r.workload == workload), None)

    def as_dict(self) -> dict:
        out = asdict(self)
        for r, d in zip(self.results, out["results"]):
            d["median"] = r.median
            d["ratio_to_baseline"] = self.ratio(r.mode, r.workload)
        return out


# -- modes ----------------------------------------------------------------------------------------
# The project's engine on the same queue, with a rules file; flow verdicts are not written (no
# maps): a bypass would stop the very queueing the measurement needs.
ENGINE_CONSUMER = r"""
import sys
from hybrid.engine import Engine
eng = Engine(int(sys.argv[1]), sys.argv[3], maps=None, mark_mask=int(sys.argv[4]), maxlen=int(sys.argv[2]))
eng.install_signals()
eng.bind()
print("bound", flush=True)
eng.run()
print(f"seen {eng.stats.packets} errors {eng.stats.errors}", flush=True)
"""


class BareConsumer:
    """Handle on a running bare consumer; ``seen`` is set when it has stopped."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.seen: int | None = None


@contextlib.contextmanager
def bare_consumer(lab: Lab, queue: int = 0, max_len: int = 4096, *, rules: str | None = None,
                  mark_mask: int = 0, cpu: int | None = None) -> Iterator[BareConsumer]:
    """A NetfilterQueue process in the gateway that accepts every packet of ``queue`` and
    counts them; with ``rules``, the project's engine deciding with that rules file instead."""
    argv = [sys.executable, "-c", BARE_CONSUMER, str(queue), str(max_len)] if rules is None else \
        [sys.executable, "-c", ENGINE_CONSUMER, str(queue), str(max_len), rules, str(mark_mask)]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    proc = lab.popen("gw", argv, stdout=subprocess.PIPE, text=True)
    handle = BareConsumer(proc)
    try:
        line = proc.stdout.readline()
        if line.strip() != "bound":
            raise HybridError(f"the queue consumer did not start (exit {proc.poll()})")
        yield handle
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=5)
            if out.startswith("seen "):
                handle.seen = int(out.split()[1])
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@contextlib.contextmanager
def nothing(lab: Lab) -> Iterator[None]:
    yield


@contextlib.contextmanager
def iptables_queue(lab: Lab, match: list[str]) -> Iterator[None]:
    """Queue forwarded packets selected by ``match`` to queue 0, with a bare consumer bound."""
    spec = [*match, "-m", "comment", "--comment", "hybrid-bench", "-j", "NFQUEUE", "--queue-num", "0",
            "--queue-bypass"]
    for fam in ("iptables", "ip6tables"):
        lab.run("gw", [fam, "-I", "FORWARD", "1", *spec])
    try:
        with bare_consumer(lab):
            yield
    finally:
        for fam in ("iptables", "ip6tables"):
            lab.run("gw", [fam, "-D", "FORWARD", *spec], check=False)


@contextlib.contextmanager
def hybrid_attached(lab: Lab, xdp_mode: str = "auto") -> Iterator[None]:
    gw = lab.netns("gw")
    sysutil.run([*hybridctl(), "attach", "to-client", "to-server", "--xdp-mode", xdp_mode], netns=gw,
                timeout=120, what="hybridctl attach")
    try:
        with bare_consumer(lab):
            yield
    finally:
        sysutil.run([*hybridctl(), "detach", "--all"], netns=gw, timeout=60, what="hybridctl detach")


MODES: dict[str, Mode] = {
    "baseline": Mode("baseline", "nothing attached, nothing queued", nothing),
    "nfq-all": Mode("nfq-all", "every forwarded packet queued to a bare accept-all consumer",
                    lambda lab: iptables_queue(lab, [])),
    "hybrid": Mode("hybrid", "hybrid attached (xdp auto), flagged packets queued to a bare consumer",
                   lambda lab: hybrid_attached(lab, "auto")),
    "hybrid-generic": Mode("hybrid-generic", "as hybrid, with generic XDP on both gateway links",
                           lambda lab: hybrid_attached(lab, "generic")),
    "hybrid-native": Mode("hybrid-native", "as hybrid, with native XDP on both gateway links",
                          lambda lab: hybrid_attached(lab, "native")),
}


# -- workloads ------------------------------------------------------------------------------------
def _bulk(streams: int) -> Callable[[Lab, float], float]:
    def run(lab: Lab, seconds: float) -> float:
        res = iperf3(lab, seconds, streams=streams)
        return res["end"]["sum_received"]["bits_per_second"] / 1e9
    return run


WORKLOADS: dict[str, Workload] = {
    "bulk-1": Workload("bulk-1", "Gbit/s", _bulk(1)),
    "bulk-4": Workload("bulk-4", "Gbit/s", _bulk(4)),
}


def machine() -> dict:
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine()}


def run(modes: list[str], workloads: list[str], repetitions: int, seconds: float, *,
        lab_name: str = "hbench", progress: Callable[[str], None] = lambda _m: None,
        command: str = "") -> Report:
    """Run every workload under every mode, ``repetitions`` times, interleaved."""
    sysutil.require_root("bench")
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"mode {m!r}: use any of {', '.join(MODES)}")
    for w in workloads:
        if w not in WORKLOADS:
            raise ConfigError(f"workload {w!r}: use any of {', '.join(WORKLOADS)}")
    if "baseline" not in modes:
        modes = ["baseline", *modes]
    results = {(m, w): Result(m, w, WORKLOADS[w].unit) for m in modes for w in workloads}
    total = repetitions * len(modes) * len(workloads)
    done = 0
    with Lab(lab_name) as lab:
        for rep in range(repetitions):
            order = modes if rep % 2 == 0 else list(reversed(modes))   # no mode always runs first
            for m in order:
                with MODES[m].setup(lab):
                    for w in workloads:
                        value = WORKLOADS[w].run(lab, seconds)
                        results[(m, w)].samples.append(value)
                        done += 1
                        progress(f"[{done}/{total}] rep {rep + 1} {m:<15} {w:<8} {value:8.2f} {WORKLOADS[w].unit}")
                time.sleep(0.2)
    return Report(command, machine(), repetitions, seconds, list(results.values()))


def table(report: Report) -> str:
    workloads = list(dict.fromkeys(r.workload for r in report.results))
    modes = list(dict.fromkeys(r.mode for r in report.results))
    head = f"{'mode':<16}" + "".join(f"{w + ' (' + report.get(modes[0], w).unit + ')':>26}" for w in workloads)
    lines = [head, "-" * len(head)]
    for m in modes:
        cells = []
        for w in workloads:
            r = report.get(m, w)
            cells.append(f"{r.median:>10.2f} ({report.ratio(m, w):>5.3f} of base)")
        lines.append(f"{m:<16}" + "".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


# -- the engine against a bare consumer -----------------------------------------------------------
def queue_pps(lab: Lab, rules: str | None, seconds: float, port: int = 9999) -> float:
    """Packets per second a consumer of queue 0 handles while the client floods 64-byte UDP
    datagrams at ``port``, every one of them marked by hybrid (--watch-port) and queued.

    On a 2-core machine the flooding sender, the forwarding softirqs and the consumer compete for
    CPU, and unpinned runs of the same consumer varied by 40%; so the consumer gets the last CPU
    and the sender and receiver the first, for every consumer alike."""
    from .attach import DEFAULT_MASK
    last_cpu = max(0, (os.cpu_count() or 1) - 1)
    with bare_consumer(lab, rules=rules, mark_mask=DEFAULT_MASK, cpu=last_cpu) as consumer:
        server = lab.popen("server", ["iperf3", "-s", "-1", "-A", "0", "-B", lab.info.server.ipv4, "-p", str(port)])
        try:
            from .labservers import _wait_port
            _wait_port(lab, "server", port)
            lab.run("client", ["iperf3", "-u", "-b", "0", "-l", "64", "-A", "0", "-c", lab.info.server.ipv4,
                               "-p", str(port), "-t", str(seconds)], timeout=seconds + 30, check=False)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=5)
            if server.poll() is None:
                server.kill()
                server.wait()
    if consumer.seen is None:
        raise HybridError("the queue consumer did not report what it saw")
    return consumer.seen / seconds


def engine_vs_bare(rules: str, repetitions: int, seconds: float, *, lab_name: str = "hbench",
                   progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Median packets/s through the engine with ``rules`` and through a bare accept-all
    consumer on the same queue, interleaved, and their ratio."""
    sysutil.require_root("bench")
    samples: dict[str, list[float]] = {"bare": [], "engine": []}
    with Lab(lab_name) as lab:
        gw = lab.netns("gw")
        sysutil.run([*hybridctl(), "attach", "to-client", "to-server", "--watch-port", "9999"], netns=gw,
                    timeout=120, what="hybridctl attach")
        try:
            for rep in range(repetitions):
                for kind in (("bare", "engine") if rep % 2 == 0 else ("engine", "bare")):
                    pps = queue_pps(lab, None if kind == "bare" else os.path.abspath(rules), seconds)
                    samples[kind].append(pps)
                    progress(f"rep {rep + 1} {kind:<7} {pps:12,.0f} packets/s")
        finally:
            sysutil.run([*hybridctl(), "detach", "--all"], netns=gw, timeout=60, what="hybridctl detach")
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"rules": rules, "repetitions": repetitions, "seconds": seconds, "machine": machine(),
            "samples": samples, "median": med, "ratio": med["engine"] / med["bare"] if med["bare"] else float("nan")}
