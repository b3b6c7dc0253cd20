"""Capabilities: reading a process's sets, and giving up the ones it does not use.

See capabilities(7). A process that runs as root keeps uid 0 whatever it does here; what limits
it is its capability sets, five of them per thread:

- *effective*: what the kernel checks now;
- *permitted*: the most it can make effective (capset(2) can lower it, never raise it);
- *inheritable* and *ambient*: what it may hand to a program it executes;
- *bounding*: the most any program it executes can get. A root process that calls execve(2)
  gets its whole bounding set as permitted, so a dropped capability stays dropped across exec
  only if it also leaves the bounding set, or if ``no_new_privs`` is set: then exec can never
  raise the permitted set (the kernel intersects the new set with the old one).

:func:`limit_to` lowers all five to a given set, for the rest of the process's life and for its
children: the bounding set with ``prctl(PR_CAPBSET_DROP)`` (that needs CAP_SETPCAP, so it comes
first), effective and permitted to the kept set and inheritable to none with ``capset(2)``,
ambient cleared (``PR_CAP_AMBIENT_CLEAR_ALL``), then ``prctl(PR_SET_NO_NEW_PRIVS)``. Through
ctypes on the C library: no dependency (python3-prctl is not packaged where hybrid runs).

Two things the kernel decides, worth knowing before calling it:

- The sets belong to a thread, not to the process: capset and prctl change the calling thread
  only. :func:`limit_to` refuses to run once a second thread exists, since that thread would keep
  everything.
- Without CAP_SETPCAP (systemd's ``CapabilityBoundingSet=`` without it, as in
  deploy/hybrid.service) the bounding set cannot be lowered. ``no_new_privs`` then does that
  job: nothing outside the kept set can come back through exec either.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from hybrid.errors import HybridError, PrivilegeError

log = logging.getLogger(__name__)

# include/uapi/linux/capability.h, by number.
NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
NUMBERS = {name: i for i, name in enumerate(NAMES)}
CAP_SETPCAP = NUMBERS["CAP_SETPCAP"]

# What the verdict engine uses once its supervisor has attached (hybrid.engine.loop):
# CAP_NET_ADMIN: every nfnetlink message (bind, queue configuration, each verdict) and the
#   queue's SO_RCVBUFFORCE; also what iptables-save needs when the engine records the queue
#   rule's counters at bind.
# CAP_NET_RAW: the raw sockets that send a reject's TCP RST or ICMP unreachable (opened lazily,
#   at the first reject).
# CAP_BPF: bpf() on the pinned maps (flow verdicts, the config map). Since Linux 6.5 the kernel
#   checks only the pin's file mode for BPF_OBJ_GET and the fd's mode for lookups and updates
#   (measured on 6.18 with kernel.unprivileged_bpf_disabled = 2: a process holding no capability
#   at all opens the pins, reads and writes; no CAP_SYS_ADMIN either). From 5.8 to 6.4 every
#   bpf() command needs CAP_BPF while unprivileged_bpf_disabled is set (the default of most
#   distributions), so it stays.
# Not CAP_PERFMON (only the verifier, at load, wants it), CAP_SYS_ADMIN, CAP_DAC_OVERRIDE (the
# rules file, the verdict log and /run/hybrid are root's own), nor anything else.
ENGINE = frozenset({"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF"})

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def name(number: int) -> str:
    return NAMES[number] if 0 <= number < len(NAMES) else f"CAP_{number}"    # newer than this table


def names(mask: int) -> list[str]:
    """The capabilities in a mask (as /proc/PID/status shows it), by number."""
    return [name(i) for i in range(mask.bit_length()) if mask >> i & 1]


def mask(caps: Iterable[str]) -> int:
    """The mask of capabilities named ``CAP_NET_ADMIN`` or ``net_admin``."""
    m = 0
    for cap in caps:
        key = cap.upper() if cap.upper().startswith("CAP_") else "CAP_" + cap.upper()
        if key not in NUMBERS:
            raise ValueError(f"unknown capability {cap!r} (see capabilities(7))")
        m |= 1 << NUMBERS[key]
    return m


@dataclass(frozen=True)
class Sets:
    """A thread's capability sets (masks) and its no_new_privs flag, from /proc/PID/status."""

    inheritable: int
    permitted: int
    effective: int
    bounding: int
    ambient: int
    no_new_privs: bool

    @classmethod
    def parse(cls, status: str) -> Sets:
        fields = {}
        for line in status.splitlines():
            key, sep, value = line.partition(":")
            if sep and key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"):
                fields[key] = int(value.strip(), 16 if key.startswith("Cap") else 10)
        missing = {"CapInh", "CapPrm", "CapEff", "CapBnd"} - set(fields)
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))} in this status text")
        return cls(inheritable=fields["CapInh"], permitted=fields["CapPrm"], effective=fields["CapEff"],
                   bounding=fields["CapBnd"], ambient=fields.get("CapAmb", 0),
                   no_new_privs=bool(fields.get("NoNewPrivs", 0)))

    @classmethod
    def of(cls, pid: int | str = "self") -> Sets:
        """The sets of a process (its main thread; ``self``: the calling thread's process)."""
        with open(f"/proc/{pid}/status") as f:
            return cls.parse(f.read())


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc, option: int, arg2: int = 0) -> int:
    ret = libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0),
                     ctypes.c_ulong(0))
    return -ctypes.get_errno() if ret < 0 else ret


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capset(libc, effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()           # version 3: 64 bits per set, low 32 first
    for i in range(2):
        data[i].effective = effective >> (32 * i) & 0xFFFFFFFF
        data[i].permitted = permitted >> (32 * i) & 0xFFFFFFFF
        data[i].inheritable = inheritable >> (32 * i) & 0xFFFFFFFF
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"capset: {os.strerror(err)}", err)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def limit_to(keep: Iterable[str]) -> Sets:
    """Keep only ``keep`` (names, see :func:`mask`) of what this process holds: bounding set
    (when CAP_SETPCAP allows), effective and permitted; inheritable and ambient emptied;
    no_new_privs set. Capabilities in ``keep`` that the process does not hold stay absent.
    Returns the sets as they are afterwards. Raises HybridError if the process has more than one
    thread, PrivilegeError if the kernel refuses a step."""
    wanted = mask(keep)
    if (n := _threads()) != 1:
        raise HybridError(f"cannot give up capabilities with {n} threads running: capset(2) changes the "
                          "calling thread only (do it before starting threads)")
    libc = _libc()
    before = Sets.of()
    if before.effective >> CAP_SETPCAP & 1:
        number = 0
        while (held := _prctl(libc, _PR_CAPBSET_READ, number)) != -_errno.EINVAL:   # EINVAL: past the last one
            if held == 1 and not wanted >> number & 1 and (ret := _prctl(libc, _PR_CAPBSET_DROP, number)) < 0:
                raise PrivilegeError(f"prctl(PR_CAPBSET_DROP, {name(number)}): {os.strerror(-ret)}", -ret)
            number += 1
    kept = before.permitted & wanted
    _capset(libc, kept, kept, 0)
    if (ret := _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)) < 0 and ret != -_errno.EINVAL:
        raise PrivilegeError(f"prctl(PR_CAP_AMBIENT_CLEAR_ALL): {os.strerror(-ret)}", -ret)
    if (ret := _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)) < 0:
        raise PrivilegeError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(-ret)}", -ret)
    after = Sets.of()
    if after.effective != kept or after.permitted != kept or after.inheritable or after.ambient:
        raise PrivilegeError(f"capabilities not as asked after capset: effective {names(after.effective)}, "
                             f"permitted {names(after.permitted)}")
    log.debug("capabilities limited to %s (bounding set %s)", names(kept), names(after.bounding))
    return after
