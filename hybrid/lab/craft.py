"""Packets built by hand for the lab's evasion tests: IPv4 and IPv6 headers, UDP and TCP with
their checksums, and IP fragments cut wherever a test wants them (reversed, overlapping, a tiny
first one), which no socket API will produce. Pure Python, no scapy.

Everything here returns bytes starting at the IP header. :func:`send_ip` hands such packets to
the kernel through a raw socket (``IPPROTO_RAW``: the header is ours, the kernel routes it and,
for IPv4, fills in the header checksum) from inside a lab namespace; it refuses destinations
outside the lab's ranges (198.18.0.0/15, 2001:2::/48).

Fragment offsets are in bytes of the *transport* data (the UDP or TCP header and what follows)
and must be multiples of 8, as on the wire.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import socket
import struct
from collections.abc import Iterable, Sequence

from hybrid.errors import ConfigError
from hybrid.lab.flood import checksum
from hybrid.lab.topology import netns

LAB_V4 = ipaddress.ip_network("198.18.0.0/15")
LAB_V6 = ipaddress.ip_network("2001:2::/48")
UDP, TCP, FRAGMENT6 = socket.IPPROTO_UDP, socket.IPPROTO_TCP, 44
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


@functools.lru_cache(maxsize=4096)
def _addr(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


@functools.lru_cache(maxsize=4096)
def _is_v6(a: str) -> bool:
    return ipaddress.ip_address(a).version == 6


def l4_checksum(src: str, dst: str, proto: int, segment: bytes) -> int:
    """The UDP/TCP checksum of ``segment`` (its checksum field zero) with the pseudo-header of
    the addresses' family."""
    if _is_v6(src):
        pseudo = _addr(src) + _addr(dst) + struct.pack("!I3xB", len(segment), proto)
    else:
        pseudo = _addr(src) + _addr(dst) + struct.pack("!xBH", proto, len(segment))
    return checksum(pseudo + segment)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP header and payload with its checksum."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = l4_checksum(src, dst, UDP, seg) or 0xFFFF     # 0 would mean "no checksum"
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


def tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
        window: int = 65535, options: bytes = b"") -> bytes:
    """A TCP header (``options`` padded to 4 bytes) and payload with its checksum."""
    options += b"\0" * (-len(options) % 4)
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      (5 + len(options) // 4) << 4, flags, window, 0, 0) + options + payload
    return seg[:16] + struct.pack("!H", l4_checksum(src, dst, TCP, seg)) + seg[18:]


def ipv4(src: str, dst: str, proto: int, data: bytes, *, ident: int = 0, ttl: int = 64, offset: int = 0,
         more: bool = False, df: bool = False) -> bytes:
    """An IPv4 header (no options, checksum filled in) and ``data``; ``offset`` (bytes, a
    multiple of 8) and ``more`` make it a fragment."""
    if offset % 8:
        raise ConfigError(f"fragment offset {offset}: must be a multiple of 8")
    flags = (0x4000 if df else 0) | (0x2000 if more else 0) | (offset // 8)
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(data), ident & 0xFFFF, flags, ttl, proto, 0,
                       _addr(src), _addr(dst))
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + data


def ipv6(src: str, dst: str, nexthdr: int, data: bytes, *, hop_limit: int = 64) -> bytes:
    """An IPv6 header and ``data`` (which starts with header ``nexthdr``)."""
    return struct.pack("!IHBB16s16s", 6 << 28, len(data), nexthdr, hop_limit, _addr(src), _addr(dst)) + data


def fragment(src: str, dst: str, proto: int, data: bytes, offset: int, more: bool, ident: int) -> bytes:
    """One IP fragment carrying ``data`` at ``offset`` of a datagram of transport ``proto``:
    IPv4 with MF/offset, or IPv6 with a fragment extension header, by the addresses' family."""
    if _is_v6(src):
        if offset % 8:
            raise ConfigError(f"fragment offset {offset}: must be a multiple of 8")
        fh = struct.pack("!BxHI", proto, offset | int(more), ident & 0xFFFFFFFF)
        return ipv6(src, dst, FRAGMENT6, fh + data)
    return ipv4(src, dst, proto, data, ident=ident, offset=offset, more=more)


def fragments(src: str, dst: str, proto: int, transport: bytes, cuts: Iterable[int], ident: int) -> list[bytes]:
    """``transport`` (a whole UDP or TCP segment) cut at the byte offsets ``cuts`` into fragments,
    in datagram order."""
    bounds = [0, *sorted(set(cuts)), len(transport)]
    if any(not 0 < c < len(transport) for c in bounds[1:-1]):
        raise ConfigError(f"cuts {list(cuts)}: each must lie inside the {len(transport)}-byte segment")
    return [fragment(src, dst, proto, transport[a:b], a, b < len(transport), ident)
            for a, b in itertools.pairwise(bounds)]


def _check_lab(dst: str) -> None:
    addr = ipaddress.ip_address(dst)
    if addr not in (LAB_V6 if addr.version == 6 else LAB_V4):
        raise ConfigError(f"destination {dst}: the lab sends only inside {LAB_V4} and {LAB_V6}")


def raw_socket(ns: str, v6: bool) -> socket.socket:
    """A raw socket in namespace ``ns`` that sends whole IP packets built here."""
    with netns(ns):
        return socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)


def send_ip(ns: str, packets: Sequence[bytes]) -> None:
    """Send ``packets`` (whole IP packets, one family) in this order from namespace ``ns``."""
    if not packets:
        return
    v6 = packets[0][0] >> 4 == 6
    with raw_socket(ns, v6) as s:
        for p in packets:
            dst = str(ipaddress.ip_address(p[24:40] if v6 else p[16:20]))
            _check_lab(dst)
            s.sendto(p, (dst, 0))
