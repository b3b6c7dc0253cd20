"""A fleet of lab gateways: a management network that joins several labs' gateways to one host
(where a CrowdSec Local API runs), for the fleet tests and benchmarks.

::

    [NAME-mgmt] br0 198.18.200.1/24, 2001:2:0:200::1/64
        |-- veth -- [LAB1-gw] mgmt0 198.18.200.11/24
        |-- veth -- [LAB2-gw] mgmt0 198.18.200.12/24

Each gateway keeps its own client and server (hybrid/lab/topology.py); only the management
network is shared. Everything lives in namespaces: removing the management namespace removes the
bridge and every veth. No default route anywhere: nothing can leave the lab.
"""

from __future__ import annotations

import contextlib
import logging

from hybrid.errors import HybridError
from hybrid.kernel import sysutil
from hybrid.lab.topology import NAME_RE, _kill_netns_pids, existing_netns

log = logging.getLogger(__name__)

MGMT_V4 = "198.18.200"
MGMT_V6 = "2001:2:0:200"


class FleetNet:
    """``with FleetNet(name) as net: net.join(lab.netns("gw"))`` ... always torn down."""

    def __init__(self, name: str):
        if not NAME_RE.match(name):
            raise HybridError(f"fleet name {name!r}: lowercase letters, digits and dashes")
        self.name = name
        self.netns = f"{name}-mgmt"
        self.ipv4, self.ipv6 = f"{MGMT_V4}.1", f"{MGMT_V6}::1"
        self.members: dict[str, str] = {}          # gateway netns -> its management IPv4 address

    def up(self) -> FleetNet:
        sysutil.require_root("fleet up")
        if self.netns in existing_netns():
            raise HybridError(f"namespace {self.netns} exists: remove it (ip netns del {self.netns})")
        ip = sysutil.which("ip")
        with contextlib.ExitStack() as undo:
            undo.callback(self.down)
            sysutil.run([ip, "netns", "add", self.netns], what=f"creating namespace {self.netns}")
            sysutil.run([ip, "-n", self.netns, "link", "set", "lo", "up"])
            sysutil.run([ip, "-n", self.netns, "link", "add", "br0", "type", "bridge"])
            sysutil.run(["sysctl", "-q", "-w", "net.ipv6.conf.br0.accept_dad=0"], netns=self.netns)
            sysutil.run([ip, "-n", self.netns, "addr", "add", f"{self.ipv4}/24", "dev", "br0"])
            sysutil.run([ip, "-n", self.netns, "addr", "add", f"{self.ipv6}/64", "dev", "br0", "nodad"])
            sysutil.run([ip, "-n", self.netns, "link", "set", "br0", "up"])
            undo.pop_all()
        return self

    def join(self, gw_netns: str) -> str:
        """Connect a gateway namespace; returns its management IPv4 address."""
        ip = sysutil.which("ip")
        n = len(self.members) + 1
        if n > 200:
            raise HybridError("a lab fleet has at most 200 gateways")
        port = f"gw{n}"
        addr4, addr6 = f"{MGMT_V4}.{10 + n}", f"{MGMT_V6}::{10 + n:x}"
        sysutil.run([ip, "-n", self.netns, "link", "add", port, "type", "veth", "peer", "name", "mgmt0",
                     "netns", gw_netns], what=f"joining {gw_netns} to {self.netns}")
        sysutil.run([ip, "-n", self.netns, "link", "set", port, "master", "br0", "up"])
        sysutil.run(["sysctl", "-q", "-w", "net.ipv6.conf.mgmt0.accept_dad=0"], netns=gw_netns)
        sysutil.run([ip, "-n", gw_netns, "addr", "add", f"{addr4}/24", "dev", "mgmt0"])
        sysutil.run([ip, "-n", gw_netns, "addr", "add", f"{addr6}/64", "dev", "mgmt0", "nodad"])
        sysutil.run([ip, "-n", gw_netns, "link", "set", "mgmt0", "up"])
        self.members[gw_netns] = addr4
        return addr4

    def down(self) -> None:
        """Remove the management namespace (its bridge and veths with it); idempotent."""
        if self.netns in existing_netns():
            _kill_netns_pids(self.netns)
            sysutil.run([sysutil.which("ip"), "netns", "del", self.netns], check=False)
        self.members.clear()

    def __enter__(self) -> FleetNet:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
