"""Reading a capture for a replay: pcap and pcapng files, every frame as an Ethernet frame with
its timestamp, the interface it was captured on and its direction when the capture says them.

dpkt parses the file headers, packet records and pcapng blocks (and their options); this module
only walks them in order, because dpkt's own pcapng reader keeps one interface and drops the
per-packet options a replay needs (the interface of each packet, its direction).

Link types: Ethernet (VLAN tags kept as they are), Linux cooked captures SLL and SLL2 (what
``tcpdump -i any`` writes: an Ethernet header is made from the protocol and the sender's
address) and raw IPv4/IPv6 (an Ethernet header is made). A direction comes from pcapng's
epb_flags or SLL's packet type: ``"in"`` (received on that interface), ``"out"`` (sent by the
capturing host), None (the capture does not say).

Bad input never raises anything but :class:`CaptureError`, one line: a file that is not a
capture, an unknown link type, a truncated file (what comes before the cut is read, the cut is
reported in :attr:`Capture.truncated`). A packet that cannot be replayed as it was on the wire (cut
by the snap length, too short for its link header, on an interface of an unknown link type) is
skipped and counted by reason in :attr:`Capture.skipped`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import dpkt
from dpkt import pcap, pcapng

from hybrid.errors import HybridError

# Link types (https://www.tcpdump.org/linktypes.html)
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
_RAW_ALIASES = (12, 14)          # DLT_RAW as some systems number it
LINK_NAMES = {LINKTYPE_ETHERNET: "Ethernet", LINKTYPE_RAW: "raw IP", LINKTYPE_LINUX_SLL: "Linux SLL",
              LINKTYPE_IPV4: "raw IPv4", LINKTYPE_IPV6: "raw IPv6", LINKTYPE_LINUX_SLL2: "Linux SLL2",
              12: "raw IP", 14: "raw IP"}
SUPPORTED = frozenset(LINK_NAMES)

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
# The addresses of a made-up Ethernet header (locally administered): the destination is always
# SYNTH_DST; the source is the SLL sender's address when it has one, else SYNTH_SRC.
SYNTH_DST = bytes.fromhex("020000000002")
SYNTH_SRC = bytes.fromhex("020000000001")
_PACKET_OUTGOING = 4             # SLL packet type: sent by the capturing host
_EPB_FLAGS = 2                   # pcapng epb_flags option: bits 0-1 are the direction
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
_PCAP_MAGICS = {struct.pack("<I", m) for m in pcap.MAGIC_TO_PKT_HDR} | {struct.pack(">I", m) for m in pcap.MAGIC_TO_PKT_HDR}

# Why a packet is skipped (Capture.skipped's keys)
SKIP_SNAPLEN = "cut by the snap length"
SKIP_SHORT = "shorter than its link header"
SKIP_LINKTYPE = "unknown link type"
SKIP_NOT_IP = "not IP (link header)"


class CaptureError(HybridError):
    """A capture that cannot be read: one line naming the file and what is wrong."""


@dataclass(slots=True)
class Frame:
    """One packet: ``data`` an Ethernet frame, ``ts_ns`` its time (ns since the epoch),
    ``iface`` the interface it was captured on (pcapng's if_name, ``"ifindex N"`` for SLL2,
    else None), ``direction`` ``"in"``, ``"out"`` or None, ``wire_len`` its length on the wire
    (Ethernet frame as replayed), ``number`` its 1-based position among the capture's packets."""
    number: int
    ts_ns: int
    data: bytes
    iface: str | None = None
    direction: str | None = None
    wire_len: int = 0


@dataclass
class _Iface:
    linktype: int
    name: str | None
    ts_unit_ns: tuple[int, int]   # ns per timestamp unit, as (numerator, denominator)
    ts_offset_s: int = 0


@dataclass
class Capture:
    """A capture file opened for reading; iterate it for :class:`Frame` s (once)."""
    path: str
    format: str = "?"                                   # "pcap" or "pcapng"
    linktypes: set[int] = field(default_factory=set)
    packets: int = 0                                    # packet records read
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: str | None = None                        # where and how the file was cut, if it was
    interfaces: list[str | None] = field(default_factory=list)
    offset: int = 0                                     # bytes read so far (for progress)
    size: int = 0                                       # the file's size

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def __iter__(self) -> Iterator[Frame]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below, generator-owned
        except OSError as exc:
            raise CaptureError(f"{self.path}: {exc.strerror}") from None
        with f:
            with contextlib.suppress(OSError):
                self.size = os.fstat(f.fileno()).st_size
            head = f.read(4)
            f.seek(0)
            if head == _PCAPNG_MAGIC:
                self.format = "pcapng"
                yield from self._pcapng(f)
            elif head in _PCAP_MAGICS:
                self.format = "pcap"
                yield from self._pcap(f)
            elif not head:
                raise CaptureError(f"{self.path}: empty file, not a capture")
            else:
                raise CaptureError(f"{self.path}: not a pcap or pcapng capture (it starts with {head.hex()})")

    # -- pcap ---------------------------------------------------------------------------------------
    def _pcap(self, f) -> Iterator[Frame]:
        buf = f.read(pcap.FileHdr.__hdr_len__)
        if len(buf) < pcap.FileHdr.__hdr_len__:
            raise CaptureError(f"{self.path}: truncated pcap file header ({len(buf)} bytes)")
        fh = pcap.FileHdr(buf)
        magic = fh.magic                   # as read big-endian: dpkt's table maps it to the record header
        if fh.magic in (pcap.PMUDPCT_MAGIC, pcap.PMUDPCT_MAGIC_NANO, getattr(pcap, "PACPDOM_MAGIC", -1)):
            fh = pcap.LEFileHdr(buf)
        hdr_cls = pcap.MAGIC_TO_PKT_HDR[magic]
        nano = magic in (pcap.TCPDUMP_MAGIC_NANO, pcap.PMUDPCT_MAGIC_NANO)
        linktype = fh.linktype & 0x0FFFFFFF        # the upper bits hold FCS information
        self._check_linktype(linktype)
        iface = _Iface(linktype, None, (1, 1) if nano else (1000, 1))
        self.interfaces = [None]
        hlen = hdr_cls.__hdr_len__
        # dpkt's record header, read with its own layout (tv_sec, tv_usec, caplen, len) through
        # struct rather than one dpkt object per packet: the same fields, at a fraction of the
        # cost. The file is mapped: a record is a slice, not a read.
        unpack_from = struct.Struct(hdr_cls.__hdr_fmt__).unpack_from
        scale = 1 if nano else 1000
        offset = f.tell()
        try:
            view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):                    # not mappable (a pipe, an empty tail)
            view = f.read()
            view = view if isinstance(view, bytes) else b""
            base = offset
        else:
            base = 0
        size = len(view)
        pos = offset - base
        ethernet = linktype == LINKTYPE_ETHERNET
        try:
            while pos < size:
                if pos + hlen > size:
                    self.truncated = f"packet record at byte {pos + base}: {size - pos} of its {hlen}-byte header"
                    return
                tv_sec, tv_frac, caplen, wire_len = unpack_from(view, pos)
                start = pos + hlen
                pos = start + caplen
                if pos > size:
                    self.truncated = (f"packet record at byte {start - hlen + base}: {size - start} of "
                                      f"{caplen} bytes")
                    return
                self.packets += 1
                self.offset = pos + base
                data = view[start:pos]
                ts_ns = tv_sec * 1_000_000_000 + tv_frac * scale
                if ethernet and caplen == wire_len and caplen >= 14:     # the common case, inline
                    yield Frame(self.packets, ts_ns, data, None, None, caplen)
                    continue
                frame = self._frame(self.packets, ts_ns, iface, data, wire_len, None)
                if frame is not None:
                    yield frame
        finally:
            if isinstance(view, mmap.mmap):
                view.close()

    # -- pcapng -------------------------------------------------------------------------------------
    def _pcapng(self, f) -> Iterator[Frame]:
        ifaces: list[_Iface] = []
        little = True
        first = True
        while True:
            offset = f.tell()
            head = f.read(12)
            if not head:
                if first:
                    raise CaptureError(f"{self.path}: truncated pcapng section header")
                return
            if len(head) < 8:
                self.truncated = f"block at byte {offset}: {len(head)} of its 8-byte header"
                return
            btype = struct.unpack("<I", head[:4])[0]
            if btype == pcapng.PCAPNG_BT_SHB:
                if len(head) < 12:
                    self._cut_or_fail(first, offset, "section header")
                    return
                bom = head[8:12]
                if bom == b"\x4d\x3c\x2b\x1a":
                    little = True
                elif bom == b"\x1a\x2b\x3c\x4d":
                    little = False
                else:
                    raise CaptureError(f"{self.path}: pcapng section header at byte {offset} has no byte-order magic")
                ifaces = []                         # interface ids are per section
            elif first:
                raise CaptureError(f"{self.path}: pcapng file does not start with a section header")
            blen = struct.unpack("<I" if little else ">I", head[4:8])[0]
            if blen < 12 or blen % 4:
                raise CaptureError(f"{self.path}: pcapng block at byte {offset} has an impossible length {blen}")
            rest = f.read(blen - len(head))
            if len(rest) < blen - len(head):
                if first:
                    raise CaptureError(f"{self.path}: truncated pcapng section header")
                self.truncated = f"block at byte {offset}: {len(head) + len(rest)} of {blen} bytes"
                return
            buf = head + rest
            first = False
            self.offset = offset + blen
            try:
                if btype == pcapng.PCAPNG_BT_SHB:
                    continue
                if btype == pcapng.PCAPNG_BT_IDB:
                    idb = (pcapng.InterfaceDescriptionBlockLE if little else pcapng.InterfaceDescriptionBlock)(buf)
                    ifaces.append(self._idb(idb, little))
                    self.linktypes.add(idb.linktype)
                    self.interfaces.append(ifaces[-1].name)
                    continue
                if btype == pcapng.PCAPNG_BT_EPB:
                    epb = (pcapng.EnhancedPacketBlockLE if little else pcapng.EnhancedPacketBlock)(buf)
                    self.packets += 1
                    if epb.iface_id >= len(ifaces):
                        raise CaptureError(f"{self.path}: packet block at byte {offset} names interface "
                                           f"{epb.iface_id}, which the section does not describe")
                    iface = ifaces[epb.iface_id]
                    direction = None
                    for opt in epb.opts:
                        if opt.code == _EPB_FLAGS and len(opt.data) >= 4:
                            bits = struct.unpack("<I" if little else ">I", opt.data[:4])[0] & 3
                            direction = {1: "in", 2: "out"}.get(bits)
                    ts = (epb.ts_high << 32) | epb.ts_low
                    num, den = iface.ts_unit_ns
                    ts_ns = ts * num // den + iface.ts_offset_s * 1_000_000_000
                    frame = self._frame(self.packets, ts_ns, iface, epb.pkt_data, epb.pkt_len, direction)
                    if frame is not None:
                        yield frame
                    continue
                if btype == pcapng.PCAPNG_BT_SPB:          # no timestamp, no interface but the first
                    self.packets += 1
                    self.skip("simple packet block (no timestamp)")
                    continue
            except (dpkt.UnpackError, struct.error) as exc:
                raise CaptureError(f"{self.path}: pcapng block at byte {offset} cannot be read ({exc})") from None
            # other blocks (statistics, name resolution, custom, ...) say nothing a replay needs

    def _cut_or_fail(self, first: bool, offset: int, what: str) -> None:
        if first:
            raise CaptureError(f"{self.path}: truncated pcapng {what}")
        self.truncated = f"{what} at byte {offset}"

    def _idb(self, idb, little: bool) -> _Iface:
        name = None
        unit = (1000, 1)                  # ns per unit as a fraction; default resolution: microseconds
        offset = 0
        for opt in idb.opts:
            if opt.code == pcapng.PCAPNG_OPT_IF_NAME:
                name = bytes(opt.data).split(b"\0", 1)[0].decode("utf-8", "replace")
            elif opt.code == pcapng.PCAPNG_OPT_IF_TSRESOL and opt.data:
                res = opt.data[0]
                exp = res & 0x7F
                unit = (10**9, 2**exp) if res & 0x80 else (10**9, 10**exp)
            elif opt.code == pcapng.PCAPNG_OPT_IF_TSOFFSET and len(opt.data) >= 8:
                offset = struct.unpack("<q" if little else ">q", opt.data[:8])[0]
        return _Iface(idb.linktype, name, unit, offset)

    # -- link layers --------------------------------------------------------------------------------
    def _check_linktype(self, linktype: int) -> None:
        self.linktypes.add(linktype)
        if linktype not in SUPPORTED:
            raise CaptureError(f"{self.path}: link type {linktype} is not one a replay reads (Ethernet, "
                               "Linux SLL/SLL2, raw IPv4/IPv6)")

    def _frame(self, number: int, ts_ns: int, iface: _Iface, data: bytes, wire_len: int,
               direction: str | None) -> Frame | None:
        lt = iface.linktype
        if lt not in SUPPORTED:
            self.skip(SKIP_LINKTYPE)
            return None
        if len(data) < wire_len:
            self.skip(SKIP_SNAPLEN)
            return None
        name = iface.name
        if lt == LINKTYPE_ETHERNET:
            if len(data) < 14:
                self.skip(SKIP_SHORT)
                return None
            eth = bytes(data)
        elif lt == LINKTYPE_LINUX_SLL:
            if len(data) < 16:
                self.skip(SKIP_SHORT)
                return None
            pkttype, _hatype, alen = struct.unpack_from(">HHH", data, 0)
            proto = struct.unpack_from(">H", data, 14)[0]
            src = bytes(data[6:12]) if alen == 6 else SYNTH_SRC
            if proto < 0x0600:
                self.skip(SKIP_NOT_IP)
                return None
            eth = SYNTH_DST + src + struct.pack(">H", proto) + bytes(data[16:])
            if direction is None:
                direction = "out" if pkttype == _PACKET_OUTGOING else "in"
        elif lt == LINKTYPE_LINUX_SLL2:
            if len(data) < 20:
                self.skip(SKIP_SHORT)
                return None
            proto, _res, ifindex, _hatype, pkttype, alen = struct.unpack_from(">HHIHBB", data, 0)
            src = bytes(data[12:18]) if alen == 6 else SYNTH_SRC
            if proto < 0x0600:
                self.skip(SKIP_NOT_IP)
                return None
            eth = SYNTH_DST + src + struct.pack(">H", proto) + bytes(data[20:])
            if direction is None:
                direction = "out" if pkttype == _PACKET_OUTGOING else "in"
            if name is None:
                name = f"ifindex {ifindex}"
        else:                                       # raw IP: the version says which
            if not data:
                self.skip(SKIP_SHORT)
                return None
            version = data[0] >> 4
            if lt == LINKTYPE_IPV4 or (lt != LINKTYPE_IPV6 and version == 4):
                proto = ETH_P_IP
            elif lt == LINKTYPE_IPV6 or version == 6:
                proto = ETH_P_IPV6
            else:
                self.skip(SKIP_NOT_IP)
                return None
            eth = SYNTH_DST + SYNTH_SRC + struct.pack(">H", proto) + bytes(data)
        return Frame(number, ts_ns, eth, name, direction, len(eth))


def open_capture(path: str) -> Capture:
    """A capture to iterate (nothing is read before the first frame is asked for)."""
    return Capture(str(path))


def read_all(path: str) -> tuple[Capture, list[Frame]]:
    """Every frame of a capture, and the capture's counts."""
    cap = open_capture(path)
    return cap, list(cap)
