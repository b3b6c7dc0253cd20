"""Benchmarks: ways of feeding a userspace engine, side by side on one lab, in one run.

Every figure is a median over repetitions, and every mode's figure is also given as a ratio to
the ``baseline`` (nothing attached): each sample over a baseline sample of the same workload
measured right before it, and the median of those paired ratios with their lowest and highest,
so that the machine's drift between samples (±15% here) cancels within each pair. Nothing here asserts a time: this is
measurement, reported; tests only check that the harness works.

Every queued mode runs the project's engine with one rules file (``scripts/bench-rules.toml``),
so that inspection costs are equal and only the choice of packets queued differs; the engine is
pinned to the last CPU in every such mode. ``nfq-all-bare`` keeps the cheapest possible consumer
(accept-all, no decoding) for reference. The passive modes (``afpacket``, ``bridge-flood``) run
the same decoder and rules on a copy of the traffic (hybrid/lab/afpacket.py), one worker per CPU.

Every mode also says what it can do (:data:`MODES`' ``sees``/``blocks``/``rewrites``), printed
beside the figures with the share of packets a passive mode actually read: the field report's
point is the trade-off between speed and what the userspace side can see and do.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from hybrid import resources
from hybrid.datapath.maps import Maps
from hybrid.datapath.options import DEFAULT_MARK, DEFAULT_MASK
from hybrid.engine.runner import hybridctl_argv
from hybrid.errors import ConfigError, HybridError
from hybrid.kernel import abi, bpffs, sysutil
from hybrid.lab.demo import engine_process, iperf3
from hybrid.lab.flood import flooding
from hybrid.lab.servers import Nginx
from hybrid.lab.servers import iperf3 as iperf3_run
from hybrid.lab.topology import Lab

# The rule set every queued mode decides with (see the file's own comments).
BENCH_RULES = resources.shipped("scripts", "bench-rules.toml")    # in a checkout of hybrid
VISIBLE_RULE = "see-visible-host"        # the rule in BENCH_RULES that payload-visibility counts
UDP_SMALL = ["-u", "-b", "0", "-l", "64", "-A", "0"]   # iperf3 client: 64-byte datagrams, unlimited, on CPU 0

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
class Probe:
    """What a mode tells the workloads run under it."""
    engine_log: str | None = None     # the engine's verdict log (JSON lines); None: no engine
    hybrid: bool = False              # hybrid is attached (blocks go into its maps, not iptables)
    # Extras the mode itself measured over the sample, filled in when the mode is taken down
    # (a passive consumer's counts): added to the sample's extras.
    after: dict[str, float] = field(default_factory=dict)
    capture: dict | None = None       # a passive consumer's whole summary (hybrid/lab/afpacket.py)


@dataclass
class Mode:
    name: str
    description: str
    # Yields a Probe (or None: nothing to tell) while the mode is in place.
    setup: Callable[[Lab], contextlib.AbstractContextManager]
    # What the userspace side gets and can do, for the capability table.
    sees: str = ""
    blocks: str = "no"
    rewrites: str = "no"
    lab: str | None = None            # the lab kind the mode needs (None: either)


# A workload's sample: its main metric, or the main metric and extra named metrics.
Sample = float | tuple[float, dict[str, float]]


@dataclass
class Workload:
    name: str
    unit: str
    run: Callable[[Lab, float, Probe], Sample]
    higher_is_better: bool = True


@dataclass
class Result:
    mode: str
    workload: str
    unit: str
    samples: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)   # metric -> one value per sample
    # Each sample over the baseline sample measured right before it (same workload, same
    # repetition): the machine's drift between samples cancels in each pair. Empty for baseline.
    paired: list[float] = field(default_factory=list)

    @property
    def paired_median(self) -> float:
        return statistics.median(self.paired) if self.paired else float("nan")

    @property
    def paired_spread(self) -> tuple[float, float] | None:
        """The lowest and highest paired ratio."""
        return (min(self.paired), max(self.paired)) if self.paired else None

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def extra_median(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.extra.items() if v}

    def add(self, sample: Sample) -> float:
        value, extra = sample if isinstance(sample, tuple) else (sample, {})
        self.samples.append(float(value))
        self.add_extra(extra)
        return float(value)

    def add_extra(self, extra: dict[str, float]) -> None:
        for k, v in extra.items():
            self.extra.setdefault(k, []).append(float(v))


@dataclass
class Report:
    command: str
    machine: dict
    repetitions: int
    seconds: float
    results: list[Result]
    lab: str = "router"               # the lab kind it ran on

    def ratio(self, mode: str, workload: str) -> float:
        """The median of the paired ratios (each sample over the baseline measured right before
        it); for a report without pairs, the ratio of the medians."""
        base = self.get("baseline", workload)
        r = self.get(mode, workload)
        if base is None or r is None or not base.median:
            return float("nan")
        if mode != "baseline" and r.paired:
            return r.paired_median
        return r.median / base.median

    def get(self, mode: str, workload: str) -> Result | None:
        return next((r for r in self.results if r.mode == mode and r.workload == workload), None)

    def as_dict(self) -> dict:
        out = asdict(self)
        for r, d in zip(self.results, out["results"]):
            d["median"] = r.median
            d["extra_median"] = r.extra_median
            d["ratio_to_baseline"] = self.ratio(r.mode, r.workload)
            d["paired_spread"] = r.paired_spread
        out["capabilities"] = capabilities(self)
        return out


# -- modes ----------------------------------------------------------------------------------------
# The project's engine on the same queue, with a rules file; flow verdicts are not written (no
# maps): a bypass would stop the very queueing the measurement needs.
ENGINE_CONSUMER = r"""
import sys
from hybrid.engine.loop import Engine
log = open(sys.argv[5], "a") if len(sys.argv) > 5 else None
eng = Engine(int(sys.argv[1]), sys.argv[3], maps=None, mark_mask=int(sys.argv[4]), maxlen=int(sys.argv[2]),
             log_stream=log)
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
                  mark_mask: int = 0, cpu: int | None = None, log: str | None = None) -> Iterator[BareConsumer]:
    """A NetfilterQueue process in the gateway that accepts every packet of ``queue`` and
    counts them; with ``rules``, the project's engine deciding with that rules file instead
    (clearing ``mark_mask`` on accept, writing its verdict log to ``log``)."""
    argv = [sys.executable, "-c", BARE_CONSUMER, str(queue), str(max_len)] if rules is None else \
        [sys.executable, "-c", ENGINE_CONSUMER, str(queue), str(max_len), rules, str(mark_mask),
         *([log] if log else [])]
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
def nothing(lab: Lab) -> Iterator[Probe]:
    yield Probe()


def _engine_cpu() -> int:
    """Every engine runs on the last CPU, so that modes compete for CPU alike (see queue_pps)."""
    return max(0, (os.cpu_count() or 1) - 1)


@contextlib.contextmanager
def _rules_in(lab: Lab, rules: list[tuple[str, str, list[str]]]) -> Iterator[None]:
    """Add ``(table, chain, spec)`` rules in the gateway for IPv4 and IPv6, each inserted in
    order at the head of its chain; every one is removed again on exit, also when a later one
    fails to go in."""
    with contextlib.ExitStack() as undo:
        pos: dict[tuple[str, str, str], int] = {}
        for fam in ("iptables", "ip6tables"):
            for table, chain, spec in rules:
                n = pos[(fam, table, chain)] = pos.get((fam, table, chain), 0) + 1
                lab.run("gw", [fam, "-t", table, "-I", chain, str(n), *spec])
                undo.callback(lab.run, "gw", [fam, "-t", table, "-D", chain, *spec], check=False)
        yield


@contextlib.contextmanager
def iptables_queue(lab: Lab, match: list[str]) -> Iterator[Probe]:
    """Queue forwarded packets selected by ``match`` to queue 0, with a bare consumer bound."""
    spec = [*match, "-m", "comment", "--comment", "hybrid-bench", "-j", "NFQUEUE", "--queue-num", "0",
            "--queue-bypass"]
    with _rules_in(lab, [("filter", "FORWARD", spec)]), bare_consumer(lab):
        yield Probe()


@contextlib.contextmanager
def engine_queue(lab: Lab, selectors: list[list[str]], rules: str | None = None) -> Iterator[Probe]:
    """Queue the forwarded packets that any of ``selectors`` picks to queue 0, decided by the
    project's engine with ``rules`` (no flow table: nothing is bypassed in the kernel).

    The engine's accept is NF_REPEAT with hybrid's mark bit cleared, so the queue rules match
    only packets that still carry the bit: a mangle PREROUTING rule sets it on every packet, the
    repeated packet no longer has it and passes."""
    rules = rules or BENCH_RULES
    bit = f"{DEFAULT_MARK:#x}/{DEFAULT_MASK:#x}"
    tag = ["-m", "comment", "--comment", "hybrid-bench"]
    spec = [("mangle", "PREROUTING", [*tag, "-j", "MARK", "--set-xmark", bit])]
    spec += [("filter", "FORWARD", [*sel, "-m", "mark", "--mark", bit, *tag, "-j", "NFQUEUE",
                                    "--queue-num", "0", "--queue-bypass"]) for sel in selectors]
    with tempfile.TemporaryDirectory(prefix="hybrid-bench-") as tmp:
        log = os.path.join(tmp, "verdicts.jsonl")
        with _rules_in(lab, spec), bare_consumer(lab, rules=os.path.abspath(rules), mark_mask=DEFAULT_MASK,
                                                 cpu=_engine_cpu(), log=log):
            yield Probe(engine_log=log)


# OpenSnitch's selection: TCP packets whose flags are exactly SYN (of FIN, SYN, RST, ACK; the ECN
# bits may be set) and, for the rest, conntrack NEW or RELATED.
CT_NEW = [["-p", "tcp", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN"],
          ["-m", "conntrack", "--ctstate", "NEW,RELATED"]]
# Stream-depth inspection: the first 4 KiB of each connection, both directions counted together.
CONNBYTES = [["-m", "connbytes", "--connbytes", "0:4096", "--connbytes-dir", "both", "--connbytes-mode", "bytes"]]


@contextlib.contextmanager
def hybrid_attached(lab: Lab, xdp_mode: str = "auto", rules: str | None = "",
                    name_cache: bool = False) -> Iterator[Probe]:
    """hybrid attached on the gateway links, and the real engine (``hybridctl engine``) with
    ``rules`` (default: BENCH_RULES) against the attachment, so that its bypass and block
    verdicts reach the kernel's flow table; ``rules=None``: a bare accept-all consumer instead.
    ``name_cache``: attached with --name-cache (the engine teaches the kernel names)."""
    gw = lab.netns("gw")
    with contextlib.ExitStack() as undo:
        sysutil.run([*hybridctl_argv(), "attach", "to-client", "to-server", "--xdp-mode", xdp_mode,
                     *(["--name-cache"] if name_cache else [])], netns=gw,
                    timeout=120, what="hybridctl attach")
        undo.callback(sysutil.run, [*hybridctl_argv(), "detach", "--all"], netns=gw, timeout=60,
                      what="hybridctl detach")
        if rules is None:
            undo.enter_context(bare_consumer(lab))
            yield Probe(hybrid=True)
            return
        tmp = undo.enter_context(tempfile.TemporaryDirectory(prefix="hybrid-bench-"))
        log = os.path.join(tmp, "verdicts.jsonl")
        yield undo.enter_context(_hybrid_engine(lab, os.path.abspath(rules or BENCH_RULES), log))


@contextlib.contextmanager
def _hybrid_engine(lab: Lab, rules: str, log: str) -> Iterator[Probe]:
    with engine_process(lab, rules, log=log, cpu=_engine_cpu()):
        yield Probe(engine_log=log, hybrid=True)


# -- passive modes: a copy of the traffic to an AF_PACKET consumer (hybrid/lab/afpacket.py) --------
MONITOR = "hb-mon"          # bridge-flood: the monitor port in br0 ...
MONITOR_RX = "hb-mon-rx"    # ... and its veth peer, not enslaved, where the consumer reads


@contextlib.contextmanager
def capture_consumer(lab: Lab, ifaces: list[str], count_only: bool = False) -> Iterator[Probe]:
    """The AF_PACKET consumer in the gateway on ``ifaces`` (ingress), one worker per CPU,
    deciding with BENCH_RULES (``count_only``: counting frames, no decoding, no rules); on the
    way out it is stopped and its counts become the sample's extras (``capture_*``): frames
    read, bytes, IP packets decoded, rule hits, the kernel's ring drops and the share of
    packets read."""
    work = ["--count-only"] if count_only else ["--rules", os.path.abspath(BENCH_RULES)]
    proc = lab.popen("gw", [sys.executable, "-m", "hybrid.lab.afpacket", "--ifaces", ",".join(ifaces), *work],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    probe = Probe()
    started = False
    try:
        started = proc.stdout.readline().strip() == "ready"
        if started:
            yield probe
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    if not started:
        raise HybridError(f"the AF_PACKET consumer did not start: {sysutil.last_line(err) or f'exit {proc.returncode}'}")
    summary = next((ln[len("afpacket "):] for ln in out.splitlines() if ln.startswith("afpacket ")), None)
    if summary is None:
        raise HybridError(f"the AF_PACKET consumer did not report: {sysutil.last_line(err) or f'exit {proc.returncode}'}")
    c = probe.capture = json.loads(summary)
    probe.after.update({
        "capture_frames": c["frames"], "capture_bytes": c["bytes"], "capture_ip": c["ip"],
        "capture_decoded": c["decoded"], "capture_undecodable": c["undecodable"],
        "capture_truncated": c["truncated"], "capture_rule_hits": sum(c["rule_hits"].values()),
        "capture_drops": c["drops"],
        "capture_seen_share": c["seen_share"] if c["seen_share"] is not None else float("nan")})


def afpacket_ports(lab: Lab, count_only: bool = False) -> contextlib.AbstractContextManager:
    """The consumer on the gateway's two ports: every forwarded packet, where it came in."""
    return capture_consumer(lab, [lab.info.gw_client.ifname, lab.info.gw_server.ifname], count_only)


def _ageing_time(lab: Lab) -> int:
    """The bridge's ageing time, in the centiseconds ``ip link`` takes."""
    out = lab.run("gw", ["ip", "-j", "-d", "link", "show", lab.info.bridge]).stdout
    try:
        return int(json.loads(out)[0]["linkinfo"]["info_data"]["ageing_time"])
    except (ValueError, LookupError, TypeError):
        raise HybridError(f"cannot read {lab.info.bridge}'s ageing time from 'ip -j -d link show'") from None


@contextlib.contextmanager
def bridge_flood(lab: Lab, read: bool = True) -> Iterator[Probe]:
    """The field report's monitor port: br0's ageing time set to 0, so the bridge forgets every
    address at once and floods every frame to all its ports, one of which (MONITOR) is a veth
    whose other end (MONITOR_RX, no address, no IPv6) the AF_PACKET consumer reads (``read``;
    without it nobody reads there: the flooding's own cost). The ageing time is restored and
    the monitor veth removed on the way out, also on failure."""
    if lab.info.bridge is None:
        raise ConfigError("bridge-flood needs the bridge lab (--lab bridge)")
    br = lab.info.bridge
    with contextlib.ExitStack() as undo:
        old = _ageing_time(lab)
        lab.run("gw", ["ip", "link", "add", MONITOR, "type", "veth", "peer", "name", MONITOR_RX])
        undo.callback(lab.run, "gw", ["ip", "link", "del", MONITOR], check=False)
        for dev in (MONITOR, MONITOR_RX):
            lab.run("gw", ["sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=1"])
        lab.run("gw", ["ip", "link", "set", MONITOR, "master", br])
        for dev in (MONITOR, MONITOR_RX):
            lab.run("gw", ["ip", "link", "set", dev, "up"])
        lab.run("gw", ["ip", "link", "set", br, "type", "bridge", "ageing_time", "0"])
        undo.callback(lab.run, "gw", ["ip", "link", "set", br, "type", "bridge", "ageing_time", str(old)],
                      check=False)
        yield undo.enter_context(capture_consumer(lab, [MONITOR_RX])) if read else Probe()


# What each kind of userspace side sees and can do (the capability table).
_QUEUED = dict(blocks="yes", rewrites="yes")
_COPY = "a copy of every packet"

MODES: dict[str, Mode] = {
    "baseline": Mode("baseline", "nothing attached, nothing queued", nothing, sees="nothing"),
    "nfq-all": Mode("nfq-all", "every forwarded packet queued to the engine",
                    lambda lab: engine_queue(lab, [[]]), sees="every packet", **_QUEUED),
    "nfq-all-bare": Mode("nfq-all-bare", "every forwarded packet queued to a bare accept-all consumer "
                         "(reference: the cheapest userspace side)", lambda lab: iptables_queue(lab, []),
                         sees="every packet (accepts all)", **_QUEUED),
    "ct-new": Mode("ct-new", "OpenSnitch style: TCP SYNs and conntrack NEW/RELATED queued to the engine",
                   lambda lab: engine_queue(lab, CT_NEW), sees="first packets (handshakes, no payload)",
                   blocks="new connections", rewrites="no payload"),
    "connbytes": Mode("connbytes", "the first 4 KiB of each connection queued to the engine",
                      lambda lab: engine_queue(lab, CONNBYTES), sees="first 4 KiB of each connection",
                      blocks="yes", rewrites="first 4 KiB"),
    "hybrid": Mode("hybrid", "hybrid attached (xdp auto), flagged packets to the engine with flow verdicts",
                   lambda lab: hybrid_attached(lab, "auto"),
                   sees="flagged packets (each flow's first payload); kernel: every packet",
                   blocks="yes (kernel + engine)", rewrites="flagged packets"),
    "hybrid-cache": Mode("hybrid-cache", "as hybrid, with the name-verdict cache (--name-cache): new "
                         "connections to names the engine decided are decided in the kernel",
                         lambda lab: hybrid_attached(lab, "auto", name_cache=True),
                         sees="flagged packets, fewer (names decided in the kernel)",
                         blocks="yes (kernel + engine)", rewrites="flagged packets"),
    "hybrid-generic": Mode("hybrid-generic", "as hybrid, with generic XDP on both gateway links",
                           lambda lab: hybrid_attached(lab, "generic"),
                           sees="flagged packets; kernel: every packet", blocks="yes (kernel + engine)",
                           rewrites="flagged packets"),
    "hybrid-native": Mode("hybrid-native", "as hybrid, with native XDP on both gateway links",
                          lambda lab: hybrid_attached(lab, "native"),
                          sees="flagged packets; kernel: every packet", blocks="yes (kernel + engine)",
                          rewrites="flagged packets"),
    "afpacket": Mode("afpacket", "an AF_PACKET consumer (TPACKET_V3 ring, fanout per CPU) reads a copy of every "
                     "packet on the gateway's ports, decodes it and runs the rules; it cannot act",
                     afpacket_ports, sees=_COPY + " (what the ring kept)"),
    "afpacket-bare": Mode("afpacket-bare", "as afpacket, the consumer only counting frames (reference: what "
                          "the rings cost without the decoder and rules)",
                          lambda lab: afpacket_ports(lab, count_only=True),
                          sees="a count of the packets (what the ring kept)"),
    "bridge-flood": Mode("bridge-flood", "bridge ageing time 0: every frame flooded to a monitor port, read "
                         "there by the same AF_PACKET consumer; it cannot act", bridge_flood,
                         sees=_COPY + " at a monitor port (what the ring kept)", lab="bridge"),
    "bridge-flood-bare": Mode("bridge-flood-bare", "as bridge-flood with nobody reading the monitor port "
                              "(reference: the cost of the flooding alone)",
                              lambda lab: bridge_flood(lab, read=False), sees="nothing (nobody reads)",
                              lab="bridge"),
}


def capabilities(report: Report) -> dict[str, dict]:
    """Per mode: what it sees, whether it blocks and rewrites inline, and (passive modes) the
    median share of packets its consumer read, per workload (the rest were ring drops)."""
    out = {}
    for m in dict.fromkeys(r.mode for r in report.results):
        mode = MODES.get(m)
        seen = {r.workload: r.extra_median["capture_seen_share"] for r in report.results
                if r.mode == m and "capture_seen_share" in r.extra_median}
        out[m] = {"sees": mode.sees if mode else "?", "seen_share": seen or None,
                  "blocks": mode.blocks if mode else "?", "rewrites": mode.rewrites if mode else "?"}
    return out


# -- workloads ------------------------------------------------------------------------------------
def _bulk(streams: int) -> Callable[[Lab, float, Probe], Sample]:
    def run(lab: Lab, seconds: float, probe: Probe | None = None) -> Sample:
        res = iperf3(lab, seconds, streams=streams)
        got = res["end"]["sum_received"]
        return got["bits_per_second"] / 1e9, {"bytes": got["bytes"]}
    return run


WRK_CONNECTIONS = 8          # few enough for one wrk thread and one nginx worker on 2 cores
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise HybridError(f"wrk printed a latency I cannot read: {text!r}")
    return float(m.group(1)) * _WRK_UNITS[m.group(2)]


def parse_wrk(out: str) -> tuple[float, dict[str, float]]:
    """Requests/s and the extras (p50/p99 latency in ms, errors) from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    if not rps:
        raise HybridError(f"wrk failed: {sysutil.last_line(out) or 'no output'}")
    extra: dict[str, float] = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", out, re.MULTILINE)
        if m:
            extra[f"p{pct}_ms"] = _wrk_ms(m.group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    extra["errors"] = errors
    m = re.search(r"^\s*(\d+) requests in ", out, re.MULTILINE)
    if m:
        extra["requests"] = int(m.group(1))
    return float(rps.group(1)), extra


def _newconn(lab: Lab, seconds: float, probe: Probe | None = None, script: str | None = None,
             keepalive: bool = False) -> Sample:
    """New connections: wrk with ``Connection: close`` against nginx; requests/s, p50/p99, and
    packets queued to userspace per request (each request is one connection). ``script``: a
    wrk Lua script that shapes the requests (the Zipf-named variant). ``keepalive``: wrk's
    persistent connections instead, many requests on each (every request is still decided:
    the engine follows each connection's requests, hybrid/engine/follow.py)."""
    extra_args = ["-s", script] if script else []
    if not keepalive:
        extra_args += ["-H", "Connection: close"]
    with Nginx(lab):
        cache0 = _cache_counters(lab) if probe is not None and probe.hybrid else None
        queued0 = _queued_total(lab)
        proc = lab.run("client", ["taskset", "-c", "0", "wrk", "-t", "1", "-c", str(WRK_CONNECTIONS),
                                  "-d", f"{max(1, round(seconds))}s", "--latency",
                                  *extra_args, f"http://{lab.info.server.ipv4}/"],
                       timeout=seconds + 30, check=False, what="wrk")
        queued = _queued_total(lab) - queued0
        cache1 = _cache_counters(lab) if cache0 is not None else None
    rate, extra = parse_wrk(proc.stdout + proc.stderr)
    if extra.get("requests"):
        extra["queued_per_request"] = max(0, queued) / extra["requests"]
    if cache0 is not None and cache1 is not None:
        hits, asked = cache1[0] - cache0[0], cache1[1] - cache0[1]
        if asked > 0:
            extra["cache_hit_ratio"] = hits / asked
    return rate, extra


def _cache_counters(lab: Lab) -> tuple[int, int] | None:
    """(first payloads decided from the name cache, first payloads whose name was looked up)
    on the gateway so far, or None without a cache."""
    try:
        maps = Maps.open_pinned(os.path.join(bpffs.locate() or "", lab.netns("gw")))
    except HybridError:
        return None
    with maps:
        if not maps.has_name_cache:
            return None
        totals: dict[str, int] = {}
        for counters in maps.stats().values():
            for k, v in counters.items():
                totals[k] = totals.get(k, 0) + v
    hits = totals["cache_passed"] + totals["cache_dropped"]
    return hits, hits + totals["cache_miss"] + totals["cache_expired"] + totals["cache_refused"]


ZIPF_NAMES = 10_000           # distinct Host names; the k-th most popular is asked with weight 1/k
# wrk's Lua: each request (one connection, Connection: close) names a host drawn from a Zipf
# distribution (s = 1) over ZIPF_NAMES names, n<k>.zipf.example; nginx's default server answers
# every one. The cumulative weights are built once per thread, a draw is a binary search.
ZIPF_WRK_SCRIPT = """
local n = %(names)d
local cdf, total = {}, 0
for k = 1, n do total = total + 1 / k; cdf[k] = total end
math.randomseed(%(seed)d)
request = function()
  local x, lo, hi = math.random() * total, 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < x then lo = mid + 1 else hi = mid end
  end
  return wrk.format("GET", "/", {["Host"] = "n" .. lo .. ".zipf.example", ["Connection"] = "close"})
end
"""


def _newconn_zipf(lab: Lab, seconds: float, probe: Probe | None = None) -> Sample:
    """New connections as ``newconn``, each to a Host name drawn from a Zipf distribution
    (s = 1) over 10,000 names: web-like traffic, where most connections go to names already
    seen and a long tail does not."""
    fd, path = tempfile.mkstemp(prefix="hybrid-zipf-", suffix=".lua")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ZIPF_WRK_SCRIPT % {"names": ZIPF_NAMES, "seed": 1})
        os.chmod(path, 0o644)
        return _newconn(lab, seconds, probe, script=path)
    finally:
        os.unlink(path)


# The worst case for the name cache: every request names a host never seen before
# (u<k>.unique.example, k counting up), so every connection's first payload goes to the engine.
UNIQUE_WRK_SCRIPT = """
local k = 0
request = function()
  k = k + 1
  return wrk.format("GET", "/", {["Host"] = "u" .. k .. ".unique.example", ["Connection"] = "close"})
end
"""


def _newconn_unique(lab: Lab, seconds: float, probe: Probe | None = None) -> Sample:
    """New connections as ``newconn``, each to a Host name not seen before: the name cache's
    worst case (it should cost what hybrid without it costs, not more)."""
    fd, path = tempfile.mkstemp(prefix="hybrid-unique-", suffix=".lua")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(UNIQUE_WRK_SCRIPT)
        os.chmod(path, 0o644)
        return _newconn(lab, seconds, probe, script=path)
    finally:
        os.unlink(path)


def _queued_total(lab: Lab) -> int:
    """Packets the gateway's kernel has queued so far, over all its queues (id_sequence)."""
    out = lab.run("gw", ["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    return sum(int(f[7]) for f in (line.split() for line in out.splitlines()) if len(f) > 7)


def _udp_small(lab: Lab, seconds: float, probe: Probe | None = None, port: int = 5202) -> Sample:
    """64-byte UDP datagrams at unlimited rate; packets/s the server received, and (extra)
    packets/s sent and queued to userspace: a queue that overflows fails open, so the packets
    received but never queued went uninspected. Sender and receiver share CPU 0; the engine
    (where there is one) has the last CPU."""
    queued_before = _queued_total(lab)
    res = iperf3_run(lab, seconds, port=port, client=UDP_SMALL, server=["-A", "0"])
    s = res["end"]["sum"]           # UDP: the server's count of packets and losses
    secs = s.get("seconds") or seconds
    received = max(0, s["packets"] - s["lost_packets"])
    queued = _queued_total(lab) - queued_before
    return received / secs, {"sent_pps": s["packets"] / secs, "lost_percent": s.get("lost_percent", 0.0),
                             "queued_pps": max(0, queued) / secs}


VISIBILITY_CONNECTIONS = 20
_VISIBILITY_CLIENT = r"""
import socket, sys
ip, n = sys.argv[1], int(sys.argv[2])
ok = 0
for i in range(n):
    with socket.create_connection((ip, 80), timeout=5) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: c{i}.visible.bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    ok += data.startswith(b"HTTP/1.1 200")
print(ok)
"""


def _payload_visibility(lab: Lab, seconds: float, probe: Probe | None = None,
                        n: int = VISIBILITY_CONNECTIONS) -> Sample:
    """N short HTTP connections, each with its own Host; the share of them whose request the
    engine decided (its verdict log names the rule that matched, and the client's port). A mode
    without an engine, or one that queues no payload, sees 0."""
    log = probe.engine_log if probe else None
    start = os.path.getsize(log) if log and os.path.exists(log) else 0
    with Nginx(lab):
        proc = lab.run("client", [sys.executable, "-c", _VISIBILITY_CLIENT, lab.info.server.ipv4, str(n)],
                       timeout=60, check=False, what="HTTP client")
    answered = int(proc.stdout.strip() or 0) if proc.returncode == 0 else 0
    if answered != n:
        raise HybridError(f"payload-visibility: {answered} of {n} requests answered: "
                          f"{sysutil.last_line(proc.stderr) or 'no output'}")
    seen: set[tuple] = set()
    if log and os.path.exists(log):
        with open(log) as f:
            f.seek(start)
            for line in f:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("rule") == VISIBLE_RULE and rec.get("src") == lab.info.client.ipv4:
                        seen.add((rec["src"], rec["sport"]))
    return len(seen) / n, {"connections": n, "seen": len(seen)}


# -- flood: a blocked source floods while a legitimate bulk stream runs -----------------------------
FLOOD_SOURCES = "198.18.1.128/25"   # spoofed, beside the client on its link; blocked in every mode
FLOOD_PORT = 9                      # UDP discard: nothing listens, nothing in the lab answers
FLOOD_TAG = "hybrid-bench flood"


def _iptables_packets(lab: Lab, role: str, table: str, chain: str, comment: str) -> int:
    """The packet counter of the rule in ``role``'s ``table``/``chain`` carrying ``comment``."""
    out = lab.run(role, ["iptables", "-w", "-t", table, "-L", chain, "-v", "-x", "-n"]).stdout
    for line in out.splitlines():
        if f"/* {comment} */" in line:
            return int(line.split()[0])
    raise HybridError(f"the benchmark's counting rule {comment!r} vanished from {role} {table} {chain}")


@contextlib.contextmanager
def _flood_blocked(lab: Lab, probe: Probe) -> Iterator[Callable[[], dict[str, int]]]:
    """Block FLOOD_SOURCES the way the mode would: hybrid modes put the prefix in hybrid's map
    (--block-prefix at run time: dropped at XDP where XDP is attached, else at tc); every other
    mode gets an iptables DROP as the first rule of filter FORWARD, ahead of any queue rule. A
    counting rule in the server's raw PREROUTING sees what got through. Yields a function that
    reads the counters (packets dropped at XDP, at tc, at netfilter, reaching the server)."""
    with contextlib.ExitStack() as undo:
        count = ["-s", FLOOD_SOURCES, "-m", "comment", "--comment", FLOOD_TAG]
        lab.run("server", ["iptables", "-w", "-t", "raw", "-I", "PREROUTING", "1", *count])
        undo.callback(lab.run, "server", ["iptables", "-w", "-t", "raw", "-D", "PREROUTING", *count], check=False)
        maps = None
        if probe.hybrid:
            maps = undo.enter_context(Maps.open_pinned(os.path.join(bpffs.locate() or "", lab.netns("gw"))))
            maps.add_prefix(FLOOD_SOURCES, abi.PREFIX_BLOCK)
            undo.callback(maps.del_prefix, FLOOD_SOURCES)
        else:
            lab.run("gw", ["iptables", "-w", "-t", "filter", "-I", "FORWARD", "1", *count, "-j", "DROP"])
            undo.callback(lab.run, "gw", ["iptables", "-w", "-t", "filter", "-D", "FORWARD", *count, "-j", "DROP"],
                          check=False)

        def read() -> dict[str, int]:
            out = {"xdp": 0, "tc": 0, "netfilter": 0}
            if maps is not None:
                for ifindex, c in maps.stats().items():
                    if ifindex:
                        out["xdp"] += c.get("xdp_drop_prefix", 0)
                        out["tc"] += c.get("drop_tc_prefix", 0)
            else:
                out["netfilter"] = _iptables_packets(lab, "gw", "filter", "FORWARD", FLOOD_TAG)
            out["server"] = _iptables_packets(lab, "server", "raw", "PREROUTING", FLOOD_TAG)
            return out

        yield read


def _flood(lab: Lab, seconds: float, probe: Probe | None = None) -> Sample:
    """Legitimate bulk TCP (iperf3, one stream) while spoofed sources in a blocked prefix flood
    small UDP datagrams as fast as one process sends them (hybrid.flood, on CPU 0). Main metric:
    the legitimate Gbit/s with the flood. Extras: the same mode's Gbit/s without the flood,
    measured just before in the same setup (``no_flood_gbps``), their ratio (``kept``), and the
    flood's fate in packets/s: sent, dropped at XDP, at tc, at netfilter, reaching the server,
    and unaccounted (lost elsewhere, e.g. a full backlog queue, or still in flight)."""
    probe = probe or Probe()
    clean = iperf3(lab, seconds)["end"]["sum_received"]["bits_per_second"] / 1e9
    with _flood_blocked(lab, probe) as read:
        before = read()
        with flooding(lab, FLOOD_SOURCES, kind="udp", port=FLOOD_PORT, cpu=0) as f:
            time.sleep(0.3)                                # the flood is at full rate first
            res = iperf3(lab, seconds)
        time.sleep(0.2)                                    # let the last frames land
        after = read()
    if f.result is None or not f.result.seconds:
        raise HybridError("the flood sender did not report what it sent")
    secs = f.result.seconds
    died = {k: after[k] - before[k] for k in after}
    gbps = res["end"]["sum_received"]["bits_per_second"] / 1e9
    unaccounted = max(0, f.result.sent - sum(died.values()))
    return gbps, {"no_flood_gbps": clean, "kept": gbps / clean if clean else float("nan"),
                  "flood_sent_pps": f.result.sent / secs, "flood_xdp_pps": died["xdp"] / secs,
                  "flood_tc_pps": died["tc"] / secs, "flood_netfilter_pps": died["netfilter"] / secs,
                  "flood_server_pps": died["server"] / secs, "flood_unaccounted_pps": unaccounted / secs}


# -- synflood: spoofed SYNs at full speed while a legitimate client opens connections -----------------
SYNFLOOD_SOURCES = "198.18.128.0/17"   # spoofed; the server has no route back, so no backscatter
_CONNECT_LOOP = r"""
import json, socket, sys, time
ip, seconds = sys.argv[1], float(sys.argv[2])
ok = tried = 0
start = time.monotonic()
while time.monotonic() - start < seconds:
    tried += 1
    try:
        with socket.create_connection((ip, 80), timeout=3) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: legit\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        ok += data.startswith(b"HTTP/1.1 200")
    except OSError:
        pass
print(json.dumps({"ok": ok, "tried": tried, "seconds": time.monotonic() - start}))
"""


def _connect_loop(lab: Lab, seconds: float) -> dict:
    proc = lab.run("client", ["taskset", "-c", "0", sys.executable, "-c", _CONNECT_LOOP, lab.info.server.ipv4,
                              str(seconds)], timeout=seconds + 30, check=False, what="connection loop")
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise HybridError(f"the connection loop failed: {sysutil.last_line(proc.stderr) or 'no output'}") from None


def _refused(lab: Lab, probe: Probe) -> int:
    """Flagged packets hybrid's admission control refused so far (0 outside hybrid modes)."""
    if not probe.hybrid:
        return 0
    with Maps.open_pinned(os.path.join(bpffs.locate() or "", lab.netns("gw"))) as maps:
        return sum(c.get("over_global", 0) + c.get("over_source", 0) for i, c in maps.stats().items() if i)


def _synflood(lab: Lab, seconds: float, probe: Probe | None = None) -> Sample:
    """A legitimate client opening connections one after another (HTTP GET to nginx, 3 s
    timeout, on CPU 0) while spoofed SYNs from SYNFLOOD_SOURCES flood the server's port 80 as
    fast as hybrid.flood sends them (also CPU 0). Nothing is blocked: this measures what the
    mode does with a flood it must classify (hybrid: admission control, default budgets). Main
    metric: legitimate connections/s completed under the flood. Extras: the same without the
    flood just before (``no_flood_cps``), ``kept``, the share of attempts that completed under
    the flood (``completed``), the flood's rate, packets/s queued to userspace during the flood,
    and (hybrid) flagged packets/s its admission control refused."""
    probe = probe or Probe()
    with Nginx(lab):
        quiet = _connect_loop(lab, seconds)
        with flooding(lab, SYNFLOOD_SOURCES, kind="syn", port=80, cpu=0) as f:
            time.sleep(0.3)
            queued0, refused0 = _queued_total(lab), _refused(lab, probe)
            loud = _connect_loop(lab, seconds)
            queued1, refused1 = _queued_total(lab), _refused(lab, probe)
    if f.result is None or not f.result.seconds:
        raise HybridError("the flood sender did not report what it sent")
    cps = loud["ok"] / loud["seconds"]
    clean = quiet["ok"] / quiet["seconds"]
    return cps, {"no_flood_cps": clean, "kept": cps / clean if clean else float("nan"),
                 "completed": loud["ok"] / loud["tried"] if loud["tried"] else 0.0,
                 "flood_sent_pps": f.result.sent / f.result.seconds,
                 "queued_pps": max(0, queued1 - queued0) / loud["seconds"],
                 "refused_pps": (refused1 - refused0) / loud["seconds"]}


def _forget_spoofed(lab: Lab) -> None:
    """After a flood, forget the spoofed sources' conntrack entries in the gateway (up to
    hundreds of thousands, in the modes that load conntrack) so that the next sample, of any
    mode, starts from the same gateway state."""
    with contextlib.suppress(HybridError, OSError):
        lab.run("gw", ["conntrack", "-F"], check=False)


WORKLOADS: dict[str, Workload] = {
    "bulk-1": Workload("bulk-1", "Gbit/s", _bulk(1)),
    "bulk-4": Workload("bulk-4", "Gbit/s", _bulk(4)),
    "newconn": Workload("newconn", "req/s", _newconn),
    "newconn-zipf": Workload("newconn-zipf", "req/s", _newconn_zipf),
    "newconn-unique": Workload("newconn-unique", "req/s", _newconn_unique),
    "keepalive": Workload("keepalive", "req/s", functools.partial(_newconn, keepalive=True)),
    "udp-small": Workload("udp-small", "packets/s", _udp_small),
    "payload-visibility": Workload("payload-visibility", "share seen", _payload_visibility),
    "flood": Workload("flood", "Gbit/s", _flood),
    "synflood": Workload("synflood", "conn/s", _synflood),
}


def machine() -> dict:
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine()}


def run(modes: list[str], workloads: list[str], repetitions: int, seconds: float, *,
        lab_name: str = "hbench", progress: Callable[[str], None] = lambda _m: None,
        command: str = "", lab_kind: str = "router") -> Report:
    """Run every workload under every mode, ``repetitions`` times, on a fresh lab of
    ``lab_kind`` ("router" or "bridge"). Every sample of a mode is paired with a baseline
    sample of the same workload measured right before it (a machine whose speed drifts by 15%
    between samples would otherwise hide an 8% cost), and the modes take turns going first
    from one repetition to the next."""
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"mode {m!r}: use any of {', '.join(MODES)}")
        need = MODES[m].lab
        if need and need != lab_kind:
            raise ConfigError(f"mode {m!r} needs the {need} lab: add --lab {need}")
    sysutil.require_root("bench")
    for w in workloads:
        if w not in WORKLOADS:
            raise ConfigError(f"workload {w!r}: use any of {', '.join(WORKLOADS)}")
    if not os.path.exists(BENCH_RULES):
        raise ConfigError(f"the benchmark's rules file {BENCH_RULES} is missing: run from a checkout of hybrid")
    if "baseline" not in modes:
        modes = ["baseline", *modes]
    results = {(m, w): Result(m, w, WORKLOADS[w].unit) for m in modes for w in workloads}
    others = [m for m in modes if m != "baseline"] or ["baseline"]
    total = repetitions * len(others) * len(workloads) * (2 if others != ["baseline"] else 1)
    done = 0

    def sample(lab: Lab, m: str, w: str, rep: int) -> float:
        nonlocal done
        with MODES[m].setup(lab) as probe:
            probe = probe or Probe()
            value = results[(m, w)].add(WORKLOADS[w].run(lab, seconds, probe))
        results[(m, w)].add_extra(probe.after)     # what the mode measured, now that it is down
        if w in ("flood", "synflood"):
            _forget_spoofed(lab)
        done += 1
        progress(f"[{done}/{total}] rep {rep + 1} {m:<15} {w:<18} {value:12.2f} {WORKLOADS[w].unit}")
        time.sleep(0.2)
        return value

    with Lab(lab_name, kind=lab_kind) as lab:
        for rep in range(repetitions):
            order = others if rep % 2 == 0 else list(reversed(others))   # no mode always runs first
            for m in order:
                for w in workloads:
                    base = sample(lab, "baseline", w, rep)
                    if m == "baseline":
                        continue
                    value = sample(lab, m, w, rep)
                    results[(m, w)].paired.append(value / base if base else float("nan"))
    return Report(command, machine(), repetitions, seconds, list(results.values()), lab=lab_kind)


def table(report: Report) -> str:
    """The main metric of every workload per mode, with its ratio to baseline; the extras are in
    the JSON."""
    workloads = list(dict.fromkeys(r.workload for r in report.results))
    modes = list(dict.fromkeys(r.mode for r in report.results))
    titles = [f"{w} ({report.get(modes[0], w).unit})" for w in workloads]
    widths = [max(38, len(t) + 2) for t in titles]
    head = f"{'mode':<16}" + "".join(f"{t:>{n}}" for t, n in zip(titles, widths))
    lines = [head, "-" * len(head)]
    for m in modes:
        cells = []
        for w, n in zip(workloads, widths):
            r = report.get(m, w)
            spread = r.paired_spread
            rng = f" {spread[0]:.2f}-{spread[1]:.2f}" if spread and m != "baseline" else ""
            cells.append(f"{r.median:>10.2f} ({report.ratio(m, w):>5.3f} of base{rng})".rjust(n))
        lines.append(f"{m:<16}" + "".join(cells))
    return "\n".join(lines) + "\n\n" + capability_table(report)


def capability_table(report: Report) -> str:
    """What each mode's userspace side sees (and, for a passive mode, the share of packets its
    consumer read per workload: the rest were dropped by a full ring), and whether it can block
    or rewrite inline."""
    caps = capabilities(report)
    rows = []
    for m, c in caps.items():
        seen = ", ".join(f"{w} {v:.2f}" for w, v in c["seen_share"].items()) if c["seen_share"] else "-"
        rows.append((m, c["sees"], seen, c["blocks"], c["rewrites"]))
    head = ("mode", "sees", "share read", "blocks inline", "rewrites")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{n}}}" for n in widths)
    out = [fmt.format(*head).rstrip(), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [fmt.format(*r).rstrip() for r in rows]
    return "\n".join(out)


# -- the engine against a bare consumer -----------------------------------------------------------
def queue_pps(lab: Lab, rules: str | None, seconds: float, port: int = 9999) -> float:
    """Packets per second a consumer of queue 0 handles while the client floods 64-byte UDP
    datagrams at ``port``, every one of them marked by hybrid (--watch-port) and queued.

    On a 2-core machine the flooding sender, the forwarding softirqs and the consumer compete for
    CPU, and unpinned runs of the same consumer varied by 40%; so the consumer gets the last CPU
    and the sender and receiver the first, for every consumer alike."""
    with bare_consumer(lab, rules=rules, mark_mask=DEFAULT_MASK, cpu=_engine_cpu()) as consumer:
        iperf3_run(lab, seconds, port=port, client=UDP_SMALL, server=["-A", "0"], parse=False)
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
        # No admission budget: this measures how fast the engine empties the queue, and the
        # default global budget (40,000/s) would cap both consumers below that.
        sysutil.run([*hybridctl_argv(), "attach", "to-client", "to-server", "--watch-port", "9999",
                     "--global-rate", "0"], netns=gw,
                    timeout=120, what="hybridctl attach")
        try:
            for rep in range(repetitions):
                for kind in (("bare", "engine") if rep % 2 == 0 else ("engine", "bare")):
                    pps = queue_pps(lab, None if kind == "bare" else os.path.abspath(rules), seconds)
                    samples[kind].append(pps)
                    progress(f"rep {rep + 1} {kind:<7} {pps:12,.0f} packets/s")
        finally:
            sysutil.run([*hybridctl_argv(), "detach", "--all"], netns=gw, timeout=60, what="hybridctl detach")
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"rules": rules, "repetitions": repetitions, "seconds": seconds, "machine": machine(),
            "samples": samples, "median": med, "ratio": med["engine"] / med["bare"] if med["bare"] else float("nan")}


# -- engine takeover: how long a killed engine's queue stays unbound ---------------------------------
def _run_events(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _wait_event(proc: subprocess.Popen, path: str, name: str, count: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = [e for e in _run_events(path) if e.get("event") == name]
        if len(got) >= count:
            return got[count - 1]
        if proc.poll() is not None or time.monotonic() > deadline:
            raise HybridError(f"hybridctl run did not log {name} #{count} (exit {proc.poll()}); its log: {path}")
        time.sleep(0.01)


def _takeover_once(lab: Lab, spare: bool, tmp: str) -> float:
    """Start `hybridctl run`, kill its engine with SIGKILL, and return the seconds from the kill
    to the queue bound again (the `engine_bound` line's timestamp); stop the run."""
    log_path = os.path.join(tmp, f"run-{'spare' if spare else 'nospare'}.jsonl")
    conf = os.path.join(tmp, "hybrid.toml")
    with open(conf, "w") as f:
        f.write(f'[attach]\ninterfaces = ["to-client", "to-server"]\n[engine]\nrules = {json.dumps(os.path.abspath(BENCH_RULES))}\n')
    with open(log_path, "w") as out:
        proc = lab.popen("gw", [*hybridctl_argv(), "run", "--config", conf, "--detach-on-stop",
                                "--standby" if spare else "--no-standby"], stdout=out, start_new_session=True)
    try:
        _wait_event(proc, log_path, "engine_running", 1)
        if spare:
            _wait_event(proc, log_path, "engine_standby", 1)
        time.sleep(0.5)
        pid = _wait_event(proc, log_path, "engine_started", 1)["pid"]
        t0 = time.time()
        os.kill(pid, signal.SIGKILL)
        bound = _wait_event(proc, log_path, "engine_bound", 2)
        ts = datetime.datetime.fromisoformat(bound["ts"].replace("Z", "+00:00")).timestamp()
        _wait_event(proc, log_path, "engine_running", 2)
        return ts - t0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sysutil.run([*hybridctl_argv(), "detach", "--all"], netns=lab.netns("gw"), timeout=60,
                    what="hybridctl detach", check=False)


def takeover(repetitions: int, *, lab_name: str = "hbench",
             progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Seconds from ``kill -9`` of the engine of `hybridctl run` to its queue bound again, with a
    spare engine waiting (the default) and without, interleaved; a fresh run for each sample."""
    sysutil.require_root("bench")
    samples: dict[str, list[float]] = {"spare": [], "no-spare": []}
    with Lab(lab_name) as lab, tempfile.TemporaryDirectory(prefix="hybrid-bench-") as tmp:
        for rep in range(repetitions):
            for kind in (("spare", "no-spare") if rep % 2 == 0 else ("no-spare", "spare")):
                secs = _takeover_once(lab, kind == "spare", tmp)
                samples[kind].append(secs)
                progress(f"rep {rep + 1} {kind:<9} {secs * 1000:8.1f} ms unbound")
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"repetitions": repetitions, "machine": machine(), "samples": samples, "median": med}
