"""A hung engine (SIGSTOP) under a steady stream of new connections. Its small queue fills at
once; after that, fail-open lets every flagged packet through uninspected (NFQA_CFG_F_FAIL_OPEN)
and fail-closed drops them. The kernel counts only the drops, so hybrid counts the passes
itself; both show in `hybridctl status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from gwlab import HYBRIDCTL, start_engine

from hybrid.kernel import nfq
from hybrid.lab.servers import Nginx

pytestmark = pytest.mark.integration
IFACES = ["to-client", "to-server"]
QUEUE_LEN = 4
RULES = 'default = "accept"\ndefault_flow = "bypass"\nflow_ttl = 300\n'

# Workers that open connections one after another for a while, each an HTTP GET with a timeout
# (a SYN held in the stopped engine's queue is retransmitted after 1 s, and that one passes).
CLIENT = r"""
import json, socket, sys, threading, time
ip, seconds, workers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
ok = failed = 0
lock = threading.Lock()
def work():
    global ok, failed
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with socket.create_connection((ip, 80), timeout=4) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            good = data.startswith(b"HTTP/1.1 200")
        except OSError:
            good = False
        with lock:
            if good:
                ok += 1
            else:
                failed += 1
threads = [threading.Thread(target=work) for _ in range(workers)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"ok": ok, "failed": failed}))
"""


def in_gw(lab, *argv, **kw):
    return subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *argv], capture_output=True, text=True,
                          timeout=kw.pop("timeout", 120), **kw)


def status(lab) -> dict:
    proc = in_gw(lab, *HYBRIDCTL, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("policy", ["--fail-open", "--fail-closed"])
def test_hung_engine_overflow_is_counted_and_shown(lab, tmp_path, policy):
    assert in_gw(lab, *HYBRIDCTL, "attach", *IFACES, policy).returncode == 0
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    stats = f"/run/hybrid/instances/{lab.netns('gw')}/engine-0.json"
    err = open(tmp_path / "engine.err", "w")
    engine = start_engine(lab, rules, queue_len=QUEUE_LEN, stdout=subprocess.DEVNULL, stderr=err,
                          start_new_session=True)
    child = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(stats):
            assert engine.poll() is None and time.monotonic() < deadline, "engine did not start"
            time.sleep(0.05)
        with open(stats) as f:
            child = json.load(f)["pid"]                  # the process bound to the queue
        before = status(lab)["queue"]
        assert before["queues"][0]["bound"] and before["passed_overflow"] == 0
        os.kill(child, signal.SIGSTOP)
        with Nginx(lab):
            proc = lab.run("client", [sys.executable, "-c", CLIENT, lab.info.server.ipv4, "3", "4"],
                           timeout=60, check=False)
            mid = status(lab)
        res = json.loads(proc.stdout)
        q = mid["queue"]
        flagged = sum(e["counters"].get("flagged", 0) for e in mid["interfaces"].values())
        text = in_gw(lab, *HYBRIDCTL, "status").stdout
        assert q["queues"][0]["bound"] and q["queues"][0]["waiting"] == QUEUE_LEN   # full, engine hung
        if policy == "--fail-open":
            # New connections keep completing past the hung engine...
            assert res["failed"] == 0 and res["ok"] >= 10, res
            # ... and every one of them passed uninspected: its SYN and its first payload packets
            # at least, never more than tc flagged.
            assert res["ok"] * 2 <= q["passed_overflow"] <= flagged, (res, q, flagged)
            assert q["dropped_overflow"] == 0 and q["user_dropped"] == 0
            assert f"{q['passed_overflow']:,}" in _line(text, "passed by fail-open overflow")
        else:
            # Nothing gets past a hung fail-closed engine, and the drops are the kernel's count.
            assert res["ok"] == 0 and res["failed"] >= 4, res
            assert q["passed_overflow"] == 0
            assert q["dropped_overflow"] >= res["failed"]
            assert f"{q['dropped_overflow']:,}" in _line(text, "dropped by overflow (fail-closed)")
        os.kill(child, signal.SIGCONT)
        # Let it drain the queue first: a SIGTERM that lands while the engine handles a packet
        # is swallowed (reported to the lead), and the engine would wait for the next packet.
        deadline = time.monotonic() + 10
        while nfq.counters(f"/proc/{child}/net/netfilter/nfnetlink_queue")[0].waiting:
            assert time.monotonic() < deadline, "the engine did not drain its queue after SIGCONT"
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(engine.pid, signal.SIGTERM)        # the parent stops its queue process
        assert engine.wait(timeout=30) in (0, -signal.SIGTERM), (tmp_path / "engine.err").read_text()
    finally:
        if child is not None:
            _signal(child, signal.SIGCONT)
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait()
        err.close()
        assert in_gw(lab, *HYBRIDCTL, "detach", "--all").returncode == 0


def _line(text: str, label: str) -> str:
    return next((ln for ln in text.splitlines() if label in ln), f"<no line {label!r} in:\n{text}>")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
