"""The fleet benchmark: how fast a CrowdSec decision reaches hybrid's kernel, and what 100,000 of
them cost (docs/crowdsec.md has a full run's figures).

    python -m hybrid.lab.fleetbench [--quick] [--parts propagation,share,load] [--json FILE]

- ``propagation``: from ``cscli decisions add`` (started) to the first packet the gateway drops
  for it, over N decisions at the default poll interval (1 s). Each decision bans a client
  address that pings the server every 2 ms, and the gateway's ban drop counters (XDP and tc) are
  read every millisecond. cscli's own time (a Go start and a bcrypt login, ~0.2 s) is part of it
  and reported apart.
- ``share``: from a blocked request on gateway A (a rule with ``share = {...}``) to the ban in
  gateway B's kernel: two labs and one LAPI on a management network (hybrid/lab/fleet.py).
- ``load``: 100,000 decisions pulled in one go (time, the supervisor's memory, the kernel trie's
  memory), while an iperf3 stream crosses the gateway: its throughput per second before, while
  the bouncer applies them, and after (every packet then looks up a trie of 100,000).

Everything runs in lab namespaces (198.18.0.0/15) and is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hybrid.datapath.maps import Maps
from hybrid.errors import HybridError
from hybrid.lab.crowdsec import Lapi, decision_values
from hybrid.lab.fleet import FleetNet, ServiceRun, kernel_bans, service_config, wait_for
from hybrid.lab.topology import Lab

PARTS = ("propagation", "share", "load")
SHARE_RULES = '''
[[rule]]
name = "block-and-share"
proto = "tcp"
http_host = ".blocked.example"
action = "reject"
flow = "block"
share = { ban = "source", duration = "1h", reason = "fleet bench" }
'''


def _q(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": round(_q(values, 0.5), 3), "p99": round(_q(values, 0.99), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


def _ban_drops(maps: Maps) -> int:
    return sum(c.get("xdp_drop_ban", 0) + c.get("drop_tc_ban", 0) for c in maps.stats().values())


def _name(tag: str) -> str:
    return f"fb{tag}{os.getpid() % 10000}"


@contextlib.contextmanager
def _gateway(lab: Lab, lapi: Lapi, tmp: Path, interval: float, name: str = "gw", **kw):
    run = ServiceRun(lab.netns("gw"), tmp, service_config(tmp, lapi, interval=interval, name=name, **kw), name=name)
    try:
        run.wait_event("crowdsec_connected" if "key" in kw else "crowdsec_started", timeout=120)
        yield run
    finally:
        run.cleanup()


def propagation(n: int, interval: float = 1.0) -> dict:
    with tempfile.TemporaryDirectory() as d, Lab(_name("p")) as lab, \
            Lapi(netns=lab.netns("server"), host=lab.info.server.ipv4) as lapi:
        tmp = Path(d)
        with _gateway(lab, lapi, tmp, interval, key=lapi.add_bouncer("bench")) as run, \
                Maps.open_pinned(run.status()["pin_dir"]) as maps:
            total, cli = [], []
            for i in range(n):
                src = f"198.18.1.{10 + i}"
                lab.run("client", ["ip", "addr", "add", f"{src}/24", "dev", "eth0"])
                ping = lab.popen("client", ["ping", "-q", "-i", "0.002", "-I", src, lab.info.server.ipv4])
                try:
                    time.sleep(0.05)
                    base = _ban_drops(maps)
                    t0 = time.monotonic()
                    lapi.add_decision(src, duration="1h")
                    t_cli = time.monotonic() - t0
                    wait_for(lambda: _ban_drops(maps) > base, f"the ban on {src} to drop", 30, step=0.001)
                    total.append(time.monotonic() - t0)
                    cli.append(t_cli)
                finally:
                    ping.terminate()
                    ping.wait()
            return {"poll_interval": interval, "seconds": _summary(total), "cscli_seconds": _summary(cli),
                    "after_cscli_seconds": _summary([t - c for t, c in zip(total, cli)])}


def share(n: int, interval: float = 1.0) -> dict:
    with tempfile.TemporaryDirectory() as d, Lab(_name("a")) as a, Lab(_name("b")) as b, \
            FleetNet(_name("m")) as net:
        tmp = Path(d)
        net.join(a.netns("gw"))
        net.join(b.netns("gw"))
        rules = tmp / "share.toml"
        rules.write_text(SHARE_RULES)
        with Lapi(netns=net.netns, host=net.ipv4) as lapi, \
                _gateway(a, lapi, tmp, interval, name="a", machine=lapi.add_machine("gw-a"), rules=str(rules)), \
                _gateway(b, lapi, tmp, interval, name="b", key=lapi.add_bouncer("gw-b")) as run_b:
            from hybrid.lab.servers import Nginx
            times = []
            with Nginx(a):
                for i in range(n):
                    src = f"198.18.1.{10 + i}"
                    a.run("client", ["ip", "addr", "add", f"{src}/24", "dev", "eth0"])
                    t0 = time.monotonic()
                    a.run("client", ["curl", "-s", "-m", "5", "--interface", src, "-o", "/dev/null",
                                     f"http://{a.info.server.ipv4}/", "-H", "Host: x.blocked.example"], check=False)
                    wait_for(lambda: f"{src}/32" in kernel_bans(run_b), f"B to ban {src}", 30, step=0.005)
                    times.append(time.monotonic() - t0)
            return {"poll_interval": interval, "seconds": _summary(times)}


def _rss_kib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    return out


def _memlock(maps: Maps, name: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, HybridError):
        fd = maps.fd(name)
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
    return None


def load(count: int, seconds_steady: int = 5, interval: float = 1.0) -> dict:
    """The decisions are stored first (a big import and a bouncer's pulls lock each other out of
    the LAPI's SQLite database); the gateway runs without a link while an iperf3 stream crosses
    it; then a SIGHUP adds the [crowdsec] table and the link pulls them all in one snapshot."""
    with tempfile.TemporaryDirectory() as d, Lab(_name("l")) as lab, \
            Lapi(netns=lab.netns("server"), host=lab.info.server.ipv4) as lapi:
        tmp = Path(d)
        # 198.19.0.0/16 (at most 60,000) and 2001:2:0:ff::/64 for the rest: no lab address
        v4 = min(count, 60_000)
        values = decision_values(v4, offset=1 << 16) + decision_values(count - v4, family=6, offset=0xff << 64)
        import_s = lapi.import_decisions(values, duration="4h")
        key = lapi.add_bouncer("bench")
        conf = service_config(tmp, None, name="gw")
        run = ServiceRun(lab.netns("gw"), tmp, conf, name="gw")
        server = iperf = None
        try:
            run.wait_event("engine_running", timeout=120)
            pid = run.events("starting")[0]["pid"]
            rss0 = _rss_kib(pid)
            server = lab.popen("server", ["iperf3", "-s", "-1"])
            time.sleep(0.3)
            iperf = lab.popen("client", ["iperf3", "-c", lab.info.server.ipv4, "-t", str(2 * seconds_steady + 120),
                                         "-i", "1", "--json"], stdout=subprocess.PIPE)
            t_start = time.monotonic()
            time.sleep(seconds_steady)
            service_config(tmp, lapi, key=key, interval=interval, name="gw")      # the same file, now linked
            t_hup = time.monotonic()
            run.proc.send_signal(signal.SIGHUP)
            pulled = run.wait_event("crowdsec_pull", timeout=300)
            t_applied = time.monotonic()
            time.sleep(seconds_steady)
            t_end = time.monotonic()
            iperf.terminate()
            out, _ = iperf.communicate(timeout=30)
            rss1 = _rss_kib(pid)
            with Maps.open_pinned(run.status()["pin_dir"]) as maps:
                entries = len(maps.bans())
                memlock = _memlock(maps, "hybrid_bans")
        finally:
            for proc in (iperf, server):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            run.cleanup()
        per_s = _intervals(out, t_start)

        def phase(a: float, b: float) -> dict | None:
            v = [g for t, g in per_s if a <= t < b]
            return {"gbit_s_median": round(statistics.median(v), 2), "seconds": len(v),
                    "min": round(min(v), 2), "max": round(max(v), 2)} if v else None
        return {
            "decisions": count, "kernel_entries": entries, "cscli_import_s": round(import_s, 1),
            "snapshot": {k: pulled.get(k) for k in ("startup", "new", "added", "written", "bytes", "fetch_s",
                                                     "table_s", "kernel_s")},
            "sighup_to_applied_s": round(t_applied - t_hup, 2),
            "supervisor_rss_kib": {"before": rss0["VmRSS"], "after": rss1["VmRSS"], "peak": rss1["VmHWM"]},
            "ban_trie_memlock_bytes": memlock,
            "throughput": {"before": phase(0, t_hup - t_start),
                           "applying": phase(t_hup - t_start, t_applied - t_start + 1),
                           "after": phase(t_applied - t_start + 1, t_end - t_start)},
        }


def _intervals(iperf_json: bytes, t_start: float) -> list[tuple[float, float]]:
    """(seconds since the stream started, Gbit/s) per one-second interval of iperf3's report."""
    try:
        doc = json.loads(iperf_json)
    except ValueError:
        return []
    return [(iv["sum"]["start"], iv["sum"]["bits_per_second"] / 1e9) for iv in doc.get("intervals", [])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hybrid.lab.fleetbench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few samples, 10,000 decisions (CI)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    ap.add_argument("--samples", type=int, default=None, help="decisions for propagation (default 50; quick 5)")
    ap.add_argument("--decisions", type=int, default=None, help="decisions for load (default 100000; quick 10000)")
    ap.add_argument("--json", dest="json_path", default=None, help="also write the result to this file")
    a = ap.parse_args(argv)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        print(f"fleetbench: unknown part {bad[0]!r}: use {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("fleetbench: needs root (lab namespaces): run with sudo", file=sys.stderr)
        return 2
    n = a.samples or (5 if a.quick else 50)
    result: dict = {"quick": a.quick}
    if "propagation" in parts:
        result["propagation"] = propagation(n)
    if "share" in parts:
        result["share"] = share(3 if a.quick else 10)
    if "load" in parts:
        result["load"] = load(a.decisions or (10_000 if a.quick else 100_000), 2 if a.quick else 5)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json_path:
        with open(a.json_path, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
