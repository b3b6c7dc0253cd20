"""Engine death under load: flows already bypassed keep flowing without losing a connection, and
new flows follow the configured policy (fail-open: they pass through --queue-bypass; fail-closed:
they are dropped while no engine is bound)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from gwlab import HYBRIDCTL, start_engine

from hybrid.lab.servers import Nginx, _wait_port

pytestmark = pytest.mark.integration
IFACES = ["to-client", "to-server"]
RULES = 'default = "accept"\ndefault_flow = "bypass"\nflow_ttl = 300\n' \
        '[[rule]]\nname = "wait-for-payload"\nproto = "tcp"\npayload_len = 0\naction = "accept"\nflow = "none"\n'


def in_gw(lab, *argv, **kw):
    return subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *argv], capture_output=True, text=True,
                          timeout=kw.pop("timeout", 120), **kw)


@pytest.mark.parametrize("policy", ["--fail-open", "--fail-closed"])
def test_kill_9_of_the_engine_under_load(lab, tmp_path, policy):
    assert in_gw(lab, *HYBRIDCTL, "attach", *IFACES, policy).returncode == 0
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    stats = f"/run/hybrid/instances/{lab.netns('gw')}/engine-0.json"
    errlog = open(tmp_path / "engine.err", "w+")
    engine = start_engine(lab, rules, stdout=subprocess.DEVNULL, stderr=errlog, start_new_session=True)
    iperf_server = bulk = None

    def gone(what: str) -> str:
        errlog.seek(0)
        return f"the engine exited ({engine.returncode}) {what}: " + " | ".join(errlog.read().splitlines()[-5:])

    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(stats):
            assert engine.poll() is None and time.monotonic() < deadline, "engine did not start"
            time.sleep(0.05)
        iperf_server = lab.popen("server", ["iperf3", "-s", "-1", "-B", lab.info.server.ipv4])
        _wait_port(lab, "server", 5201)
        bulk = lab.popen("client", ["iperf3", "-c", lab.info.server.ipv4, "-t", "5", "-J"],
                         stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)                                   # the stream is established and bypassed
        with open(stats) as f:
            child = json.load(f)["pid"]
        # The engine must still be there to be killed: if it left by itself, say why (seen once in
        # CI as a bare ProcessLookupError from killpg, with its stderr thrown away).
        assert engine.poll() is None, gone("before the test killed it")
        os.killpg(engine.pid, signal.SIGKILL)             # the engine parent and its queue process
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        engine.wait()
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
        with Nginx(lab):
            new = lab.run("client", ["curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}",
                                     f"http://{lab.info.server.ipv4}/"], check=False)
        out, _ = bulk.communicate(timeout=30)
        res = json.loads(out)
        # The bypassed stream never noticed: it finished its 5 s with no error.
        assert "error" not in res and res["end"]["sum_received"]["bytes"] > 100_000_000
        if policy == "--fail-open":
            assert new.stdout == "200"                    # no engine bound: --queue-bypass lets it pass
        else:
            assert new.returncode == 28                   # no engine bound: its request (and every retransmission) is dropped
    finally:
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait()
        errlog.close()
        for proc in (bulk, iperf_server):      # a failed run must not leave a Popen to be collected later
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.communicate()
        assert in_gw(lab, *HYBRIDCTL, "detach", "--all").returncode == 0


def _alive(pid: int) -> bool:
    """Running (a killed process that waits to be reaped, a zombie, no longer runs anything)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
