"""Run a command inside the sandbox that deploy/hybrid.service asks systemd for, without systemd.

The reference machine has systemd 252 installed but not running, so the unit cannot be started;
this builds the same sandbox by hand, as systemd 252 builds it (src/core/namespace.c and
src/shared/seccomp-util.c), from the unit's own lines, then executes the command:

    ip netns exec NS python tests/unitsandbox.py deploy/hybrid.service -- hybridctl run ...

Emulated, each only when the unit sets it:
- ProtectSystem=full (/usr, /boot, /etc read-only), ProtectHome=yes (/home, /root, /run/user
  inaccessible), PrivateTmp=yes (empty /tmp, /var/tmp), PrivateDevices=yes (a /dev holding only
  null, zero, full, random, urandom, tty, pts, shm), ProtectKernelTunables=yes (/proc/sys, /sys
  and the other kernel knobs read-only; /proc/kallsyms, /proc/kcore inaccessible),
  ProtectKernelLogs=yes (/proc/kmsg, /dev/kmsg inaccessible), ProtectControlGroups=yes
  (/sys/fs/cgroup read-only), ProtectProc=invisible (a /proc that hides the processes this one
  may not ptrace), ProtectKernelModules=yes (/lib/modules, /usr/lib/modules inaccessible);
- CapabilityBoundingSet= and NoNewPrivileges=yes (hybrid.kernel.caps.limit_to: bounding,
  effective and permitted sets as the unit says, inheritable and ambient empty);
- the seccomp filters of SystemCallFilter= (with @default added, as systemd adds it to an
  allow-list), SystemCallErrorNumber=, SystemCallArchitectures=native, MemoryDenyWriteExecute=,
  RestrictAddressFamilies= and RestrictNamespaces=, through libseccomp (ctypes).
  HYBRID_SANDBOX_SECCOMP_LOG=1 makes the allow-list log what it would refuse (dmesg: "audit:
  type=1326 ... syscall=N") instead of refusing it: how to find what a filter lacks.

Not emulated: LockPersonality, RestrictRealtime, RestrictSUIDSGID, ProtectClock, ProtectHostname
(they refuse calls hybrid never makes), DevicePolicy (a cgroup program), PrivateMounts, UMask,
LogsDirectory (creating /var/log/hybrid would change the host), and the ExecStartPre= line (the
caller runs it first, outside). /mnt is hidden inside: the stand-ins live there.

It must run as root in a mount namespace of its own (``ip netns exec`` makes one): it refuses
to run in the initial one, and makes every mount private first, so nothing leaves it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import subprocess
import sys

from hybrid.kernel import caps, sysutil

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 4, 6, 7
AF_MAX = 46
NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def SCMP_ACT_ERRNO(err: int) -> int:       # libseccomp's name
    return 0x00050000 | (err & 0xFFFF)


def unit_values(path: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                values.setdefault(key, []).append(value)
    return values


def yes(values, key: str) -> bool:
    return values.get(key, ["no"])[-1] in ("yes", "true", "1", "on")


# -- the file system ----------------------------------------------------------------------------

def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


# What PrivateTmp= and ProtectHome= hide: a --keep path below one of them is put back.
HIDDEN = ("/tmp", "/var/tmp", "/home", "/root", "/run/user")


def mountpoint(path: str) -> bool:
    return subprocess.run(["mountpoint", "-q", path], check=False).returncode == 0


class FileSystem:
    def __init__(self, keep: list[str] | None = None):
        self.stage = None
        self.keep = [os.path.realpath(p) for p in keep or ()]

    def staging(self) -> str:
        """A private tmpfs (over /mnt) for the inaccessible stand-ins and the new /dev."""
        if self.stage is None:
            self.stage = "/mnt"          # hidden in here only; a new directory would be the host's
            sh("mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", self.stage)
            os.mknod(f"{self.stage}/reg", 0o000)
            os.mkdir(f"{self.stage}/dir", 0o000)
        return self.stage

    def read_only(self, path: str) -> None:
        if os.path.exists(path):
            sh("mount", "--bind", path, path)
            sh("mount", "-o", "remount,bind,ro", path)

    def inaccessible(self, path: str) -> None:
        if os.path.lexists(path):
            stand_in = f"{self.staging()}/{'dir' if os.path.isdir(path) else 'reg'}"
            sh("mount", "--bind", stand_in, path)
            sh("mount", "-o", "remount,bind,ro", path)

    def empty(self, path: str) -> None:
        if os.path.isdir(path):
            sh("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", path)

    def private_dev(self) -> None:
        new = f"{self.staging()}/dev"
        os.mkdir(new, 0o755)
        sh("mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,noexec", "tmpfs", new)
        for node in ("null", "zero", "full", "random", "urandom", "tty"):
            os.mknod(f"{new}/{node}", 0o600)
            sh("mount", "--bind", f"/dev/{node}", f"{new}/{node}")
        for d in ("pts", "shm"):
            os.mkdir(f"{new}/{d}", 0o755)
            if os.path.isdir(f"/dev/{d}"):
                sh("mount", "--bind", f"/dev/{d}", f"{new}/{d}")
        os.symlink("pts/ptmx", f"{new}/ptmx")
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{new}/{name}")
        sh("mount", "--move", new, "/dev")

    def apply(self, v) -> None:
        if sysutil.in_init_ns("mnt") is not False:
            sys.exit("unitsandbox: run me in a mount namespace of my own (ip netns exec NS ...)")
        sh("mount", "--make-rprivate", "/")
        kept = []
        for i, path in enumerate(self.keep):     # set aside before /tmp, /root... are hidden
            os.mkdir(f"{self.staging()}/keep{i}", 0o700)
            sh("mount", "--bind", path, f"{self.staging()}/keep{i}")
            kept.append((f"{self.staging()}/keep{i}", path))
        self.hide(v)
        for staged, path in kept:
            self.restore(staged, path)

    def restore(self, staged: str, path: str) -> None:
        """Put back a kept path that the sandbox hid, as an installation outside /tmp and the
        home directories would be: a tmpfs over the hidden top directory, the path bound in."""
        if os.access(path, os.X_OK):
            return
        top = next(t for t in HIDDEN if path == t or path.startswith(t + "/"))
        sh("mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", top)
        os.makedirs(path, exist_ok=True)
        sh("mount", "--bind", staged, path)

    def hide(self, v) -> None:
        if v.get("ProtectProc", ["default"])[-1] == "invisible":
            sh("mount", "-t", "proc", "-o", "hidepid=invisible", "proc", "/proc")
        system = v.get("ProtectSystem", ["no"])[-1]
        if system in ("yes", "full", "strict"):
            for p in ("/usr", "/boot", "/efi") + (("/etc",) if system in ("full", "strict") else ()):
                self.read_only(p)
        if yes(v, "ProtectHome"):
            for p in ("/home", "/root", "/run/user"):
                self.inaccessible(p)
        if yes(v, "PrivateTmp"):
            for p in ("/tmp", "/var/tmp"):
                self.empty(p)
        if yes(v, "PrivateDevices"):
            self.private_dev()
        if yes(v, "ProtectKernelTunables"):
            for p in ("/proc/acpi", "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/latency_stats",
                      "/proc/mtrr", "/proc/scsi", "/proc/sys", "/proc/sysrq-trigger", "/proc/timer_stats", "/sys"):
                self.read_only(p)
            for p in ("/proc/kallsyms", "/proc/kcore"):
                self.inaccessible(p)
        if yes(v, "ProtectKernelModules"):
            for p in ("/lib/modules", "/usr/lib/modules"):
                self.inaccessible(p)
        if yes(v, "ProtectKernelLogs"):
            for p in ("/proc/kmsg", "/dev/kmsg"):
                self.inaccessible(p)
        if yes(v, "ProtectControlGroups") and mountpoint("/sys/fs/cgroup"):
            self.read_only("/sys/fs/cgroup")


# -- seccomp ------------------------------------------------------------------------------------

class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class Seccomp:
    def __init__(self):
        self.lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                                    ctypes.POINTER(ArgCmp)]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    def number(self, name: str) -> int | None:
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        return None if nr == -1 else nr         # __NR_SCMP_ERROR: no such call on this architecture

    def load(self, default: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]) -> None:
        """One filter: ``rules`` are (action, syscall, [(arg, op, a, b), ...])."""
        ctx = self.lib.seccomp_init(default)
        try:
            for action, name, conds in rules:
                nr = self.number(name)
                if nr is None or action == default:
                    continue
                arr = (ArgCmp * max(1, len(conds)))(*[ArgCmp(*c) for c in conds])
                ret = self.lib.seccomp_rule_add_array(ctx, action, nr, len(conds), arr)
                if ret < 0 and nr >= 0:
                    raise OSError(-ret, f"seccomp_rule_add {name}: {os.strerror(-ret)}")
            ret = self.lib.seccomp_load(ctx)
            if ret < 0:
                raise OSError(-ret, f"seccomp_load: {os.strerror(-ret)}")
        finally:
            self.lib.seccomp_release(ctx)


def syscall_groups() -> dict[str, list[str]]:
    """systemd's named sets (``systemd-analyze syscall-filter``): @name -> members."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True,
                         check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if re.match(r"^@[\w-]+$", line):
            current = groups.setdefault(line, [])
        elif current is not None and line.startswith("    ") and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for item in items:
        if item.startswith("@"):
            out |= expand(groups[item], groups)
        else:
            out.add(item)
    return out


def seccomp_filters(v) -> None:
    sc = Seccomp()
    families = v.get("RestrictAddressFamilies")
    if families:
        allowed = {getattr(__import__("socket"), f) for f in families[-1].split()}
        sc.load(SCMP_ACT_ALLOW, [(SCMP_ACT_ERRNO(errno.EAFNOSUPPORT), "socket", [(0, SCMP_CMP_EQ, f, 0)])
                                 for f in range(AF_MAX) if f not in allowed]
                + [(SCMP_ACT_ERRNO(errno.EAFNOSUPPORT), "socket", [(0, SCMP_CMP_GT, AF_MAX - 1, 0)])])
    if yes(v, "RestrictNamespaces"):
        rules = [(SCMP_ACT_ERRNO(errno.EPERM), "setns", []), (SCMP_ACT_ERRNO(errno.ENOSYS), "clone3", [])]
        for flag in NS_FLAGS:
            rules += [(SCMP_ACT_ERRNO(errno.EPERM), call, [(0, SCMP_CMP_MASKED_EQ, flag, flag)])
                      for call in ("unshare", "clone")]
        sc.load(SCMP_ACT_ALLOW, rules)
    if yes(v, "MemoryDenyWriteExecute"):
        wx = PROT_WRITE | PROT_EXEC
        sc.load(SCMP_ACT_ALLOW, [
            (SCMP_ACT_ERRNO(errno.EPERM), "mmap", [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
            (SCMP_ACT_ERRNO(errno.EPERM), "mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (SCMP_ACT_ERRNO(errno.EPERM), "pkey_mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (SCMP_ACT_ERRNO(errno.EPERM), "shmat", [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)])])
    lines = v.get("SystemCallFilter")
    if lines:                      # last: the calls that load the filters above are not on its list
        groups = syscall_groups()
        if lines[0].startswith("~"):
            raise SystemExit("unitsandbox: a deny-list first is not emulated")
        allowed = expand(["@default"], groups)
        for line in lines:
            items = line.lstrip("~").split()
            allowed = allowed - expand(items, groups) if line.startswith("~") else allowed | expand(items, groups)
        err = v.get("SystemCallErrorNumber", [None])[-1]
        default = SCMP_ACT_KILL_PROCESS if err is None else SCMP_ACT_ERRNO(getattr(errno, err))
        if os.environ.get("HYBRID_SANDBOX_SECCOMP_LOG"):
            default = SCMP_ACT_LOG
        sc.load(default, [(SCMP_ACT_ALLOW, name, []) for name in sorted(allowed)])


def main(argv: list[str]) -> None:
    keep = []
    while argv[:1] == ["--keep"] and len(argv) > 1:
        keep.append(argv[1])
        argv = argv[2:]
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: unitsandbox.py [--keep PATH]... UNIT -- COMMAND [ARG...]")
    v = unit_values(argv[0])
    FileSystem(keep).apply(v)
    bounding = v.get("CapabilityBoundingSet")
    caps.limit_to(bounding[-1].split() if bounding else caps.NAMES)
    seccomp_filters(v)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
