"""Record real lab traffic while hybrid is attached: the capture, the live verdicts, the live counters.

Issue 17 replays captures through the BPF programs and the engine offline; to check a replay
against what really happened, or to make a regression capture for ``hybridctl rules test``, a
capture must come with what the live gateway did with the very same packets. :func:`record`
makes one in a lab (router or bridge kind):

1. attaches hybrid to the gateway's two links (``hybridctl attach to-client to-server`` plus
   the caller's attach options) and starts ``hybridctl engine`` with the rules and a verdict log;
2. starts the scenario's servers (hybrid/lab/servers.py) in the server namespace;
3. captures on both gateway links, *ingress only*: one ``dumpcap`` per link whose capture filter
   keeps the frames the link's peer sent (``ether src`` of the client's or the server's MAC, so
   in a router lab and in a bridge lab alike; libpcap's ``inbound`` loses a link's first packet
   on veth). Each frame is in the capture once, as the gateway received it and where (the
   pcapng interface name is the gateway's link name), whatever the gateway then did with it;
4. runs the scenario's clients in the client namespace (see :data:`SCENARIOS`);
5. stops the capture cleanly: a sentinel ping each way (client to server, server to client) is
   sent last, and dumpcap is stopped only once the file holds both (dumpcap reads in blocks and
   loses what it has not read when stopped early); both files are merged in time order into one
   pcapng (``mergecap``), whose interface names are the gateway's links;
6. reads ``hybridctl status --json`` once the engine has published its counters for the last
   packet, stops the engine and detaches.

The result (:class:`Recording`) names the capture, the verdict log (JSON lines, as
``hybridctl engine --log`` writes them: rate-limited, and only decisions whose rule logs, see
docs/rules.md), the status at the start and at the end, and what the clients saw. Everything is
also written to the output directory (``capture.pcapng``, ``rules.toml``, ``verdicts.jsonl``,
``status-before.json``, ``status.json``, ``record.json``), so the directory is self-contained.

What a capture does not hold: frames the gateway dropped at XDP (a ban, or a BLOCK with
``--xdp-mode native`` or ``generic``) are dropped before the capture taps them. On the lab's veths
XDP is off unless asked for, so every frame is captured and tc enforces blocks.

``python -m hybrid.lab.record --scenario web --rules R --out DIR`` runs it from a shell (as root):
on a lab it brings up and removes, or on a lab that is up already (``--lab NAME``), left up.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from hybrid import instance as inst
from hybrid.engine.loop import STATS_INTERVAL
from hybrid.engine.rules import load_rules
from hybrid.engine.runner import hybridctl_argv
from hybrid.errors import ConfigError, HybridError, ToolMissingError
from hybrid.kernel import sysutil
from hybrid.lab import servers
from hybrid.lab.demo import engine_process
from hybrid.lab.servers import Dns, Nginx
from hybrid.lab.topology import KINDS, Lab, existing_netns

IFACES = ("to-client", "to-server")
SCENARIOS = ("web", "tls", "dns", "bulk", "mixed")

# The names the scenarios use: one allowed and one blocked name of each kind. LAB_RULES blocks
# every name under blocked.test; a caller's rules may decide them otherwise.
WEB_HOSTS = ("www.allowed.test", "www.blocked.test")
TLS_NAMES = ("tls.allowed.test", "tls.blocked.test")
DNS_NAMES = ("dns.allowed.test", "dns.blocked.test")
HTTP_PORT, TLS_PORT, IPERF_PORT = 80, 443, 5201
CLIENT_TIMEOUT = 3          # seconds a client waits for an answer (a dropped request times out)
SENTINEL = "6879627269642d7265636f7264"     # ping -p: "hybrid-record", the capture's last frames
START_SENTINEL = "6879627269642d7374617274"   # ping -p: "hybrid-start", the capture's first frames
FLUSH_TIMEOUT = 15.0
DUMPCAP_BUFFER_MB = 64      # per link: a bulk burst must not overflow the kernel's capture ring

LAB_RULES = """\
# The lab recorder's default rules (hybrid/lab/record.py): every name under blocked.test is
# refused, the rest is bypassed in the kernel after its first payload.
default = "accept"
default_flow = "bypass"
flow_ttl = 300

[[rule]]
name = "wait-for-payload"
proto = "tcp"
payload_len = 0
action = "accept"
log = false

[[rule]]
name = "block-host"
proto = "tcp"
http_host = ".blocked.test"
action = "reject"
flow = "block"

[[rule]]
name = "block-sni"
proto = "tcp"
tls_sni = ".blocked.test"
action = "reject"
flow = "block"

[[rule]]
name = "block-dns"
dns_qname = ".blocked.test"
action = "reject"
flow = "block"
"""


@dataclass
class Recording:
    """One recorded scenario. Paths are inside ``out``."""

    scenario: str
    lab_kind: str
    out: str
    capture: str                     # pcapng, both links' ingress, interface names IFACES
    rules: str                       # the rules file the engine ran (a copy)
    verdict_log: str                 # the engine's verdict log, JSON lines
    verdicts: list[dict] = field(default_factory=list)
    status_before: dict = field(default_factory=dict)    # hybridctl status --json, capture start
    status: dict = field(default_factory=dict)           # the same at the end
    outcomes: dict[str, object] = field(default_factory=dict)   # what each client saw
    captured: dict[str, int] = field(default_factory=dict)      # frames per link, as dumpcap wrote
    capture_dropped: dict[str, int] = field(default_factory=dict)   # frames the capture lost
    attach_args: list[str] = field(default_factory=list)

    def kernel_counters(self) -> dict[str, int]:
        """The tc/XDP counters of both links, summed, during the recording (end minus start)."""
        def summed(st: dict) -> dict[str, int]:
            out: dict[str, int] = {}
            for e in st.get("interfaces", {}).values():
                for k, v in e.get("counters", {}).items():
                    out[k] = out.get(k, 0) + v
            return out
        before, after = summed(self.status_before), summed(self.status)
        return {k: v - before.get(k, 0) for k, v in after.items()}

    def queued_packets(self) -> int:
        """Packets netfilter queued to the engine during the recording (IPv4 and IPv6)."""
        def q(st: dict) -> int:
            return sum(n.get("queued_packets", 0) for n in st.get("netfilter", []))
        return q(self.status) - q(self.status_before)


# -- the scenarios' clients -------------------------------------------------------------------
class _Ctx:
    """What a scenario's clients need: the lab, and the servers started for them."""

    def __init__(self, lab: Lab, nginx: Nginx | None, seconds: float, bulk_rate: str):
        self.lab, self.nginx, self.seconds, self.bulk_rate = lab, nginx, seconds, bulk_rate

    def client(self, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return self.lab.run("client", list(argv), check=False, timeout=timeout)


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def _web(ctx: _Ctx) -> dict[str, object]:
    """curl with an allowed and a blocked Host, over IPv4 and IPv6: the HTTP status (0: none)."""
    out: dict[str, object] = {}
    srv = ctx.lab.info.server
    for family, addr in (("ipv4", srv.ipv4), ("ipv6", srv.ipv6)):
        for host in WEB_HOSTS:
            proc = ctx.client(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", str(CLIENT_TIMEOUT),
                               "-H", f"Host: {host}", f"http://{_url_host(addr)}:{HTTP_PORT}/"])
            out[f"http {host} {family}"] = int(proc.stdout.strip() or 0)
    return out


def _tls(ctx: _Ctx) -> dict[str, object]:
    """curl over HTTPS to an allowed and a blocked server name (SNI), IPv4 and IPv6: the status."""
    out: dict[str, object] = {}
    srv = ctx.lab.info.server
    for family, addr in (("ipv4", srv.ipv4), ("ipv6", srv.ipv6)):
        for name in TLS_NAMES:
            proc = ctx.client(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", str(CLIENT_TIMEOUT),
                               "--cacert", ctx.nginx.cert, "--resolve", f"{name}:{TLS_PORT}:{addr}",
                               f"https://{name}:{TLS_PORT}/"])
            out[f"https {name} {family}"] = int(proc.stdout.strip() or 0)
    return out


def _dns(ctx: _Ctx) -> dict[str, object]:
    """dig for an allowed and a blocked name: over UDP to each server address, and over TCP;
    the answer's addresses (empty: no answer, e.g. refused)."""
    out: dict[str, object] = {}
    srv = ctx.lab.info.server
    for how, addr, extra in (("udp ipv4", srv.ipv4, []), ("udp ipv6", srv.ipv6, []), ("tcp ipv4", srv.ipv4, ["+tcp"])):
        for name in DNS_NAMES:
            proc = ctx.client(["dig", "+short", "+tries=1", f"+time={CLIENT_TIMEOUT}", *extra, f"@{addr}", name, "A"])
            out[f"dns {name} {how}"] = _answers(proc.stdout)
    return out


def _answers(dig_short: str) -> list[str]:
    """The addresses in ``dig +short``'s output (dig prints its errors there too, ";;" lines)."""
    found = []
    for word in dig_short.split():
        with contextlib.suppress(ValueError):
            found.append(str(ipaddress.ip_address(word)))
    return found


def _bulk(ctx: _Ctx) -> dict[str, object]:
    """iperf3 client -> server for ``seconds`` at ``bulk_rate`` (a rate keeps the capture small)."""
    res = servers.iperf3(ctx.lab, ctx.seconds, port=IPERF_PORT, client=["-b", ctx.bulk_rate])
    return {"bulk bytes": int(res["end"]["sum_received"]["bytes"])}


def _mixed(ctx: _Ctx) -> dict[str, object]:
    """A bulk transfer in the background while the web, TLS and DNS clients run."""
    bulk: dict[str, object] = {}
    failed: list[BaseException] = []

    def background() -> None:
        try:
            bulk.update(_bulk(ctx))
        except BaseException as exc:      # re-raised below, in the caller's thread
            failed.append(exc)

    t = threading.Thread(target=background, name="record-bulk", daemon=True)
    t.start()
    out = {**_web(ctx), **_tls(ctx), **_dns(ctx)}
    t.join()
    if failed:
        raise failed[0]
    return {**out, **bulk}


_CLIENTS: dict[str, Callable[[_Ctx], dict[str, object]]] = {
    "web": _web, "tls": _tls, "dns": _dns, "bulk": _bulk, "mixed": _mixed}
_SERVERS = {"web": ("http",), "tls": ("http",), "dns": ("dns",), "bulk": (), "mixed": ("http", "dns")}


@contextlib.contextmanager
def _servers(lab: Lab, scenario: str):
    """The servers ``scenario`` needs, in the server namespace; yields the nginx (or None)."""
    want = _SERVERS[scenario]
    with contextlib.ExitStack() as stack:
        nginx = None
        if "http" in want:
            nginx = stack.enter_context(Nginx(lab, port=HTTP_PORT, tls_port=TLS_PORT,
                                              server_names=(*TLS_NAMES, *WEB_HOSTS)))
        if "dns" in want:
            srv = lab.info.server
            stack.enter_context(Dns(lab, records={n: [srv.ipv4, srv.ipv6] for n in DNS_NAMES}))
        yield nginx


# -- capture ------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    try:
        return sysutil.which(name)
    except ToolMissingError:
        raise ToolMissingError(f"'{name}' not found: install it (apt-get install tshark) or run "
                               f"scripts/setup.sh") from None


def _mac(lab: Lab, role: str) -> str:
    """The MAC address of ``role``'s lab interface (read in its namespace's sysfs)."""
    host = lab.info.client if role == "client" else lab.info.server
    mac = lab.run(role, ["cat", f"/sys/class/net/{host.ifname}/address"]).stdout.strip()
    if not mac:
        raise HybridError(f"no MAC address on {lab.netns(role)} {host.ifname}")
    return mac


class _Capture:
    """One dumpcap per gateway link, ingress only (frames whose source is the link's peer)."""

    def __init__(self, lab: Lab, workdir: str):
        self.lab, self.workdir = lab, workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.files = {ifname: os.path.join(workdir, f"{ifname}.pcapng") for ifname in IFACES}
        self.errs = {ifname: os.path.join(workdir, f"{ifname}.dumpcap.log") for ifname in IFACES}
        self.captured: dict[str, int] = {}
        self.dropped: dict[str, int] = {}

    def start(self) -> None:
        dumpcap = _tool("dumpcap")
        peers = {"to-client": "client", "to-server": "server"}
        for ifname in IFACES:
            mac = _mac(self.lab, peers[ifname])
            with open(self.errs[ifname], "wb") as err:
                self.procs[ifname] = self.lab.popen("gw", [
                    dumpcap, "-q", "-i", ifname, "-f", f"ether src {mac}", "-B", str(DUMPCAP_BUFFER_MB),
                    "-w", self.files[ifname]], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 10
        for ifname, proc in self.procs.items():
            # dumpcap says "Capturing on 'IF'" once the interface is open and filtered
            while "Capturing on" not in self._log(ifname):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise HybridError(f"dumpcap on {ifname} did not start: {self._reason(ifname)}")
                time.sleep(0.05)
        self._ready()

    def _ready(self) -> None:
        """Ping each way until each link's file holds one of these pings: only then is the
        capture really running. A dumpcap that has said "Capturing on" can still miss the next
        packets (seen in CI under load: the client's first requests were not in the file)."""
        deadline = time.monotonic() + FLUSH_TIMEOUT
        pending = set(IFACES)
        while pending:
            self._ping(START_SENTINEL)
            until = time.monotonic() + 1.0
            while pending and time.monotonic() < until:
                pending -= {ifname for ifname in pending if self._holds(ifname, START_SENTINEL)}
                if pending:
                    time.sleep(0.1)
            if pending and time.monotonic() > deadline:
                raise HybridError(f"the capture on {', '.join(sorted(pending))} never saw its start ping "
                                  f"within {FLUSH_TIMEOUT:g} s")

    def _ping(self, pattern: str) -> None:
        i = self.lab.info
        for role, dst in (("client", i.server.ipv4), ("server", i.client.ipv4)):
            self.lab.run(role, ["ping", "-n", "-q", "-c", "1", "-W", "1", "-p", pattern, dst], check=False, timeout=10)

    def _holds(self, ifname: str, pattern: str) -> bool:
        """Whether the link's file holds an echo request padded with ``pattern``. dumpcap writes
        the file out at each of its updates (every 0.1 s with new packets); a file read mid-write
        ends short, which tshark reports and survives."""
        want = ":".join(pattern[k:k + 2] for k in range(0, len(pattern), 2))
        proc = subprocess.run([_tool("tshark"), "-n", "-r", self.files[ifname], "-Y",
                               f"icmp.type == 8 and data.data contains {want}", "-T", "fields",
                               "-e", "frame.number"], capture_output=True, text=True, timeout=60)
        return bool(proc.stdout.strip())

    def _log(self, ifname: str) -> str:
        with open(self.errs[ifname], errors="replace") as f:
            return f.read()

    def _reason(self, ifname: str) -> str:
        lines = [ln for ln in self._log(ifname).splitlines() if ln.strip() and not ln.startswith("Running as")]
        return lines[-1].strip() if lines else "no output"

    def flush(self) -> None:
        """Send the sentinels (a ping each way, padded with SENTINEL) and wait until each link's
        file holds its own: then everything sent before them is in the files too."""
        self._ping(SENTINEL)
        deadline = time.monotonic() + FLUSH_TIMEOUT
        pending = set(IFACES)
        while pending:
            pending -= {ifname for ifname in pending if self._holds(ifname, SENTINEL)}
            if pending and time.monotonic() > deadline:
                raise HybridError(f"the capture on {', '.join(sorted(pending))} did not receive its sentinel "
                                  f"ping within {FLUSH_TIMEOUT:g} s")
            if pending:
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM each dumpcap (it writes what it read and its statistics), reap it, and read
        how many frames it wrote and the capture lost."""
        for ifname, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log = self._log(ifname)
            for line in log.splitlines():
                # "Packets received/dropped on interface 'to-client': 17/0 (pcap:0/dumpcap:0/...)"
                if line.startswith("Packets received/dropped on interface"):
                    counts = line.split(":", 1)[1].split()[0]
                    received, dropped = (int(x) for x in counts.split("/"))
                    self.captured[ifname], self.dropped[ifname] = received, dropped
        self.procs.clear()

    def merge(self, out: str) -> None:
        """Both links' files into ``out``, frames in time order, each link's interface kept."""
        sysutil.run([_tool("mergecap"), "-F", "pcapng", "-w", out, *(self.files[i] for i in IFACES)],
                    what="mergecap")


# -- the recorder ---------------------------------------------------------------------------------
def _hybridctl(lab: Lab, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return sysutil.run([*hybridctl_argv(), *args], netns=lab.netns("gw"), timeout=timeout,
                       what=f"hybridctl {args[0]}")


def _status(lab: Lab) -> dict:
    return json.loads(_hybridctl(lab, "status", "--json", timeout=60).stdout)


def _wait_published(stats_file: str, after: float) -> None:
    """Wait until the engine's published counters count every packet it decided before
    ``after``: it publishes every STATS_INTERVAL when it decided something since, so either a
    publication after ``after`` shows up or, after two intervals without one, there was none to
    make."""
    deadline = time.monotonic() + 2 * STATS_INTERVAL + 0.5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if os.stat(stats_file).st_mtime > after:
                return
        time.sleep(0.05)


def record(lab: Lab, scenario: str, out: str | os.PathLike, rules: str | os.PathLike | None = None, *,
           attach_args: Sequence[str] = (), seconds: float = 2.0, bulk_rate: str = "100M") -> Recording:
    """Record ``scenario`` in ``lab`` (up, with nothing attached in its gateway) with hybrid
    attached (``attach_args``: more ``hybridctl attach`` options) and an engine running
    ``rules`` (None: :data:`LAB_RULES`). ``out`` is made if missing. Leaves the lab as it found
    it: hybrid detached, servers, captures and engine stopped, also on failure."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"scenario {scenario!r}: use one of {', '.join(SCENARIOS)}")
    sysutil.require_root("recording lab traffic")
    for tool in ("dumpcap", "mergecap", "tshark"):
        _tool(tool)
    out = os.path.abspath(os.fspath(out))
    os.makedirs(out, exist_ok=True)
    rules_copy = os.path.join(out, "rules.toml")
    if rules is None:
        with open(rules_copy, "w") as f:
            f.write(LAB_RULES)
    elif os.path.abspath(os.fspath(rules)) != rules_copy:
        shutil.copyfile(rules, rules_copy)
    load_rules(rules_copy)          # a broken rules file: one line, before anything is attached
    rec = Recording(scenario=scenario, lab_kind=lab.kind, out=out, capture=os.path.join(out, "capture.pcapng"),
                    rules=rules_copy, verdict_log=os.path.join(out, "verdicts.jsonl"),
                    attach_args=list(attach_args))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(rec.verdict_log)
    gw = lab.netns("gw")
    with tempfile.TemporaryDirectory(prefix="hybrid-record-") as work, contextlib.ExitStack() as stack:
        _hybridctl(lab, "attach", *IFACES, *attach_args)
        stack.callback(lambda: sysutil.run([*hybridctl_argv(), "detach", "--all"], netns=gw, check=False,
                                           timeout=120, what="hybridctl detach"))
        stats_file = stack.enter_context(engine_process(lab, rules_copy, log=rec.verdict_log))
        nginx = stack.enter_context(_servers(lab, scenario))
        cap = _Capture(lab, work)
        stack.callback(cap.stop)
        rec.status_before = _status(lab)
        cap.start()
        rec.outcomes = _CLIENTS[scenario](_Ctx(lab, nginx, seconds, bulk_rate))
        cap.flush()
        cap.stop()
        stopped = time.time()
        rec.captured, rec.capture_dropped = dict(cap.captured), dict(cap.dropped)
        cap.merge(rec.capture)
        _wait_published(stats_file, stopped)
        rec.status = _status(lab)
    rec.verdicts = _read_jsonl(rec.verdict_log)
    _write(rec)
    return rec


def _read_jsonl(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(ln) for ln in f if ln.strip()]
    except FileNotFoundError:
        return []


def _write(rec: Recording) -> None:
    for name, doc in (("status-before.json", rec.status_before), ("status.json", rec.status)):
        with open(os.path.join(rec.out, name), "w") as f:
            json.dump(doc, f, indent=1)
    summary = {k: v for k, v in asdict(rec).items() if k not in ("verdicts", "status", "status_before")}
    summary["kernel_counters"] = rec.kernel_counters()
    summary["queued_packets"] = rec.queued_packets()
    with open(os.path.join(rec.out, "record.json"), "w") as f:
        json.dump(summary, f, indent=1)


# -- command line ---------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid.lab.record",
                                description="Record a lab scenario while hybrid is attached: the capture (both "
                                            "gateway links, ingress), the verdict log and the status counters.")
    p.add_argument("--scenario", required=True, choices=SCENARIOS)
    p.add_argument("--rules", default=None, help="the engine's rules file (default: block names under blocked.test)")
    p.add_argument("--out", required=True, help="directory for capture.pcapng, verdicts.jsonl, status.json, ...")
    p.add_argument("--lab", default="hrec", help="lab name; an existing lab is used and left up (default: hrec)")
    p.add_argument("--kind", default="router", choices=KINDS, help="kind of a lab made for the recording")
    p.add_argument("--seconds", type=float, default=2.0, help="bulk transfer time (bulk, mixed)")
    p.add_argument("--bulk-rate", default="100M", help="iperf3 -b rate of the bulk transfer (default 100M)")
    p.add_argument("--attach-opt", action="append", default=[], metavar="OPT",
                   help="an option for hybridctl attach, repeatable (e.g. --attach-opt=--name-cache)")
    a = p.parse_args(argv)
    try:
        if a.rules is not None:
            load_rules(a.rules)     # a broken rules file: one line, before any lab is made
        lab = Lab(a.lab, a.kind)
        with contextlib.ExitStack() as stack:
            if set(lab.namespaces) <= existing_netns():
                lab = Lab(a.lab, _recorded_kind(a.lab))       # up already: used as it is, left up
            else:
                stack.enter_context(lab)
            rec = record(lab, a.scenario, a.out, a.rules, attach_args=a.attach_opt, seconds=a.seconds,
                         bulk_rate=a.bulk_rate)
    except (HybridError, OSError) as exc:
        print(f"record: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"{rec.capture}: {sum(rec.captured.values())} frames "
          f"({', '.join(f'{k} {v}' for k, v in rec.captured.items())}), "
          f"{sum(rec.capture_dropped.values())} lost by the capture")
    print(f"{rec.verdict_log}: {len(rec.verdicts)} verdicts; {rec.queued_packets()} packets queued to the engine")
    for k, v in rec.outcomes.items():
        print(f"  {k}: {v}")
    return 0


def _recorded_kind(name: str) -> str:
    """The kind of a lab that is up, from its record (router when unknown)."""
    try:
        with open(inst.lab_record_path(name)) as f:
            return json.load(f).get("kind", "router")
    except (OSError, ValueError):
        return "router"


if __name__ == "__main__":
    raise SystemExit(main())
