"""Typed access to one hybrid instance's maps.

Used by attach/status and by the verdict engine; it only talks to libbpf (hybrid.kernel.bpfsys), never
to bcc, so a process using it needs no compiler and no kernel headers.

Three ways to get at the maps: the pin directory (``Maps.open_pinned``), fds held by the loader
(``Maps.from_fds``), or the id of a loaded program (``Maps.from_prog_id``: the program keeps its
maps alive and lists their ids, which is how a fresh process finds the state when the pins are
unreachable). Each ``Maps`` owns its fds; close it, or use it as a context manager.

Canonical flow keys: :func:`canonical_order` (inlined in :func:`flow_key_bytes`) is the Python
twin of ``flow_key_build()`` in bpf/flow_table.h, and :func:`packet_key_ports` of the ports
``parse_packet()`` puts in a packet's key. Change both.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Mapping

from hybrid.errors import ConfigError, HybridError, NotFoundError, TableFullError
from hybrid.kernel import abi, bpfsys


log = logging.getLogger(__name__)

IPV4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

# Batch lookups that the map type does not support fail with one of these; we then walk keys.
_BATCH_UNSUPPORTED = {_errno.EINVAL, _errno.EOPNOTSUPP, 524, _errno.ENOSPC}  # 524: ENOTSUPP
_BATCH_SIZE = 1024
PRUNE_INTERVAL_NS = 1_000_000_000   # a full pinned table is swept for expired entries at most this often
# write_verdict() starts from the entry get_flow() read under the same key object when that read
# is younger than this: what tc records in between (counters, a TTL rise) is lost, as it is
# between the read and the write of any read-modify-write; the bound keeps that window short.
READ_REUSE_NS = 1_000_000

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---- pure helpers (no kernel) ---------------------------------------------------------------------
def addr16(addr: str | IPAddress) -> bytes:
    """16-byte network-order form of an address: IPv6 as is, IPv4 as IPv4-mapped IPv6."""
    try:
        ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    except ValueError as exc:
        raise ConfigError(f"'{addr}' is not an IPv4 or IPv6 address") from exc
    if ip.version == 4:
        return IPV4_MAPPED_PREFIX + ip.packed
    return ip.packed


def addr_from16(raw: bytes) -> IPAddress:
    """Inverse of :func:`addr16`: IPv4-mapped addresses come back as IPv4."""
    raw = bytes(raw)
    if raw[:12] == IPV4_MAPPED_PREFIX:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


def canonical_order(src: bytes, sport: int, dst: bytes, dport: int) -> int:
    """Direction of a packet from (src, sport) to (dst, dport): 0 when the source endpoint is
    "lo" (compares lower: memcmp of the 16-byte addresses, then the host-order port; equal
    endpoints count as lo), 1 when it is "hi". Same rule as flow_key_build() in the BPF code."""
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("addresses must be 16 bytes (IPv6 or IPv4-mapped)")
    return 1 if (src, sport) > (dst, dport) else 0


def flow_key(src: str | IPAddress, dst: str | IPAddress, sport: int, dport: int, proto: int,
             vlan: int = 0) -> tuple[abi.FlowKey, int]:
    """The canonical key of the flow a packet src:sport -> dst:dport belongs to, and the
    packet's direction (0: from lo). Ports are host-order numbers; for ICMP/ICMPv6 echo pass
    the identifier as both ports, 0 for other ICMP (:func:`packet_key_ports` picks them from a
    packet)."""
    for port in (sport, dport):
        if not 0 <= port <= 0xFFFF:
            raise ConfigError(f"port {port} is out of range 0-65535")
    if not 0 <= vlan <= 0xFFF:
        raise ConfigError(f"VLAN id {vlan} is out of range 0-4095")
    if not 0 <= proto <= 0xFF:
        raise ConfigError(f"protocol {proto} is out of range 0-255")
    return flow_key_raw(addr16(src), addr16(dst), sport, dport, proto, vlan)


def flow_key_raw(src: bytes, dst: bytes, sport: int, dport: int, proto: int,
                 vlan: int = 0) -> tuple[abi.FlowKey, int]:
    """:func:`flow_key` for addresses already in packet form (4 or 16 bytes, network order),
    unchecked."""
    raw, direction = flow_key_bytes(src, dst, sport, dport, proto, vlan)
    return abi.FlowKey.from_buffer_copy(raw), direction


# struct flow_key after the addresses: the ports in network order, then vlan and proto in host order.
_KEY_PORTS = struct.Struct("!HH")
_KEY_TAIL = struct.Struct("=HBx")


def flow_key_bytes(src: bytes, dst: bytes, sport: int, dport: int, proto: int,
                   vlan: int = 0) -> tuple[bytes, int]:
    """The flow key as the bytes of ``struct flow_key`` and the packet's direction: the verdict
    engine's per-packet path, which hands the bytes to the kernel as they are. Addresses in
    packet form (4 or 16 bytes, network order), unchecked. Much cheaper than filling an
    abi.FlowKey field by field (docs/benchmarks.md, "where the engine's time went")."""
    s = IPV4_MAPPED_PREFIX + src if len(src) == 4 else src
    d = IPV4_MAPPED_PREFIX + dst if len(dst) == 4 else dst
    tail = _KEY_TAIL.pack(vlan, proto)
    if (s, sport) > (d, dport):                    # canonical_order() == 1
        return d + s + _KEY_PORTS.pack(dport, sport) + tail, 1
    return s + d + _KEY_PORTS.pack(sport, dport) + tail, 0


# The ICMP types whose identifier keys the flow, per transport protocol, as parse_packet() in
# bpf/packet.h tests them: ICMP_ECHOREPLY and ICMP_ECHO over IPv4, ICMPV6_ECHO_REQUEST and
# ICMPV6_ECHO_REPLY over IPv6. Each family's own numbers only: an ICMP type 128 or an ICMPv6
# type 8 is no echo message and is keyed with port 0.
ECHO_TYPES = {abi.IPPROTO_ICMP: (0, 8), abi.IPPROTO_ICMPV6: (128, 129)}


def packet_key_ports(version: int, proto: int, sport: int, dport: int, l4: bytes,
                     l4_off: int) -> tuple[int, int] | None:
    """The two ports parse_packet() in bpf/packet.h keys a packet's flow by (host-order
    numbers), from the packet's IP version, transport protocol and decoded ports, and ``l4``
    holding its transport header at ``l4_off``:

    - TCP, UDP: ``(sport, dport)``;
    - ICMP over IPv4, ICMPv6 over IPv6: the echo identifier as both ports for the family's echo
      types (:data:`ECHO_TYPES`), ``(0, 0)`` for any other type;
    - ICMP over IPv6, ICMPv6 over IPv4, an ICMP header shorter than 8 bytes: ``None``, the tc
      program builds no key (it flags the packet MALFORMED);
    - any other protocol: ``(0, 0)``, the flow is keyed by addresses and protocol alone.

    Change it with parse_packet()."""
    if proto == abi.IPPROTO_TCP or proto == abi.IPPROTO_UDP:
        return sport, dport
    echo = ECHO_TYPES.get(proto)
    if echo is None:
        return 0, 0
    if (proto == abi.IPPROTO_ICMPV6) != (version == 6) or len(l4) < l4_off + 8:
        return None
    if l4[l4_off] in echo:
        ident = (l4[l4_off + 4] << 8) | l4[l4_off + 5]
        return ident, ident
    return 0, 0


def key_ports(key: abi.FlowKey) -> tuple[int, int]:
    """(port_lo, port_hi) of a key as host-order numbers."""
    return (int.from_bytes(key.port_lo.to_bytes(2, "little"), "big"),
            int.from_bytes(key.port_hi.to_bytes(2, "little"), "big"))


def format_flow_key(key: abi.FlowKey) -> str:
    """One line: ``tcp 198.18.1.2:40000 <-> 198.18.2.2:80 vlan 0`` (lo endpoint first)."""
    lo, hi = addr_from16(bytes(key.addr_lo)), addr_from16(bytes(key.addr_hi))
    plo, phi = key_ports(key)
    proto = abi.PROTO_NAMES.get(key.proto, f"proto-{key.proto}")
    return f"{proto} {_endpoints(key.proto, lo, plo, hi, phi, ' <-> ')} vlan {key.vlan}"


def _endpoints(proto: int, a: IPAddress, pa: int, b: IPAddress, pb: int, sep: str) -> str:
    """The two endpoints of a flow as FLOW arguments write them: with ports for TCP and UDP
    (IPv6 in brackets), with the echo id for ICMP, bare addresses otherwise."""
    def endpoint(ip: IPAddress, port: int) -> str:
        return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"

    if proto in (abi.IPPROTO_TCP, abi.IPPROTO_UDP):
        return f"{endpoint(a, pa)}{sep}{endpoint(b, pb)}"
    if proto in abi.ICMP_PROTOS and pa:
        return f"{a}{sep}{b} id {pa}"
    return f"{a}{sep}{b}"


def flow_info(key: abi.FlowKey, flow: abi.Flow, now_ns: int | None = None,
              pinned: abi.PinnedVerdict | None = None) -> dict:
    """One flow-table entry as plain data, oriented from the endpoint that sent its first packet
    (``src``) to the other (``dst``); per-direction counters are ``[from src, from dst]``.
    ``verdict`` is the effective one: an expired verdict reads "none" (tc reverts it on the
    flow's next packet). ``ttl`` is seconds left, None when the verdict never expires; ``age``
    and ``idle`` are seconds since the first and the last packet (CLOCK_MONOTONIC, like
    bpf_ktime_get_ns). ``flow`` is the FLOW form that ``hybridctl block`` takes. ``pinned`` is
    who pinned the flow's BLOCK (``manual``, ``engine``; None: not pinned), from the flow's
    entry in hybrid_pinned when the caller passes it. The kernel's facts about the connection,
    oriented the same way: ``ttl_max`` (the highest IPv4 TTL / IPv6 hop limit seen, 0: none),
    ``isn`` (the initial sequence numbers of the SYN and SYN-ACK, None where not seen),
    ``handshake`` (both seen) and ``conn_verdict`` (the verdict belongs to one connection:
    a new SYN starts the flow over)."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    lo, hi = addr_from16(bytes(key.addr_lo)), addr_from16(bytes(key.addr_hi))
    plo, phi = key_ports(key)
    orig = 1 if flow.flags & abi.FLOW_ORIG_HI else 0
    (src, sport), (dst, dport) = ((hi, phi), (lo, plo)) if orig else ((lo, plo), (hi, phi))
    expires = flow.verdict_expires_ns
    live = flow.verdict != abi.VERDICT_NONE and (expires == 0 or expires > now)
    proto = abi.PROTO_NAMES.get(key.proto, str(key.proto))
    spec = f"{proto} {_endpoints(key.proto, src, sport, dst, dport, ' ')}"
    isn = [flow.isn[d] if flow.flags & (abi.FLOW_ISN0, abi.FLOW_ISN1)[d] else None for d in (0, 1)]
    if key.vlan:
        spec += f" vlan {key.vlan}"
    return {
        "flow": spec, "proto": proto, "src": str(src), "sport": sport, "dst": str(dst), "dport": dport,
        "vlan": key.vlan,
        "verdict": abi.VERDICT_NAMES.get(flow.verdict, str(flow.verdict)) if live else "none",
        "expired_verdict": abi.VERDICT_NAMES.get(flow.verdict, str(flow.verdict))
        if flow.verdict != abi.VERDICT_NONE and not live else None,
        "ttl": round((expires - now) / 1e9, 3) if live and expires else None,
        "age": round(max(0, now - flow.first_seen_ns) / 1e9, 3),
        "idle": round(max(0, now - flow.last_seen_ns) / 1e9, 3),
        "packets": [flow.packets[orig], flow.packets[1 - orig]],
        "bytes": [flow.bytes[orig], flow.bytes[1 - orig]],
        "payload_packets": [flow.payload_packets[orig], flow.payload_packets[1 - orig]],
        "flagged": flow.flagged,
        "midstream": bool(flow.flags & abi.FLOW_MIDSTREAM),
        "ttl_max": [flow.ttl_max[orig], flow.ttl_max[1 - orig]],
        "isn": [isn[orig], isn[1 - orig]],
        "handshake": None not in isn,
        "conn_verdict": bool(flow.flags & abi.FLOW_CONN_VERDICT),
        "by_cache": bool(flow.flags & abi.FLOW_BY_CACHE),
        "pinned": abi.PIN_ORIGIN_NAMES.get(pinned.origin, str(pinned.origin)) if pinned is not None else None,
    }


def parse_cidr(cidr: str) -> abi.PrefixKey:
    """LPM key of an IPv4 or IPv6 CIDR (a bare address is a /32 or /128). IPv4 is stored
    IPv4-mapped: 198.18.0.0/15 becomes ::ffff:198.18.0.0/111. Host bits are cleared."""
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=False)
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"'{cidr}' is not an IPv4 or IPv6 CIDR (e.g. 198.18.0.0/15 or 2001:db8::/32)") from exc
    key = abi.PrefixKey()
    if net.version == 4:
        key.prefixlen = 96 + net.prefixlen
    else:
        key.prefixlen = net.prefixlen
    key.addr[:] = addr16(net.network_address)
    return key


_PREFIXLEN = struct.Struct("=I")
_BAN_VALUE = struct.Struct("=Q")


def prefix_key_bytes(cidr: str) -> bytes:
    """``bytes(parse_cidr(cidr))``, several times faster for the plain forms ("a.b.c.d/n",
    "x:y::/n", bare addresses): what loads 100,000 bans. Anything else goes through
    :func:`parse_cidr` (same result, same errors)."""
    addr, slash, plen_text = cidr.partition("/")
    if not slash or (plen_text.isascii() and plen_text.isdigit() and len(plen_text) <= 3):
        try:
            if ":" in addr:
                raw, width, base = socket.inet_pton(socket.AF_INET6, addr), 128, 0
            else:
                raw, width, base = socket.inet_pton(socket.AF_INET, addr), 32, 96
            plen = int(plen_text) if slash else width
            if plen <= width:
                value = int.from_bytes(raw, "big") >> (width - plen) << (width - plen)   # host bits cleared
                raw = value.to_bytes(width // 8, "big")
                return _PREFIXLEN.pack(base + plen) + (IPV4_MAPPED_PREFIX + raw if base else raw)
        except OSError:
            pass                                  # not a plain address: parse_cidr says why
    return bytes(parse_cidr(cidr))


def format_prefix(key: abi.PrefixKey) -> str:
    """Inverse of :func:`parse_cidr`: IPv4-mapped prefixes (length >= 96) come back as IPv4."""
    raw = bytes(key.addr)
    if key.prefixlen >= 96 and raw[:12] == IPV4_MAPPED_PREFIX:     # as str(IPv4Network), 10x faster
        return f"{raw[12]}.{raw[13]}.{raw[14]}.{raw[15]}/{key.prefixlen - 96}"
    return str(ipaddress.IPv6Network((raw, key.prefixlen)))


def _element(array, index: int, ctype):
    """A copy of array[index] as a ctypes object (indexing a c_uint32 array gives an int)."""
    return ctype.from_buffer_copy(array, index * ctypes.sizeof(ctype))


# ---- the maps of one instance -------------------------------------------------------------------
class Maps:
    """Open fds of every map in abi.MAP_NAMES, with typed operations on them."""

    def __init__(self, fds: Mapping[str, int], *, origin: str = "fds"):
        """Take ownership of ``fds`` (map name -> fd). Use the classmethods instead."""
        self._fds: dict[str, int] = dict(fds)
        self.origin = origin
        self.pin_dir: str | None = None       # where the maps are pinned (config_lock() locks it), if known
        self._ncpu: int | None = None
        self._scratch = abi.Flow()      # write_verdict()'s buffer
        self._pin_scratch = abi.PinnedVerdict()
        self._last_prune_ns: int | None = None
        try:
            self._check_layouts()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open_pinned(cls, pin_dir: str) -> Maps:
        """Open the maps pinned in ``pin_dir`` (one pin per map, named as the map)."""
        fds: dict[str, int] = {}
        missing = []
        try:
            for name in abi.MAP_NAMES + abi.NAME_CACHE_MAPS:
                path = os.path.join(pin_dir, name)
                try:
                    fds[name] = bpfsys.obj_get(path)
                except NotFoundError:
                    if name in abi.MAP_NAMES:
                        missing.append(name)
        except BaseException:
            _close_all(fds)
            raise
        if missing:
            _close_all(fds)
            raise NotFoundError(
                f"no hybrid maps pinned in {pin_dir} (missing: {', '.join(missing)}): "
                "is hybrid attached in this namespace? (hybridctl status)", _errno.ENOENT)
        maps = cls(fds, origin=pin_dir)
        maps.pin_dir = pin_dir
        return maps

    @classmethod
    def from_fds(cls, fds: Mapping[str, int]) -> Maps:
        """Duplicate the given fds (the caller keeps its own)."""
        missing = [name for name in abi.MAP_NAMES if name not in fds]
        if missing:
            raise NotFoundError(f"map fds missing for: {', '.join(missing)}")
        dup: dict[str, int] = {}
        try:
            for name in abi.MAP_NAMES + abi.NAME_CACHE_MAPS:
                if name in fds:
                    dup[name] = os.dup(fds[name])
        except OSError as exc:
            _close_all(dup)
            raise HybridError(f"duplicating map fds: {exc.strerror}", exc.errno) from exc
        return cls(dup, origin="fds")

    @classmethod
    def from_prog_id(cls, prog_id: int) -> Maps:
        """Open the maps used by the loaded program ``prog_id``, matched by kernel map name.
        Give the tc program's id: hybrid_xdp does not use hybrid_ports, so its id is refused."""
        prog_fd = bpfsys.prog_get_fd_by_id(prog_id)
        fds: dict[str, int] = {}
        try:
            info = bpfsys.prog_info(prog_fd)
            for map_id in info.map_ids:
                fd = bpfsys.map_get_fd_by_id(map_id)
                name = bpfsys.map_info(fd).name
                if name in abi.MAP_NAMES + abi.NAME_CACHE_MAPS and name not in fds:
                    fds[name] = fd
                else:
                    os.close(fd)
        except BaseException:
            _close_all(fds)
            raise
        finally:
            os.close(prog_fd)
        missing = [name for name in abi.MAP_NAMES if name not in fds]
        if missing:
            _close_all(fds)
            raise NotFoundError(
                f"BPF program id {prog_id} ({info.name}) does not use the hybrid maps "
                f"{', '.join(missing)}: pass the id of the tc program ({abi.PROG_TC}), the only one "
                "that uses every map", _errno.ENOENT)
        return cls(fds, origin=f"prog id {prog_id}")

    def _check_layouts(self) -> None:
        """Refuse maps whose key/value sizes differ from abi (built from another header)."""
        for name, (ktype, vtype) in abi.MAP_LAYOUTS.items():
            if name not in self._fds:
                continue                        # a name-cache map of a datapath built without it
            info = bpfsys.map_info(self._fds[name])
            if (info.key_size, info.value_size) != (ctypes.sizeof(ktype), ctypes.sizeof(vtype)):
                raise HybridError(
                    f"map {name} ({self.origin}) has key/value sizes {info.key_size}/{info.value_size}, "
                    f"expected {ctypes.sizeof(ktype)}/{ctypes.sizeof(vtype)}: it was created by another "
                    "hybrid version; detach and attach again")

    def close(self) -> None:
        _close_all(self._fds)
        self._fds = {}

    def __enter__(self) -> Maps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_fds", None):
            self.close()

    def fd(self, name: str) -> int:
        try:
            return self._fds[name]
        except KeyError:
            raise HybridError(f"map {name} is not open (closed Maps?)") from None

    def fds(self) -> dict[str, int]:
        """The open fds (still owned by this object)."""
        return dict(self._fds)

    def pin_all(self, pin_dir: str) -> None:
        """Pin every map in ``pin_dir`` (which must be on a bpffs)."""
        for name, fd in self._fds.items():
            bpfsys.obj_pin(fd, os.path.join(pin_dir, name))

    @property
    def ncpu(self) -> int:
        if self._ncpu is None:
            self._ncpu = bpfsys.num_possible_cpus()
        return self._ncpu

    # -- generic element access -----------------------------------------------------------------
    def _lookup(self, name: str, key, value) -> bool:
        return bpfsys.map_lookup(self.fd(name), key, value, name=name)

    def _update(self, name: str, key, value, flags: int = bpfsys.BPF_ANY) -> None:
        bpfsys.map_update(self.fd(name), key, value, flags, name=name)

    def _delete(self, name: str, key) -> bool:
        return bpfsys.map_delete(self.fd(name), key, name=name)

    def _keys(self, name: str) -> Iterator:
        ktype = abi.MAP_LAYOUTS[name][0]
        fd = self.fd(name)
        prev = None
        while True:
            nxt = ktype()
            if not bpfsys.map_get_next_key(fd, prev, nxt, name=name):
                return
            yield nxt
            prev = nxt

    def _items(self, name: str) -> Iterator[tuple]:
        """(key, value) pairs of a non-per-CPU map: batch lookup where the map type supports
        it, else a get_next_key walk (keys deleted meanwhile are skipped)."""
        ktype, vtype = abi.MAP_LAYOUTS[name]
        fd = self.fd(name)
        keys = (ktype * _BATCH_SIZE)()
        values = (vtype * _BATCH_SIZE)()
        token_size = max(ctypes.sizeof(ktype), 8)
        in_batch = None
        out_batch = ctypes.create_string_buffer(token_size)
        try:
            while True:
                n, done = bpfsys.map_lookup_batch(fd, in_batch, out_batch, keys, values, _BATCH_SIZE, name=name)
                for i in range(n):
                    yield _element(keys, i, ktype), _element(values, i, vtype)
                if done:
                    return
                in_batch = ctypes.create_string_buffer(out_batch.raw, token_size)
        except HybridError as exc:
            if in_batch is not None or exc.errno not in _BATCH_UNSUPPORTED:
                raise
        for key in self._keys(name):
            value = vtype()
            if self._lookup(name, key, value):
                yield key, value

    # -- config -------------------------------------------------------------------------------------
    def get_config(self) -> abi.Config:
        cfg = abi.Config()
        self._lookup(abi.MAP_CONFIG, ctypes.c_uint32(0), cfg)
        return cfg

    def set_config(self, cfg: abi.Config) -> None:
        self._update(abi.MAP_CONFIG, ctypes.c_uint32(0), cfg)

    @contextlib.contextmanager
    def config_lock(self) -> Iterator[None]:
        """Hold while reading, changing and writing back the config: the engines (skip_reasons),
        the CrowdSec link (HAVE_BANS), `hybridctl block` (HAVE_PREFIXES) and a re-attach write it
        from different processes and threads, and a write made from a stale read would undo
        another's flag (the kernel would then skip the bans it holds). An flock on the pin
        directory itself (no file to create or remove; every opener of the instance's maps
        reaches the same directory, also through /proc/2/root); maps that are not pinned (one
        process's own, as in BPF tests) need none."""
        if self.pin_dir is None:
            yield
            return
        fd = os.open(self.pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def update_config(self, **fields: int) -> abi.Config:
        """Read-modify-write of named config fields (under :meth:`config_lock`); returns the new config."""
        names = {f[0] for f in abi.Config._fields_}
        for field in fields:
            if field not in names or field.startswith("_"):
                raise ConfigError(f"unknown config field '{field}'")
        with self.config_lock():
            cfg = self.get_config()
            for field, value in fields.items():
                setattr(cfg, field, value)
            self.set_config(cfg)
        return cfg

    def _set_cfg_flag(self, flag: int, on: bool) -> None:
        with self.config_lock():
            cfg = self.get_config()
            new = (cfg.flags | flag) if on else (cfg.flags & ~flag)
            if new != cfg.flags:
                cfg.flags = new
                self.set_config(cfg)

    # -- interfaces and counters -------------------------------------------------------------------
    def ifaces(self) -> dict[int, abi.Iface]:
        """ifindex -> registration (stats slot, flags)."""
        return {key.value: value for key, value in self._items(abi.MAP_IFACES)}

    def register_iface(self, ifindex: int, flags: int = 0) -> int:
        """Give ``ifindex`` its own stats slot (the lowest free one >= 1) and return it.
        Registering an ifindex again returns its slot (and updates its flags)."""
        if ifindex <= 0:
            raise ConfigError(f"invalid ifindex {ifindex}")
        current = self.ifaces()
        if ifindex in current:
            entry = current[ifindex]
            if entry.flags != flags:
                entry.flags = flags
                self._update(abi.MAP_IFACES, ctypes.c_uint32(ifindex), entry, bpfsys.BPF_EXIST)
            return entry.slot
        used = {entry.slot for entry in current.values()}
        free = [slot for slot in range(1, abi.MAX_IFACES) if slot not in used]
        if not free:
            raise HybridError(f"all {abi.MAX_IFACES - 1} interface slots are in use: detach an interface first")
        slot = free[0]
        self._zero_slot(slot)
        self._update(abi.MAP_IFACES, ctypes.c_uint32(ifindex), abi.Iface(slot=slot, flags=flags),
                     bpfsys.BPF_NOEXIST)
        return slot

    def unregister_iface(self, ifindex: int) -> bool:
        """Forget ``ifindex`` and zero its slot's counters; False if it was not registered."""
        entry = abi.Iface()
        if not self._lookup(abi.MAP_IFACES, ctypes.c_uint32(ifindex), entry):
            return False
        self._delete(abi.MAP_IFACES, ctypes.c_uint32(ifindex))
        self._zero_slot(entry.slot)
        return True

    def _zero_slot(self, slot: int) -> None:
        if 0 <= slot < abi.MAX_IFACES:
            self._update(abi.MAP_STATS, ctypes.c_uint32(slot), (abi.Stats * self.ncpu)())

    def slot_counters(self, slot: int) -> dict[str, int]:
        """Counters of one stats slot, summed over possible CPUs."""
        per_cpu = (abi.Stats * self.ncpu)()
        self._lookup(abi.MAP_STATS, ctypes.c_uint32(slot), per_cpu)
        totals = [0] * abi.CNT_MAX
        for cpu in per_cpu:
            for i in range(abi.CNT_MAX):
                totals[i] += cpu.c[i]
        return {abi.COUNTER_NAMES[i]: totals[i] for i in range(abi.CNT_MAX)}

    def name_scratch(self, cpu: int) -> abi.NameScratch:
        """The name parsers' per-CPU scratch as one CPU left it (bpf/names.h): the last name
        tc read there (key.len 0: none), how many first payloads it looked at, the result."""
        per_cpu = (abi.NameScratch * self.ncpu)()
        self._lookup(abi.MAP_NAMES_SCRATCH, ctypes.c_uint32(0), per_cpu)
        return per_cpu[cpu]

    def stats(self) -> dict[int, dict[str, int]]:
        """ifindex -> counter name -> value summed over CPUs; ifindex 0 is the slot of
        interfaces that are not registered."""
        result = {0: self.slot_counters(0)}
        for ifindex, entry in sorted(self.ifaces().items()):
            if 0 < entry.slot < abi.MAX_IFACES:
                result[ifindex] = self.slot_counters(entry.slot)
        return result

    # -- watched ports ------------------------------------------------------------------------------
    @staticmethod
    def _check_port(port: int) -> None:
        if not isinstance(port, int) or not 0 < port <= 0xFFFF:
            raise ConfigError(f"port {port!r} is out of range 1-65535")

    def watch_port(self, port: int, tcp: bool = True, udp: bool = True) -> None:
        """Flag every packet to or from ``port`` for the given protocols (replaces the port's
        previous setting; neither protocol = unwatch)."""
        self._check_port(port)
        bits = (abi.PORT_TCP if tcp else 0) | (abi.PORT_UDP if udp else 0)
        self._update(abi.MAP_PORTS, ctypes.c_uint32(port), ctypes.c_uint8(bits))
        if bits:
            self._set_cfg_flag(abi.CFG_HAVE_PORTS, True)
        else:
            self._set_cfg_flag(abi.CFG_HAVE_PORTS, bool(self.watched_ports()))

    def unwatch_port(self, port: int) -> None:
        self.watch_port(port, tcp=False, udp=False)

    def watched_ports(self) -> dict[int, int]:
        """port -> HYBRID_PORT_* bits, for every watched port."""
        return {key.value: value.value for key, value in self._items(abi.MAP_PORTS) if value.value}

    # -- prefixes -----------------------------------------------------------------------------------
    def add_prefix(self, cidr: str, action: int) -> None:
        """Watch and/or block a prefix (action: abi.PREFIX_WATCH | abi.PREFIX_BLOCK bits);
        replaces the prefix's previous action."""
        if not isinstance(action, int) or action <= 0 or action & ~(abi.PREFIX_WATCH | abi.PREFIX_BLOCK):
            raise ConfigError(f"invalid prefix action {action!r}: use PREFIX_WATCH and/or PREFIX_BLOCK")
        key = parse_cidr(cidr)
        self._update(abi.MAP_PREFIXES, key, abi.Prefix(action=action))
        self._set_cfg_flag(abi.CFG_HAVE_PREFIXES, True)

    def del_prefix(self, cidr: str) -> bool:
        """Remove a prefix; False if it was not there."""
        found = self._delete(abi.MAP_PREFIXES, parse_cidr(cidr))
        self._set_cfg_flag(abi.CFG_HAVE_PREFIXES, bool(self.prefixes()))
        return found

    def prefixes(self) -> dict[str, int]:
        """CIDR -> action bits."""
        return {format_prefix(key): value.action for key, value in self._items(abi.MAP_PREFIXES)}

    # -- bans (hybrid_common.h, "Bans"; hybrid/fleet/bantable.py decides what they hold) -----------
    def bans(self) -> dict[str, int]:
        """CIDR (as :func:`format_prefix` writes it) -> expiry (CLOCK_MONOTONIC ns, 0 = never),
        as the kernel holds them: expired entries included until :meth:`write_bans` deletes them."""
        return {format_prefix(key): value.expires_ns for key, value in self._items(abi.MAP_BANS)}

    def write_bans(self, upserts: Mapping[str, int], deletes: Iterable[str] = ()) -> None:
        """Delete the CIDRs in ``deletes`` (absent ones are skipped), then write ``upserts`` (CIDR
        -> expiry, CLOCK_MONOTONIC ns, 0 = never; a CIDR in both ends up written), with one
        BPF_MAP_DELETE_BATCH / UPDATE_BATCH per BAN_BATCH entries (one bpf() call per entry on a
        kernel without batch operations on tries). Every CIDR and expiry is checked before
        anything is written: a bad one raises :class:`ConfigError` and changes nothing. Then
        HYBRID_CFG_HAVE_BANS is made to say whether the trie holds anything (it is set before
        the first insert, so each ban drops as soon as it is written); any call, even an
        empty one, repairs a flag that another writer of the config lost. Raises
        :class:`TableFullError` when the trie is full: what fitted is written."""
        try:
            dels = [prefix_key_bytes(cidr) for cidr in deletes]
            ups = {prefix_key_bytes(cidr): _BAN_VALUE.pack(expires) for cidr, expires in upserts.items()}
        except (struct.error, TypeError, AttributeError) as exc:
            raise ConfigError(f"a ban's CIDR must be a string and its expiry an integer of 0 to 2^64-1 "
                              f"nanoseconds ({exc})") from exc
        fd = self.fd(abi.MAP_BANS)
        try:
            if dels:
                self._bans_batch(fd, dels, None)
            if ups:
                self._set_cfg_flag(abi.CFG_HAVE_BANS, True)
                self._bans_batch(fd, list(ups), list(ups.values()))
        finally:
            self._set_cfg_flag(abi.CFG_HAVE_BANS, bpfsys.map_get_next_key(fd, None, abi.PrefixKey(),
                                                                           name=abi.MAP_BANS))

    BAN_BATCH = 8192        # entries per bpf() batch call

    def _bans_batch(self, fd: int, keys: list[bytes], values: list[bytes] | None) -> None:
        """Delete ``keys`` (``values`` None) or write them with ``values``: in batches, skipping
        keys a delete finds absent; one element at a time where the kernel has no batches."""
        i = 0
        while i < len(keys):
            n = min(self.BAN_BATCH, len(keys) - i)
            key_buf = b"".join(keys[i:i + n])
            if values is None:
                done, err = bpfsys.map_delete_batch(fd, key_buf, n)
            else:
                done, err = bpfsys.map_update_batch(fd, key_buf, b"".join(values[i:i + n]), n)
            i += done
            if not err:
                continue
            if err == _errno.ENOENT and values is None:
                i += 1                              # deleting an absent ban: nothing to do
            elif err in (_errno.ENOSPC, _errno.E2BIG):
                raise TableFullError(
                    f"{abi.MAP_BANS} is full ({bpfsys.map_info(fd).max_entries} entries): {len(keys) - i} of "
                    f"{len(keys)} bans not written; the decisions outnumber HYBRID_BAN_TABLE_SIZE", err)
            elif done == 0 and err in _BATCH_UNSUPPORTED:
                self._bans_one_by_one(fd, keys[i:], None if values is None else values[i:])
                return
            else:
                raise HybridError(f"{'deleting' if values is None else 'writing'} bans in {abi.MAP_BANS}: "
                                  f"{os.strerror(err)}", err)

    def _bans_one_by_one(self, fd: int, keys: list[bytes], values: list[bytes] | None) -> None:
        for j, key in enumerate(keys):
            if values is None:
                bpfsys.map_delete(fd, key, name=abi.MAP_BANS)
                continue
            try:
                bpfsys.map_update(fd, key, values[j], name=abi.MAP_BANS)
            except HybridError as exc:
                if exc.errno not in (_errno.ENOSPC, _errno.E2BIG):
                    raise
                raise TableFullError(f"{abi.MAP_BANS} is full ({bpfsys.map_info(fd).max_entries} entries): "
                                     f"{len(keys) - j} bans not written", exc.errno) from exc

    # -- admission buckets ----------------------------------------------------------------------------
    def sources(self) -> dict[str, int]:
        """Per-source admission buckets: address -> theoretical arrival time (CLOCK_MONOTONIC
        ns; a source is over budget while it is more than the tolerance ahead of now)."""
        return {str(addr_from16(bytes(k.addr))): v.tat_ns for k, v in self._items(abi.MAP_SOURCES)}

    def clear_admission(self) -> None:
        """Forget every bucket: each source and each CPU starts with a full burst."""
        for key in list(self._keys(abi.MAP_SOURCES)):
            self._delete(abi.MAP_SOURCES, key)
        self._update(abi.MAP_BUDGET, ctypes.c_uint32(0), abi.Bucket())

    # -- flows --------------------------------------------------------------------------------------
    flow_key = staticmethod(flow_key)

    def flows(self) -> Iterator[tuple[abi.FlowKey, abi.Flow]]:
        """Every (key, flow) in the flow table (a snapshot per batch; the table keeps changing)."""
        return self._items(abi.MAP_FLOWS)

    def flow_infos(self, now_ns: int | None = None) -> Iterator[dict]:
        """:func:`flow_info` of every entry in the flow table, with its pinned verdict."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        pinned = {bytes(key): pin for key, pin in self.pinned()}
        for key, flow in self.flows():
            yield flow_info(key, flow, now, pinned.get(bytes(key)))

    def flow_count(self) -> int:
        return sum(1 for _ in self._keys(abi.MAP_FLOWS))

    # The entry get_flow() read last, for write_verdict(): the key object it was read under,
    # when (CLOCK_MONOTONIC ns), and whether the flow was in the table. The entry is in _scratch.
    _read_key = None
    _read_ns = 0
    _read_found = False

    def get_flow(self, key: abi.FlowKey | bytes) -> abi.Flow | None:
        """The flow's entry (a copy the caller owns), or None when the flow is not in the table.
        A :meth:`write_verdict` under the same key object within READ_REUSE_NS starts from this
        read instead of reading the entry again."""
        flow = self._scratch
        self._read_key = None
        found = bpfsys.map_lookup(self.fd(abi.MAP_FLOWS), key, flow, name=abi.MAP_FLOWS)
        self._read_key, self._read_ns, self._read_found = key, time.monotonic_ns(), found
        return abi.Flow.from_buffer_copy(flow) if found else None

    def delete_flow(self, key: abi.FlowKey) -> bool:
        return self._delete(abi.MAP_FLOWS, key)

    def set_verdict(self, key: abi.FlowKey | bytes, verdict: int, ttl: float | None, *,
                    manual: bool = False) -> abi.Flow:
        """Give a flow a verdict for ``ttl`` seconds (None: until changed). Creates the entry
        when missing. The expiry is on CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns().
        A BLOCK is pinned too (:meth:`write_verdict`), marked as the operator's with ``manual``
        (hybridctl block); any other verdict removes the flow's pinned one. The verdict is the
        5-tuple's, not one connection's (``conn_scoped=False``): an operator's BLOCK survives
        new SYNs.

        This is a read-modify-write of the whole entry: packet counters the datapath adds
        between the read and the write are lost (the verdict matters, the counters are
        statistics), and so would be a fact it records meanwhile (a TTL rise, the SYN-ACK's
        isn: the next SYN-ACK records it again). Returns the flow as written. Raises :class:`TableFullError` when the
        pinned table is full: the verdict is in the flow table, but an eviction would lose it."""
        if verdict not in abi.VERDICT_NAMES:
            raise ConfigError(f"invalid verdict {verdict!r}: use one of {sorted(abi.VERDICT_NAMES)}")
        if ttl is not None and ttl <= 0:
            raise ConfigError(f"verdict TTL must be positive or None, not {ttl!r}")
        if verdict != abi.VERDICT_BLOCK:
            self.unpin_verdict(key)
        self.write_verdict(key, verdict, None if ttl is None else max(1, int(ttl * 1e9)),
                           origin=abi.PIN_MANUAL if manual else abi.PIN_ENGINE)
        return abi.Flow.from_buffer_copy(self._scratch)

    def write_verdict(self, key: abi.FlowKey | bytes, verdict: int | None, ttl_ns: int | None,
                      origin: int = abi.PIN_ENGINE, conn_scoped: bool = False,
                      follow: tuple | list | None = None, until: tuple | list | None = None) -> None:
        """:meth:`set_verdict` for the verdict engine's per-packet path: arguments unchecked
        (``ttl_ns`` in nanoseconds, positive or None), the flow read into one reused buffer,
        nothing returned. Two bpf() calls: a lookup and an update, or only the update when
        :meth:`get_flow` read the entry under the same key object less than READ_REUSE_NS
        before (the engine's decision already read it for the connection's facts: one read per
        decision, not two); a BLOCK takes one more, its copy in the pinned table (hybrid_common.h, "Pinned verdicts"), written after the flow
        table so that the datapath may take a flow missing from the table while pinned for an
        evicted one. Raises :class:`TableFullError` when the pinned table is full (after
        sweeping its expired entries, at most once per PRUNE_INTERVAL_NS): the flow table
        holds the verdict all the same.

        ``conn_scoped``: the verdict is for the connection the entry holds now
        (abi.FLOW_CONN_VERDICT): the SYN of a new connection on the same 5-tuple starts the
        entry over, BLOCK or not, and deletes an ENGINE pin; False (an operator's verdict)
        clears the flag. The datapath also takes every ENGINE pin as connection-scoped.

        ``follow``: ``(direction, seq, mode)`` (or a list of them): the engine follows that direction's messages, the
        next one at ``seq`` (TCP; any value for UDP) with ``mode`` (abi.FOLLOW_M_*), or stops
        following it with ``seq`` None (struct hybrid_flow, follow). ``until``: ``(direction,
        seq)`` (or a list): a byte budget, every payload packet of that direction starting
        before ``seq`` is queued (None: no budget). ``verdict`` None keeps the
        entry's verdict, its expiry and its flags (only the follow-up changes; an entry that
        is not there is created with verdict NONE)."""
        flow = self._scratch
        now = time.monotonic_ns()
        if key is self._read_key and now - self._read_ns < READ_REUSE_NS:
            found = self._read_found            # the entry get_flow() just read is in _scratch
        else:
            found = bpfsys.map_lookup(self.fd(abi.MAP_FLOWS), key, flow, name=abi.MAP_FLOWS)
        self._read_key = None                   # _scratch is about to change: that read is spent
        if not found:
            ctypes.memset(ctypes.addressof(flow), 0, ctypes.sizeof(flow))
            flow.first_seen_ns = flow.last_seen_ns = now
        if verdict is not None:
            flow.verdict = verdict
            flow.verdict_expires_ns = 0 if ttl_ns is None or verdict == abi.VERDICT_NONE else now + ttl_ns
            if conn_scoped:
                flow.flags = (flow.flags | abi.FLOW_CONN_VERDICT) & ~abi.FLOW_BY_CACHE & 0xFF
            else:
                flow.flags &= ~(abi.FLOW_CONN_VERDICT | abi.FLOW_BY_CACHE) & 0xFF
        if follow is not None:
            for direction, seq, mode in (follow if isinstance(follow, list) else (follow,)):
                on, shift = abi.FOLLOW_ON(direction), abi.FOLLOW_MODE_SHIFT(direction)
                bits = flow.follow & ~(on | 3 << shift) & 0xFF
                if seq is not None:
                    bits |= on | (mode & 3) << shift
                    flow.follow_seq[1 if direction else 0] = seq & 0xFFFFFFFF
                flow.follow = bits
        if until is not None:
            for direction, seq in (until if isinstance(until, list) else (until,)):
                bit = abi.FOLLOW_UNTIL(direction)
                if seq is None:
                    flow.follow &= ~bit & 0xFF
                else:
                    flow.follow |= bit
                    flow.until_seq[1 if direction else 0] = seq & 0xFFFFFFFF
        bpfsys.map_update(self.fd(abi.MAP_FLOWS), key, flow, name=abi.MAP_FLOWS)
        if verdict == abi.VERDICT_BLOCK:
            pin = self._pin_scratch
            pin.expires_ns = flow.verdict_expires_ns
            pin.verdict = verdict
            pin.origin = origin
            self._pin(key, pin, now)

    def _pin(self, key, pin: abi.PinnedVerdict, now: int) -> None:
        for attempt in (0, 1):
            try:
                bpfsys.map_update(self.fd(abi.MAP_PINNED), key, pin, name=abi.MAP_PINNED)
                return
            except HybridError as exc:
                if exc.errno != _errno.E2BIG:
                    raise
            if attempt or (self._last_prune_ns is not None and now - self._last_prune_ns < PRUNE_INTERVAL_NS):
                break
            self._last_prune_ns = now
            self.prune_pinned(now)
        raise TableFullError(
            f"{abi.MAP_PINNED} is full ({self.pinned_capacity()} entries): the verdict is in the flow table "
            "but a flood of new flows can evict it; unblock flows that need no block "
            "(hybridctl status counts them)", _errno.E2BIG)

    # -- the name-verdict cache (bpf/namecache.h) -------------------------------------------------
    @property
    def has_name_cache(self) -> bool:
        """Whether the datapath was built with the name cache (attach option name_cache)."""
        return abi.MAP_NAME_CACHE in self._fds and abi.MAP_NAME_STATE in self._fds

    def name_state(self) -> abi.NameState:
        """The cache's current generation and the digest of the rules it belongs to."""
        state = abi.NameState()
        self._lookup(abi.MAP_NAME_STATE, ctypes.c_uint32(0), state)
        return state

    def set_name_state(self, generation: int, rules_digest: int) -> None:
        """Make ``generation`` the current one: from this update on, no entry written under
        another matches (one map update, atomic for the datapath). Only the engine calls this,
        when it loads rules (hybrid/engine/kernelcache.py)."""
        bpfsys.map_update(self.fd(abi.MAP_NAME_STATE), ctypes.c_uint32(0),
                          abi.NameState(generation=generation, rules_digest=rules_digest),
                          name=abi.MAP_NAME_STATE)

    @staticmethod
    def name_key(generation: int, kind: int, name: str, proto: int, port: int) -> abi.NameKey:
        raw = name.encode("ascii")
        if not 1 <= len(raw) <= abi.NAME_MAX:
            raise ValueError(f"a cached name has 1 to {abi.NAME_MAX} characters, not {len(raw)}")
        key = abi.NameKey(generation=generation, port=port, proto=proto, kind=kind, len=len(raw))
        ctypes.memmove(key.name, raw, len(raw))
        return key

    def put_name_verdict(self, key: abi.NameKey, value: abi.NameVerdict) -> bool:
        """Write one entry; True when the key was not there (an insertion, which a full LRU map
        makes room for by evicting its least recently used entry)."""
        fd = self.fd(abi.MAP_NAME_CACHE)
        try:
            bpfsys.map_update(fd, key, value, bpfsys.BPF_NOEXIST, name=abi.MAP_NAME_CACHE)
            return True
        except HybridError as exc:
            if exc.errno != _errno.EEXIST:
                raise
        bpfsys.map_update(fd, key, value, name=abi.MAP_NAME_CACHE)
        return False

    def name_verdicts(self) -> Iterator[tuple[abi.NameKey, abi.NameVerdict]]:
        """Every (key, entry) of the cache, any generation."""
        return self._items(abi.MAP_NAME_CACHE)

    def flush_names(self) -> int:
        """Delete every cached name verdict (the engine fills the cache again as names come);
        the number deleted."""
        fd = self.fd(abi.MAP_NAME_CACHE)
        n = 0
        for key, _ in list(self.name_verdicts()):
            n += bpfsys.map_delete(fd, key, name=abi.MAP_NAME_CACHE)
        return n

    def pinned(self) -> Iterator[tuple[abi.FlowKey, abi.PinnedVerdict]]:
        """Every (key, pinned verdict): the BLOCKs that survive eviction from the flow table."""
        return self._items(abi.MAP_PINNED)

    def pinned_count(self) -> int:
        return sum(1 for _ in self._keys(abi.MAP_PINNED))

    def pinned_capacity(self) -> int:
        """The pinned table's size as created (HYBRID_PINNED_TABLE_SIZE at compile time)."""
        return bpfsys.map_info(self.fd(abi.MAP_PINNED)).max_entries

    def get_pinned(self, key: abi.FlowKey | bytes) -> abi.PinnedVerdict | None:
        pin = abi.PinnedVerdict()
        return pin if self._lookup(abi.MAP_PINNED, key, pin) else None

    def unpin_verdict(self, key: abi.FlowKey | bytes) -> bool:
        """Remove the flow's pinned verdict; False when it had none."""
        return self._delete(abi.MAP_PINNED, key)

    def prune_pinned(self, now_ns: int | None = None) -> int:
        """Delete the pinned verdicts that have expired (the datapath deletes one only when its
        flow comes back); returns how many."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        expired = [key for key, pin in self.pinned() if pin.expires_ns and pin.expires_ns <= now]
        return sum(1 for key in expired if self.unpin_verdict(key))

    def clear_verdict(self, key: abi.FlowKey) -> bool:
        """Back to VERDICT_NONE, and no pinned verdict; False when the flow is neither in the
        table nor pinned."""
        unpinned = self.unpin_verdict(key)
        flow = self.get_flow(key)
        if flow is None:
            return unpinned
        flow.verdict = abi.VERDICT_NONE
        flow.verdict_expires_ns = 0
        try:
            self._update(abi.MAP_FLOWS, key, flow, bpfsys.BPF_EXIST)
        except NotFoundError:  # evicted (LRU) between the read and the write
            return unpinned
        return True


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
