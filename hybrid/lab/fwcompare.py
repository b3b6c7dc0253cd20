"""hybrid's CrowdSec bouncer against CrowdSec's own firewall bouncer, side by side in one run,
while a banned prefix floods the gateway (issue 15, "how it is measured").

    python -m hybrid.lab.fwcompare [--quick] [--json FILE]

One lab (client -- gateway -- server, hybrid/lab/topology.py) and one real CrowdSec Local API on
the lab server's address (hybrid/lab/crowdsec.py) that bans BANNED (198.18.1.128/25, a Range
decision). A legitimate TCP stream (iperf3, from the client's own address to the server) runs
while hybrid.lab.flood sends small UDP datagrams from spoofed sources in BANNED, from the
client's namespace, on one CPU, through the gateway towards the server. Modes:

- ``baseline``: nothing in place, no flood;
- ``flood``: the flood, nothing to stop it (what it costs);
- ``hybrid``: ``hybridctl run`` with a [crowdsec] table (its own bouncer key): the ban is pulled
  into the kernel's ban trie and the flood dropped at XDP (``--xdp-mode``, generic by default:
  native XDP on a veth strips the peer's GSO, see docs/design.md);
- ``hybrid-tc``: the same without XDP, as ``--xdp-mode auto`` runs on a veth: dropped by the tc
  program (on a veth the skb exists before either hook runs, so tc is as early as generic XDP);
- ``crowdsec-fw``: Debian's crowdsec-firewall-bouncer (0.0.25), in the gateway namespace with
  its own configuration in a temp dir, in the one mode that drops forwarded traffic there:
  ``iptables`` with ``iptables_chains: [FORWARD]`` (an ipset of type hash:net, which needs the
  ``ipset`` tool); optional modes ``crowdsec-nft`` (its default nftables mode) and
  ``hybrid-native`` (native XDP).

Before the samples, one check of the firewall bouncer's default (nftables) mode is recorded in
``findings``: the hooks of its chains, what its set holds for the Range decision, and what of a
short rate-limited flood reached the server (Debian's 0.0.25 hooks ``input`` only, so forwarded
traffic passes, and its set has no interval flag, so a /25 becomes its first address).

Every mode's flood sample is paired with a baseline sample measured right before it (as in
hybrid/lab/bench.py: the machine's drift cancels within a pair), modes take turns going first
from one repetition to the next, and each protected mode also gets a sample without the flood
in the same setup (``quiet``: what the protection itself costs). Where the flood died, in
packets: hybrid's kernel counters (``xdp_drop_ban``, ``drop_tc_ban``), the firewall bouncer's
own rule counter, and nft counters of this harness: in the gateway, packets of BANNED that
reached netfilter at all (prerouting, priority -300) and that conntrack saw as new (prerouting,
-150, after conntrack); in the server, packets of BANNED that arrived. The gateway tracks
connections in every mode (that counting rule turns conntrack on in its namespace, as NAT or a
stateful firewall does, and as hybrid's own queue rule does anyway; ``--no-conntrack``: not
in the modes that do not turn it on themselves). The table's size (``conntrack -C``, recorded as
``conntrack_entries``) does not show what a FORWARD drop cost: conntrack makes an entry for each
new packet in prerouting but confirms it only at the last hook, so a packet dropped in FORWARD
leaves nothing behind; the ct-new counter shows that each one was tracked all the same.

CPU: the robust figure is ``us_per_packet``, the CPU time of the flood's sender (pinned to
FLOOD_CPU) and of that CPU's ksoftirqd per flood packet: on veth, the gateway's receive (and for
a forwarded packet the server's) runs in the sender's softirqs, so this is what one flood packet
costs the machine from its send to its death, and it is CPU time, not wall time, so other work
on the machine barely moves it (the flood's packets/s and the stream's Gbit/s move a lot on a
shared 2-core machine). Also the softirq share of the whole machine and of FLOOD_CPU during each
stream (/proc/stat is not per namespace). ``--flood-rate`` gives every mode the same flood; the
sender's pacing loop then spends CPU of its own (measured: about 15-17 us per packet at 20,000/s
in every mode, against 3-10 us unpaced), so compare us/pkt across the modes of one run only.
Nothing here asserts a time or a rate: this is measurement, reported.

Clean: every process (LAPI, bouncers, flood, iperf3), the lab's namespaces (and with them every
rule, set, program and qdisc in them), hybrid's pins and run files, and the temp dir are
removed, also when something fails; the firewall bouncer dies on SIGTERM without removing its
rules and sets (verified), so the harness removes them and records what it found.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from hybrid import instance as inst
from hybrid import resources
from hybrid.datapath.maps import Maps
from hybrid.engine.runner import hybridctl_argv
from hybrid.errors import ConfigError, HybridError
from hybrid.kernel import bpffs, sysutil
from hybrid.lab import crowdsec
from hybrid.lab.demo import iperf3
from hybrid.lab.flood import flooding
from hybrid.lab.topology import Lab

BANNED = "198.18.1.128/25"      # spoofed flood sources, beside the client on its link; banned in the LAPI
FLOOD_PORT = 9                  # UDP discard: nothing listens on the server
FLOOD_CPU = 0                   # the flood sender's CPU (its veth transmit and the gateway's receive too)
COUNT_TABLE = "hybrid_fwcompare"  # this harness's nft table (family ip) in the gateway and the server
RULES = resources.shipped("scripts", "bench-rules.toml")  # hybridctl run's engine rules, as hybridctl bench's
FW_BOUNCER = "crowdsec-firewall-bouncer"
FW_SETS = {"ipv4": "crowdsec-blacklists", "ipv6": "crowdsec6-blacklists"}
FW_NFT_TABLES = (("ip", "crowdsec", "crowdsec-chain"), ("ip6", "crowdsec6", "crowdsec6-chain"))
START_TIMEOUT = 180.0           # hybridctl run compiles its programs (bcc) before it pulls
SETTLE = 0.3                    # seconds the flood runs before the stream starts
DRAIN = 0.2                     # seconds after the flood stops before the counters are read

MODES: dict[str, str] = {
    "baseline": "nothing in place, no flood",
    "flood": "the flood, no bouncer",
    "hybrid": "hybridctl run, [crowdsec] bouncer: the ban in the kernel's trie, dropped at XDP",
    "crowdsec-fw": "crowdsec-firewall-bouncer, iptables mode, ipset matched in FORWARD",
    "crowdsec-nft": "crowdsec-firewall-bouncer in its default nftables mode (its chain hooks input)",
    "hybrid-tc": "as hybrid, without XDP: dropped by the tc program",
    "hybrid-native": "as hybrid, native XDP on the gateway's veths",
}
DEFAULT_MODES = ("baseline", "flood", "hybrid", "hybrid-tc", "crowdsec-fw")
XDP_MODES = ("generic", "native")
STAGES = ("xdp", "tc", "netfilter", "conntrack_new", "rule", "server", "unaccounted")


# -- small readers ------------------------------------------------------------------------------------
def missing(modes: Sequence[str] = DEFAULT_MODES) -> str | None:
    """Why the comparison cannot run here (one line), or None."""
    tools = ["iperf3", "nft", "iptables", "conntrack", "taskset"]
    if any(m.startswith("crowdsec") for m in modes):
        tools.append(FW_BOUNCER)
    if "crowdsec-fw" in modes:
        tools.append("ipset")
    why = crowdsec.missing()
    if why:
        return why
    for tool in tools:
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pkg = {"nft": "nftables", "taskset": "util-linux", FW_BOUNCER: FW_BOUNCER}.get(tool, tool)
            return f"'{tool}' not found: apt-get install {pkg}"
    if not os.path.exists(RULES):
        return f"the benchmark's rules file {RULES} is missing: run from a checkout of hybrid"
    return None


def _cpu_ticks() -> dict[str, tuple[int, int]]:
    """(softirq, total) clock ticks so far, of the whole machine ("cpu") and of each CPU
    ("cpu0", ...), from /proc/stat. Tick-sampled (this kernel has no IRQ time accounting):
    a fraction of a sample's seconds, not a precise time."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            fields = line.split()
            vals = [int(v) for v in fields[1:9]]      # user nice system idle iowait irq softirq steal
            out[fields[0]] = (vals[6], sum(vals))
    return out


def _task_cpu(pid: int | None) -> float | None:
    """Seconds of CPU a task has used so far (user + system, /proc/PID/stat; tick-sampled), or
    None when it is gone. Softirq work a task runs on its way out of the kernel is counted in
    its system time; what ksoftirqd runs is ksoftirqd's."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ksoftirqd(cpu: int) -> int | None:
    """The pid of ``cpu``'s ksoftirqd thread (it runs that CPU's softirqs when they pile up)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == f"ksoftirqd/{cpu}":
                    return int(pid)
    return None


def _backlog_drops() -> int:
    """Packets the machine's per-CPU input backlogs dropped so far (/proc/net/softnet_stat)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


def _package_version(pkg: str) -> str | None:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def _median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def _spread(values: Sequence[float]) -> list[float] | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return [min(vals), max(vals)] if vals else None


def _wait(cond: Callable[[], object], what: str, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HybridError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)


def _stop(proc: subprocess.Popen, grace: float) -> int | None:
    """SIGTERM, then SIGKILL to its process group after ``grace`` seconds; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _tail(path: str) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return sysutil.last_line(f.read()) or "no output"
    return "no output"


# -- the harness's counters ---------------------------------------------------------------------------
def _count_tables(lab: Lab, conntrack: bool) -> None:
    """nft counters of BANNED's packets: in the gateway where they reach netfilter and where
    conntrack has seen them (new), in the server where they arrive."""
    ct = (f"  counter ct_new {{ }}\n  chain after_conntrack {{ type filter hook prerouting priority -150; policy accept;\n"
          f"    ip saddr {BANNED} ct state new counter name \"ct_new\"\n  }}\n") if conntrack else ""
    gw = (f"table ip {COUNT_TABLE} {{\n  counter seen {{ }}\n"
          f"  chain before_conntrack {{ type filter hook prerouting priority -300; policy accept;\n"
          f"    ip saddr {BANNED} counter name \"seen\"\n  }}\n{ct}}}\n")
    server = (f"table ip {COUNT_TABLE} {{\n  counter arrived {{ }}\n"
              f"  chain before_conntrack {{ type filter hook prerouting priority -300; policy accept;\n"
              f"    ip saddr {BANNED} counter name \"arrived\"\n  }}\n}}\n")
    lab.run("gw", ["nft", "-f", "-"], input=gw, what="adding the gateway's counters")
    lab.run("server", ["nft", "-f", "-"], input=server, what="adding the server's counter")


def _nft_counters(lab: Lab, role: str) -> dict[str, int]:
    out = lab.run(role, ["nft", "-j", "list", "table", "ip", COUNT_TABLE], what=f"reading {role}'s counters").stdout
    return {o["counter"]["name"]: int(o["counter"]["packets"]) for o in json.loads(out)["nftables"] if "counter" in o}


def _conntrack_entries(lab: Lab) -> int | None:
    proc = lab.run("gw", ["cat", "/proc/sys/net/netfilter/nf_conntrack_count"], check=False)
    return int(proc.stdout) if proc.returncode == 0 and proc.stdout.strip().isdigit() else None


def _nft_tables(lab: Lab) -> set[tuple[str, str]]:
    out = lab.run("gw", ["nft", "-j", "list", "tables"], what="listing the gateway's nft tables").stdout
    return {(o["table"]["family"], o["table"]["name"]) for o in json.loads(out)["nftables"] if "table" in o}


# -- modes -------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """What a mode in place tells the samples: its drop counters, by stage (packets so far)."""
    read: Callable[[], dict[str, int]] = dict


@dataclass
class Context:
    lab: Lab
    lapi: crowdsec.Lapi
    tmp: str
    xdp_mode: str
    keys: dict[str, str] = field(default_factory=dict)
    findings: dict = field(default_factory=dict)

    def key(self, who: str) -> str:
        """A bouncer key for ``who`` (one per bouncer, registered once per run)."""
        if who not in self.keys:
            self.keys[who] = self.lapi.add_bouncer(f"fwcompare-{who}")
        return self.keys[who]



def _secret_file(path: str, text: str) -> str:
    """A file only root reads (it holds a bouncer key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@contextlib.contextmanager
def nothing(ctx: Context) -> Iterator[Probe]:
    yield Probe()


@contextlib.contextmanager
def hybrid_bouncer(ctx: Context, xdp_mode: str) -> Iterator[Probe]:
    """``hybridctl run`` in the gateway with a [crowdsec] table; in place once BANNED is in the
    kernel's ban trie. Stopped, detached and its run files removed afterwards, also on failure."""
    gw = ctx.lab.netns("gw")
    key_file = _secret_file(os.path.join(ctx.tmp, "hybrid.key"), ctx.key("hybrid") + "\n")
    conf = os.path.join(ctx.tmp, "hybrid.toml")
    with open(conf, "w") as f:
        f.write("\n".join([
            "[attach]", 'interfaces = ["to-client", "to-server"]', f"xdp_mode = {json.dumps(xdp_mode)}",
            "[engine]", f"rules = {json.dumps(os.path.abspath(RULES))}",
            "[service]", "standby_engines = false",
            "[crowdsec]", f"lapi_url = {json.dumps(ctx.lapi.url)}", f"bouncer_key_file = {json.dumps(key_file)}",
            "poll_interval = 0.5", ""]))
    log_path, err_path = os.path.join(ctx.tmp, "hybrid-run.jsonl"), os.path.join(ctx.tmp, "hybrid-run.stderr")
    with open(log_path, "w") as out, open(err_path, "w") as err:
        proc = ctx.lab.popen("gw", [*hybridctl_argv(), "run", "--config", conf], stdout=out, stderr=err,
                             start_new_session=True)
    pin_dir = os.path.join(bpffs.locate() or "/nonexistent", gw)
    try:
        def banned() -> bool:
            if proc.poll() is not None:
                raise HybridError(f"hybridctl run exited ({proc.returncode}): {_tail(err_path)}")
            try:
                with Maps.open_pinned(pin_dir) as maps:
                    return any(c == BANNED for c in maps.bans())
            except HybridError:
                return False                        # not attached yet
        _wait(banned, f"hybridctl run to put {BANNED} in the kernel", START_TIMEOUT)
        with Maps.open_pinned(pin_dir) as maps:
            def read() -> dict[str, int]:
                out = {"xdp": 0, "tc": 0}
                for ifindex, c in maps.stats().items():
                    if ifindex:
                        out["xdp"] += c.get("xdp_drop_ban", 0)
                        out["tc"] += c.get("drop_tc_ban", 0)
                return out
            yield Probe(read)
    finally:
        _stop(proc, 60)
        sysutil.run([*hybridctl_argv(), "detach", "--all"], netns=gw, check=False, timeout=120)
        for path in (inst.lock_path(gw), inst.spares_path(gw), inst.crowdsec_path(gw)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _fw_config(ctx: Context, backend: str, d: str) -> str:
    """The firewall bouncer's configuration (Debian's file, with the lab's LAPI, its own key,
    and everything it writes in ``d``)."""
    q = json.dumps
    return f"""\
mode: {backend}
pid_dir: {q(d + '/')}
update_frequency: 1s
daemonize: false
log_mode: file
log_dir: {q(d + '/')}
log_level: info
api_url: {q(ctx.lapi.url + '/')}
api_key: {q(ctx.key('crowdsec-fw'))}
insecure_skip_verify: false
disable_ipv6: false
deny_action: DROP
deny_log: false
supported_decisions_types:
  - ban
blacklists_ipv4: {FW_SETS['ipv4']}
blacklists_ipv6: {FW_SETS['ipv6']}
ipset_type: nethash
iptables_chains:
  - FORWARD
nftables:
  ipv4:
    enabled: true
    set-only: false
    table: {FW_NFT_TABLES[0][1]}
    chain: {FW_NFT_TABLES[0][2]}
  ipv6:
    enabled: true
    set-only: false
    table: {FW_NFT_TABLES[1][1]}
    chain: {FW_NFT_TABLES[1][2]}
prometheus:
  enabled: false
  listen_addr: 127.0.0.1
  listen_port: 60601
"""


def _ipset_members(lab: Lab, name: str) -> list[str] | None:
    proc = lab.run("gw", ["ipset", "list", name], check=False)
    if proc.returncode != 0:
        return None
    lines = proc.stdout.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Members:")), len(lines))
    return [ln.split()[0] for ln in lines[start + 1:] if ln.strip()]


def _nft_table(lab: Lab, family: str, table: str) -> list[dict] | None:
    proc = lab.run("gw", ["nft", "-j", "list", "table", family, table], check=False)
    return json.loads(proc.stdout)["nftables"] if proc.returncode == 0 else None


def _nft_view(objs: list[dict]) -> dict:
    """Hooks of a table's chains, its sets' flags and elements, its rules' counter packets."""
    view: dict = {"hooks": [], "sets": {}, "packets": 0}
    for o in objs:
        if "chain" in o and "hook" in o["chain"]:
            view["hooks"].append(o["chain"]["hook"])
        elif "set" in o:
            s = o["set"]
            elems = []
            for e in s.get("elem", []):
                v = e.get("elem", {}).get("val", e) if isinstance(e, dict) else e
                elems.append(f"{v['prefix']['addr']}/{v['prefix']['len']}" if isinstance(v, dict) and "prefix" in v
                             else str(v))
            view["sets"][s["name"]] = {"type": s.get("type"), "flags": s.get("flags", []), "elements": elems}
        elif "rule" in o:
            view["packets"] += sum(x["counter"]["packets"] for x in o["rule"].get("expr", [])
                                   if isinstance(x.get("counter"), dict))
    return view


def _fw_rule_packets(lab: Lab, backend: str) -> int:
    """Packets the firewall bouncer's IPv4 rule matched (and dropped) so far."""
    if backend == "nftables":
        objs = _nft_table(lab, "ip", FW_NFT_TABLES[0][1])
        if objs is None:
            raise HybridError("the firewall bouncer's nft table vanished from the gateway")
        return _nft_view(objs)["packets"]
    out = lab.run("gw", ["iptables", "-w", "-L", "FORWARD", "-v", "-x", "-n"], what="reading FORWARD").stdout
    for line in out.splitlines():
        if f"match-set {FW_SETS['ipv4']} src" in line:
            return int(line.split()[0])
    raise HybridError("the firewall bouncer's FORWARD rule vanished from the gateway")


def _fw_cleanup(lab: Lab) -> list[str]:
    """Remove whatever of the firewall bouncer's rules and sets is in the gateway; what was."""
    found = []
    for cmd, fam in (("iptables", "ipv4"), ("ip6tables", "ipv6")):
        rule = ["FORWARD", "-m", "set", "--match-set", FW_SETS[fam], "src", "-j", "DROP"]
        while lab.run("gw", [cmd, "-w", "-D", *rule], check=False).returncode == 0:
            found.append(f"{cmd} rule in FORWARD")
    if shutil.which("ipset") or shutil.which("ipset", path="/usr/sbin:/sbin"):
        for name in FW_SETS.values():
            if lab.run("gw", ["ipset", "destroy", name], check=False).returncode == 0:
                found.append(f"ipset {name}")
    for family, table, _ in FW_NFT_TABLES:
        if lab.run("gw", ["nft", "delete", "table", family, table], check=False).returncode == 0:
            found.append(f"nft table {family} {table}")
    return found


@contextlib.contextmanager
def firewall_bouncer(ctx: Context, backend: str) -> Iterator[Probe]:
    """crowdsec-firewall-bouncer in the gateway (``backend``: iptables or nftables), in place once
    its IPv4 set holds something; stopped and its rules and sets removed afterwards (it leaves
    them behind on SIGTERM: recorded in findings), also on failure."""
    d = tempfile.mkdtemp(prefix=f"fw-{backend}-", dir=ctx.tmp)
    conf = os.path.join(d, "crowdsec-firewall-bouncer.yaml")
    _secret_file(conf, _fw_config(ctx, backend, d))
    out_path = os.path.join(d, "stdout")
    with open(out_path, "w") as out:
        proc = ctx.lab.popen("gw", [sysutil.which(FW_BOUNCER), "-c", conf], stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        def holds() -> bool:
            if proc.poll() is not None:
                log = os.path.join(d, "crowdsec-firewall-bouncer.log")
                raise HybridError(f"{FW_BOUNCER} exited ({proc.returncode}): {_tail(log)} {_tail(out_path)}")
            if backend == "nftables":
                objs = _nft_table(ctx.lab, "ip", FW_NFT_TABLES[0][1])
                return bool(objs) and any(s["elements"] for s in _nft_view(objs)["sets"].values())
            return bool(_ipset_members(ctx.lab, FW_SETS["ipv4"]))
        _wait(holds, f"{FW_BOUNCER} ({backend}) to load the ban", 60)
        if backend == "iptables" and "crowdsec_iptables" not in ctx.findings:
            ctx.findings["crowdsec_iptables"] = {
                "chains": ["FORWARD"], "ipset": FW_SETS["ipv4"],
                "ipset_members": _ipset_members(ctx.lab, FW_SETS["ipv4"]), "decision": BANNED}
        yield Probe(lambda: {"rule": _fw_rule_packets(ctx.lab, backend)})
    finally:
        rc = _stop(proc, 10)
        left = _fw_cleanup(ctx.lab)
        ctx.findings.setdefault("crowdsec_fw_stop", []).append(
            {"backend": backend, "exit": rc, "left_behind": left})


def mode_setup(name: str) -> Callable[[Context], contextlib.AbstractContextManager]:
    return {
        "baseline": nothing,
        "flood": nothing,
        "hybrid": lambda ctx: hybrid_bouncer(ctx, ctx.xdp_mode),
        "hybrid-tc": lambda ctx: hybrid_bouncer(ctx, "off"),
        "hybrid-native": lambda ctx: hybrid_bouncer(ctx, "native"),
        "crowdsec-fw": lambda ctx: firewall_bouncer(ctx, "iptables"),
        "crowdsec-nft": lambda ctx: firewall_bouncer(ctx, "nftables"),
    }[name]


# -- samples -----------------------------------------------------------------------------------------
def _stream(lab: Lab, seconds: float) -> dict:
    """One legitimate stream (iperf3, one TCP connection, client -> server): Gbit/s received,
    and the share of CPU time spent in softirq meanwhile, of the whole machine and of the
    flood's CPU (on veth the gateway's receive work runs on the sending CPU)."""
    t0 = _cpu_ticks()
    res = iperf3(lab, int(seconds) if float(seconds).is_integer() else seconds)
    t1 = _cpu_ticks()

    def share(cpu: str) -> float | None:
        if cpu not in t0 or cpu not in t1 or t1[cpu][1] <= t0[cpu][1]:
            return None
        return (t1[cpu][0] - t0[cpu][0]) / (t1[cpu][1] - t0[cpu][1])
    return {"gbps": res["end"]["sum_received"]["bits_per_second"] / 1e9,
            "softirq_s": (t1["cpu"][0] - t0["cpu"][0]) / os.sysconf("SC_CLK_TCK"),
            "softirq_share": share("cpu"), "softirq_share_flood_cpu": share(f"cpu{FLOOD_CPU}")}


def _counters(lab: Lab, probe: Probe) -> dict[str, int]:
    gw, server = _nft_counters(lab, "gw"), _nft_counters(lab, "server")
    out = {"netfilter": gw["seen"], "server": server["arrived"]}
    if "ct_new" in gw:
        out["conntrack_new"] = gw["ct_new"]
    out.update(probe.read())
    return out


def _flood_sample(lab: Lab, seconds: float, probe: Probe, rate: float = 0) -> dict:
    """The stream while BANNED floods (``rate`` packets/s, 0: as fast as one CPU sends); the
    flood's fate in packets, stage by stage."""
    before, entries0, backlog0 = _counters(lab, probe), _conntrack_entries(lab), _backlog_drops()
    ksoftirqd = _ksoftirqd(FLOOD_CPU)
    with flooding(lab, BANNED, kind="udp", port=FLOOD_PORT, rate=rate, cpu=FLOOD_CPU) as f:
        # from here to the stop, what the flood sends costs its CPU: the sender's own time (the
        # gateway's and the server's receive run in its softirqs) and ksoftirqd's when they pile up
        cpu0 = _task_cpu(f.proc.pid), _task_cpu(ksoftirqd)
        time.sleep(SETTLE)
        stream = _stream(lab, seconds)
        entries_during = _conntrack_entries(lab)
        cpu1 = _task_cpu(f.proc.pid), _task_cpu(ksoftirqd)
    time.sleep(DRAIN)
    after, backlog1 = _counters(lab, probe), _backlog_drops()
    if f.result is None or not f.result.seconds:
        raise HybridError("the flood sender did not report what it sent")
    packets = {k: after[k] - before[k] for k in after}
    dropped = sum(packets.get(k, 0) for k in ("xdp", "tc", "rule"))
    packets["unaccounted"] = max(0, f.result.sent - dropped - packets["server"])
    sender, soft = (None if a is None or b is None else b - a for a, b in zip(cpu0, cpu1))
    cost = (sender + soft) / f.result.sent * 1e6 if sender is not None and soft is not None and f.result.sent else None
    return {**stream, "flood": {"sent": f.result.sent, "seconds": f.result.seconds, "pps": f.result.pps,
                                "errors": f.result.errors},
            "flood_cpu": {"sender_s": sender, "ksoftirqd_s": soft, "us_per_packet": cost},
            "packets": packets,
            "pps": {k: v / f.result.seconds for k, v in packets.items()},
            "conntrack_entries": {"before": entries0, "during": entries_during},
            "backlog_drops": backlog1 - backlog0}


def _forget_spoofed(lab: Lab) -> None:
    """Forget the spoofed sources' conntrack entries, so that every sample starts alike."""
    lab.run("gw", ["conntrack", "-F"], check=False)


def _nft_check(ctx: Context, progress: Callable[[str], None]) -> dict:
    """The firewall bouncer's default (nftables) mode: its hooks, its set for the Range
    decision, and what of a short flood (20,000 packets/s for 1 s) it dropped and let through."""
    with firewall_bouncer(ctx, "nftables") as probe:
        objs = [o for fam, table, _ in FW_NFT_TABLES for o in (_nft_table(ctx.lab, fam, table) or [])]
        view = _nft_view(objs)
        before = _counters(ctx.lab, probe)
        with flooding(ctx.lab, BANNED, kind="udp", port=FLOOD_PORT, rate=20000, seconds=1.0) as f:
            f.proc.wait(timeout=60)
        time.sleep(DRAIN)
        after = _counters(ctx.lab, probe)
    _forget_spoofed(ctx.lab)
    sent = f.result.sent if f.result else 0
    found = {"backend": "nftables", "decision": BANNED, "hooks": sorted(set(view["hooks"])),
             "set": view["sets"].get(FW_SETS["ipv4"]), "flood_sent": sent,
             "rule_packets": after["rule"] - before["rule"], "reached_server": after["server"] - before["server"]}
    found["drops_forwarded"] = found["rule_packets"] > 0
    progress(f"crowdsec-firewall-bouncer nftables mode: hooks {', '.join(found['hooks']) or 'none'}; "
             f"set {found['set']['elements'] if found['set'] else None} for {BANNED}; "
             f"{found['reached_server']:,} of {sent:,} flood packets reached the server")
    return found


# -- the run -----------------------------------------------------------------------------------------
def run(modes: Sequence[str] = DEFAULT_MODES, repetitions: int = 5, seconds: float = 4.0, *,
        lab_name: str = "hfwcmp", xdp_mode: str = "generic", conntrack: bool = True, nft_check: bool = True,
        flood_rate: float = 0,
        tmp_parent: str | None = None, progress: Callable[[str], None] = lambda _m: None,
        command: str = "") -> dict:
    """Measure every mode ``repetitions`` times (see the module docstring); the report as a
    JSON-ready dict."""
    sysutil.require_root("fwcompare")
    modes = list(dict.fromkeys(["baseline", *modes]))
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"mode {m!r}: use any of {', '.join(MODES)}")
    if xdp_mode not in XDP_MODES:
        raise ConfigError(f"xdp mode {xdp_mode!r}: use {' or '.join(XDP_MODES)}")
    if repetitions < 1 or seconds < 1:
        raise ConfigError("use at least 1 repetition of at least 1 second")
    if flood_rate < 0:
        raise ConfigError(f"flood rate {flood_rate:g}: use packets/s, or 0 for as fast as one CPU sends")
    why = missing(modes + (["crowdsec-nft"] if nft_check else []))
    if why:
        raise ConfigError(why)
    others = [m for m in modes if m != "baseline"]
    samples: dict[str, list[dict]] = {m: [] for m in modes}
    total = repetitions * max(1, len(others))
    done = 0
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="hybrid-fwcompare-", dir=tmp_parent))
        lab = stack.enter_context(Lab(lab_name))
        progress(f"lab {lab_name} up; starting a CrowdSec Local API on {lab.info.server.ipv4}")
        lapi = stack.enter_context(crowdsec.Lapi(netns=lab.netns("server"), host=lab.info.server.ipv4,
                                                 parent=tmp))
        lapi.add_decision(BANNED, duration="4h", reason="hybrid fwcompare flood")
        ctx = Context(lab, lapi, tmp, xdp_mode)
        _count_tables(lab, conntrack)
        if nft_check:
            ctx.findings["crowdsec_nftables"] = _nft_check(ctx, progress)
        for rep in range(repetitions):
            order = others if rep % 2 == 0 else list(reversed(others))
            for m in order or ["baseline"]:
                base = _stream(lab, seconds)
                samples["baseline"].append({"rep": rep, **base})
                if m == "baseline":
                    done += 1
                    progress(f"[{done}/{total}] rep {rep + 1} baseline {base['gbps']:6.2f} Gbit/s")
                    continue
                tables = _nft_tables(lab)
                with mode_setup(m)(ctx) as probe:
                    quiet = _stream(lab, seconds) if m != "flood" else None
                    s = _flood_sample(lab, seconds, probe, flood_rate)
                for family, table in _nft_tables(lab) - tables:     # e.g. iptables-nft's empty filter table
                    lab.run("gw", ["nft", "delete", "table", family, table], check=False)
                _forget_spoofed(lab)
                s.update(rep=rep, baseline_gbps=base["gbps"], baseline_softirq_share=base["softirq_share"],
                         ratio=s["gbps"] / base["gbps"] if base["gbps"] else float("nan"))
                if quiet is not None:
                    s.update(quiet_gbps=quiet["gbps"], quiet_softirq_share=quiet["softirq_share"],
                             quiet_ratio=quiet["gbps"] / base["gbps"] if base["gbps"] else float("nan"))
                samples[m].append(s)
                done += 1
                where = ", ".join(f"{k} {v / 1e3:,.0f}k" for k, v in s["pps"].items() if v)
                progress(f"[{done}/{total}] rep {rep + 1} {m:<13} {s['gbps']:6.2f} Gbit/s under "
                         f"{s['flood']['pps'] / 1e3:,.0f}k pps flood ({s['ratio']:.2f} of {base['gbps']:.2f}); "
                         f"flood/s: {where or 'nothing counted'}")
    return _report(command, modes, repetitions, seconds, samples, ctx.findings,
                   xdp_mode=xdp_mode, conntrack=conntrack, flood_rate=flood_rate)


def _report(command, modes, repetitions, seconds, samples, findings, **options) -> dict:
    summary = {}
    for m in modes:
        ss = samples[m]
        if m == "baseline":
            summary[m] = {"description": MODES[m], "samples": len(ss), "gbps_median": _median([s["gbps"] for s in ss]),
                          "softirq_share_median": _median([s["softirq_share"] for s in ss]),
                          "softirq_share_flood_cpu_median": _median([s["softirq_share_flood_cpu"] for s in ss])}
            continue
        summary[m] = {
            "description": MODES[m], "samples": len(ss),
            "gbps_median": _median([s["gbps"] for s in ss]),
            "ratio_median": _median([s["ratio"] for s in ss]), "ratio_spread": _spread([s["ratio"] for s in ss]),
            "quiet_ratio_median": _median([s.get("quiet_ratio") for s in ss]),
            "quiet_ratio_spread": _spread([s.get("quiet_ratio") for s in ss]),
            "flood_sent_pps_median": _median([s["flood"]["pps"] for s in ss]),
            "us_per_flood_packet_median": _median([s["flood_cpu"]["us_per_packet"] for s in ss]),
            "us_per_flood_packet_spread": _spread([s["flood_cpu"]["us_per_packet"] for s in ss]),
            "died_pps_median": {k: _median([s["pps"].get(k, 0) for s in ss]) for k in STAGES
                                if any(k in s["pps"] for s in ss)},
            "softirq_share_median": _median([s["softirq_share"] for s in ss]),
            "softirq_share_flood_cpu_median": _median([s["softirq_share_flood_cpu"] for s in ss]),
            "baseline_softirq_share_median": _median([s["baseline_softirq_share"] for s in ss]),
        }
    return {"command": command, "machine": _machine(), "repetitions": repetitions, "seconds": seconds,
            "banned": BANNED, "flood_cpu": FLOOD_CPU, **options, "modes": modes,
            "versions": {p: _package_version(p) for p in ("crowdsec", FW_BOUNCER, "ipset")},
            "findings": findings, "summary": summary, "samples": samples}


def _machine() -> dict:
    import platform
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()}


def _where(died: dict[str, float]) -> str:
    """Where the flood died, in words: the drop points, then what it passed on the way."""
    k = lambda v: f"{v / 1e3:,.0f}k"                           # noqa: E731
    words = {"xdp": "XDP", "tc": "tc", "rule": "its rule", "server": "reached the server",
             "unaccounted": "lost on the way"}
    out = ", ".join(f"{words[s]} {k(died[s])}" for s in words if died.get(s))
    passed = [f"{name} {k(died[s])}" for s, name in (("netfilter", "netfilter"), ("conntrack_new", "conntrack new"))
              if died.get(s)]
    return (out or "-") + (f" (through {', '.join(passed)})" if passed else "")


def table(report: dict) -> str:
    """The human summary: legitimate throughput under the flood and where the flood died."""
    cpu = f"cpu{report.get('flood_cpu', FLOOD_CPU)}"
    head = (f"{'mode':<14}{'Gbit/s':>7}{'kept (range)':>20}{'quiet':>7}{'flood/s':>9}{'us/pkt':>8}"
            f"{'softirq all|' + cpu:>18}  where the flood died (packets/s)")
    lines = [head, "-" * len(head)]
    pct = lambda v: "?" if v is None else f"{v:.0%}"             # noqa: E731
    for m in report["modes"]:
        s = report["summary"][m]
        soft = f"{pct(s['softirq_share_median'])} | {pct(s['softirq_share_flood_cpu_median'])}"
        if m == "baseline":
            lines.append(f"{m:<14}{s['gbps_median']:>7.2f}{'1':>20}{'':>7}{'-':>9}{'-':>8}{soft:>18}")
            continue
        lo, hi = s["ratio_spread"]
        kept = f"{s['ratio_median']:.2f} ({lo:.2f}-{hi:.2f})"
        quiet = f"{s['quiet_ratio_median']:.2f}" if s["quiet_ratio_median"] is not None else "-"
        us = s["us_per_flood_packet_median"]
        lines.append(f"{m:<14}{s['gbps_median']:>7.2f}{kept:>20}{quiet:>7}{s['flood_sent_pps_median'] / 1e3:>8,.0f}k"
                     f"{'?' if us is None else f'{us:.2f}':>8}{soft:>18}  {_where(s['died_pps_median'])}")
    f = report["findings"].get("crowdsec_nftables")
    if f:
        elems = f["set"]["elements"] if f["set"] else []
        lines.append(f"crowdsec-firewall-bouncer, nftables mode: its chains hook {', '.join(f['hooks']) or 'nothing'}; "
                     f"the {report['banned']} decision became {', '.join(elems) or 'nothing'} in its set; "
                     f"{f['reached_server']:,} of {f['flood_sent']:,} forwarded flood packets reached the server")
    stops = [st for st in report["findings"].get("crowdsec_fw_stop", []) if st["left_behind"]]
    if stops:
        left = sorted({x for st in stops for x in st["left_behind"]})
        lines.append(f"crowdsec-firewall-bouncer on SIGTERM (exit {stops[0]['exit']}) left behind: {', '.join(left)} "
                     "(removed by this harness)")
    rate = report.get("flood_rate") or 0
    if rate:
        lines.append("paced flood: us/pkt includes the sender's pacing loop; compare it between these modes only")
    lines.append(f"kept: legitimate Gbit/s under the flood ({f'{rate:,.0f}/s' if rate else 'as fast as one CPU sends'})"
                 " over the baseline just before (median of pairs); quiet: the same mode without the flood; "
                 f"us/pkt: CPU time of the flood's sender and {cpu}'s ksoftirqd per flood packet (send, gateway, "
                 "server: everything a packet costs until it dies); softirq: share of CPU time, tick-sampled")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid.lab.fwcompare",
                                description="hybrid's CrowdSec bouncer against crowdsec-firewall-bouncer, "
                                            "a banned prefix flooding a lab gateway while a legitimate stream runs.")
    p.add_argument("--quick", action="store_true", help="1 repetition of 2-second samples (for CI)")
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("-s", "--seconds", type=float, default=4.0, help="seconds of each stream")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated, of: {', '.join(MODES)} [default: %(default)s]")
    p.add_argument("--xdp-mode", choices=XDP_MODES, default="generic", help="hybrid's XDP mode [default: generic]")
    p.add_argument("--flood-rate", type=float, default=0, metavar="PPS",
                   help="the flood's packets/s (0: as fast as one CPU sends) [default: 0]")
    p.add_argument("--no-conntrack", action="store_true",
                   help="do not turn conntrack on in the gateway (modes that use it still do)")
    p.add_argument("--no-nft-check", action="store_true", help="skip the check of the bouncer's nftables mode")
    p.add_argument("--lab-name", default="hfwcmp")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': standard output)")
    args = p.parse_args(argv)
    reps, secs = (1, 2.0) if args.quick else (args.repetitions, args.seconds)
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        report = run([m.strip() for m in args.modes.split(",") if m.strip()], reps, secs, lab_name=args.lab_name,
                     xdp_mode=args.xdp_mode, conntrack=not args.no_conntrack, nft_check=not args.no_nft_check,
                     flood_rate=args.flood_rate,
                     progress=say, command=" ".join(["python -m hybrid.lab.fwcompare", *(argv or sys.argv[1:])]))
    except HybridError as exc:
        print(f"fwcompare: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except crowdsec.LapiFixtureError as exc:
        print(f"fwcompare: the CrowdSec Local API: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fwcompare: interrupted; the lab was removed", file=sys.stderr)
        return 130
    text = table(report)
    if args.json == "-":
        print(text, file=sys.stderr)
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
