"""A three-namespace testbed: client -- gateway -- server, joined by veth pairs.

A router lab (the default)::

    [NAME-client] eth0 ---- to-client [NAME-gw] to-server ---- eth0 [NAME-server]
     198.18.1.2/24          198.18.1.1/24        198.18.2.1/24       198.18.2.2/24
     2001:2:0:1::2/64       2001:2:0:1::1/64     2001:2:0:2::1/64    2001:2:0:2::2/64

A bridge lab (``kind="bridge"``, a bump in the wire)::

    [NAME-client] eth0 ---- to-client [NAME-gw: br0] to-server ---- eth0 [NAME-server]
     198.18.1.2/16          (bridge ports, no addresses)            198.18.2.2/16
     2001:2:0:1::2/48                                               2001:2:0:2::2/48

In the bridge lab client and server share one subnet (198.18.0.0/16, 2001:2::/48) and find each
other by ARP and neighbour discovery across the bridge; nothing is routed. The gateway's bridge
and its ports have no address and no IPv6 at all (a transparent bridge says nothing on the wire).
The end hosts keep the router lab's addresses, so every test and workload written for the router
lab addresses the same hosts in either kind.

Addresses come from the benchmarking ranges (RFC 2544 198.18.0.0/15, RFC 5180 2001:2::/48).
In the router lab the gateway forwards; the client and server have a route to each other's
subnet through it and no default route, so nothing can leave the lab. The same code builds the lab for
``hybridctl lab``, the test fixtures and the benchmarks. Names are prefixed so that several labs
(tests running side by side) never collide; a lab's record lives in /run/hybrid/labs so that
``lab down``/``status`` work from another process.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from hybrid import instance as inst
from hybrid.datapath.attach import purge_instance
from hybrid.errors import ConfigError, HybridError, NotFoundError
from hybrid.kernel import sysutil

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,20}$")
ROLES = ("client", "gw", "server")
KINDS = ("router", "bridge")
BRIDGE = "br0"          # the bridge in a bridge lab's gateway


@dataclass(frozen=True)
class Host:
    role: str
    netns: str
    ifname: str
    ipv4: str   # address without prefix length
    ipv6: str


@dataclass(frozen=True)
class LabInfo:
    name: str
    client: Host
    server: Host
    gw_client: Host   # the gateway's interface facing the client (a bridge port in a bridge lab)
    gw_server: Host   # the gateway's interface facing the server (likewise)
    kind: str = "router"        # "router" or "bridge"
    bridge: str | None = None   # the gateway's bridge (bridge lab only)

    @property
    def prefix4(self) -> int:
        """The end hosts' IPv4 prefix length: one subnet per side, or one for the whole bridge."""
        return 16 if self.kind == "bridge" else 24

    @property
    def prefix6(self) -> int:
        return 48 if self.kind == "bridge" else 64


def lab_info(name: str, kind: str = "router") -> LabInfo:
    """The fixed layout of the lab called ``name`` (no system access)."""
    if not NAME_RE.match(name):
        raise ConfigError(f"lab name {name!r}: use 1-21 lowercase letters, digits or '-', starting with a letter")
    if kind not in KINDS:
        raise ConfigError(f"lab kind {kind!r}: use one of {', '.join(KINDS)}")
    gw = f"{name}-gw"
    bridged = kind == "bridge"
    return LabInfo(
        name=name,
        client=Host("client", f"{name}-client", "eth0", "198.18.1.2", "2001:2:0:1::2"),
        server=Host("server", f"{name}-server", "eth0", "198.18.2.2", "2001:2:0:2::2"),
        gw_client=Host("gw", gw, "to-client", "" if bridged else "198.18.1.1", "" if bridged else "2001:2:0:1::1"),
        gw_server=Host("gw", gw, "to-server", "" if bridged else "198.18.2.1", "" if bridged else "2001:2:0:2::1"),
        kind=kind,
        bridge=BRIDGE if bridged else None,
    )


def existing_netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


class Lab:
    """Build, query and remove one lab. ``with Lab(name) as lab:`` brings it up and always
    tears it down."""

    def __init__(self, name: str = "hlab", kind: str = "router"):
        self.info = lab_info(name, kind)
        self.name = name
        self.kind = kind

    # -- names -------------------------------------------------------------------------------
    @property
    def namespaces(self) -> list[str]:
        i = self.info
        return [i.client.netns, i.gw_client.netns, i.server.netns]

    def netns(self, role: str) -> str:
        if role not in ROLES:
            raise ConfigError(f"unknown lab role {role!r}: use one of {', '.join(ROLES)}")
        return f"{self.name}-{role}"

    @property
    def record_path(self) -> str:
        return inst.lab_record_path(self.name)

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self) -> LabInfo:
        """Create the namespaces, links, addresses and routes. All or nothing: a failure half-way
        removes what was created."""
        sysutil.require_root("lab up")
        clash = set(self.namespaces) & existing_netns()
        if clash:
            raise HybridError(f"lab {self.name!r} is already up (namespaces {', '.join(sorted(clash))}): "
                              f"run 'hybridctl lab down --name {self.name}' first")
        with contextlib.ExitStack() as undo:
            undo.callback(self.down)
            self._build()
            undo.pop_all()
        os.makedirs(inst.LABS, mode=0o700, exist_ok=True)
        with open(self.record_path, "w") as f:
            json.dump(asdict(self.info), f, indent=1)
        log.info("lab %s up", self.name)
        return self.info

    def _build(self) -> None:
        i = self.info
        ip = sysutil.which("ip")
        for ns in self.namespaces:
            sysutil.run([ip, "netns", "add", ns], what=f"creating namespace {ns}")
        # Create each pair inside the gateway namespace with its peer directly in the end host's,
        # so no interface ever appears in the caller's namespace (no name clashes there).
        for gw_if, host in ((i.gw_client, i.client), (i.gw_server, i.server)):
            sysutil.run([ip, "-n", gw_if.netns, "link", "add", gw_if.ifname, "type", "veth",
                         "peer", "name", host.ifname, "netns", host.netns],
                        what=f"creating veth {gw_if.ifname}")
        if i.kind == "bridge":
            self._build_bridge(ip)
        for h in (i.client, i.gw_client, i.gw_server, i.server):
            if not h.ipv4:
                continue     # a bridge port: no address
            plen4, plen6 = (i.prefix4, i.prefix6) if h.role != "gw" else (24, 64)
            # No IPv6 duplicate address detection: addresses are usable at once, not "tentative".
            sysutil.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{h.ifname}.accept_dad=0"], netns=h.netns)
            sysutil.run([ip, "-n", h.netns, "addr", "add", f"{h.ipv4}/{plen4}", "dev", h.ifname])
            sysutil.run([ip, "-n", h.netns, "addr", "add", f"{h.ipv6}/{plen6}", "dev", h.ifname, "nodad"])
        for h in (i.client, i.gw_client, i.gw_server, i.server):
            sysutil.run([ip, "-n", h.netns, "link", "set", h.ifname, "up"])
        for ns in self.namespaces:
            sysutil.run([ip, "-n", ns, "link", "set", "lo", "up"])
        # Short connections at benchmark rates (wrk, ~14k/s): the client's TIME_WAIT sockets
        # fill its 28k-port range within seconds, and then every connect() scans the range for a
        # free port. Measured: wrk at 94% CPU for 200 req/s, in every mode alike, once ~14k
        # TIME_WAITs had piled up. The client may reuse TIME_WAIT ports (timestamps make that
        # safe) from a wider range, and the server keeps no TIME_WAIT sockets that a reused port
        # would run into. Lab knobs for the lab's end hosts, not gateway settings.
        sysutil.run(["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                     "net.ipv4.ip_local_port_range=1024 65000"], netns=i.client.netns)
        sysutil.run(["sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=0"], netns=i.server.netns)
        if i.kind == "bridge":
            return       # one subnet: the hosts reach each other on-link, nothing is routed
        sysutil.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], netns=i.gw_client.netns)
        sysutil.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"], netns=i.gw_client.netns)
        # Routes to the far subnet only: no default route, so nothing can leave the lab.
        for host, gw_if, far in ((i.client, i.gw_client, i.server), (i.server, i.gw_server, i.client)):
            net4 = far.ipv4.rsplit(".", 1)[0] + ".0/24"
            net6 = far.ipv6.rsplit("::", 1)[0] + "::/64"
            sysutil.run([ip, "-n", host.netns, "route", "add", net4, "via", gw_if.ipv4])
            sysutil.run([ip, "-n", host.netns, "-6", "route", "add", net6, "via", gw_if.ipv6])

    def _build_bridge(self, ip: str) -> None:
        """The gateway's bridge with both veths as ports. No STP (two ports, no loop): ports
        forward as soon as they are up. No IPv6 on the bridge or its ports, so the gateway sends
        no router or neighbour solicitations of its own: only the end hosts talk."""
        i = self.info
        gw = i.gw_client.netns
        for dev in (i.bridge, i.gw_client.ifname, i.gw_server.ifname):
            if dev == i.bridge:
                sysutil.run([ip, "-n", gw, "link", "add", dev, "type", "bridge", "stp_state", "0"],
                            what=f"creating bridge {dev}")
            sysutil.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=1"], netns=gw)
        for port in (i.gw_client.ifname, i.gw_server.ifname):
            sysutil.run([ip, "-n", gw, "link", "set", port, "master", i.bridge])
        # br_netfilter hands bridged IP to iptables (as a new namespace does by default): the bench's
        # iptables modes (nfq-all, ct-new, ...) queue nothing without it. Said here, not assumed.
        sysutil.run(["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1",
                     "net.bridge.bridge-nf-call-ip6tables=1"], netns=gw)
        sysutil.run([ip, "-n", gw, "link", "set", i.bridge, "up"])

    def down(self) -> list[str]:
        """Remove the lab's namespaces (which removes their veths, iptables rules and XDP/tc
        programs) and its record. Idempotent; returns the namespaces that were removed."""
        sysutil.require_root("lab down")
        removed = []
        present = existing_netns()
        for ns in self.namespaces:
            if ns in present:
                # Stop whatever still runs in there (servers we started), then delete.
                _kill_netns_pids(ns)
                sysutil.run([sysutil.which("ip"), "netns", "del", ns], what=f"removing namespace {ns}")
                removed.append(ns)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record_path)
        # hybrid attached in the gateway lived and died with the namespace; its pins and state
        # file live outside it (bpffs, /run) and go now.
        purge_instance(self.info.gw_client.netns)
        return removed

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # -- running things inside ---------------------------------------------------------------
    def run(self, role: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return sysutil.run(argv, netns=self.netns(role), **kw)

    def popen(self, role: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a long-running program in a namespace (the caller stops it)."""
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        return subprocess.Popen(sysutil.netns_prefix(self.netns(role)) + list(argv), **kw)

    def status(self) -> dict:
        present = existing_netns()
        state = {ns: ns in present for ns in self.namespaces}
        return {"name": self.name, "up": all(state.values()), "namespaces": state,
                "recorded": os.path.exists(self.record_path)}

    def ping(self, src_role: str, dst: str, count: int = 1, timeout: float = 2) -> bool:
        proc = self.run(src_role, ["ping", "-n", "-q", "-c", str(count), "-W", str(int(timeout)), dst],
                        check=False, timeout=timeout * count + 5)
        return proc.returncode == 0


def recorded_labs() -> list[str]:
    try:
        return sorted(f[:-5] for f in os.listdir(inst.LABS) if f.endswith(".json"))
    except FileNotFoundError:
        return []


def _kill_netns_pids(ns: str) -> None:
    proc = sysutil.run([sysutil.which("ip"), "netns", "pids", ns], check=False)
    for pid in proc.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


# -- per-thread namespace switching ----------------------------------------------------------
# A network namespace is a per-thread attribute: a thread may setns() into a lab namespace,
# open sockets there (they stay bound to it), and switch back, without touching other threads.
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``name``. Sockets created in
    the body belong to that namespace for their whole life."""
    path = f"/run/netns/{name}"
    if not os.path.exists(path):
        raise NotFoundError(f"network namespace {name!r} does not exist")
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise HybridError(f"setns into {name}: {os.strerror(err)}", errno=err)
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:  # pragma: no cover - would be a kernel bug
                raise HybridError("cannot return to the original network namespace")
    finally:
        os.close(target)
        os.close(home)
