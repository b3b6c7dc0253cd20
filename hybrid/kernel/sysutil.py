"""Running external tools, and small facts about the running system.

Every subprocess goes through :func:`run` so that failures become one-line
:class:`~hybrid.errors.HybridError` messages (the tool's own last stderr line, not a traceback).
Arguments are always passed as a list: no shell ever sees user input.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence

from hybrid.errors import HybridError, PrivilegeError, ToolMissingError

log = logging.getLogger(__name__)

# Debian package that provides each tool we call, for the "install X" hint.
TOOL_PACKAGES = {
    "ip": "iproute2",
    "tc": "iproute2",
    "iptables": "iptables",
    "iptables-save": "iptables",
    "iptables-restore": "iptables",
    "ip6tables": "iptables",
    "ip6tables-save": "iptables",
    "ip6tables-restore": "iptables",
    "iperf3": "iperf3",
    "nginx": "nginx-light",
    "wrk": "wrk",
    "curl": "curl",
    "nsenter": "util-linux",
    "mount": "mount",
    "nft": "nftables",
}


def which(tool: str) -> str:
    """Absolute path of ``tool`` or a ToolMissingError naming the package to install."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        pkg = TOOL_PACKAGES.get(tool, tool)
        raise ToolMissingError(f"'{tool}' not found: install it (apt-get install {pkg}) or run scripts/setup.sh")
    return path


def netns_prefix(netns: str | None) -> list[str]:
    """Command prefix that runs a program inside the named network namespace."""
    return [which("ip"), "netns", "exec", netns] if netns else []


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run(
    cmd: Sequence[str],
    *,
    netns: str | None = None,
    input: str | None = None,
    check: bool = True,
    timeout: float | None = 60,
    what: str | None = None,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (optionally inside ``netns``), capture its output, and on failure raise a
    HybridError whose message is ``what`` (or the command) plus the tool's last stderr line."""
    argv = netns_prefix(netns) + [which(cmd[0]) if not os.path.isabs(cmd[0]) else cmd[0], *cmd[1:]]
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise HybridError(f"{what or cmd[0]}: timed out after {timeout:g}s") from exc
    if check and proc.returncode != 0:
        detail = last_line(proc.stderr) or last_line(proc.stdout) or f"exit status {proc.returncode}"
        raise HybridError(f"{what or ' '.join(cmd[:3])}: {detail}")
    return proc


def require_root(action: str) -> None:
    """Raise a PrivilegeError unless we run with effective uid 0.

    hybrid needs CAP_NET_ADMIN (netlink, iptables), CAP_BPF/CAP_SYS_ADMIN (bpf()) and
    CAP_SYS_ADMIN (mounting bpffs); checking for root is the honest approximation for a tool
    that mounts filesystems, and ``hybridctl doctor`` reports the individual capabilities.
    """
    if os.geteuid() != 0:
        raise PrivilegeError(f"{action} needs root (CAP_NET_ADMIN and CAP_BPF): run it with sudo")


# The initial namespaces. PID 1 may be non-dumpable (its /proc/1/ns links then refuse even root,
# as on the reference VM); kernel threads such as kthreadd (PID 2) always live in the initial
# namespaces and their links stay readable, so try it first.
INIT_NS_PIDS = (2, 1)


def init_ns_path(kind: str) -> str | None:
    """A readable /proc/PID/ns/<kind> of the initial namespace, or None."""
    for pid in INIT_NS_PIDS:
        path = f"/proc/{pid}/ns/{kind}"
        try:
            os.stat(path)
            return path
        except OSError:
            continue
    return None


def in_init_ns(kind: str) -> bool | None:
    """True/False when we can tell whether we run in the initial ``kind`` namespace, else None."""
    ref = init_ns_path(kind)
    if ref is None:
        return None
    a, b = os.stat(ref), os.stat(f"/proc/self/ns/{kind}")
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def current_netns_name() -> str | None:
    """Name of the named network namespace (``ip netns``) we run in, or None in the initial one
    (or in an unnamed one)."""
    try:
        mine = os.stat("/proc/self/ns/net")
    except OSError:
        return None
    if in_init_ns("net"):
        return None
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return None
    for name in sorted(names):
        try:
            st = os.stat(os.path.join("/run/netns", name))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            return name
    return None


def netns_id() -> str:
    """A stable identifier for the network namespace we run in: ``default`` for the initial
    namespace, the ``ip netns`` name for a named one, ``netns-<inode>`` otherwise."""
    name = current_netns_name()
    if name:
        return name
    if in_init_ns("net") is not False:
        return "default"
    return f"netns-{os.stat('/proc/self/ns/net').st_ino}"


def pid_alive(pid) -> bool:
    """A process with this id exists (one we may not signal counts: it exists). False for
    anything that is not a pid."""
    try:
        os.kill(int(pid), 0)
        return True
    except PermissionError:
        return True
    except (OSError, TypeError, ValueError, OverflowError):
        return False


def sysctl_path(name: str) -> str:
    """/proc/sys path of a dotted sysctl name (``net.bridge.bridge-nf-call-iptables``). The net.*
    ones are per network namespace: /proc/sys/net answers for the namespace of the process that
    opens the file."""
    return "/proc/sys/" + name.replace(".", "/")


def read_sysctl(name: str) -> str | None:
    """A sysctl's value, stripped; None when it does not exist in this kernel or namespace."""
    try:
        with open(sysctl_path(name)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HybridError(f"reading {name}: {exc.strerror}") from None


def write_sysctl(name: str, value: str) -> None:
    try:
        with open(sysctl_path(name), "w") as f:
            f.write(value)
    except FileNotFoundError:
        raise HybridError(f"setting {name}: no such sysctl in this kernel") from None
    except OSError as exc:
        raise HybridError(f"setting {name} to {value}: {exc.strerror}") from None
