"""Checks every prerequisite of hybrid and says what to do about each one that fails.

Each check is a function that returns a :class:`Check`; :func:`run_checks` runs them all,
independently: a check that raises becomes a ``fail`` line carrying the exception text, and the
others still run. The library never prints; ``hybridctl doctor`` formats the results.

Doctor changes nothing on the machine outside its throwaway network namespaces
(``hybrid-doctor-<pid>-<random>``), which are deleted in a ``finally`` (with SIGINT/SIGTERM
blocked while the deletion runs, so an impatient Ctrl-C cannot leave one behind). In particular
it never mounts the hybrid bpffs: it only reports whether it is there.

What needs which kernel facility, and why each check is shaped the way it is:

- The test programs are compiled and loaded with bcc, like hybrid's datapath, and attached over
  rtnetlink with pyroute2 from *this* process into the namespace (``IPRoute(netns=...)`` opens a
  netlink socket inside the namespace and hands it back; the kernel resolves the program fd in
  ``IFLA_XDP_FD``/``TCA_BPF_FD`` against the sender's fd table, so no pinning is needed).
- Every attach is verified by reading back the program id from the kernel (``IFLA_XDP_PROG_ID``
  for XDP; ``tc -j filter show`` for cls_bpf, because pyroute2 0.9.7 does not decode
  ``TCA_BPF_ID``) and comparing it with the id of the loaded program (``prog_id`` in
  ``/proc/self/fdinfo/<fd>``).
- Native XDP on a veth is only a warning: hybrid works in generic (skb) mode everywhere, and on a
  veth native mode even costs throughput (it strips GSO from the peer).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno as errno_mod
import json
import logging
import os
import platform
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from hybrid import instance as inst
from hybrid.errors import HybridError, ToolMissingError
from hybrid.kernel import bpffs, sysutil

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "fail"

NETNS_PREFIX = "hybrid-doctor-"
SETUP_HINT = "run scripts/setup.sh"


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the doctor's report. ``fix`` is empty when there is nothing to do."""

    name: str
    status: str  # ok | warn | fail
    required: bool
    detail: str
    fix: str = ""

    @property
    def blocking(self) -> bool:
        """True when this result makes the doctor fail (a required check that failed)."""
        return self.required and self.status == FAIL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def all_passed(checks: list[Check]) -> bool:
    """True when every required check passed; warnings and optional failures don't count."""
    return not any(c.blocking for c in checks)


def report_dict(checks: list[Check]) -> dict:
    """The JSON document ``hybridctl doctor --json`` prints."""
    return {"ok": all_passed(checks), "checks": [c.to_dict() for c in checks]}


def report_json(checks: list[Check]) -> str:
    return json.dumps(report_dict(checks), indent=2)


class CheckFailed(Exception):
    """Raised inside a check: becomes a line with this check's status, detail and fix."""

    def __init__(self, detail: str, fix: str = "", status: str = FAIL):
        super().__init__(detail)
        self.detail, self.fix, self.status = detail, fix, status


# --- privileges -------------------------------------------------------------------------------

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
SUDO_FIX = "run it as root with full capabilities: sudo .venv/bin/hybridctl ..."


def effective_caps(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise HybridError(f"no CapEff line in {status_path}")


def check_privileges(probe: Probe) -> Check:
    uid = os.geteuid()
    caps = effective_caps()
    have = {name: bool(caps >> bit & 1) for name, bit in
            (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_BPF", CAP_BPF), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))}
    missing = []
    if uid != 0:
        missing.append("uid 0")
    if not have["CAP_NET_ADMIN"]:
        missing.append("CAP_NET_ADMIN")
    # bpf() accepts CAP_BPF (5.8+) or CAP_SYS_ADMIN; the mount needs CAP_SYS_ADMIN anyway.
    if not (have["CAP_BPF"] or have["CAP_SYS_ADMIN"]):
        missing.append("CAP_BPF")
    if not have["CAP_SYS_ADMIN"]:
        missing.append("CAP_SYS_ADMIN")
    held = " ".join(n for n, v in have.items() if v) or "none of CAP_NET_ADMIN/CAP_BPF/CAP_SYS_ADMIN"
    if missing:
        return Check("privileges", FAIL, True, f"euid {uid}, CapEff {caps:#x}: missing {', '.join(missing)}",
                     SUDO_FIX + " (in a container: grant CAP_NET_ADMIN, CAP_BPF and CAP_SYS_ADMIN)")
    return Check("privileges", OK, True, f"euid 0, {held}")


# --- bpf() and BTF ------------------------------------------------------------------------------

BPF_MAP_TYPE_ARRAY = 2


def load_libbpf() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:
        raise CheckFailed(f"cannot load libbpf.so.1: {exc}", "apt-get install libbpf1 (bcc depends on it)") from exc


def check_bpf_syscall(probe: Probe) -> Check:
    lib = load_libbpf()
    create = lib.bpf_map_create
    create.restype = ctypes.c_int
    create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                       ctypes.c_uint32, ctypes.c_void_p]
    fd = create(BPF_MAP_TYPE_ARRAY, b"hybrid_doctor", 4, 4, 1, None)
    if fd < 0:
        err = -fd if fd < -1 else ctypes.get_errno()
        fix = {errno_mod.EPERM: SUDO_FIX, errno_mod.ENOSYS: "the kernel needs CONFIG_BPF_SYSCALL=y"}.get(
            err, "check dmesg; the kernel needs CONFIG_BPF_SYSCALL=y and root")
        raise CheckFailed(f"bpf(BPF_MAP_CREATE) of a 1-entry array failed: {os.strerror(err)}", fix)
    try:
        map_id = fdinfo_field(fd, "map_id")
    finally:
        os.close(fd)
    return Check("bpf syscall", OK, True, f"created and closed an array map (id {map_id}) through libbpf.so.1")


def check_btf(probe: Probe) -> Check:
    path = "/sys/kernel/btf/vmlinux"
    if os.path.exists(path):
        return Check("btf", OK, False, f"{path} ({os.path.getsize(path) // 1024} KiB)")
    return Check("btf", WARN, False, f"{path} missing: kernel built without CONFIG_DEBUG_INFO_BTF",
                 "not needed by bcc (it compiles against kernel headers); bpftool and CO-RE tools need it")


def fdinfo_field(fd: int, key: str) -> int:
    """A numeric field (``prog_id``, ``map_id``) of a bpf object fd, from /proc/self/fdinfo."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0])
    raise HybridError(f"no {key} in /proc/self/fdinfo/{fd}")


# --- bcc ------------------------------------------------------------------------------------------

# The smallest programs that still include the uapi headers (so a broken headers tree shows up
# here, not in the datapath): one XDP entry point and one tc (cls_bpf direct-action) entry point.
TEST_PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

int doctor_xdp(struct xdp_md *ctx)
{
    return XDP_PASS;
}

int doctor_tc(struct __sk_buff *skb)
{
    return TC_ACT_OK;
}
"""

BCC_FIX = ("apt-get install python3-bpfcc, and run hybridctl from the .venv made by scripts/setup.sh "
           "(it sees Debian's bcc through --system-site-packages)")
HEADERS_FIX = ("run scripts/setup.sh: it installs linux-headers-$(uname -r), or links Debian's generic "
               "linux-headers-amd64 into /lib/modules/$(uname -r)/{build,source} when none matches")


def kernel_headers(release: str | None = None) -> dict[str, str | None]:
    """Where bcc will look for headers: the resolved build and source trees (None if missing)."""
    release = release or platform.release()
    found: dict[str, str | None] = {}
    for kind in ("build", "source"):
        path = f"/lib/modules/{release}/{kind}"
        found[kind] = os.path.realpath(path) if os.path.isdir(path) else None
    return found


class captured_stderr:  # noqa: N801 - used like a function: ``with captured_stderr() as err:``
    """Capture what C code (clang inside libbcc) writes to fd 2, so it reaches the report instead
    of the terminal. ``err.text`` holds it once the block is left (also when it raised)."""

    def __enter__(self) -> captured_stderr:
        sys.stderr.flush()
        self.text = ""
        self._saved = os.dup(2)
        self._tmp = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *_exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        with self._tmp:
            self._tmp.seek(0)
            self.text = self._tmp.read().decode(errors="replace")


def first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln:
            return ln
    return lines[-1] if lines else ""


@dataclasses.dataclass
class Programs:
    """The loaded test programs: bcc's BPF object plus the two program fds and ids."""

    bpf: object
    xdp_fd: int
    xdp_id: int
    tc_fd: int
    tc_id: int
    compile_s: float
    headers: dict[str, str | None]


class Probe:
    """State shared by the checks of one run: the test programs are compiled once (bcc takes
    a second or more) and released at the end by :meth:`close`."""

    def __init__(self) -> None:
        self._programs: Programs | None = None
        self._error: CheckFailed | None = None

    def programs(self) -> Programs:
        if self._programs is not None:
            return self._programs
        if self._error is not None:
            raise CheckFailed(f"no test program (bcc compile failed: {self._error.detail})",
                              "fix the bcc compile check first")
        try:
            self._programs = self._load()
        except CheckFailed as exc:
            self._error = exc
            raise
        return self._programs

    def _load(self) -> Programs:
        try:
            import bcc  # noqa: PLC0415  (heavy; only doctor and the datapath import it)
        except ImportError as exc:
            raise CheckFailed(f"cannot import bcc from {sys.executable}: {exc}", BCC_FIX) from exc
        headers = kernel_headers()
        if headers["build"] is None:
            raise CheckFailed(f"no kernel headers at /lib/modules/{platform.release()}/build", HEADERS_FIX)
        start = time.monotonic()
        err = captured_stderr()
        try:
            with err:
                b = bcc.BPF(text=TEST_PROGRAM.encode())
        except Exception as exc:  # bcc raises a bare Exception
            raise CheckFailed(f"compile failed: {first_error(err.text) or exc}", HEADERS_FIX) from exc
        elapsed = time.monotonic() - start
        err = captured_stderr()
        try:
            with err:
                xdp = b.load_func(b"doctor_xdp", bcc.BPF.XDP)
                tc = b.load_func(b"doctor_tc", bcc.BPF.SCHED_CLS)
        except Exception as exc:
            b.cleanup()
            fix = SUDO_FIX if os.geteuid() != 0 else "see the verifier's message in the detail and in dmesg"
            raise CheckFailed(f"loading into the kernel failed: {first_error(err.text) or exc}", fix) from exc
        return Programs(b, xdp.fd, fdinfo_field(xdp.fd, "prog_id"), tc.fd, fdinfo_field(tc.fd, "prog_id"),
                        elapsed, headers)

    def close(self) -> None:
        if self._programs is not None:
            with contextlib.suppress(Exception):
                self._programs.bpf.cleanup()
            self._programs = None


def check_bcc(probe: Probe) -> Check:
    progs = probe.programs()
    build, source = progs.headers["build"], progs.headers["source"]
    detail = f"{progs.compile_s:.1f} s, headers {build}"
    if source and source != build:
        detail += f" + {source}"
    return Check("bcc compile", OK, True, detail + f" (xdp prog id {progs.xdp_id}, tc prog id {progs.tc_id})")


# --- throwaway namespaces -----------------------------------------------------------------------

def netns_name() -> str:
    return f"{NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"


def leftover_namespaces() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(NETNS_PREFIX))
    except OSError:
        return []


def delete_netns(name: str) -> None:
    """Delete a namespace with SIGINT/SIGTERM held off, so the deletion itself can't be cut short."""
    path = os.path.join("/run/netns", name)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        if not os.path.lexists(path):
            return
        proc = sysutil.run(["ip", "netns", "delete", name], check=False, timeout=30)
        if proc.returncode != 0 and os.path.lexists(path):
            log.warning("ip netns delete %s: %s", name, sysutil.last_line(proc.stderr))
            with contextlib.suppress(OSError):
                ctypes.CDLL(None, use_errno=True).umount2(path.encode(), 2)  # MNT_DETACH
                os.unlink(path)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def throwaway_netns(veth: bool = False) -> Iterator[str]:
    """A uniquely named network namespace (optionally holding a veth pair ``dr0``/``dr1``),
    deleted on the way out whatever happens."""
    name = netns_name()
    owner = os.getpid()
    try:
        sysutil.run(["ip", "netns", "add", name], what=f"creating network namespace {name}")
        if veth:
            sysutil.run(["ip", "-n", name, "link", "add", "dr0", "type", "veth", "peer", "name", "dr1"],
                        what="creating a veth pair")
        yield name
    finally:
        # Only the creator cleans up. pyroute2's IPRoute(netns=...) forks a child (a copy of this
        # stack) and ends it with SIGTERM; a child that unwound through here would delete the
        # namespace under the parent's feet (seen: tc read-back failing with ENOENT, 1 run in 10).
        if os.getpid() == owner:
            delete_netns(name)


@contextlib.contextmanager
def netns_ipr(name: str):
    from pyroute2 import IPRoute  # noqa: PLC0415

    # flags=0: open the existing namespace, never create one (pyroute2 defaults to O_CREAT).
    with IPRoute(netns=name, flags=0) as ipr:
        yield ipr


def netlink_text(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} (errno {code})"
    return str(exc) or type(exc).__name__


# --- XDP ------------------------------------------------------------------------------------------

XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 2, 4


def _xdp_state(ipr, index: int) -> tuple[str | None, int | None]:
    xdp = ipr.get_links(index)[0].get_attr("IFLA_XDP")
    if xdp is None:
        return None, None
    return xdp.get_attr("IFLA_XDP_ATTACHED"), xdp.get_attr("IFLA_XDP_PROG_ID")


def xdp_attach_roundtrip(mode: str, progs: Programs) -> str:
    """Attach the XDP test program in ``mode`` (``xdp`` native or ``xdpgeneric``) to a veth in a
    throwaway namespace, read the id back, detach, and check it is gone. Returns the detail."""
    flags = XDP_FLAGS_DRV_MODE if mode == "xdp" else XDP_FLAGS_SKB_MODE
    with throwaway_netns(veth=True) as ns, netns_ipr(ns) as ipr:
        index = ipr.link_lookup(ifname="dr0")[0]
        try:
            ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", progs.xdp_fd), ("IFLA_XDP_FLAGS", flags)]})
        except Exception as exc:  # pyroute2's NetlinkError
            raise CheckFailed(f"attach to a veth failed: {netlink_text(exc)}") from exc
        attached, prog_id = _xdp_state(ipr, index)
        if attached != mode or prog_id != progs.xdp_id:
            raise CheckFailed(f"read back mode {attached} prog id {prog_id}, expected {mode} id {progs.xdp_id}")
        ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})
        after = _xdp_state(ipr, index)
        if after[1]:
            raise CheckFailed(f"detach left prog id {after[1]} attached")
    return f"veth: attached, read back prog id {prog_id}, detached"


def check_xdp_native(probe: Probe) -> Check:
    try:
        detail = xdp_attach_roundtrip("xdp", probe.programs())
    except CheckFailed as exc:
        raise CheckFailed(exc.detail, exc.fix or "use generic (skb) mode, which works everywhere; native "
                          "mode needs driver support and only pays off on a physical NIC", WARN) from exc
    return Check("xdp native", OK, False, detail)


def check_xdp_generic(probe: Probe) -> Check:
    try:
        detail = xdp_attach_roundtrip("xdpgeneric", probe.programs())
    except CheckFailed as exc:
        raise CheckFailed(exc.detail, exc.fix or "generic XDP needs a kernel >= 4.12 with "
                          "CONFIG_BPF_SYSCALL=y; " + SUDO_FIX) from exc
    return Check("xdp generic", OK, True, detail)


# --- tc clsact + cls_bpf ------------------------------------------------------------------------

TC_FIX = ("the kernel needs CONFIG_NET_SCH_INGRESS (clsact) and CONFIG_NET_CLS_BPF "
          "(modprobe sch_ingress cls_bpf); " + SUDO_FIX)


def tc_attached_ids(ns: str, dev: str, direction: str) -> list[tuple[int, bool]]:
    """(program id, direct-action) of every cls_bpf filter on ``dev``'s clsact ``direction``,
    as iproute2 reports them."""
    proc = sysutil.run(["tc", "-n", ns, "-j", "filter", "show", "dev", dev, direction],
                       what="reading back tc filters")
    found = []
    for flt in json.loads(proc.stdout or "[]"):
        opts = flt.get("options") or {}
        prog = opts.get("prog") or {}
        if flt.get("kind") == "bpf" and "id" in prog:
            found.append((int(prog["id"]), bool(opts.get("direct-action"))))
    return found


def check_tc_clsact(probe: Probe) -> Check:
    progs = probe.programs()
    with throwaway_netns(veth=True) as ns:
        with netns_ipr(ns) as ipr:
            index = ipr.link_lookup(ifname="dr0")[0]
            try:
                ipr.tc("add", "clsact", index=index)
            except Exception as exc:
                raise CheckFailed(f"adding the clsact qdisc failed: {netlink_text(exc)}", TC_FIX) from exc
            for direction, parent in (("ingress", "ffff:fff2"), ("egress", "ffff:fff3")):
                try:
                    ipr.tc("add-filter", "bpf", index=index, parent=parent, handle=":1", fd=progs.tc_fd,
                           name="doctor_tc", classid=1, direct_action=True)
                except Exception as exc:
                    raise CheckFailed(f"cls_bpf filter on clsact {direction} failed: {netlink_text(exc)}",
                                      TC_FIX) from exc
        for direction in ("ingress", "egress"):
            ids = tc_attached_ids(ns, "dr0", direction)
            if (progs.tc_id, True) not in ids:
                raise CheckFailed(f"clsact {direction}: read back {ids or 'no bpf filter'}, "
                                  f"expected prog id {progs.tc_id} in direct-action mode", TC_FIX)
    return Check("tc clsact", OK, True,
                 f"veth: cls_bpf direct-action on ingress and egress, read back prog id {progs.tc_id}")


# --- netfilter ------------------------------------------------------------------------------------

NFQUEUE_RULE = ["-A", "FORWARD", "-m", "mark", "--mark", "0x1/0x1", "-m", "comment", "--comment", "x",
                "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"]
NFQUEUE_FIX = ("the kernel needs CONFIG_NETFILTER_XT_TARGET_NFQUEUE, CONFIG_NETFILTER_XT_MATCH_MARK, "
               "CONFIG_NETFILTER_XT_MATCH_COMMENT and CONFIG_NETFILTER_NETLINK_QUEUE "
               "(modprobe xt_NFQUEUE xt_mark xt_comment nfnetlink_queue)")
CT_RULES = {
    "conntrack": ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"],
    "connbytes": ["-A", "FORWARD", "-m", "connbytes", "--connbytes", "0:4096", "--connbytes-dir", "both",
                  "--connbytes-mode", "bytes", "-j", "ACCEPT"],
}


def parse_iptables_version(text: str) -> str:
    """``"nf_tables, v1.8.9"`` from ``iptables v1.8.9 (nf_tables)``; versions before 1.8 print no
    flavour and are always legacy."""
    m = re.search(r"v(\d[\w.]*)\s*(?:\(([^)]+)\))?", text)
    if not m:
        return text.strip() or "unknown"
    return f"{m.group(2) or 'legacy'}, v{m.group(1)}"


def iptables_flavour(tool: str = "iptables") -> str:
    return parse_iptables_version(sysutil.run([tool, "--version"], what=f"{tool} --version").stdout)


def check_nfqueue(probe: Probe) -> Check:
    flavour = iptables_flavour()
    with throwaway_netns() as ns:
        for tool in ("iptables", "ip6tables"):
            proc = sysutil.run([tool, "-w", *NFQUEUE_RULE], netns=ns, check=False)
            if proc.returncode != 0:
                raise CheckFailed(f"{tool} ({flavour}) NFQUEUE + mark rule refused: "
                                  f"{sysutil.last_line(proc.stderr)}", NFQUEUE_FIX)
            listed = sysutil.run([tool, "-w", "-S", "FORWARD"], netns=ns).stdout
            if "NFQUEUE" not in listed or "--queue-bypass" not in listed:
                raise CheckFailed(f"{tool}: rule added but not listed back: {listed.strip()!r}", NFQUEUE_FIX)
    return Check("nfqueue", OK, True, f"iptables and ip6tables accept -m mark -j NFQUEUE --queue-bypass ({flavour})")


def check_nf_conntrack(probe: Probe) -> Check:
    refused = []
    with throwaway_netns() as ns:
        for match, rule in CT_RULES.items():
            for tool in ("iptables", "ip6tables"):
                proc = sysutil.run([tool, "-w", *rule], netns=ns, check=False)
                if proc.returncode != 0:
                    refused.append(f"{tool} -m {match}: {sysutil.last_line(proc.stderr)}")
    if refused:
        return Check("nf conntrack", WARN, False, "; ".join(refused),
                     "only the conntrack-NEW and first-bytes modes need them: "
                     "modprobe xt_conntrack xt_connbytes (CONFIG_NETFILTER_XT_MATCH_CONNTRACK/_CONNBYTES)")
    return Check("nf conntrack", OK, False, "conntrack --ctstate and connbytes matches work (IPv4 and IPv6)")


# --- bridge ---------------------------------------------------------------------------------------

def check_bridge(probe: Probe) -> Check:
    """What bridge mode needs (docs/deployment.md, "On a bridge"): br_netfilter's sysctls present,
    and, when this namespace's instance is attached to a bridge, on for every family queued
    (bridged packets reach the queue rule only through them), filter-vlan-tagged on (else a
    flagged VLAN-tagged frame crosses unqueued), every port of the bridge attached (a port added
    later is not inspected) and the queue rule's conntrack match in place."""
    from hybrid.datapath import attach as att
    from hybrid.kernel import netfilter
    if not os.path.isdir(att.BRIDGE_SYSCTLS):
        return Check("bridge", WARN, False, "br_netfilter is missing (/proc/sys/net/bridge): bridge mode cannot "
                     "queue bridged packets (a router needs nothing of it)",
                     "modprobe br_netfilter, or a kernel with CONFIG_BRIDGE_NETFILTER")
    state = att.State.load(inst.name())
    if state is None or not state.bridges:
        now = ", ".join(f"{n.rsplit('.', 1)[1]} {sysutil.read_sysctl(n)}"
                        for n in att.bridge_sysctls(netfilter.FAMILIES))
        return Check("bridge", OK, False, f"br_netfilter present ({now}); not attached to a bridge here "
                     "(hybridctl attach BRIDGE sets what bridge mode needs)")
    problems, fixes = [], []
    families = tuple((state.netfilter or {}).get("families") or netfilter.FAMILIES)
    off = [n for n in att.bridge_sysctls(families) if sysutil.read_sysctl(n) != "1"]
    if off:
        problems.append(f"{', '.join(off)} not 1: " + ("VLAN-tagged frames cross the bridge unqueued"
                                                      if off == [att.VLAN_TAGGED] else "bridged packets are not queued"))
        fixes.append("attach again (hybridctl attach " + " ".join(state.bridges) + ")")
    for br, ports in att.unattached_ports(state).items():
        problems.append(f"{br}'s port(s) {', '.join(ports)} added after attach: not inspected")
        fixes.append(f"hybridctl attach {' '.join(ports)}")
    chains = [c for c in netfilter.status(families) if c.installed]
    if chains and not all(c.reassembles for c in chains):
        problems.append("the queue rule has no conntrack match (fragments are not reassembled before it)")
        fixes.append("attach again")
    what = "; ".join(f"{br} (ports {', '.join(p)})" for br, p in state.bridges.items())
    if problems:
        return Check("bridge", WARN, False, f"bridge mode on {what}: " + "; ".join(problems), "; ".join(fixes))
    return Check("bridge", OK, False, f"bridge mode on {what}: br_netfilter sysctls on, every port attached, "
                 "conntrack on (every bridged packet is tracked)")


# --- bpffs ----------------------------------------------------------------------------------------

def bpffs_supported(filesystems: str = "/proc/filesystems") -> bool:
    with open(filesystems) as f:
        return any(line.split() and line.split()[-1] == "bpf" for line in f)


def check_bpffs(probe: Probe) -> Check:
    root = bpffs.bpffs_root()
    where = f"{root} (from HYBRID_BPFFS)" if "HYBRID_BPFFS" in os.environ else root
    if not bpffs_supported():
        return Check("bpffs", FAIL, True, "the kernel has no bpf filesystem (not in /proc/filesystems)",
                     "use a kernel built with CONFIG_BPF_SYSCALL=y")
    found = bpffs.locate(root)
    if found is None:
        what = "is not a bpffs" if os.path.exists(root) else "does not exist"
        return Check("bpffs", WARN, True, f"not mounted: {where} {what} (the kernel supports bpffs)",
                     f"`hybridctl attach` mounts it, or: mkdir -p {root} && mount -t bpf -o mode=0700 bpf {root}")
    pins = bpffs.pins(root)
    via = f", reached through {found}" if found != root else ""
    return Check("bpffs", OK, True, f"mounted at {where}{via}, {len(pins)} pinned object(s)")


# --- tools ----------------------------------------------------------------------------------------

REQUIRED_TOOLS = ("iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "ip", "tc", "nsenter")
LAB_TOOLS = ("iperf3", "nginx", "wrk", "curl")
FALLBACK_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"


def _tools_check(name: str, tools: tuple[str, ...], required: bool, why: str) -> Check:
    missing, off_path = [], []
    for tool in tools:
        if shutil.which(tool):
            continue
        missing.append(tool)
        elsewhere = shutil.which(tool, path=FALLBACK_PATH)
        if elsewhere:
            off_path.append(elsewhere)
    if not missing:
        return Check(name, OK, required, " ".join(tools))
    packages = sorted({sysutil.TOOL_PACKAGES.get(t, t) for t in missing})
    fix = f"apt-get install {' '.join(packages)} (or run scripts/setup.sh)"
    if off_path:
        dirs = sorted({os.path.dirname(p) for p in off_path})
        fix = f"add {':'.join(dirs)} to PATH ({', '.join(off_path)} exist), or {fix}"
    return Check(name, FAIL if required else WARN, required, f"not on PATH: {', '.join(missing)}{why}", fix)


def check_tools(probe: Probe) -> Check:
    return _tools_check("tools", REQUIRED_TOOLS, True, "")


def check_lab_tools(probe: Probe) -> Check:
    return _tools_check("lab tools", LAB_TOOLS, False, " (used by the lab, demo and benchmarks)")


# --- running them all -----------------------------------------------------------------------------

# (name, required, function): the name and required flag are used when the function raises.
CHECKS: list[tuple[str, bool, Callable[[Probe], Check]]] = [
    ("privileges", True, check_privileges),
    ("bpf syscall", True, check_bpf_syscall),
    ("btf", False, check_btf),
    ("bcc compile", True, check_bcc),
    ("xdp native", False, check_xdp_native),
    ("xdp generic", True, check_xdp_generic),
    ("tc clsact", True, check_tc_clsact),
    ("nfqueue", True, check_nfqueue),
    ("nf conntrack", False, check_nf_conntrack),
    ("bridge", False, check_bridge),
    ("bpffs", True, check_bpffs),
    ("tools", True, check_tools),
    ("lab tools", False, check_lab_tools),
]


def run_one(name: str, required: bool, func: Callable[[Probe], Check], probe: Probe) -> Check:
    """Run one check; whatever it raises (short of KeyboardInterrupt/SystemExit) becomes its line."""
    try:
        return func(probe)
    except CheckFailed as exc:
        status = exc.status if exc.status != FAIL or required else WARN
        return Check(name, status, required, exc.detail, exc.fix)
    except ToolMissingError as exc:
        return Check(name, FAIL if required else WARN, required, str(exc), f"{SETUP_HINT} (installs the tools)")
    except Exception as exc:  # noqa: BLE001 - the point of doctor is to report, never to crash
        log.debug("check %s raised", name, exc_info=True)
        if os.geteuid() != 0:
            fix = SUDO_FIX
        elif isinstance(exc, HybridError):
            fix = f"see the detail; {SETUP_HINT} installs and links everything hybrid needs"
        else:
            fix = "unexpected error inside the check: report this line"
        text = str(exc) if isinstance(exc, HybridError) else f"{type(exc).__name__}: {exc}"
        return Check(name, FAIL, required, text, fix)


def run_checks(on_result: Callable[[Check], None] | None = None) -> list[Check]:
    """Run every check, in order, each independently. ``on_result`` (if given) is called with each
    result as soon as it is known, for progressive output."""
    probe = Probe()
    results = []
    try:
        for name, required, func in CHECKS:
            check = run_one(name, required, func, probe)
            results.append(check)
            if on_result is not None:
                on_result(check)
    finally:
        probe.close()
    return results
