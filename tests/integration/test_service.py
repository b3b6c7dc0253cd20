"""The systemd unit and `hybridctl install-service`: installed into a temporary root, checked
with `systemd-analyze verify`, and the unit's capability bounding set proven sufficient by
running the service under exactly that set in the lab."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from gwlab import HYBRIDCTL
from hybrid.cli.main import main
from unitsandbox import unit_values

from hybrid.kernel import caps
from hybrid.lab.servers import Nginx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(ROOT, "deploy", "hybrid.service")
SANDBOX = os.path.join(ROOT, "tests", "unitsandbox.py")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def cli(*args):
    return CliRunner().invoke(main, list(args))


def verify(path: str, cwd: str) -> subprocess.CompletedProcess:
    # systemd-analyze verify exits 0 even for lines it ignores: its output is the verdict too.
    return subprocess.run([SYSTEMD_ANALYZE, "verify", path], capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.unit
def test_install_service_into_a_root_and_verify_the_unit(tmp_path):
    root = tmp_path / "root"
    res = cli("install-service", "--root", str(root))
    assert res.exit_code == 0, res.output
    unit = root / "etc/systemd/system/hybrid.service"
    conf = root / "etc/hybrid/hybrid.toml"
    assert f"{unit}: written" in res.output and f"{conf}: written" in res.output
    assert (root / "etc/hybrid/rules/realistic.toml").exists()
    assert oct(conf.stat().st_mode & 0o777) == "0o600" and oct((root / "etc/hybrid").stat().st_mode & 0o777) == "0o700"

    values = unit_values(str(unit))
    assert values["ExecStart"] == [f"{' '.join(HYBRIDCTL)} run --config /etc/hybrid/hybrid.toml"]
    proc = verify(str(unit), str(tmp_path))
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr

    # The installed configuration and the rules it names are valid as installed.
    check = cli("config", "check", "--config", str(conf))
    assert check.exit_code == 0, check.output
    assert f"rules {root}/etc/hybrid/rules/realistic.toml" in check.output


@pytest.mark.unit
def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: an invalid value is reported (and only reported)."""
    bad = tmp_path / "hybrid.service"
    with open(UNIT) as f:
        text = f.read().replace("ExecStart=/usr/local/bin/hybridctl", f"ExecStart={' '.join(HYBRIDCTL)}")
    bad.write_text(text.replace("Restart=on-failure", "Restart=sometimes"))
    proc = verify(str(bad), str(tmp_path))
    assert "Failed to parse service restart specifier" in proc.stderr


@pytest.mark.unit
def test_install_never_overwrites_a_configuration_without_force(tmp_path):
    root = tmp_path / "root"
    assert cli("install-service", "--root", str(root)).exit_code == 0
    conf = root / "etc/hybrid/hybrid.toml"
    conf.write_text(conf.read_text().replace('"eth0", "eth1"', '"lan0", "wan0"'))
    again = cli("install-service", "--root", str(root))
    assert again.exit_code == 0
    assert f"{conf}: kept (exists and differs; --force replaces it)" in again.output
    assert f"{root}/etc/systemd/system/hybrid.service: unchanged" in again.output
    assert '"lan0", "wan0"' in conf.read_text()
    forced = cli("install-service", "--root", str(root), "--force")
    assert f"{conf}: written" in forced.output and '"eth0", "eth1"' in conf.read_text()


@pytest.mark.unit
def test_unit_policy():
    v = unit_values(UNIT)
    assert v["Restart"] == ["on-failure"] and v["KillMode"] == ["mixed"]
    assert v["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert v["CapabilityBoundingSet"] == ["CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_RAW"]
    assert v["NoNewPrivileges"] == ["yes"] and v["ProtectSystem"] == ["full"] and v["ProtectHome"] == ["yes"]
    assert v["PrivateTmp"] == ["yes"]


def decides_then_detaches(lab, proc, log) -> None:
    """A `hybridctl run` of examples/hybrid.toml in the lab lets an allowed request through,
    resets a blocked one, and detaches cleanly on SIGTERM."""
    with Nginx(lab):
        ok = lab.run("client", ["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://{lab.info.server.ipv4}/"], check=False)
        bad = lab.run("client", ["curl", "-s", "-m", "5", f"http://{lab.info.server.ipv4}/",
                                 "-H", "Host: x.blocked.example"], check=False)
    assert ok.stdout == "200" and bad.returncode == 56            # reset, not a timeout
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    text = log.read_text()
    assert '"event":"detached"' in text and '"level":"error"' not in text, text


@pytest.mark.integration
def test_the_unit_capabilities_are_enough(lab, tmp_path):
    """`hybridctl run` under exactly the unit's bounding set and no-new-privs, in the lab:
    it attaches, decides (a reject needs CAP_NET_RAW), and detaches on SIGTERM."""
    caps = unit_values(UNIT)["CapabilityBoundingSet"][0].split()
    bset = "-all," + ",".join("+" + c[len("CAP_"):].lower() for c in caps)
    log = tmp_path / "run.jsonl"
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", lab.netns("gw"), "setpriv", "--bounding-set", bset,
                                 "--inh-caps", "-all", "--no-new-privs", *HYBRIDCTL, "run",
                                 "--config", os.path.join(ROOT, "examples", "hybrid.toml"),
                                 "--interface", "to-client", "--interface", "to-server"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and '"engine_running"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()
        with open(f"/proc/{proc.pid}/status") as f:
            bnd = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapBnd:"))
        assert bin(bnd).count("1") == len(caps)                      # really limited
        decides_then_detaches(lab, proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, "detach", "--all"], capture_output=True)
        if os.path.exists(f"/run/hybrid/run-{lab.netns('gw')}.lock"):      # left only by a killed run
            os.unlink(f"/run/hybrid/run-{lab.netns('gw')}.lock")


@pytest.mark.integration
def test_exec_start_pre_mounts_the_bpffs_idempotently():
    """The unit's ExecStartPre (run outside the sandbox) leaves a bpffs at /run/hybrid/bpffs,
    and running it again changes nothing."""
    import shlex
    pre = unit_values(UNIT)["ExecStartPre"][0]
    assert pre.startswith("+")
    argv = shlex.split(pre[1:])
    for _ in range(2):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    with open("/proc/self/mountinfo") as f:
        mounts = [ln.split() for ln in f]
    ours = [m for m in mounts if m[4] == "/run/hybrid/bpffs"]
    assert len(ours) == 1 and ours[0][ours[0].index("-") + 1] == "bpf"


@pytest.mark.unit
def test_unit_hardening():
    """The sandbox settings of the hardening issue, each with its reason in a comment above it,
    and the exposure systemd-analyze gives the unit (5.6 before them, docs/deployment.md)."""
    v = unit_values(UNIT)
    for key in ("ProtectKernelTunables", "ProtectKernelLogs", "ProtectControlGroups", "PrivateDevices",
                "PrivateMounts", "RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute",
                "RestrictRealtime", "RestrictSUIDSGID", "ProtectHostname", "ProtectClock"):
        assert v[key] == ["yes"], key
    assert v["SystemCallFilter"] == ["@system-service bpf", "~@resources"]
    assert v["SystemCallArchitectures"] == ["native"] and v["SystemCallErrorNumber"] == ["EPERM"]
    assert v["DevicePolicy"] == ["closed"]
    assert v["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK AF_INET AF_INET6 AF_PACKET"]
    for absent in ("ProtectKernelModules", "ProtectProc", "ProcSubset", "User", "DynamicUser", "PrivateUsers",
                   "PrivateNetwork", "IPAddressDeny"):         # left out on purpose: the unit says why
        assert absent not in v, absent
    with open(UNIT) as f:
        lines = f.read().splitlines()
    for absent in ("ProtectKernelModules", "ProtectProc", "ProcSubset", "PrivateUsers", "IPAddressDeny"):
        assert any(ln.startswith("#") and absent in ln for ln in lines), absent
    proc = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", UNIT], capture_output=True,
                          text=True, timeout=60, check=True)
    exposure = float(proc.stdout.rsplit("Overall exposure level for hybrid.service:", 1)[1].split()[0])
    assert exposure <= 2.6, proc.stdout    # 2.4 + AF_PACKET (0.2), which bridge mode needs


@pytest.mark.integration
def test_the_unit_sandbox_is_enough(lab, tmp_path):
    """`hybridctl run` inside the unit's whole sandbox, built by tests/unitsandbox.py as systemd
    252 builds it (no systemd runs here): mounts, capabilities, no_new_privs and the seccomp
    filters of SystemCallFilter, MemoryDenyWriteExecute, RestrictAddressFamilies and
    RestrictNamespaces. It compiles and attaches, decides (a reject goes through a raw socket),
    its engines keep only their own capabilities, and it detaches on SIGTERM."""
    pre = unit_values(UNIT)["ExecStartPre"][0]
    subprocess.run(shlex.split(pre[1:]), capture_output=True, timeout=30, check=True)
    log = tmp_path / "run.jsonl"
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", lab.netns("gw"), sys.executable, SANDBOX,
                                 # hybrid as installed: the checkout and its venv, wherever CI cloned it
                                 "--keep", ROOT, UNIT, "--",
                                 *HYBRIDCTL, "run", "--config", os.path.join(ROOT, "examples", "hybrid.toml"),
                                 "--interface", "to-client", "--interface", "to-server"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and '"engine_running"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and '"engine_running"' in log.read_text(), log.read_text()
        unit_set = caps.mask(unit_values(UNIT)["CapabilityBoundingSet"][0].split())
        service = caps.Sets.of(proc.pid)
        assert (service.effective, service.bounding, service.no_new_privs) == (unit_set, unit_set, True)
        with open(f"/proc/{proc.pid}/status") as f:
            assert "Seccomp:\t2\n" in f.read()                   # filtered
        events = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
        engines = [e["pid"] for e in events if e["event"] == "engine_started"]
        # Without CAP_SETPCAP (not in the unit's set) the bounding set cannot be lowered:
        # no_new_privs keeps CAP_PERFMON out of the engines' reach instead.
        assert [(e["kept"], e["bounding"]) for e in events if e["event"] == "engine_capabilities"
                and e["pid"] in engines] == [(caps.names(caps.mask(caps.ENGINE)), caps.names(unit_set))]
        engine = caps.Sets.of(engines[0])
        assert (engine.effective, engine.permitted, engine.bounding) == (caps.mask(caps.ENGINE),) * 2 + (unit_set,)
        decides_then_detaches(lab, proc, log)
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, "detach", "--all"], capture_output=True,
                       check=False)
        for left in ("lock", "spares.json"):                         # left only by a killed run
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/run/hybrid/run-{lab.netns('gw')}.{left}")
