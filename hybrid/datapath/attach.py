"""Attach and detach: the lifecycle of one hybrid instance (one per network namespace).

Attach is a transaction: every step that changes the system registers its undo on an ExitStack,
so a failure half-way (a missing second interface, a foreign XDP program, a netfilter error)
leaves the system exactly as it was. Every step is also written to a state file *before* the
step runs, so ``detach`` from a fresh process, after ``kill -9`` of whoever attached, knows what to
look for; and it never trusts the file alone: it reads back what is attached (program names via
netlink and bpf()) and removes only what is hybrid's.

Where things live:
- state: hybrid.instance.state_path(instance) (root only, 0600);
- maps: pinned in <bpffs>/<instance>/ (see hybrid.bpffs), reopened by the next attach so that
  verdicts and counters survive a restart;
- programs: attached to the interfaces (XDP and clsact ingress), referenced by nothing else.

On a bridge (docs/deployment.md, "On a bridge"): naming a bridge attaches to its Ethernet ports,
and naming ports of a bridge is bridge mode too. Bridged packets meet iptables only through
br_netfilter, so attach sets the namespace's ``net.bridge.bridge-nf-call-iptables`` /
``-ip6tables`` (per family queued) and ``bridge-nf-filter-vlan-tagged`` to 1, in the same
transaction (undone on failure), their old values written ahead in the state file; detach puts
back each value hybrid set, unless someone changed it meanwhile (then it is left and said). A
bridge table (hybrid.kernel.netfilter, "bridge mode") drops the flagged frames br_netfilter cannot
queue (two VLAN tags).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from hybrid import instance as inst
from hybrid.datapath import loader
from hybrid.datapath.maps import Maps, format_prefix, parse_cidr
from hybrid.datapath.options import AttachOptions
from hybrid.errors import ConfigError, HybridError, KernelFeatureError, NotFoundError, PrivilegeError
from hybrid.kernel import abi, bpffs, bpfsys, netfilter, netlink, sysutil

log = logging.getLogger(__name__)

TC_PREF = 1
TC_HANDLE = 0x4859          # "HY": identifies our filter next to others on the same hook


# -- state file ----------------------------------------------------------------------------------
@dataclass
class IfaceState:
    ifname: str
    ifindex: int
    xdp_mode: str             # "native", "generic" or "off" (the mode actually used)
    clsact_created: bool      # we added the clsact qdisc, so we may remove it when it is empty
    attached_at: float = 0.0


@dataclass
class State:
    instance: str
    pin_dir: str
    options: dict = field(default_factory=dict)
    interfaces: dict[str, IfaceState] = field(default_factory=dict)
    netfilter: dict | None = None
    bridges: dict[str, list[str]] = field(default_factory=dict)    # bridge -> its ports hybrid attached to
    sysctls: dict[str, list[str]] = field(default_factory=dict)    # sysctl -> [value before attach, value set]

    @staticmethod
    def path(instance: str) -> str:
        return inst.state_path(instance)

    @classmethod
    def load(cls, instance: str) -> State | None:
        try:
            with open(cls.path(instance)) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except PermissionError:
            raise PrivilegeError("hybrid's state is readable by root only: run it with sudo") from None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state %s: %s", cls.path(instance), exc)
            return None
        ifaces = {k: IfaceState(**v) for k, v in raw.get("interfaces", {}).items()}
        return cls(raw["instance"], raw["pin_dir"], raw.get("options", {}), ifaces, raw.get("netfilter"),
                   raw.get("bridges", {}), raw.get("sysctls", {}))

    def save(self) -> None:
        inst.make_dirs(self.instance)
        inst.write_json(self.path(self.instance), asdict(self), indent=1)

    def remove(self) -> None:
        inst.remove(self.instance)


_ETHERNET_HINT = "attach to an Ethernet interface (a bridge port, a veth, a NIC)"


def link_type_refusal(ifname: str, link_type: int) -> str | None:
    """Why hybrid cannot attach to a link of this hardware type (ARPHRD_*), or None when it can.
    Both programs parse from an Ethernet header: on a layer-3 device (WireGuard, tun, PPP, GRE)
    the packet starts at the IP header, which would be read as MAC addresses and an EtherType,
    and every packet would pass unflagged. Decided by the hardware type, never by the name."""
    if link_type == netlink.ARPHRD_ETHER:
        return None
    kind = netlink.link_type_name(link_type)
    if link_type == netlink.ARPHRD_LOOPBACK:
        return (f"{ifname} is the loopback device (link type {kind}): it carries this host's traffic to "
                f"itself, not traffic hybrid can gate; {_ETHERNET_HINT}")
    if link_type in netlink.ARPHRD_LAYER3:
        return (f"{ifname} is a layer-3 device (link type {kind}): its packets have no Ethernet header "
                f"and hybrid parses Ethernet frames; {_ETHERNET_HINT}")
    return f"{ifname} is not an Ethernet device (link type {kind}): hybrid parses Ethernet frames; {_ETHERNET_HINT}"


def choose_xdp_mode(requested: str, link: netlink.LinkInfo) -> str:
    """The XDP mode for one interface. ``auto`` never picks a mode that costs throughput on the
    interface at hand. On veth (measured in docs/design.md, "XDP mode") native XDP strips the peer's
    software GSO and generic XDP copies every GSO super-packet, and the skb already exists, so
    dropping at tc is as early as XDP would be. auto: veth and other virtual
    links -> off (tc enforces blocks), physical NICs -> native (drop before any skb exists)."""
    if requested != "auto":
        return requested
    return "off" if link.kind is not None else "native"


# -- attach --------------------------------------------------------------------------------------
@dataclass
class AttachResult:
    instance: str
    pin_dir: str
    interfaces: dict[str, str]   # ifname -> xdp mode used
    reused_pins: bool
    bridges: dict[str, list[str]] = field(default_factory=dict)   # bridge -> ports attached
    sysctls: dict[str, str] = field(default_factory=dict)         # sysctl -> value set


# -- bridges ---------------------------------------------------------------------------------------
BRIDGE_SYSCTLS = "/proc/sys/net/bridge"
NF_CALL = {"ipv4": "net.bridge.bridge-nf-call-iptables", "ipv6": "net.bridge.bridge-nf-call-ip6tables"}
# VLAN-tagged IP frames reach iptables only with this on; the BPF programs parse and flag tagged
# frames like untagged ones, so with it off a flagged tagged frame would cross the bridge
# unqueued: an attacker tags (VID 0, a priority tag, is taken as untagged by every Linux receiver)
# and is never inspected (tests/integration/test_bridge_gateway.py shows it).
VLAN_TAGGED = "net.bridge.bridge-nf-filter-vlan-tagged"
BR_NETFILTER_NEEDED = ("bridge mode needs br_netfilter (/proc/sys/net/bridge is missing): "
                       "modprobe br_netfilter, or a kernel with CONFIG_BRIDGE_NETFILTER")


def bridge_sysctls(families) -> list[str]:
    """The sysctls bridge mode sets to 1, for the netfilter families queued."""
    return [NF_CALL[f] for f in families if f in NF_CALL] + [VLAN_TAGGED]


def resolve_links(names: Sequence[str]) -> tuple[dict[str, netlink.LinkInfo], dict[str, list[str]]]:
    """(the links to attach to, by name; the bridges involved -> their ports among those). A
    bridge stands for its ports; a port stands for itself and makes its bridge involved. Every
    link must exist and be Ethernet, else nothing changes (one ConfigError/NotFoundError line)."""
    links: dict[str, netlink.LinkInfo] = {}
    bridges: dict[str, list[str]] = {}
    for name in names:
        link = netlink.link_info(name)
        if link.kind == "bridge":
            ports = netlink.bridge_ports(name)
            if not ports:
                raise ConfigError(f"{name} is a bridge with no port: hybrid inspects a bridge on its ports; "
                                  f"add them first (ip link set PORT master {name})")
            for port in ports:
                plink = netlink.link_info(port)
                if refusal := link_type_refusal(port, plink.link_type):
                    raise ConfigError(f"bridge {name}: {refusal}")
                links[port] = plink
                bridges.setdefault(name, []).append(port)
            continue
        if refusal := link_type_refusal(link.ifname, link.link_type):
            raise ConfigError(refusal)
        links[name] = link
        if link.master:
            master = netlink.ifname(link.master)
            if master and netlink.link_info(master).kind == "bridge":
                bridges.setdefault(master, []).append(name)
    return links, {br: sorted(set(ports)) for br, ports in bridges.items()}


def _set_sysctls(undo: contextlib.ExitStack, state: State, wanted: list[str]) -> dict[str, str]:
    """Set each of ``wanted`` to 1, writing its old value to the state file first; a sysctl
    hybrid set before (a re-attach) keeps the old value recorded then. Sysctls set by an earlier
    attach and no longer wanted are put back."""
    if not os.path.isdir(BRIDGE_SYSCTLS):
        raise KernelFeatureError(BR_NETFILTER_NEEDED)
    for name in [n for n in state.sysctls if n not in wanted]:
        _restore_sysctl(name, *state.sysctls.pop(name))
    for name in wanted:
        now = sysutil.read_sysctl(name)
        if now is None:
            raise KernelFeatureError(f"{name} is missing: {BR_NETFILTER_NEEDED}")
        if name not in state.sysctls:
            state.sysctls[name] = [now, "1"]
            state.save()                       # write-ahead: a kill -9 after the write still restores
            undo.callback(_undo_sysctl, state, name)
        if now != "1":
            sysutil.write_sysctl(name, "1")
    return dict.fromkeys(wanted, "1")


def _undo_sysctl(state: State, name: str) -> None:
    old, _ = state.sysctls.pop(name)
    with contextlib.suppress(HybridError):
        sysutil.write_sysctl(name, old)
    if state.interfaces:
        state.save()


def _restore_sysctl(name: str, old: str, set_to: str) -> str:
    """Put a sysctl back to its value before attach, unless someone changed it since hybrid set
    it; a line saying what happened."""
    try:
        now = sysutil.read_sysctl(name)
        if now is None:
            return f"{name} is gone (br_netfilter unloaded?): nothing to restore"
        if now == old:
            return f"{name} is {old} as before attach"
        if now != set_to:
            return f"{name} left at {now}: changed by someone else since attach (was {old}, hybrid set {set_to})"
        sysutil.write_sysctl(name, old)
        return f"{name} restored to {old}"
    except HybridError as exc:
        return f"{name} not restored to {old}: {exc}"


def restore_sysctls(state: State) -> list[str]:
    """Put back every sysctl the state says hybrid set (see _restore_sysctl); lines for people."""
    out = [_restore_sysctl(name, *vals) for name, vals in state.sysctls.items()]
    state.sysctls.clear()
    return out


def unattached_ports(state: State | None) -> dict[str, list[str]]:
    """Ports of each bridge hybrid is attached to that hybrid is not attached to (added to the
    bridge after attach: their traffic is not inspected). Bridges that are gone are skipped."""
    out = {}
    for br in (state.bridges if state else {}):
        try:
            ports = netlink.bridge_ports(br)
        except HybridError:
            continue
        missing = [p for p in ports if p not in state.interfaces]
        if missing:
            out[br] = missing
    return out


def attach(opts: AttachOptions) -> AttachResult:
    """Attach hybrid to ``opts.interfaces`` in the current network namespace (or re-attach:
    programs are replaced in place, pinned state is reused, rules are never duplicated)."""

    sysutil.require_root("attach")
    opts.validate()
    links, bridges = resolve_links(opts.interfaces)   # all exist and are Ethernet, or nothing changes
    if bridges and "forward" not in opts.hooks:
        raise ConfigError(f"bridge {', '.join(bridges)}: bridged packets meet iptables in FORWARD "
                          "(through br_netfilter); attach with the forward hook")
    if bridges and not os.path.isdir(BRIDGE_SYSCTLS):
        raise KernelFeatureError(BR_NETFILTER_NEEDED)
    instance = inst.name()
    old = State.load(instance)
    pin_dir = os.path.join(bpffs.ensure(), instance)   # how this process reaches it
    reused = os.path.isdir(pin_dir) and bool(os.listdir(pin_dir))

    with contextlib.ExitStack() as undo:
        if not reused:
            undo.callback(_remove_pins, pin_dir)
        os.makedirs(pin_dir, mode=0o700, exist_ok=True)
        state = old or State(instance, "")
        state.pin_dir = os.path.join(bpffs.bpffs_root(), instance)   # canonical, for people and files
        state.options = asdict(opts)
        if old is None:
            undo.callback(state.remove)

        dp = loader.compile_datapath(pin_dir, flow_table_size=opts.flow_table_size, names=opts.name_cache)
        undo.callback(dp.close)
        maps = dp.maps()
        undo.callback(maps.close)
        old_cfg = maps.get_config() if reused else None
        _apply_config(maps, opts, old_cfg)
        if old_cfg is not None:
            undo.callback(maps.set_config, old_cfg)

        # The queue rule goes in before any program can mark a packet: a flow already flowing at
        # attach time spends its first-N budget on its next packets, and if those were marked
        # before the rule existed they would pass unqueued and the flow would stay uninspected
        # until its next SYN (found by the service restart test).
        rule = opts.queue_rule()
        state.netfilter = asdict(rule)
        state.save()
        # Bridged packets reach the queue rule only through br_netfilter: on before any mark.
        sysctls: dict[str, str] = {}
        if bridges:
            undo.callback(setattr, state, "bridges", {k: list(v) for k, v in state.bridges.items()})
            for br, ports in bridges.items():
                state.bridges[br] = sorted(set(state.bridges.get(br, [])) | set(ports))
            sysctls = _set_sysctls(undo, state, bridge_sysctls(rule.families))
            had_table = netfilter.bridge_installed()
            netfilter.bridge_install(rule.mark_value, rule.mark_mask)   # what br_netfilter cannot queue
            if not had_table:
                undo.callback(netfilter.bridge_remove)
        netfilter.install(rule)
        undo.callback(netfilter.remove, rule.families)
        # Other families we installed before (a re-attach that drops ipv6) must not linger.
        stale = [f for f in netfilter.FAMILIES if f not in rule.families]
        if stale:
            netfilter.remove(stale)

        used = {}
        for name, link in links.items():
            mode = choose_xdp_mode(opts.xdp_mode, link)
            prev = state.interfaces.get(name)
            ist = IfaceState(name, link.ifindex, mode,
                             clsact_created=prev.clsact_created if prev else not netlink.has_clsact(name),
                             attached_at=time.time())
            state.interfaces[name] = ist
            state.save()   # write-ahead: a kill -9 from here on still leaves a findable record
            if prev is None:
                undo.callback(_forget_iface, state, name)
            _attach_iface(undo, dp, maps, ist, link, prev)
            used[name] = mode

        state.save()
        undo.pop_all()
    maps.close()
    dp.close()
    log.info("attached %s in instance %s", ", ".join(f"{k} (xdp {v})" for k, v in used.items()), instance)
    return AttachResult(instance, state.pin_dir, used, reused, dict(state.bridges), sysctls)


def _apply_config(maps, opts: AttachOptions, old_cfg) -> None:
    """Make the maps say exactly what ``opts`` says. On a re-attach the pinned maps still hold
    the previous options: ports and prefixes no longer asked for are removed, so attaching
    again means "this configuration", not "this configuration added to the last one"."""
    cfg = opts.config()
    with maps.config_lock():     # engines and the CrowdSec link may write it meanwhile
        if old_cfg is not None:
            # Keep what the maps API maintains (HAVE_PORTS/PREFIXES/BANS: the pinned tables keep
            # their entries) and what a running engine declared (skip_reasons); the options own the rest.
            now = maps.get_config()
            cfg.flags |= now.flags & (abi.CFG_HAVE_PORTS | abi.CFG_HAVE_PREFIXES | abi.CFG_HAVE_BANS)
            cfg.skip_reasons = now.skip_reasons
        maps.set_config(cfg)
    wanted_prefixes: dict[str, int] = {}
    for cidrs, action in ((opts.watch_prefixes, abi.PREFIX_WATCH), (opts.block_prefixes, abi.PREFIX_BLOCK)):
        for cidr in cidrs:
            canon = format_prefix(parse_cidr(cidr))
            wanted_prefixes[canon] = wanted_prefixes.get(canon, 0) | action
    for port in set(maps.watched_ports()) - set(opts.watch_ports):
        maps.unwatch_port(port)
    for cidr in set(maps.prefixes()) - set(wanted_prefixes):
        maps.del_prefix(cidr)
    for port in opts.watch_ports:
        maps.watch_port(port)
    for cidr, action in wanted_prefixes.items():
        maps.add_prefix(cidr, action)


def _attach_iface(undo: contextlib.ExitStack, dp, maps, ist: IfaceState, link: netlink.LinkInfo,
                  prev: IfaceState | None) -> None:
    name = ist.ifname
    maps.register_iface(link.ifindex, abi.IFACE_XDP if ist.xdp_mode != "off" else 0)
    if prev is None:
        undo.callback(maps.unregister_iface, link.ifindex)

    # tc first: classification and marking must be in place before anything is dropped early.
    if ist.clsact_created and not netlink.has_clsact(name):
        netlink.clsact_add(name)
        undo.callback(_remove_clsact_if_empty, name)
    ours = [f for f in netlink.ingress_filters(name) if _is_our_filter(f)]
    netlink.tc_filter_add(name, dp.tc_fd, abi.PROG_TC, TC_PREF, TC_HANDLE, replace=bool(ours))
    if not ours:
        undo.callback(netlink.tc_filter_del, name, TC_PREF, TC_HANDLE)

    # XDP: replace our own program atomically; never a foreign one.
    current = link.xdp_prog_id
    ours_xdp = current and _prog_name(current) == abi.PROG_XDP
    if ist.xdp_mode == "off":
        if ours_xdp:
            netlink.xdp_detach(name, link.driver_xdp or "generic")
        return
    if current and not ours_xdp:
        raise HybridError(f"{name} already has a foreign XDP program (id {current}): detach it, "
                          "or attach with --xdp-mode off")
    if ours_xdp and link.driver_xdp != ist.xdp_mode:
        netlink.xdp_detach(name, link.driver_xdp)
        ours_xdp = False
    if ours_xdp:
        with _prog_fd(current) as old_fd:
            netlink.xdp_attach(name, dp.xdp_fd, ist.xdp_mode, replace_prog_fd=old_fd)
    else:
        netlink.xdp_attach(name, dp.xdp_fd, ist.xdp_mode)
        undo.callback(_xdp_detach_quiet, name, ist.xdp_mode)


def _is_our_filter(f: netlink.TcFilter) -> bool:
    return f.kind == "bpf" and (f.bpf_name or "").startswith(abi.PROG_TC) and \
        (f.pref, f.handle) == (TC_PREF, TC_HANDLE)


def _prog_name(prog_id: int) -> str | None:
    """Name of a loaded program by id (None if it vanished meanwhile)."""
    try:
        with _prog_fd(prog_id) as fd:
            return bpfsys.prog_info(fd).name
    except HybridError:
        return None


@contextlib.contextmanager
def _prog_fd(prog_id: int):
    fd = bpfsys.prog_get_fd_by_id(prog_id)
    try:
        yield fd
    finally:
        os.close(fd)


def _xdp_detach_quiet(name: str, mode: str) -> None:
    with contextlib.suppress(HybridError):
        netlink.xdp_detach(name, mode)


def _remove_clsact_if_empty(name: str) -> None:
    with contextlib.suppress(NotFoundError):
        if not netlink.ingress_filters(name):
            netlink.clsact_del(name)


def _forget_iface(state: State, name: str) -> None:
    state.interfaces.pop(name, None)
    if state.interfaces:
        state.save()


def _remove_pins(pin_dir: str) -> None:
    shutil.rmtree(pin_dir, ignore_errors=True)   # unlinking a pin drops its reference


# -- detach --------------------------------------------------------------------------------------
@dataclass
class DetachResult:
    instance: str
    interfaces: list[str]             # interfaces we removed something from
    netfilter_families: list[str]     # families whose rules we removed
    pins_removed: bool
    remaining: list[str]              # interfaces still attached
    kept_clsact: list[str] = field(default_factory=list)  # clsact qdiscs left: not known to be ours
    sysctls: list[str] = field(default_factory=list)      # what became of the bridge sysctls hybrid set


def detach(interfaces: Sequence[str] | None = None) -> DetachResult:
    """Remove hybrid from the named interfaces, or from everything when ``interfaces`` is None.
    Idempotent, and works without the state file (it then looks for hybrid's programs on every
    interface and for hybrid's chain)."""
    sysutil.require_root("detach")
    instance = inst.name()
    state = State.load(instance)
    known = set(state.interfaces) if state else set()
    if interfaces is None:
        targets = sorted(known | set(discover_attached()))
    else:
        targets = []
        for name in interfaces:      # a bridge stands for its ports (the state's, else the kernel's)
            targets += state.bridges[name] if state and name in state.bridges else _ports_if_bridge(name)
        targets = list(dict.fromkeys(targets))
    touched, kept_clsact = [], []
    maps = open_maps(state)
    try:
        for name in targets:
            ist = state.interfaces.get(name) if state else None
            if _detach_iface(name, ist, maps):
                touched.append(name)
            if ist is None and _has_clsact(name):
                kept_clsact.append(name)
            if state:
                state.interfaces.pop(name, None)
    finally:
        if maps is not None:
            maps.close()
    remaining = sorted(state.interfaces) if state else []
    families, pins_removed, sysctls = [], False, []
    if state:
        for br in list(state.bridges):
            state.bridges[br] = [p for p in state.bridges[br] if p in state.interfaces]
            if not state.bridges[br]:
                del state.bridges[br]
        if not state.bridges and state.sysctls:    # no bridge port left attached
            sysctls = restore_sysctls(state)
    if not remaining:
        families = netfilter.remove()
        if netfilter.bridge_remove():
            families.append("bridge")
        pin_dir = pin_access(instance)
        if pin_dir and os.path.isdir(pin_dir):
            _remove_pins(pin_dir)
            pins_removed = True
        inst.remove(instance)
    elif state:
        state.save()
    return DetachResult(instance, touched, families, pins_removed, remaining, kept_clsact, sysctls)


def _ports_if_bridge(name: str) -> list[str]:
    """A bridge's ports, or [name] for any other link (or one that is gone)."""
    try:
        if netlink.link_info(name).kind == "bridge":
            return netlink.bridge_ports(name) or [name]
    except HybridError:
        pass
    return [name]


def pin_access(instance: str) -> str | None:
    """The path through which this process reaches the instance's pins (see hybrid.bpffs)."""
    base = bpffs.locate()
    return os.path.join(base, instance) if base else None


def open_maps(state: State | None):
    path = pin_access(state.instance) if state else None
    if path is None:
        return None
    try:
        return Maps.open_pinned(path)
    except HybridError:
        return None


def _detach_iface(name: str, ist: IfaceState | None, maps) -> bool:
    try:
        link = netlink.link_info(name)
    except NotFoundError:
        return ist is not None   # the interface is gone, and with it whatever was attached
    did = False
    if link.xdp_prog_id and _prog_name(link.xdp_prog_id) == abi.PROG_XDP:
        netlink.xdp_detach(name, link.driver_xdp if link.driver_xdp in netlink.XDP_MODE_FLAGS else "generic")
        did = True
    for f in netlink.ingress_filters(name):
        if _is_our_filter(f):
            netlink.tc_filter_del(name, f.pref, f.handle)
            did = True
    if ist is not None and ist.clsact_created:
        _remove_clsact_if_empty(name)
    if maps is not None:
        with contextlib.suppress(HybridError):
            maps.unregister_iface(link.ifindex)
    return did


def _has_clsact(name: str) -> bool:
    try:
        return netlink.has_clsact(name)
    except NotFoundError:
        return False


def programs_on(name: str) -> tuple[bool, bool]:
    """(hybrid's XDP program is attached, hybrid's tc filter is attached) on interface ``name``;
    NotFoundError when the interface is gone."""
    link = netlink.link_info(name)
    xdp = bool(link.xdp_prog_id) and _prog_name(link.xdp_prog_id) == abi.PROG_XDP
    return xdp, any(_is_our_filter(f) for f in netlink.ingress_filters(name))


def _has_our_programs(name: str) -> bool:
    try:
        return any(programs_on(name))
    except NotFoundError:
        return False


def discover_attached() -> list[str]:
    """Interfaces in this namespace that carry a hybrid program (for detach without state)."""
    out = []
    for name in _all_ifnames():
        with contextlib.suppress(HybridError):
            if _has_our_programs(name):
                out.append(name)
    return out


def _all_ifnames() -> list[str]:
    proc = sysutil.run(["ip", "-j", "link", "show"])
    return [link["ifname"] for link in json.loads(proc.stdout)]


# -- forgetting -----------------------------------------------------------------------------------
def purge_instance(instance: str) -> None:
    """Forget an instance whose network namespace is gone (lab down): its pins and state.
    The kernel already dropped its programs and rules with the namespace."""
    pin_dir = pin_access(instance)
    if pin_dir and os.path.isdir(pin_dir):
        _remove_pins(pin_dir)
    inst.remove(instance)

