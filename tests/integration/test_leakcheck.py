"""The session-end leak check must be able to fail: prove it sees each kind of leftover, and that
it leaves alone what another session (or hybrid itself) owns."""

import os
import subprocess
import time

import leakcheck
import pytest
from leakcheck import new_lab_name

from hybrid import instance
from hybrid.kernel import netfilter as nf
from hybrid.lab import topology as labmod

pytestmark = pytest.mark.integration


def leaks_since(before):
    return leakcheck.leaked(before, leakcheck.snapshot(), leakcheck.ours)


def test_detects_a_leaked_namespace_and_lab_record():
    before = leakcheck.snapshot()
    lb = labmod.Lab(new_lab_name())
    lb.up()
    try:
        leaks = leaks_since(before)
        assert set(leaks["network namespaces"]) == set(lb.namespaces)
        assert leaks["lab records"] == [lb.name]
    finally:
        lb.down()
    assert leaks_since(before) == {}


def test_detects_rules_left_in_a_namespace_the_test_owns(lab):
    gw = lab.netns("gw")
    nf.install(nf.QueueRule(0x1, 0x1, families=("ipv4",)), netns=gw)
    try:
        assert any("HYBRID" in line for line in nf.leftovers(gw))
    finally:
        nf.remove(netns=gw)
    assert nf.leftovers(gw) == []


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_detects_a_process_the_session_started_and_left_running():
    before = leakcheck.snapshot()
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)   # a new session is still ours
    try:
        assert leaks_since(before)[leakcheck.PROCESSES] == [f"{proc.pid} sleep 300 (started by {os.getpid()})"]
    finally:
        _stop(proc)
    assert leaks_since(before) == {}          # killed and reaped: gone (a zombie is no leak)


def test_detects_a_daemon_left_in_the_sessions_namespace(lab):
    """A program that left the process tree (double fork) still counts while it runs in one of
    the session's namespaces."""
    before = leakcheck.snapshot()
    out = lab.run("server", ["sh", "-c", "sleep 301 </dev/null >/dev/null 2>&1 & echo $!"]).stdout
    pid = int(out)
    try:
        assert leakcheck.session_processes()[pid] == f"in namespace {lab.netns('server')}"
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rpartition(")")[2].split()[1]) != os.getpid()     # not our child
        assert leaks_since(before)[leakcheck.PROCESSES] == [f"{pid} sleep 301 (in namespace {lab.netns('server')})"]
    finally:
        os.kill(pid, 9)
    deadline = time.monotonic() + 5
    while leakcheck.PROCESSES in leaks_since(before):       # reaped by init, not by us
        assert time.monotonic() < deadline, leaks_since(before)
        time.sleep(0.05)


def test_ignores_processes_it_did_not_start():
    """A process in the root namespace that is not a descendant of this session (another
    session's, or the machine's) is none of its business."""
    before = leakcheck.snapshot()
    out = subprocess.run(["sh", "-c", "sleep 302 </dev/null >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True).stdout
    pid = int(out)
    try:
        assert pid not in leakcheck.session_processes()
        assert leakcheck.PROCESSES not in leaks_since(before)
    finally:
        os.kill(pid, 9)


@pytest.mark.parametrize("suffix", [".lock", ".spares.json"])
def test_detects_run_files_of_the_sessions_instances(suffix):
    before = leakcheck.snapshot()
    os.makedirs(instance.RUN_ROOT, mode=0o700, exist_ok=True)
    mine = os.path.join(instance.RUN_ROOT, f"run-{new_lab_name()}-gw{suffix}")
    theirs = os.path.join(instance.RUN_ROOT, f"run-t999999x-gw{suffix}")    # another session's
    for path in (mine, theirs):
        with open(path, "w"):
            pass
    try:
        assert leaks_since(before)[leakcheck.RUN_FILES] == [os.path.basename(mine)]
    finally:
        for path in (mine, theirs):
            os.unlink(path)
    assert leaks_since(before) == {}


def test_detects_a_new_bpffs_mount_but_not_hybrids_own(tmp_path):
    before = leakcheck.snapshot()
    point = tmp_path / "bpffs"
    point.mkdir()
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", str(point)], check=True)
    try:
        assert leaks_since(before)[leakcheck.BPFFS_MOUNTS] == [str(point)]
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert leaks_since(before) == {}
    assert not leakcheck.ours(leakcheck.BPFFS_MOUNTS, "/run/hybrid/bpffs")     # mounted for good by design
