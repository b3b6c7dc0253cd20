"""hybridctl doctor on this machine, as root: every required check passes, nothing is left
behind (also when interrupted), and two provoked failures say how to fix them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from gwlab import HYBRIDCTL
from hybrid.cli.doctor import doctor

from hybrid.observe import doctor as lib

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="hybridctl doctor attaches BPF programs: needs root"),
]

REPO = Path(__file__).resolve().parents[2]


def leftovers(pid: int | None = None) -> list[str]:
    prefix = lib.NETNS_PREFIX + (f"{pid}-" if pid else "")
    return [n for n in lib.leftover_namespaces() if n.startswith(prefix)]


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["checks"]}


def test_every_required_check_passes_and_nothing_is_left():
    with subprocess.Popen([*HYBRIDCTL, "doctor", "--json"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        out, err = proc.communicate(timeout=300)
    doc = json.loads(out)
    bad = [c for c in doc["checks"] if c["required"] and c["status"] == "fail"]
    assert not bad, bad
    assert proc.returncode == 0, err
    assert doc["ok"] is True
    checks = by_name(doc)
    assert set(checks) == {name for name, _req, _fn in lib.CHECKS}
    for name in ("privileges", "bpf syscall", "bcc compile", "xdp generic", "tc clsact", "nfqueue", "tools"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "headers /" in checks["bcc compile"]["detail"]
    assert "read back prog id" in checks["xdp generic"]["detail"]
    assert leftovers(proc.pid) == []


def test_bpffs_elsewhere_is_a_warning_naming_the_mount_command(tmp_path):
    # A directory that is not a bpffs, run in-process (the check only reads mountinfo).
    result = CliRunner().invoke(doctor, ["--json"], env={"HYBRID_BPFFS": str(tmp_path)})
    doc = json.loads(result.output)
    bpffs = by_name(doc)["bpffs"]
    assert bpffs["status"] == "warn"
    assert f"mount -t bpf -o mode=0700 bpf {tmp_path}" in bpffs["fix"]
    assert result.exit_code == 0, doc   # a warning does not fail the doctor
    assert leftovers(os.getpid()) == []


def test_without_iptables_on_path_doctor_fails_naming_the_package(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("ip", "tc", "nsenter", "mount"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True,
                               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}).stdout.strip()
        (bindir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bindir)}
    proc = subprocess.run([*HYBRIDCTL, "doctor"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout
    tools = next(line for line in proc.stdout.splitlines() if line.split()[1:2] == ["tools"])
    assert tools.startswith("FAIL  tools")
    assert "iptables-restore" in tools and "apt-get install iptables" in tools.split("-> fix:")[1]
    assert proc.stdout.splitlines()[-1] == "doctor: 1 required check(s) failed: tools"
    # the other checks still ran (one failing check stops nothing)
    assert sum(line.startswith(("ok", "warn", "FAIL")) for line in proc.stdout.splitlines()) == len(lib.CHECKS)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_doctor_leaves_no_namespace(sig):
    # Interrupt while the attach checks are running: their namespace must go anyway.
    with subprocess.Popen([*HYBRIDCTL, "doctor"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            seen = []
            for line in proc.stdout:
                seen.append(line)
                if line.split()[1:2] == ["bcc"]:
                    break
            else:
                pytest.fail(f"doctor ended before the bcc check: {seen}")
            # now in the xdp native check: wait until its namespace exists, then interrupt
            deadline = time.monotonic() + 10
            while not leftovers(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.002)
            assert leftovers(proc.pid), "the xdp native check's namespace never appeared"
            proc.send_signal(sig)
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    # SIGINT: hybridctl's group reports "interrupted" (130); SIGTERM: doctor exits 128 + 15
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else 130), err
    assert "Traceback" not in err
    assert leftovers(proc.pid) == []


def test_forked_child_unwinding_does_not_delete_the_namespace():
    # pyroute2's IPRoute(netns=...) forks a copy of this process and ends it with SIGTERM; such a
    # copy unwinding through throwaway_netns must not delete the parent's namespace.
    parent = os.getpid()
    try:
        with lib.throwaway_netns() as ns:
            pid = os.fork()
            if pid == 0:
                raise SystemExit(0)   # the child unwinds through throwaway_netns's finally
            os.waitpid(pid, 0)
            assert os.path.lexists(f"/run/netns/{ns}"), "a forked child deleted the namespace"
    finally:
        if os.getpid() != parent:
            os._exit(0)               # the child never gets back into pytest
    assert not os.path.lexists(f"/run/netns/{ns}")
