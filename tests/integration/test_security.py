"""Security: what hybrid leaves on disk is root's alone, an unprivileged user can neither read
nor change rules, maps or state, and no code path runs a shell."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest
from gwlab import HYBRIDCTL

from hybrid.kernel import abi, bpffs

pytestmark = pytest.mark.integration
IFACES = ["to-client", "to-server"]
REPO = pathlib.Path(__file__).resolve().parents[2]
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"]


def in_gw(lab, *argv, nobody=False):
    return subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *(AS_NOBODY if nobody else []), *argv],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def attached(lab):
    """One attachment for the module (a compile takes 6-10 s on CI): no test here may change it,
    and each checks that it did not."""
    assert in_gw(lab, *HYBRIDCTL, "attach", *IFACES, "--watch-port", "53").returncode == 0
    try:
        yield lab
    finally:
        assert in_gw(lab, *HYBRIDCTL, "detach", "--all").returncode == 0


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_pins_and_state_are_root_only(attached):
    lab = attached
    pin_dir = os.path.join(bpffs.locate(), lab.netns("gw"))
    assert mode(bpffs.locate()) & 0o077 == 0                       # the bpffs itself: mode=0700
    assert mode(pin_dir) == 0o700
    pins = os.listdir(pin_dir)
    assert sorted(pins) == sorted(abi.MAP_NAMES)
    for name in pins:
        st = os.stat(os.path.join(pin_dir, name))
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o077 == 0, name
    assert mode("/run/hybrid/instances") == 0o700
    state = f"/run/hybrid/instances/{lab.netns('gw')}"
    assert mode(state) == 0o700 and mode(os.path.join(state, "state.json")) == 0o600


@pytest.mark.parametrize("args, action", [
    (["status"], None), (["detach", "--all"], "detach"), (["attach", *IFACES], "attach"),
])
def test_unprivileged_user_gets_one_line_and_changes_nothing(attached, args, action):
    lab = attached
    before = in_gw(lab, "iptables-save").stdout.splitlines()[1:-1]
    proc = in_gw(lab, *HYBRIDCTL, *args, nobody=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0] == (f"Error: {action} needs root (CAP_NET_ADMIN and CAP_BPF): run it with sudo" if action
                        else "Error: hybrid's state is readable by root only: run it with sudo")
    assert in_gw(lab, "iptables-save").stdout.splitlines()[1:-1] == before
    assert json.loads(in_gw(lab, *HYBRIDCTL, "status", "--json").stdout)["attached"] is True


def test_unprivileged_user_cannot_open_the_maps_or_touch_the_rules(attached):
    lab = attached
    pin = os.path.join(bpffs.locate(), lab.netns("gw"), "hybrid_ports")
    probe = ("import sys\nfrom hybrid.kernel import bpfsys\n"
             "try:\n    bpfsys.obj_get(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e.errno)\n"
             "else:\n    print('opened')\n")
    out = in_gw(lab, sys.executable, "-c", probe, pin, nobody=True)
    assert out.stdout.split()[:2] in (["PrivilegeError", "13"], ["PrivilegeError", "1"]), out.stdout + out.stderr
    assert in_gw(lab, "iptables", "-F", "HYBRID", nobody=True).returncode != 0
    assert "-j NFQUEUE" in in_gw(lab, "iptables-save").stdout          # still there


def test_no_shell_anywhere():
    """Every subprocess gets an argv list: user input never meets a shell."""
    offenders = []
    for path in list((REPO / "hybrid").rglob("*.py")) + list((REPO / "cli").rglob("*.py")):
        text = path.read_text()
        for needle in ("shell=True", "os.system(", "os.popen(", "subprocess.getoutput", "subprocess.getstatusoutput"):
            if needle in text:
                offenders.append(f"{path.name}: {needle}")
    assert offenders == []
