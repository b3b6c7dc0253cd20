"""What the fleet's integration tests share: `hybridctl run` in a lab gateway with a [crowdsec]
table, secret files as the configuration wants them, traffic probes, and the kernel's ban trie
compared with a real CrowdSec Local API (hybrid/lab/crowdsec.py)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import time

from gwlab import HYBRIDCTL

from hybrid.datapath.maps import Maps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "examples", "rules", "realistic.toml")


def wait_for(cond, what: str, timeout: float = 30.0, step: float = 0.05):
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


def config(tmp_path, lapi, *, key: str | None = None, machine: tuple[str, str] | None = None,
           rules: str = RULES, interval: float = 0.5, extra: str = "", name: str = "hybrid") -> str:
    """A configuration file for a lab gateway linked to ``lapi``."""
    lines = ['[attach]', 'interfaces = ["to-client", "to-server"]', '[engine]', f'rules = "{rules}"',
             '[service]', 'standby_engines = false', '[crowdsec]', f'lapi_url = "{lapi.url}"',
             f"poll_interval = {interval}"]
    if key is not None:
        lines.append(f'bouncer_key_file = "{secret_file(tmp_path / f"{name}.key", key)}"')
    if machine is not None:
        lines.append(f'machine_id = "{machine[0]}"')
        lines.append(f'machine_password_file = "{secret_file(tmp_path / f"{name}.pw", machine[1])}"')
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


class Run:
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
        """Kill what runs, detach, and remove the run's files in /run/hybrid."""
        self.kill()
        subprocess.run(["ip", "netns", "exec", self.netns, *HYBRIDCTL, "detach", "--all"], capture_output=True,
                       timeout=120)
        for left in ("lock", "spares.json", "crowdsec.json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/run/hybrid/run-{self.netns}.{left}")


def pin_dir(run: Run) -> str:
    return run.status()["pin_dir"]


def kernel_bans(run: Run) -> dict[str, int]:
    """The gateway's ban trie: CIDR -> expiry (CLOCK_MONOTONIC ns, 0 never)."""
    with Maps.open_pinned(pin_dir(run)) as maps:
        return maps.bans()


def lapi_networks(lapi, types=("ban",)) -> set[str]:
    """The networks the LAPI bans (as the kernel keys them), from its own view of its decisions."""
    out = set()
    for d in lapi.decisions():
        if d["type"] in types and d["scope"].lower() in ("ip", "range"):
            out.add(str(ipaddress.ip_network(d["value"], strict=False)))
    return out


def probe(netns: str, src: str, dst: str) -> bool:
    """One ping from ``src`` to ``dst`` inside ``netns`` answered within a second."""
    six = ":" in dst
    proc = subprocess.run(["ip", "netns", "exec", netns, "ping", "-6" if six else "-4", "-c", "1", "-W", "1",
                           "-I", src, dst], capture_output=True, timeout=10)
    return proc.returncode == 0
