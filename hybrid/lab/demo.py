"""The demo: a lab, hybrid on its gateway, real traffic, what the kernel did with it, teardown.

Runs ``hybridctl`` itself inside the gateway namespace (``ip netns exec``), exactly as an operator
would on a gateway, so the demo exercises the real command line, not a shortcut.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hybrid import instance as inst
from hybrid.engine.runner import hybridctl_argv, start_engine
from hybrid.errors import HybridError
from hybrid.kernel import sysutil
from hybrid.lab import servers
from hybrid.lab.servers import (  # re-exported: tests import Nginx from here
    Nginx,
    _stop,
)
from hybrid.lab.topology import Lab

Say = Callable[[str], None]


@dataclass
class DemoReport:
    lab: str
    reachable: dict[str, bool] = field(default_factory=dict)
    bulk_gbps: float | None = None
    bulk_bytes: int = 0
    http_ok: int = 0
    http_total: int = 0
    status: dict = field(default_factory=dict)
    queued_packets: int = 0
    kernel_packets: int = 0
    consumer_packets: int | None = None     # packets the engine decided
    blocked_ok: bool | None = None          # the request to the blocked Host was reset
    engine: dict = field(default_factory=dict)


# The demo's embedded policy: block one HTTP Host, let everything else through and keep each
# flow in the kernel once its first payload has been seen.
DEMO_RULES = """\
default = "accept"
default_flow = "bypass"
flow_ttl = 300

[[rule]]
name = "block-demo-host"
proto = "tcp"
http_host = ".blocked.test"
action = "reject"
flow = "block"

[[rule]]
name = "wait-for-payload"
proto = "tcp"
payload_len = 0
action = "accept"
flow = "none"
log = false
"""


def iperf3(lab: Lab, seconds: float, streams: int = 1, port: int = 5201) -> dict:
    """One iperf3 TCP transfer client -> server through the gateway; the parsed JSON result."""
    return servers.iperf3(lab, seconds, port=port, client=["-P", str(streams)])


def run_demo(say: Say, lab_name: str = "hdemo", seconds: float = 3.0, requests: int = 20) -> DemoReport:
    """Bring up a lab, attach hybrid on its gateway, drive bulk TCP and short HTTP connections,
    collect what the kernel counted, and remove everything (also on failure or Ctrl-C)."""
    sysutil.require_root("demo")
    rep = DemoReport(lab=lab_name)
    with Lab(lab_name) as lab:
        gw = lab.netns("gw")
        say(f"lab {lab_name} up: client {lab.info.client.ipv4} -> gateway -> server {lab.info.server.ipv4}")
        rep.reachable = {"ipv4": lab.ping("client", lab.info.server.ipv4),
                         "ipv6": lab.ping("client", lab.info.server.ipv6)}
        if not all(rep.reachable.values()):
            raise HybridError(f"the lab does not forward ({rep.reachable}): check 'hybridctl doctor'")
        say("client reaches the server through the gateway (IPv4 and IPv6)")
        try:
            sysutil.run([*hybridctl_argv(), "attach", "to-client", "to-server"], netns=gw, timeout=120,
                        what="hybridctl attach")
            say("hybrid attached on the gateway (to-client, to-server); flagged packets go to NFQUEUE 0")
            with _engine(lab, say) as stats_file:
                _drive(lab, rep, say, seconds, requests)
                _wait_published(stats_file, rep)
            rep.consumer_packets = rep.engine.get("packets")
            st = sysutil.run([*hybridctl_argv(), "status", "--json"], netns=gw, what="hybridctl status")
            rep.status = json.loads(st.stdout)
            rep.kernel_packets = sum(e["counters"].get("packets", 0) for e in rep.status["interfaces"].values())
            rep.queued_packets = sum(n["queued_packets"] for n in rep.status["netfilter"])
        finally:
            sysutil.run([*hybridctl_argv(), "detach", "--all"], netns=gw, check=False, what="hybridctl detach")
    say(f"lab {lab_name} removed; nothing of hybrid is left")
    return rep


@contextlib.contextmanager
def engine_process(lab: Lab, rules: str, *, log: str | None = None, cpu: int | None = None,
                   timeout: float = 30.0):
    """``hybridctl engine --rules RULES`` in the lab's gateway for the duration of the block
    (hybrid must be attached there). Yields the engine's stats file once the engine is bound;
    stops it on the way out, also on failure."""
    gw = lab.netns("gw")
    stats_file = inst.engine_stats_path(gw, 0)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stats_file)
    proc = start_engine(rules, log_path=log, cpu=cpu, netns=gw, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(stats_file):      # written once the engine is bound
            if proc.poll() is not None or time.monotonic() > deadline:
                raise HybridError(f"the verdict engine did not start (exit {proc.poll()}): run "
                                  f"'hybridctl engine --rules {rules}' in {gw} by hand to see why")
            time.sleep(0.05)
        yield stats_file
    finally:
        _stop(proc)


@contextlib.contextmanager
def _engine(lab: Lab, say: Say):
    """The verdict engine with DEMO_RULES in the gateway; yields its stats file."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="hybrid-demo-") as tmp:
        rules = os.path.join(tmp, "rules.toml")
        with open(rules, "w") as f:
            f.write(DEMO_RULES)
        with engine_process(lab, rules) as stats_file:
            say("the verdict engine is bound to queue 0: it blocks HTTP Host *.blocked.test and bypasses "
                "every other flow after its first payload")
            yield stats_file


def _wait_published(stats_file: str, rep: DemoReport, timeout: float = 3.0) -> None:
    """The engine publishes its counters every 0.5 s: wait for the last decision to show."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with open(stats_file) as f:
                rep.engine = json.load(f)
            if rep.engine.get("rules", {}).get("block-demo-host"):
                return
        time.sleep(0.1)


def _drive(lab: Lab, rep: DemoReport, say: Say, seconds: float, requests: int) -> None:
    res = iperf3(lab, seconds)
    rep.bulk_gbps = res["end"]["sum_received"]["bits_per_second"] / 1e9
    rep.bulk_bytes = int(res["end"]["sum_received"]["bytes"])
    say(f"bulk TCP through the gateway: {rep.bulk_gbps:.2f} Gbit/s for {seconds:g} s")
    with Nginx(lab):
        url = f"http://{lab.info.server.ipv4}/"
        for _ in range(requests):
            proc = lab.run("client", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5", url],
                           check=False, timeout=15)
            rep.http_total += 1
            rep.http_ok += proc.stdout.strip() == "200"
        blocked = lab.run("client", ["curl", "-s", "-o", "/dev/null", "-m", "5", "-H", "Host: www.blocked.test", url],
                          check=False, timeout=15)
    rep.blocked_ok = blocked.returncode == 56      # curl: connection reset by the engine's RST
    say(f"HTTP: {rep.http_ok}/{rep.http_total} requests answered 200 by nginx in the server namespace; "
        f"the request for www.blocked.test was {'reset by the engine' if rep.blocked_ok else 'NOT blocked'}")
