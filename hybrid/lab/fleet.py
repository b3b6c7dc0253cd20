"""A fleet of lab gateways: a management network that joins several labs' gateways to one host
(where a CrowdSec Local API runs), for the fleet tests and benchmarks.

::

    [NAME-mgmt] br0 198.18.200.1/24, 2001:2:0:200::1/64
        |-- veth -- [LAB1-gw] mgmt0 198.18.200.11/24
        |-- veth -- [LAB2-gw] mgmt0 198.18.200.12/24

Each gateway keeps its own client and server (hybrid/lab/topology.py); only the management
network is shared. :class:`ServiceRun` runs `hybridctl run` in a gateway with a [crowdsec] table
(:func:`service_config`). Everything lives in namespaces: removing the management namespace removes the
bridge and every veth. No default route anywhere: nothing can leave the lab.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time

from hybrid.datapath.maps import Maps
from hybrid.engine.runner import hybridctl_argv
from hybrid.errors import HybridError
from hybrid.kernel import sysutil
from hybrid.lab.topology import NAME_RE, _kill_netns_pids, existing_netns

log = logging.getLogger(__name__)

HYBRIDCTL = hybridctl_argv()
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
RULES = os.path.join(EXAMPLES, "rules", "realistic.toml")
MGMT_V4 = "198.18.200"
MGMT_V6 = "2001:2:0:200"


class FleetNet:
    """``with FleetNet(name) as net: net.join(lab.netns("gw"))`` ... always torn down."""

    def __init__(self, name: str):
        if not NAME_RE.match(name):
            raise HybridError(f"fleet name {name!r}: lowercase letters, digits and dashes")
        self.name = name
        self.netns = f"{name}-mgmt"
        self.ipv4, self.ipv6 = f"{MGMT_V4}.1", f"{MGMT_V6}::1"
        self.members: dict[str, str] = {}          # gateway netns -> its management IPv4 address

    def up(self) -> FleetNet:
        sysutil.require_root("fleet up")
        if self.netns in existing_netns():
            raise HybridError(f"namespace {self.netns} exists: remove it (ip netns del {self.netns})")
        ip = sysutil.which("ip")
        with contextlib.ExitStack() as undo:
            undo.callback(self.down)
            sysutil.run([ip, "netns", "add", self.netns], what=f"creating namespace {self.netns}")
            sysutil.run([ip, "-n", self.netns, "link", "set", "lo", "up"])
            sysutil.run([ip, "-n", self.netns, "link", "add", "br0", "type", "bridge"])
            sysutil.run(["sysctl", "-q", "-w", "net.ipv6.conf.br0.accept_dad=0"], netns=self.netns)
            sysutil.run([ip, "-n", self.netns, "addr", "add", f"{self.ipv4}/24", "dev", "br0"])
            sysutil.run([ip, "-n", self.netns, "addr", "add", f"{self.ipv6}/64", "dev", "br0", "nodad"])
            sysutil.run([ip, "-n", self.netns, "link", "set", "br0", "up"])
            undo.pop_all()
        return self

    def join(self, gw_netns: str) -> str:
        """Connect a gateway namespace; returns its management IPv4 address."""
        ip = sysutil.which("ip")
        n = len(self.members) + 1
        if n > 200:
            raise HybridError("a lab fleet has at most 200 gateways")
        port = f"gw{n}"
        addr4, addr6 = f"{MGMT_V4}.{10 + n}", f"{MGMT_V6}::{10 + n:x}"
        sysutil.run([ip, "-n", self.netns, "link", "add", port, "type", "veth", "peer", "name", "mgmt0",
                     "netns", gw_netns], what=f"joining {gw_netns} to {self.netns}")
        sysutil.run([ip, "-n", self.netns, "link", "set", port, "master", "br0", "up"])
        sysutil.run(["sysctl", "-q", "-w", "net.ipv6.conf.mgmt0.accept_dad=0"], netns=gw_netns)
        sysutil.run([ip, "-n", gw_netns, "addr", "add", f"{addr4}/24", "dev", "mgmt0"])
        sysutil.run([ip, "-n", gw_netns, "addr", "add", f"{addr6}/64", "dev", "mgmt0", "nodad"])
        sysutil.run([ip, "-n", gw_netns, "link", "set", "mgmt0", "up"])
        self.members[gw_netns] = addr4
        return addr4

    def down(self) -> None:
        """Remove the management namespace (its bridge and veths with it); idempotent."""
        if self.netns in existing_netns():
            _kill_netns_pids(self.netns)
            sysutil.run([sysutil.which("ip"), "netns", "del", self.netns], check=False)
        self.members.clear()

    def __enter__(self) -> FleetNet:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


def wait_for(cond, what: str, timeout: float = 30.0, step: float = 0.05):
    """``cond()``'s first true value, polled; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


def secret_file(path, text: str) -> str:
    """A file of root's alone, as bouncer_key_file and machine_password_file must be."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return str(path)


def service_config(tmp_path, lapi, *, key: str | None = None, machine: tuple[str, str] | None = None,
                   rules: str = RULES, interval: float = 0.5, extra: str = "", name: str = "hybrid") -> str:
    """A configuration file for a lab gateway linked to ``lapi`` (None: no [crowdsec] table)."""
    lines = ['[attach]', 'interfaces = ["to-client", "to-server"]', '[engine]', f'rules = "{rules}"',
             '[service]', 'standby_engines = false']
    if lapi is not None:
        lines += ['[crowdsec]', f'lapi_url = "{lapi.url}"', f"poll_interval = {interval}"]
    if key is not None:
        lines.append(f'bouncer_key_file = "{secret_file(tmp_path / f"{name}.key", key)}"')
    if machine is not None:
        lines.append(f'machine_id = "{machine[0]}"')
        lines.append(f'machine_password_file = "{secret_file(tmp_path / f"{name}.pw", machine[1])}"')
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


class ServiceRun:
    """One `hybridctl run` in a gateway namespace, its JSON log in a file."""

    def __init__(self, netns: str, tmp_path, conf: str, name: str = "run"):
        self.netns = netns
        self.log_path = tmp_path / f"{name}.jsonl"
        self.err_path = tmp_path / f"{name}.stderr"
        with open(self.log_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(["ip", "netns", "exec", netns, *HYBRIDCTL, "run", "--config", conf],
                                         stdout=out, stderr=err, start_new_session=True)

    def lines(self) -> list[dict]:
        with open(self.log_path) as f:
            return [json.loads(ln) for ln in f if ln.strip()]

    def events(self, name: str) -> list[dict]:
        return [e for e in self.lines() if e["event"] == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 60.0, since: int = 0) -> dict:
        def ready():
            got = self.events(name)[since:]
            if len(got) >= count:
                return got[count - 1]
            if self.proc.poll() is not None:
                raise AssertionError(f"hybridctl run exited ({self.proc.returncode}) before {name}: "
                                     f"{self.err_path.read_text()} {self.log_path.read_text()[-3000:]}")
            return None
        return wait_for(ready, f"event {name} #{count}", timeout)

    def status(self) -> dict:
        proc = subprocess.run(["ip", "netns", "exec", self.netns, *HYBRIDCTL, "status", "--json"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def status_text(self) -> str:
        proc = subprocess.run(["ip", "netns", "exec", self.netns, *HYBRIDCTL, "status"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def cleanup(self) -> None:
        """Stop what runs (SIGTERM, then SIGKILL), detach, and remove the run's files in
        /run/hybrid (those a killed run leaves: its lock, spares and CrowdSec reports)."""
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            self.kill()
        subprocess.run(["ip", "netns", "exec", self.netns, *HYBRIDCTL, "detach", "--all"], capture_output=True,
                       timeout=120)
        for left in ("lock", "spares.json", "crowdsec.json", "crowdsec.json.tmp", "spares.json.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/run/hybrid/run-{self.netns}.{left}")


def kernel_bans(run: ServiceRun) -> dict[str, int]:
    """The gateway's ban trie: CIDR -> expiry (CLOCK_MONOTONIC ns, 0 never)."""
    with Maps.open_pinned(run.status()["pin_dir"]) as maps:
        return maps.bans()
