"""Netlink plumbing (pyroute2), in the current network namespace: links, XDP, clsact and cls_bpf.

Everything here works from a fresh process that knows only interface names: what is attached is
read back from the kernel (program ids), never assumed. pyroute2's ``NetlinkError`` is turned
into :class:`~hybrid.errors.HybridError` with the operation and interface named.
"""

from __future__ import annotations

import contextlib
import errno as E
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hybrid.errors import HybridError, KernelFeatureError, NotFoundError
from hybrid.kernel import sysutil

log = logging.getLogger(__name__)

# linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
XDP_MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}
# IFLA_XDP_ATTACHED as pyroute2 decodes it
_ATTACHED = {None: None, "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}

INGRESS_PARENT = 0xFFFFFFF2   # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
ETH_P_ALL = 0x0003

# linux/if_arp.h: a link's hardware type (ifinfomsg.ifi_type). The names are the ones
# 'ip link' prints after "link/" (iproute2's lib/ll_types.c).
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
# Layer-3 devices: no link-layer header, skb->data (tc) and xdp->data start at the IP header.
ARPHRD_LAYER3 = {
    0xFFFE: "none",       # ARPHRD_NONE: WireGuard, tun, bareudp
    512: "ppp",           # ARPHRD_PPP
    519: "rawip",         # ARPHRD_RAWIP: some cellular modems (qmi_wwan raw-ip)
    768: "ipip",          # ARPHRD_TUNNEL
    769: "tunnel6",       # ARPHRD_TUNNEL6: ip6tnl
    776: "sit",           # ARPHRD_SIT
    778: "gre",           # ARPHRD_IPGRE (gretap is Ethernet)
    823: "gre6",          # ARPHRD_IP6GRE (ip6gretap is Ethernet)
}
_ARPHRD_NAMES = {ARPHRD_ETHER: "ether", ARPHRD_LOOPBACK: "loopback", 32: "infiniband", 280: "can",
                 0xFFFF: "void", **ARPHRD_LAYER3}


def link_type_name(link_type: int) -> str:
    """``ip link``'s name for a hardware type, or its number when it is not one we name."""
    return _ARPHRD_NAMES.get(link_type, str(link_type))


@contextlib.contextmanager
def _ipr() -> Iterator[IPRoute]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _err(action: str, ifname: str, exc: NetlinkError) -> HybridError:
    code = exc.code
    msg = f"{action} on {ifname}: {exc.args[1] if len(exc.args) > 1 else exc}"
    if code in (E.EOPNOTSUPP, E.EINVAL) and "xdp" in action.lower():
        return KernelFeatureError(msg + " (try --xdp-mode generic, or off)", errno=code)
    if code == E.EPERM:
        return HybridError(msg + " (needs CAP_NET_ADMIN and CAP_BPF: run as root)", errno=code)
    return HybridError(msg, errno=code)


def ifindex(ifname: str) -> int:
    with _ipr() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise NotFoundError(f"interface {ifname!r} does not exist in this network namespace "
                            "(check 'ip link'; inside a namespace run through 'ip netns exec NS')")
    return idx[0]


def ifname(index: int) -> str | None:
    with _ipr() as ipr:
        try:
            link = ipr.get_links(index)[0]
        except NetlinkError:
            return None
    return link.get_attr("IFLA_IFNAME")


@dataclass
class LinkInfo:
    ifname: str
    ifindex: int
    kind: str | None          # "veth", "bridge", ... ; None for physical NICs
    link_type: int            # hardware type, ARPHRD_* (ARPHRD_ETHER for NICs, veth, bridge, tap)
    driver_xdp: str | None    # "native"/"generic"/... when an XDP program is attached
    xdp_prog_id: int
    oper_up: bool
    master: int = 0           # ifindex of the device this one is enslaved to (a bridge's port: the bridge)


def link_info(name: str) -> LinkInfo:
    idx = ifindex(name)
    with _ipr() as ipr:
        link = ipr.get_links(idx)[0]
    kind = None
    linkinfo = link.get_attr("IFLA_LINKINFO")
    if linkinfo is not None:
        kind = linkinfo.get_attr("IFLA_INFO_KIND")
    mode, prog = None, 0
    xdp = link.get_attr("IFLA_XDP")
    if xdp is not None:
        mode = _ATTACHED.get(xdp.get_attr("IFLA_XDP_ATTACHED"), "unknown")
        prog = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
    return LinkInfo(name, idx, kind, link["ifi_type"], mode, prog, link.get_attr("IFLA_OPERSTATE") == "UP",
                    link.get_attr("IFLA_MASTER") or 0)


def bridge_ports(name: str) -> list[str]:
    """The names of the ports of bridge ``name`` (the links enslaved to it), sorted. Read through
    netlink, so it answers for the network namespace we run in (sysfs may show another one)."""
    idx = ifindex(name)
    with _ipr() as ipr:
        links = ipr.get_links()
    return sorted(ln.get_attr("IFLA_IFNAME") for ln in links if ln.get_attr("IFLA_MASTER") == idx)


def xdp_attach(name: str, prog_fd: int, mode: str, *, replace_prog_fd: int | None = None) -> None:
    """Attach an XDP program. Never silently replaces a foreign program: without
    ``replace_prog_fd`` the attach fails if any program is there; with it, the kernel swaps
    atomically only if that exact program is still attached."""
    flags = XDP_MODE_FLAGS[mode]
    attrs = [("IFLA_XDP_FD", prog_fd)]
    if replace_prog_fd is None:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
    else:
        flags |= XDP_FLAGS_REPLACE
        attrs.append(("IFLA_XDP_EXPECTED_FD", replace_prog_fd))
    attrs.append(("IFLA_XDP_FLAGS", flags))
    idx = ifindex(name)
    with _ipr() as ipr:
        try:
            ipr.link("set", index=idx, xdp={"attrs": attrs})
        except NetlinkError as exc:
            if exc.code == E.EBUSY:
                raise HybridError(f"attaching XDP ({mode}) on {name}: another XDP program is attached "
                                  "(see 'ip link show'; detach it or use --xdp-mode off)", errno=exc.code) from None
            raise _err(f"attaching XDP ({mode})", name, exc) from None


def xdp_detach(name: str, mode: str) -> None:
    idx = ifindex(name)
    with _ipr() as ipr:
        try:
            ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", XDP_MODE_FLAGS[mode])]})
        except NetlinkError as exc:
            raise _err(f"detaching XDP ({mode})", name, exc) from None


# -- tc ----------------------------------------------------------------------------------------
def has_clsact(name: str) -> bool:
    idx = ifindex(name)
    with _ipr() as ipr:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(idx))


def clsact_add(name: str) -> None:
    idx = ifindex(name)
    with _ipr() as ipr:
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as exc:
            if exc.code == E.ENOENT or exc.code == E.EOPNOTSUPP:
                raise KernelFeatureError(f"adding a clsact qdisc on {name}: {exc.args[1]} "
                                         "(the kernel needs CONFIG_NET_SCH_INGRESS)", errno=exc.code) from None
            raise _err("adding a clsact qdisc", name, exc) from None


def clsact_del(name: str) -> None:
    idx = ifindex(name)
    with _ipr() as ipr:
        try:
            ipr.tc("del", "clsact", idx)
        except NetlinkError as exc:
            if exc.code not in (E.ENOENT, E.EINVAL):
                raise _err("removing the clsact qdisc", name, exc) from None


@dataclass
class TcFilter:
    pref: int
    handle: int
    kind: str
    bpf_name: str | None
    prog_id: int


def ingress_filters(name: str) -> list[TcFilter]:
    """Filters on the clsact ingress hook, with their BPF program ids. Read through
    ``tc -j`` because pyroute2 0.9.7 does not decode TCA_BPF_ID."""
    ifindex(name)   # a clear NotFoundError first
    proc = sysutil.run(["tc", "-j", "filter", "show", "dev", name, "ingress"], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []   # no clsact qdisc: nothing attached
    out = []
    for f in json.loads(proc.stdout):
        if "options" not in f:    # the per-pref chain header, not a filter
            continue
        opts = f["options"]
        handle = opts.get("handle", "0")
        out.append(TcFilter(pref=f.get("pref", 0), handle=int(handle, 16) if isinstance(handle, str) else handle,
                            kind=f.get("kind", ""), bpf_name=opts.get("bpf_name"),
                            prog_id=(opts.get("prog") or {}).get("id", 0)))
    return out


def tc_filter_add(name: str, prog_fd: int, prog_name: str, pref: int, handle: int, *, replace: bool = False) -> None:
    idx = ifindex(name)
    with _ipr() as ipr:
        try:
            ipr.tc("replace-filter" if replace else "add-filter", "bpf", idx, handle, fd=prog_fd, name=prog_name,
                   parent=INGRESS_PARENT, prio=pref, protocol=ETH_P_ALL, direct_action=True)
        except NetlinkError as exc:
            raise _err("adding the tc ingress filter", name, exc) from None


def tc_filter_del(name: str, pref: int, handle: int) -> None:
    idx = ifindex(name)
    with _ipr() as ipr:
        try:
            ipr.tc("del-filter", "bpf", idx, handle, parent=INGRESS_PARENT, prio=pref, protocol=ETH_P_ALL)
        except NetlinkError as exc:
            if exc.code not in (E.ENOENT, E.EINVAL):
                raise _err("removing the tc ingress filter", name, exc) from None
