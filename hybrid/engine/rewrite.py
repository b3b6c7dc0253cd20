"""Packets the verdict engine hands back to the kernel: rewritten payloads, TCP resets (to the
sender, and on to the receiver), ICMP unreachables.

Every function takes a :class:`hybrid.engine.packet.Packet` and returns new raw IP bytes with every
length and checksum recomputed. Where a rewrite is impossible (not IP, a decode error, a
fragment, no TCP/UDP/ICMP header, a result too long) it raises :class:`HybridError` with a one-line
reason; it never raises anything else.

Payload rewrites keep the packet's length fields consistent but not the TCP sequence space: a
rewrite that changes a TCP payload's length desynchronises the endpoints unless the engine
compensates (fill_payload keeps the length, which is why it is the usual choice).
"""

from __future__ import annotations

import struct

from hybrid.engine.packet import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Packet,
)
from hybrid.errors import HybridError

__all__ = ["transport_checksum_ok", "ICMP_ADMIN_PROHIBITED", "ICMP_HOST_PROHIBITED", "ICMP_PORT_UNREACHABLE",
           "ICMP6_ADMIN_PROHIBITED", "ICMP6_PORT_UNREACHABLE", "checksum", "fill_payload",
           "icmp_unreachable_for", "replace_bytes", "set_payload", "tcp_rst_for", "tcp_rst_onward"]

# ICMPv4 type 3 codes (RFC 792, RFC 1812 5.2.7.1) and ICMPv6 type 1 codes (RFC 4443 3.1).
ICMP_PORT_UNREACHABLE = 3
ICMP_HOST_PROHIBITED = 10
ICMP_ADMIN_PROHIBITED = 13
ICMP6_ADMIN_PROHIBITED = 1
ICMP6_PORT_UNREACHABLE = 4
_NAMED_CODES = {"admin-prohibited": (ICMP_ADMIN_PROHIBITED, ICMP6_ADMIN_PROHIBITED),
                "port-unreachable": (ICMP_PORT_UNREACHABLE, ICMP6_PORT_UNREACHABLE)}

# How much of the offending packet an ICMP error quotes: the whole error must fit in 576 bytes
# for IPv4 (RFC 1812 4.3.2.3, which extends RFC 792's "header + 64 bits") and in the IPv6
# minimum MTU of 1280 (RFC 4443 2.4 (c)).
_QUOTE_V4 = 576 - 20 - 8
_QUOTE_V6 = 1280 - 40 - 8
_TTL = 64

_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_ACK = 0x01, 0x02, 0x04, 0x10
_ICMP_ERRORS_V4 = frozenset((3, 4, 5, 11, 12))
_ROUTING, _AH, _FRAGMENT = 43, 51, 44
_V6_EXT = frozenset((0, 43, 44, 51, 60))


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum of ``data`` (odd length padded with a zero byte): the value to
    store in the checksum field, i.e. the one's complement of the one's complement sum."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    # The one's complement sum of 16-bit words is the big-endian integer modulo 0xFFFF
    # (2**16 == 1 mod 0xFFFF), except that a non-zero sum is 0xFFFF, never 0.
    total = int.from_bytes(data, "big")
    s = total % 0xFFFF
    if s == 0 and total:
        s = 0xFFFF
    return ~s & 0xFFFF


def transport_checksum_ok(pkt: Packet) -> bool:
    """Whether the TCP or UDP checksum of a decoded, unfragmented packet is right (a UDP/IPv4
    checksum of 0, "none", is right), i.e. whether its receiver will take the segment rather
    than discard it. True for other protocols and for packets it cannot check (fragments,
    decode errors): callers only use False. The kernel completes offloaded (CHECKSUM_PARTIAL)
    checksums before it queues a packet (NFQA_CFG_F_GSO is not set), so a wrong one is wrong."""
    proto = pkt.proto
    if (proto != IPPROTO_TCP and proto != IPPROTO_UDP) or pkt.fragment or pkt.error or not pkt.version:
        return True
    raw, l4 = pkt.raw, pkt.l4_off
    end = pkt.payload_off + pkt.payload_len
    if proto == IPPROTO_UDP and pkt.version == 4 and raw[l4 + 6:l4 + 8] == b"\0\0":
        return True
    dst = pkt.dst_bytes if pkt.version == 4 else _final_dst_v6(raw, l4, refuse_ah=False)
    return checksum(_pseudo(pkt.version, pkt.src_bytes, dst, proto, end - l4) + raw[l4:end]) == 0


def _require(pkt: Packet, what: str) -> None:
    if not pkt.version:
        raise HybridError(f"cannot {what}: not an IPv4 or IPv6 packet ({pkt.error or 'undecoded'})")
    if pkt.error:
        raise HybridError(f"cannot {what}: the packet did not decode ({pkt.error})")
    if pkt.fragment:
        raise HybridError(f"cannot {what}: the packet is an IP fragment")


def _final_dst_v6(raw: bytes, l4_off: int, refuse_ah: bool = True) -> bytes:
    """The destination for the IPv6 pseudo-header: the final one when a routing header still
    has segments left (RFC 8200 8.1). Refuses AH unless ``refuse_ah`` is false: a rewrite would
    break its ICV."""
    dst = raw[24:40]
    nh, off = raw[6], 40
    while nh in _V6_EXT and off < l4_off:
        if nh == _FRAGMENT:
            ext_len = 8
        elif nh == _AH:
            ext_len = (raw[off + 1] + 2) << 2
        else:
            ext_len = (raw[off + 1] + 1) << 3
        if nh == _AH and refuse_ah:
            raise HybridError("cannot rewrite the payload: the packet is protected by an IPsec "
                              "authentication header")
        if nh == _ROUTING and raw[off + 3]:           # segments left
            if raw[off + 2] == 4:                     # SRH: Segment List[0] is the last hop
                if ext_len >= 24:
                    dst = raw[off + 8:off + 24]
            elif ext_len >= 24:                       # type 0/2: addresses, last is final
                dst = raw[off + ext_len - 16:off + ext_len]
        nh = raw[off]
        off += ext_len
    return dst


def _pseudo(version: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if version == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def _fix_transport(buf: bytearray, version: int, proto: int, l4_off: int, src: bytes,
                   dst: bytes) -> None:
    """Recompute the TCP/UDP/ICMP/ICMPv6 checksum (and the UDP length) of buf[l4_off:]."""
    l4_len = len(buf) - l4_off
    if proto == IPPROTO_TCP:
        buf[l4_off + 16:l4_off + 18] = b"\0\0"
        c = checksum(_pseudo(version, src, dst, proto, l4_len) + buf[l4_off:])
        struct.pack_into("!H", buf, l4_off + 16, c)
    elif proto == IPPROTO_UDP:
        struct.pack_into("!HH", buf, l4_off + 4, l4_len, 0)
        c = checksum(_pseudo(version, src, dst, proto, l4_len) + buf[l4_off:])
        struct.pack_into("!H", buf, l4_off + 6, c or 0xFFFF)   # 0 means "no checksum"
    elif proto == IPPROTO_ICMP and version == 4:
        buf[l4_off + 2:l4_off + 4] = b"\0\0"
        struct.pack_into("!H", buf, l4_off + 2, checksum(buf[l4_off:]))
    elif proto == IPPROTO_ICMPV6 and version == 6:
        buf[l4_off + 2:l4_off + 4] = b"\0\0"
        c = checksum(_pseudo(version, src, dst, proto, l4_len) + buf[l4_off:])
        struct.pack_into("!H", buf, l4_off + 2, c)
    else:                                             # callers check first
        raise HybridError(f"cannot recompute the checksum of IP protocol {proto}")


def _fix_ip(buf: bytearray, version: int, ip_hdr_len: int) -> None:
    """Set the IP length field(s) of buf and, for IPv4, the header checksum."""
    if version == 4:
        if len(buf) > 0xFFFF:
            raise HybridError(f"cannot build a {len(buf)}-byte IPv4 packet (maximum 65535)")
        struct.pack_into("!H", buf, 2, len(buf))
        buf[10:12] = b"\0\0"
        struct.pack_into("!H", buf, 10, checksum(buf[:ip_hdr_len]))
    else:
        if len(buf) - 40 > 0xFFFF:
            raise HybridError(f"cannot build an IPv6 payload of {len(buf) - 40} bytes (no jumbograms)")
        struct.pack_into("!H", buf, 4, len(buf) - 40)


def set_payload(pkt: Packet, new_payload: bytes) -> bytes:
    """``pkt`` with its transport payload replaced by ``new_payload``, lengths and checksums
    recomputed (IPv4 total length and header checksum, IPv6 payload length, UDP length, the
    TCP/UDP/ICMP/ICMPv6 checksum). Link-layer padding after the IP packet is dropped."""
    _require(pkt, "rewrite the payload")
    proto, version = pkt.proto, pkt.version
    if not (proto == IPPROTO_TCP or proto == IPPROTO_UDP or (proto == IPPROTO_ICMP and version == 4)
            or (proto == IPPROTO_ICMPV6 and version == 6)) or pkt.payload_off <= pkt.l4_off:
        raise HybridError(f"cannot rewrite the payload: IP protocol {proto} is not TCP, UDP or ICMP")
    raw = pkt.raw
    dst = pkt.dst_bytes if version == 4 else _final_dst_v6(raw, pkt.l4_off)
    buf = bytearray(raw[:pkt.payload_off])
    buf += new_payload
    _fix_ip(buf, version, pkt.ip_hlen if version == 4 else 40)
    _fix_transport(buf, version, proto, pkt.l4_off, pkt.src_bytes, dst)
    return bytes(buf)


def replace_bytes(pkt: Packet, old: bytes, new: bytes) -> bytes:
    """``pkt`` with every occurrence of ``old`` in its payload replaced by ``new``."""
    if not old:
        raise HybridError("cannot replace an empty byte string")
    return set_payload(pkt, pkt.payload.replace(old, new))


def fill_payload(pkt: Packet, byte: bytes, end: bytes = b"") -> bytes:
    """``pkt`` with its payload overwritten in place: same length, every byte ``byte``, the last
    ``len(end)`` bytes ``end`` (its tail, if the payload is shorter). ``fill_payload(pkt, b"h",
    b"\\n")`` is the classic rewrite that keeps a TCP stream's sequence space intact."""
    if len(byte) != 1:
        raise HybridError(f"fill_payload needs exactly one fill byte, not {len(byte)}")
    n = pkt.payload_len
    end = end[len(end) - n:] if len(end) > n else end
    return set_payload(pkt, byte * (n - len(end)) + end)


def _ip_header(version: int, src: bytes, dst: bytes, proto: int) -> bytearray:
    """A fresh IP header without options; lengths and checksum are set by _fix_ip."""
    if version == 4:
        return bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, _TTL, proto, 0, src, dst))
    return bytearray(struct.pack("!IHBB16s16s", 6 << 28, 0, proto, _TTL, src, dst))


def _tcp_flags_to_reset(pkt: Packet) -> int:
    """The flags of a TCP segment a RST may answer; HybridError for anything else."""
    _require(pkt, "build a TCP RST")
    if pkt.proto != IPPROTO_TCP or pkt.payload_off <= pkt.l4_off:
        raise HybridError(f"cannot build a TCP RST: IP protocol {pkt.proto} is not TCP")
    if pkt.tcp_flags & _TCP_RST:
        raise HybridError("cannot build a TCP RST in answer to a RST (RFC 9293)")
    return pkt.tcp_flags


def tcp_rst_for(pkt: Packet) -> bytes:
    """A TCP RST from the packet's receiver back to its sender (RFC 9293 3.10.7.1): if the
    packet has ACK, ``seq = its ack``; otherwise ``seq = 0``, ACK set and ``ack = its seq +
    payload length (+1 for SYN, +1 for FIN)``. No options, window 0, TTL/hop limit 64."""
    flags = _tcp_flags_to_reset(pkt)
    if flags & _TCP_ACK:
        seq, ack, out_flags = pkt.tcp_ack, 0, _TCP_RST
    else:
        seq = 0
        ack = (pkt.tcp_seq + pkt.payload_len + bool(flags & _TCP_SYN) + bool(flags & _TCP_FIN)) & 0xFFFFFFFF
        out_flags = _TCP_RST | _TCP_ACK
    version = pkt.version
    buf = _ip_header(version, pkt.dst_bytes, pkt.src_bytes, IPPROTO_TCP)
    l4_off = len(buf)
    buf += struct.pack("!HHIIBBHHH", pkt.dport, pkt.sport, seq, ack, 5 << 4, out_flags, 0, 0, 0)
    _fix_ip(buf, version, 20)
    _fix_transport(buf, version, IPPROTO_TCP, l4_off, pkt.dst_bytes, pkt.src_bytes)
    return bytes(buf)


def tcp_rst_onward(pkt: Packet) -> bytes:
    """A TCP RST from the packet's sender on to its receiver, as if the sender had aborted: the
    second half of an inline reject, so that the receiver (the server, usually) does not keep a
    half-open connection. The packet's own addresses and ports, ``seq = its seq`` (the
    receiver's RCV.NXT when the segment is in order: RFC 5961 3.2 resets only on that exact
    number, anything else in the window draws a challenge ACK), RST+ACK with ``ack = its ack``.
    The ACK changes nothing in a synchronized state, where a RST is judged by its sequence
    number alone (RFC 9293 3.10.7.4), nor in SYN-RECEIVED (Linux's tcp_check_req wants an ACK
    of ISS+1, which the sender's own ack is), and it is required in SYN-SENT, where only a RST
    that acknowledges the SYN counts (3.10.7.3): the receiver of a rejected SYN+ACK.

    Refused for a packet without ACK (a bare SYN): its receiver has no connection to reset (the
    SYN never reached it; a listener ignores RSTs). No options, window 0, TTL/hop limit 64; an
    IPv6 packet still on a routing header's way is reset at its final destination."""
    flags = _tcp_flags_to_reset(pkt)
    if not flags & _TCP_ACK:
        raise HybridError("cannot build a TCP RST onward: a segment without ACK leaves its receiver "
                          "no connection to reset")
    version = pkt.version
    src = pkt.src_bytes
    dst = pkt.dst_bytes if version == 4 else _final_dst_v6(pkt.raw, pkt.l4_off, refuse_ah=False)
    buf = _ip_header(version, src, dst, IPPROTO_TCP)
    l4_off = len(buf)
    buf += struct.pack("!HHIIBBHHH", pkt.sport, pkt.dport, pkt.tcp_seq, pkt.tcp_ack, 5 << 4,
                       _TCP_RST | _TCP_ACK, 0, 0, 0)
    _fix_ip(buf, version, 20)
    _fix_transport(buf, version, IPPROTO_TCP, l4_off, src, dst)
    return bytes(buf)


def icmp_unreachable_for(pkt: Packet, code: int | str = "admin-prohibited") -> bytes:
    """An ICMP destination unreachable from the packet's receiver back to its sender, quoting
    the packet up to 576 bytes in all (IPv4) or 1280 (IPv6).

    ``code``: ``"admin-prohibited"`` (ICMPv4 3/13, ICMPv6 1/1), ``"port-unreachable"`` (3/3,
    1/4), or a number used as the code as is (e.g. :data:`ICMP_HOST_PROHIBITED`). Refused where
    RFC 1122 3.2.2 / RFC 4443 2.4 forbid an error: about an ICMP error, a fragment, or a
    multicast/broadcast packet."""
    _require(pkt, "build an ICMP unreachable")
    version = pkt.version
    if isinstance(code, str):
        if code not in _NAMED_CODES:
            raise HybridError(f"unknown ICMP unreachable code {code!r}; use one of "
                              f"{', '.join(_NAMED_CODES)} or a number")
        code = _NAMED_CODES[code][version == 6]
    elif not (isinstance(code, int) and 0 <= code <= 255):
        raise HybridError(f"ICMP code {code!r} is not a number from 0 to 255")
    if version == 4:
        if pkt.proto == IPPROTO_ICMP and (pkt.icmp_type in _ICMP_ERRORS_V4 or pkt.icmp_type < 0):
            raise HybridError("will not send an ICMP error about an ICMP error (RFC 1122 3.2.2)")
        d0, s0 = pkt.dst_bytes[0], pkt.src_bytes[0]
        if d0 >= 224 or s0 >= 224 or pkt.dst_bytes == b"\xff\xff\xff\xff" or s0 == 0 or s0 == 127:
            raise HybridError("will not send an ICMP error about a multicast, broadcast or "
                              "non-unicast-source packet (RFC 1122 3.2.2)")
        icmp_type, proto, limit = 3, IPPROTO_ICMP, _QUOTE_V4
    else:
        if pkt.proto == IPPROTO_ICMPV6 and (pkt.icmp_type < 128):
            raise HybridError("will not send an ICMPv6 error about an ICMPv6 error (RFC 4443 2.4)")
        if pkt.dst_bytes[0] == 0xFF or pkt.src_bytes[0] == 0xFF or not any(pkt.src_bytes):
            raise HybridError("will not send an ICMPv6 error about a multicast or "
                              "unspecified-source packet (RFC 4443 2.4)")
        icmp_type, proto, limit = 1, IPPROTO_ICMPV6, _QUOTE_V6
    end = pkt.payload_off + pkt.payload_len
    quote = pkt.raw[:min(end, limit)]
    buf = _ip_header(version, pkt.dst_bytes, pkt.src_bytes, proto)
    l4_off = len(buf)
    buf += struct.pack("!BBHI", icmp_type, code, 0, 0)
    buf += quote
    _fix_ip(buf, version, 20)
    _fix_transport(buf, version, proto, l4_off, pkt.dst_bytes, pkt.src_bytes)
    return bytes(buf)
