"""What a test run may leave behind, and how to tell: a snapshot of every kind of object hybrid
or its tests create, and the difference between two snapshots. Used by the session-end check in
conftest.py and tested itself (tests/integration/test_leakcheck.py).

Other test sessions may run on the same machine at the same time, so a leak is only what this
session owns (:func:`ours`): objects named with its tag (:func:`session_tag`), and processes it
started (:func:`session_processes`)."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess

from hybrid import instance
from hybrid.kernel import bpffs, netfilter
from hybrid.lab import topology as lab

PROCESSES = "processes the session started"
RUN_FILES = "run lock, spares and CrowdSec report files (/run/hybrid)"
BPFFS_MOUNTS = "bpffs mounts"
# hybridctl doctor names its throwaway namespaces after itself, not after the session
DOCTOR_PREFIX = "hybrid-doctor-"
INIT_PID = 2            # kthreadd: always in the initial namespaces (see hybrid.kernel.sysutil)
_RUN_FILE = re.compile(r"run-(?P<instance>.+?)\.(lock|spares\.json|crowdsec\.json)(\.tmp)?$")


def session_tag() -> str:
    """Prefix of every namespace and lab this test session creates (lab names: <= 21 chars)."""
    return f"t{os.getpid() % 1000000:06d}"


_names = itertools.count()


def new_lab_name() -> str:
    """A lab name unique to this session (and so covered by the leak check)."""
    return f"{session_tag()}{next(_names)}"


def _ours_by_name(name: str) -> bool:
    return name.startswith((session_tag(), DOCTOR_PREFIX))


def ours(kind: str, item: str) -> bool:
    """Whether ``item`` (of a snapshot's ``kind``) is this session's to clean up."""
    if kind in ("network namespaces", "lab records", "hybrid instances (state files)"):
        return _ours_by_name(item)
    if kind == "pinned BPF objects":
        return item.startswith(session_tag())
    if kind == RUN_FILES:
        m = _RUN_FILE.match(item)
        return bool(m) and _ours_by_name(m["instance"])
    if kind == BPFFS_MOUNTS:
        return item != bpffs.DEFAULT_BPFFS        # hybrid's own bpffs stays mounted on purpose
    return True                                   # processes: snapshot() lists only the session's


# -- processes -----------------------------------------------------------------------------------

def _stat(pid: str) -> tuple[str, int] | None:
    """(state, ppid) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _netns_inode(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        text = ""
    return text[:100] or "?"


def session_processes(session_pid: int | None = None) -> dict[int, str]:
    """pid -> where, for every live (not zombie) process this session started: descendants of
    the session's process (the pytest process), and whatever runs inside a network namespace
    the session owns (daemons there have left the process tree)."""
    session_pid = session_pid or os.getpid()
    namespaces = {}
    for name in lab.existing_netns():
        if _ours_by_name(name):
            try:
                namespaces[os.stat(f"/run/netns/{name}").st_ino] = name
            except OSError:
                pass
    children: dict[int, list[int]] = {}
    found: dict[int, str] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        st = _stat(pid)
        if st is None or st[0] == "Z":
            continue
        children.setdefault(st[1], []).append(int(pid))
        ns = _netns_inode(pid) if namespaces else None
        if ns in namespaces:
            found[int(pid)] = f"in namespace {namespaces[ns]}"
    todo = list(children.get(session_pid, []))
    while todo:
        pid = todo.pop()
        found.setdefault(pid, f"started by {session_pid}")
        todo.extend(children.get(pid, []))
    found.pop(session_pid, None)
    return found


# -- files and mounts ----------------------------------------------------------------------------

def run_files() -> set[str]:
    """The run-<instance>.lock, .spares.json and .crowdsec.json files under /run/hybrid."""
    try:
        return {f for f in os.listdir(instance.RUN_ROOT) if _RUN_FILE.match(f)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def bpffs_mounts() -> set[str]:
    """Mount points of every bpffs this process sees, and of those in the initial mount
    namespace (hybrid mounts its bpffs there when it runs in a private one)."""
    return bpffs.mounted_bpffs() | bpffs.mounted_bpffs(f"/proc/{INIT_PID}/mountinfo")


def _root_xdp_links() -> list[str]:
    proc = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return []
    return sorted(f"{link['ifname']}:xdp" for link in json.loads(proc.stdout) if "xdp" in link)


def snapshot() -> dict[str, set[str]]:
    return {
        "network namespaces": lab.existing_netns(),
        "pinned BPF objects": set(bpffs.pins()),
        "iptables rules in the root namespace": set(netfilter.leftovers()),
        "XDP programs in the root namespace": set(_root_xdp_links()),
        "hybrid instances (state files)": set(instance.instances()),
        "lab records": set(lab.recorded_labs()),
        PROCESSES: {f"{pid} {_cmdline(str(pid))} ({where})" for pid, where in session_processes().items()},
        RUN_FILES: run_files(),
        BPFFS_MOUNTS: bpffs_mounts(),
    }


def leaked(before: dict[str, set[str]], after: dict[str, set[str]], ours=lambda kind, item: True) -> dict[str, list[str]]:
    """Objects present after but not before, filtered by ``ours(kind, item)`` (a run shares the
    machine with other runs; only what this run created is its leak)."""
    out = {}
    for kind, items in after.items():
        new = sorted(i for i in items - before.get(kind, set()) if ours(kind, i))
        if new:
            out[kind] = new
    return out
