"""Where hybrid pins its maps, and making sure a bpffs is mounted there.

Why not /sys/fs/bpf: ``ip netns exec NS cmd`` runs ``cmd`` in a private mount namespace with a
fresh /sys, so a bpffs mounted or pinned under /sys/fs/bpf inside it vanishes when ``cmd`` exits,
and a later ``hybridctl detach`` run the same way would find nothing. hybrid therefore uses its
own bpffs at /run/hybrid/bpffs (``HYBRID_BPFFS`` overrides), mounted in the *initial* mount
namespace, which every ``ip netns exec`` inherits.

When we are already inside a private mount namespace and the bpffs is not mounted yet, a mount
made here would die with us. We mount it in the initial mount namespace instead (setns through
``/proc/2/ns/mnt``: kthreadd always lives in the initial namespaces, and unlike PID 1 it is never
made non-dumpable) and reach it through ``/proc/2/root``, which resolves paths in that namespace.
The mount is private to root (``mode=0700``).
"""

from __future__ import annotations

import logging
import os

from hybrid.errors import KernelFeatureError, PrivilegeError
from hybrid.kernel import sysutil

log = logging.getLogger(__name__)

DEFAULT_BPFFS = "/run/hybrid/bpffs"
# Files the kernel creates in every bpffs (bpf_preload iterators): not ours, never "left behind".
KERNEL_FILES = frozenset({"maps.debug", "progs.debug"})


def bpffs_root() -> str:
    return os.environ.get("HYBRID_BPFFS", DEFAULT_BPFFS)


def mounted_bpffs(mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    """Mount points of every bpffs listed in ``mountinfo``."""
    points = set()
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "bpf":
                    points.add(left.split(" ")[4].replace("\\040", " "))
    except OSError:
        pass
    return points


def _init_root() -> str | None:
    """A /proc/PID/root path that resolves in the initial mount namespace, if we can use one."""
    for pid in sysutil.INIT_NS_PIDS:
        root = f"/proc/{pid}/root"
        if os.access(root, os.R_OK | os.X_OK):
            return root
    return None


def locate(root: str | None = None) -> str | None:
    """Path through which this process reaches the hybrid bpffs, or None when it is not mounted.
    Never mounts anything."""
    root = root or bpffs_root()
    if root in mounted_bpffs():
        return root
    if sysutil.in_init_ns("mnt") is False:
        init_root = _init_root()
        if init_root and root in mounted_bpffs(f"/proc/{init_root.split('/')[2]}/mountinfo"):
            return init_root + root
    return None


def ensure(root: str | None = None) -> str:
    """Mount the hybrid bpffs when missing; return the path this process uses to reach it."""
    root = root or bpffs_root()
    found = locate(root)
    if found:
        return found
    if os.geteuid() != 0:
        raise PrivilegeError(f"mounting a bpffs at {root} needs root: run with sudo")
    if sysutil.in_init_ns("mnt") is False:
        ns = sysutil.init_ns_path("mnt")
        init_root = _init_root()
        if ns is None or init_root is None:
            raise KernelFeatureError(
                f"no bpffs at {root} and this process runs in a private mount namespace: "
                f"mount one from the host first (mount -t bpf -o mode=0700 bpf {root})")
        sysutil.run([sysutil.which("nsenter"), f"--mount={ns}", "--", "mkdir", "-p", root],
                    what=f"creating {root}")
        _mount([sysutil.which("nsenter"), f"--mount={ns}", "--"], root)
        return init_root + root
    os.makedirs(root, mode=0o700, exist_ok=True)
    _mount([], root)
    return root


def _mount(prefix: list[str], root: str) -> None:
    proc = sysutil.run([*prefix, "mount", "-t", "bpf", "-o", "mode=0700", "bpf", root], check=False)
    if proc.returncode != 0:
        raise KernelFeatureError(
            f"cannot mount a bpffs at {root}: {sysutil.last_line(proc.stderr)} "
            "(the kernel needs CONFIG_BPF_SYSCALL; in a container, allow mounts or mount it from the host)")
    log.info("mounted bpffs at %s", root)


def pins(root: str | None = None) -> list[str]:
    """Every pinned object below the hybrid bpffs (relative paths), without mounting it."""
    base = locate(root)
    if base is None:
        return []
    found = []
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), base)
            if rel not in KERNEL_FILES:
                found.append(rel)
    return sorted(found)
