"""The verdict engine's per-packet decoder: raw IPv4/IPv6 bytes from NFQUEUE to a :class:`Packet`.

:func:`decode` is on the hot path (called once per queued packet), so it does only what every
verdict needs: version, addresses as bytes, transport protocol after the IPv6 extension headers,
ports, TCP flags/seq/ack, ICMP type/code and the offsets of the transport header and payload.
Everything else is computed on first access and cached: ``ipaddress`` objects, integer addresses,
the payload bytes, and the protocol views ``http``, ``tls_sni``, ``dns_qname``/``dns_is_response``.

:func:`decode` never raises: a packet it cannot fully decode has ``error`` set to a short reason,
the fields decoded before the problem set, and the others at their defaults (0, -1 for ICMP
type/code, ``None``). Lazy views of a broken or irrelevant packet are ``None``.

The rules follow the tc classifier's parse_packet() in bpf/packet.h: ICMP only over IPv4 and ICMPv6 only over
IPv6; a non-first fragment has no transport header; ICMP echo flows are keyed by the identifier
(see :meth:`Packet.flow_key`, :meth:`Packet.flow_tuple` and :func:`hybrid.datapath.maps.packet_key_ports`).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from hybrid.datapath.maps import flow_key_bytes, packet_key_ports
from hybrid.kernel.abi import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP  # noqa: F401 (re-exported)

__all__ = ["HttpRequest", "Packet", "client_hello_names", "client_hello_sni", "decode", "http_unparsed",
           "normalize_http_path"]

_U16 = struct.Struct("!H").unpack_from
_U16x2 = struct.Struct("!HH").unpack_from
_IPV4_HDR = struct.Struct("!BxHxxHxB")      # ver/ihl, total length, flags/frag offset, protocol
_IPV6_HDR = struct.Struct("!HB")            # at offset 4: payload length, next header
_TCP_HDR = struct.Struct("!HHIIBB")         # ports, seq, ack, data offset, flags
_UDP_HDR = _U16x2

# IPv6 extension headers walked to find the transport (RFC 8200 4.1, RFC 4302).
_HOPOPTS, _ROUTING, _FRAGMENT, _AH, _DSTOPTS = 0, 43, 44, 51, 60
_MAX_EXT_HEADERS = 8
_V6_EXT = frozenset((_HOPOPTS, _ROUTING, _FRAGMENT, _AH, _DSTOPTS))

_UNSET = object()                           # "lazy field not computed yet"
_new = object.__new__
_MAX_HTTP_LINE = 8192


class Packet:
    """One decoded IP packet, built by :func:`decode` only (it has no constructor). Read-only
    by convention, except ``indev``, ``doubt`` and :meth:`set_joined`, which the engine sets.
    ``doubt`` (None, or a reason like "join:abandoned") says the bytes decided on may not be
    what the server reads: the engine then never bypasses the flow on this packet (loop.py).

    ``ip_hlen`` counts every header before the transport one (IPv4 options, IPv6 extension
    headers), so ``l4_off == ip_hlen``. ``payload_off``/``payload_len`` delimit the transport
    payload (ICMP: after the 8-byte header; a non-first fragment: its fragment data) within the
    IP length, ignoring any link-layer padding after it.
    """

    __slots__ = ("raw", "version", "proto", "src_bytes", "dst_bytes", "sport", "dport",
                 "tcp_flags", "tcp_seq", "tcp_ack", "icmp_type", "icmp_code", "ip_hlen",
                 "l4_off", "payload_off", "payload_len", "fragment", "error", "indev",
                 "doubt", "_src", "_dst", "_payload", "_http", "_sni", "_dns")

    # The ports whose payloads the DNS view reads (a rules file's dns_ports; RuleSet.decide sets
    # them: one set per process, as one engine runs one rules file).
    dns_ports: frozenset = frozenset((53,))

    def __repr__(self) -> str:
        if not self.version:
            return f"<Packet error={self.error!r} len={len(self.raw)}>"
        err = f" error={self.error!r}" if self.error else ""
        frag = " fragment" if self.fragment else ""
        return (f"<Packet v{self.version} proto={self.proto} {self.src}:{self.sport} -> "
                f"{self.dst}:{self.dport} payload={self.payload_len}{frag}{err}>")

    # -- addresses -------------------------------------------------------------------------

    @property
    def src(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        if self._src is _UNSET:
            self._src = _ip_object(self.src_bytes)
        return self._src

    @property
    def dst(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        if self._dst is _UNSET:
            self._dst = _ip_object(self.dst_bytes)
        return self._dst

    @property
    def ttl(self) -> int:
        """IPv4 TTL or IPv6 hop limit, as the engine got the packet (0 when not decoded)."""
        if self.version == 4:
            return self.raw[8]
        return self.raw[7] if self.version == 6 else 0

    @property
    def src_int(self) -> int:
        return int.from_bytes(self.src_bytes, "big")

    @property
    def dst_int(self) -> int:
        return int.from_bytes(self.dst_bytes, "big")

    def flow_tuple(self) -> tuple:
        """``(src, dst, sport, dport, proto)`` ready for :func:`hybrid.datapath.maps.flow_key`: addresses
        as ``ipaddress`` objects (``None`` if undecodable), and for ICMP/ICMPv6 echo the
        identifier as both ports, like the BPF classifier (:func:`hybrid.datapath.maps.packet_key_ports`)."""
        sport, dport = self.sport, self.dport
        if self.icmp_type >= 0:                 # an ICMP header of the packet's own IP version
            sport, dport = packet_key_ports(self.version, self.proto, sport, dport, self.raw, self.l4_off)
        return (self.src, self.dst, sport, dport, self.proto)

    def flow_key(self) -> tuple[bytes, int] | None:
        """The key the tc program builds for this packet, as the bytes of ``struct flow_key``
        (VLAN 0: a queued packet has no link-layer header), and the packet's direction (0: from
        the "lo" endpoint). ``None`` where the tc program builds none: not IP, a fragment, a
        header that does not decode, ICMP over the other IP version. The verdict engine writes
        its flow verdicts under this key."""
        if not self.version or self.fragment or self.error:
            return None
        proto = self.proto
        if proto == 6 or proto == 17:           # TCP, UDP: their ports (packet_key_ports() without the call)
            return flow_key_bytes(self.src_bytes, self.dst_bytes, self.sport, self.dport, proto)
        ports = packet_key_ports(self.version, proto, self.sport, self.dport, self.raw, self.l4_off)
        if ports is None:
            return None
        return flow_key_bytes(self.src_bytes, self.dst_bytes, ports[0], ports[1], proto)

    # -- payload and protocol views --------------------------------------------------------

    @property
    def payload(self) -> bytes:
        if self._payload is _UNSET:
            off = self.payload_off
            self._payload = self.raw[off:off + self.payload_len] if self.payload_len else b""
        return self._payload

    @property
    def http(self) -> HttpRequest | None:
        """The HTTP/1.x request starting this TCP payload, or ``None``."""
        if self._http is _UNSET:
            self._http = (_parse_http(self.payload) if self.proto == IPPROTO_TCP and self.payload_len
                          and self.payload_off > self.l4_off else None)
        return self._http

    @property
    def tls_sni(self) -> str | None:
        """The server_name of the TLS ClientHello starting this TCP payload, or ``None``."""
        if self._sni is _UNSET:
            self._sni = (_parse_sni(self.payload) if self.proto == IPPROTO_TCP and self.payload_len
                         and self.payload_off > self.l4_off else None)
        return self._sni

    def set_joined(self, data: bytes, *, http: bool) -> None:
        """Read this segment's ``http`` view (``http=True``) or its ``tls_sni`` view from
        ``data`` instead of its own payload: the request head or ClientHello that the engine
        joined from its flow's segments, ending with this one (hybrid.engine.join)."""
        if http:
            self._http = _parse_http(data)
        else:
            self._sni = _parse_sni(data)

    def message(self, data: bytes) -> Packet:
        """A copy of this packet whose payload (and every view of it) is ``data``: one message
        of several the packet carries (a request head after a body, a pipelined request, a DNS
        message on a TCP connection), for the rules to decide on its own (hybrid.engine.follow).
        Headers, addresses and ports stay the packet's."""
        p = Packet.__new__(Packet)
        for name in Packet.__slots__:
            setattr(p, name, getattr(self, name))
        p._payload, p.payload_len = data, len(data)
        p._http = p._sni = p._dns = _UNSET
        p.doubt = None
        return p

    def names_read(self) -> tuple[str, str] | None:
        """(view, name) of the name the rules read from this packet, if one was read: ``http_host``,
        ``tls_sni`` or ``dns_qname``. Nothing is parsed here (a view no rule read stays unread):
        for the verdict log, which says what name a decision was about."""
        if self._http is not _UNSET and self._http is not None and self._http.host:
            return "http_host", self._http.host
        if self._sni is not _UNSET and self._sni:
            return "tls_sni", self._sni
        if self._dns is not _UNSET and self._dns[1] is not None:
            return "dns_qname", self._dns[1]
        return None

    def set_sni(self, name: str | None) -> None:
        """Read this datagram's ``tls_sni`` view as ``name``: a server_name the engine read from
        the ClientHello carried in its QUIC Initial packets (hybrid.engine.quic), which a TLS
        record parse of the UDP payload cannot see."""
        self._sni = name

    @property
    def dns_qname(self) -> str | None:
        """The question name of a DNS message to or from a DNS port (53, or the rules' dns_ports) as the server reads it
        (compression pointers followed, ASCII lower-cased, no final dot; ``""`` for the root),
        or ``None`` when there is none or it cannot be read: see :func:`_parse_dns` and
        :attr:`dns_unparsed`. With several questions, the first one."""
        return self._dns_view()[1]

    @property
    def dns_is_response(self) -> bool | None:
        """QR bit of a DNS message to or from port 53; ``None`` when this is not one."""
        return self._dns_view()[0]

    @property
    def dns_unparsed(self) -> str | None:
        """Why the DNS view could not read this message's question name exactly (a short
        reason, see :data:`DNS_UNPARSED`), or ``None`` when it could, when this is not DNS, or
        when nothing read the view (this never parses: the engine counts what rules read)."""
        return None if self._dns is _UNSET else self._dns[2]

    def _dns_view(self) -> tuple:
        if self._dns is _UNSET:
            self._dns = _NO_DNS
            ports = Packet.dns_ports
            if self.payload_len and (self.sport in ports or self.dport in ports):
                if self.proto == IPPROTO_UDP:
                    self._dns = _parse_dns(self.payload, 0)
                elif self.proto == IPPROTO_TCP:
                    self._dns = _parse_dns_tcp(self.payload)
        return self._dns


def _ip_object(packed: bytes):
    if len(packed) == 4:
        return ipaddress.IPv4Address(packed)
    if len(packed) == 16:
        return ipaddress.IPv6Address(packed)
    return None


def decode(raw: bytes) -> Packet:
    """Decode one IP packet (no link-layer header). Never raises; see the module docstring."""
    # Everything is computed in locals and stored once at the end: attribute stores dominate
    # the cost of this function, so no field is written twice.
    version = proto = sport = dport = flags = seq = ack = l4_off = payload_off = payload_len = 0
    icmp_type = icmp_code = -1
    src = dst = b""
    fragment = False
    error = None
    if raw.__class__ is not bytes:                      # bytearray/memoryview: slices must be bytes
        raw = bytes(raw)
    n = len(raw)
    while True:                                         # once; `break` is the single exit
        if not n:
            error = "empty packet"
            break
        ver = raw[0] >> 4
        if ver == 4:
            if n < 20:
                error = "truncated IPv4 header"
                break
            vihl, total, frag, proto4 = _IPV4_HDR.unpack_from(raw)
            hlen = (vihl & 15) << 2
            if hlen < 20:
                error = "bad IPv4 header length"
                break
            if hlen > n:
                error = "truncated IPv4 options"
                break
            version, proto = 4, proto4
            src, dst = raw[12:16], raw[16:20]
            l4_off = payload_off = off = hlen
            if total < hlen:
                error = "bad IPv4 total length"
                break
            if total > n:
                error = "truncated IPv4 packet"
                break
            end = total
            if frag & 0x3FFF:                           # MF set or offset != 0
                fragment = True
                if frag & 0x1FFF:                       # non-first: no transport header
                    payload_len = end - hlen
                    break
        elif ver == 6:
            if n < 40:
                error = "truncated IPv6 header"
                break
            plen, proto = _IPV6_HDR.unpack_from(raw, 4)
            version = 6
            src, dst = raw[8:24], raw[24:40]
            l4_off = payload_off = off = 40
            end = 40 + plen
            if end > n:
                error = "truncated IPv6 packet"
                break
            if proto in _V6_EXT:
                proto, off, fragment, nonfirst, error = _walk_v6(raw, proto, end)
                l4_off = payload_off = off
                if error:
                    break
                if nonfirst:
                    payload_len = end - off
                    break
        else:
            error = "not IPv4 or IPv6"
            break

        # Transport header at `off`, IP payload ends at `end`.
        avail = end - off
        if proto == IPPROTO_TCP:
            if avail < 20:
                error = "truncated TCP header"
                break
            sport, dport, seq, ack, doff, flags = _TCP_HDR.unpack_from(raw, off)
            flags |= (doff & 1) << 8                    # NS/AE bit above CWR
            doff = (doff >> 4) << 2
            if doff < 20:
                error = "bad TCP data offset"
                break
            if doff > avail:
                error = "truncated TCP options"
                break
            payload_off = off + doff
            payload_len = avail - doff
        elif proto == IPPROTO_UDP:
            if avail < 8:
                error = "truncated UDP header"
                break
            sport, dport = _UDP_HDR(raw, off)
            payload_off = off + 8
            payload_len = avail - 8
        elif (proto == IPPROTO_ICMP and version == 4) or (proto == IPPROTO_ICMPV6 and version == 6):
            if avail < 8:
                error = "truncated ICMP header"
                break
            icmp_type = raw[off]
            icmp_code = raw[off + 1]
            payload_off = off + 8
            payload_len = avail - 8
        else:
            payload_len = avail                         # unknown transport: all of it
        break

    p = _new(Packet)
    p.raw = raw
    p.version = version
    p.proto = proto
    p.src_bytes = src
    p.dst_bytes = dst
    p.sport = sport
    p.dport = dport
    p.tcp_flags = flags
    p.tcp_seq = seq
    p.tcp_ack = ack
    p.icmp_type = icmp_type
    p.icmp_code = icmp_code
    p.ip_hlen = p.l4_off = l4_off
    p.payload_off = payload_off
    p.payload_len = payload_len
    p.fragment = fragment
    p.error = error
    p.doubt = None
    p.indev = None
    p._src = p._dst = p._payload = p._http = p._sni = p._dns = _UNSET
    return p


def _walk_v6(raw: bytes, nh: int, end: int) -> tuple:
    """Walk IPv6 extension headers from offset 40: (next header, its offset, fragment,
    non-first fragment, error)."""
    off = 40
    fragment = False
    for _ in range(_MAX_EXT_HEADERS):
        if off + 8 > end:
            return nh, off, fragment, False, "truncated IPv6 extension header"
        if nh == _FRAGMENT:
            ext_len = 8
            fragment = True
            nonfirst = _U16(raw, off + 2)[0] & 0xFFF8
        else:
            ext_len = (raw[off + 1] + 2) << 2 if nh == _AH else (raw[off + 1] + 1) << 3
            nonfirst = 0
        if off + ext_len > end:
            return nh, off, fragment, False, "truncated IPv6 extension header"
        nh = raw[off]
        off += ext_len
        if nonfirst:
            return nh, off, fragment, True, None
        if nh not in _V6_EXT:
            return nh, off, fragment, False, None
    return nh, off, fragment, False, "too many IPv6 extension headers"


# -- protocol views (lazy; bounded; return None on anything unexpected) ---------------------

# -- HTTP/1.x request heads, read as the server reads them (RFC 9112, nginx 1.22) -----------------
#
# One reading, the server's: what nginx serves is what the rules must see. So the parser skips
# empty lines before the request line, accepts bare LF line ends and the runs of spaces nginx
# accepts, any HTTP/1.x version nginx accepts (1.0-1.99), takes the host of an absolute-form
# target over the Host header (RFC 9112 3.2.2), reads Host as nginx's ngx_http_validate_host()
# does (lowercase, port and one trailing dot dropped), and normalises the path as nginx does
# before location matching (percent-decoding of every octet, dot segments, merged slashes).
# A head whose host is ambiguous (several Host lines, a Host that differs from the target's
# authority, userinfo in it) carries every candidate in ``hosts`` and a ``doubt``; a head that
# may be a request but does not parse has ``http_unparsed()`` reason: the engine bypasses neither.

_METHOD_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-"          # nginx: anything else is 400
_NAME_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"
_SCHEME_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-."
_HEX = frozenset(b"0123456789abcdefABCDEF")


class HttpRequest(NamedTuple):
    """An HTTP/1.x request head as the server reads it. ``host``: the authority of an
    absolute-form target, else the Host header (lowercase, no port, no final dot; ``None`` when
    absent or not yet seen). ``path``: the target's path normalised as nginx does for location
    matching, then its query unchanged (``?...``); other targets (``*``, authority-form) as sent.
    ``hosts``: every candidate host when they disagree or repeat (else empty; an absolute-form
    target's authority alone, as the server reads it, when a Host line disagrees); ``doubt``: why
    the head cannot be attributed to one host with certainty (``None`` normally): the engine
    never bypasses it.
    ``paths``: with requests pipelined after this one in the same bytes, the path of each."""
    method: str
    host: str | None
    path: str
    hosts: tuple = ()
    doubt: str | None = None
    paths: tuple = ()


def _skip_empty_lines(data: bytes) -> int:
    """Offset of the first byte that is not CR or LF (nginx skips them before a request line)."""
    i, n = 0, min(len(data), _MAX_HTTP_LINE)
    while i < n and data[i] in b"\r\n":
        i += 1
    return i


def _request_line(line: bytes):
    """(method, target, version or None for HTTP/0.9) of a request line without its line end,
    or a reason string when nginx would not accept it."""
    method, sp, rest = line.partition(b" ")
    if not sp or not method or method.translate(None, _METHOD_CHARS):
        return "bad_method"
    rest = rest.lstrip(b" ").rstrip(b" ")
    target, sp, version = rest.rpartition(b" ")
    if not sp:
        if method != b"GET" or not rest:                 # HTTP/0.9: GET only
            return "bad_request_line"
        target, version = rest, None
    else:
        target = target.rstrip(b" ")
        if version != b"HTTP/1.1" and version != b"HTTP/1.0":
            major, dot, minor = version[5:].partition(b".")
            if (version[:5] != b"HTTP/" or not dot or major != b"1" or not minor.isdigit()
                    or not minor.isascii() or int(minor) > 99):
                return "bad_version"
    if not target or b" " in target or b"\t" in target or b"\r" in target or b"\0" in target:
        return "bad_target"
    return method, target, version


def _parse_http(data: bytes) -> HttpRequest | None:
    """The request head at the start of ``data``, or ``None`` (see :func:`http_unparsed`)."""
    r = _read_http(data)
    return r if r.__class__ is HttpRequest else None


def _read_http(data: bytes, depth: int = 0):
    """:class:`HttpRequest`, or the reason string why ``data`` is not one. Requests pipelined
    after it in ``data`` (the server serves them all) make it ambiguous: ``hosts`` and ``paths``
    then hold those of every request."""
    start = _skip_empty_lines(data) if data[:1] in (b"\r", b"\n") else 0
    eol = data.find(b"\n", start, start + _MAX_HTTP_LINE)
    if eol < 0:
        return "incomplete" if len(data) - start < _MAX_HTTP_LINE else "line_too_long"
    end = eol - 1 if eol > start and data[eol - 1] == 13 else eol
    line = data[start:end]
    rl = line.split(b" ")
    if (len(rl) == 3 and (rl[2] == b"HTTP/1.1" or rl[2] == b"HTTP/1.0") and rl[0].isalpha()
            and rl[0].isupper() and rl[1][:1] == b"/" and b"\t" not in line and b"\0" not in line):
        method, target, version = rl                    # the common case, checked at once
    else:
        rl = _request_line(line)
        if rl.__class__ is str:
            return rl
        method, target, version = rl
    doubt = None
    hosts = []
    paths = ()
    if target[:1] == b"/":
        if b"%" in target or b"/." in target or b"//" in target:
            path = _http_path(target)
        else:
            path = target.decode("latin-1")
        authority = None
    else:
        scheme, sep, after = target.partition(b"://")
        if sep and scheme and not scheme.translate(None, _SCHEME_CHARS) and scheme[:1].isalpha():
            cut = len(after)
            for c in (b"/", b"?"):
                i = after.find(c)
                if 0 <= i < cut:
                    cut = i
            authority, rest = after[:cut], after[cut:]
            if b"@" in authority:
                doubt = "userinfo"                      # nginx: 400; the rules still see it
                hosts.append(_http_host(authority))
                authority = authority.rpartition(b"@")[2]
            path = _http_path(rest) if rest[:1] == b"/" else "/" + rest.decode("latin-1")
        else:
            authority = None
            path = target.decode("latin-1")             # "*", authority-form: as sent
    if path is None:
        return "bad_path"
    if authority is not None:
        host = _http_host(authority)
        hosts.append(host)
    else:
        host = None
    if version is not None:
        # Host lines of the head (ends at the first empty line), found in one lowercase copy:
        # a line starting "host:" (a name with spaces or another prefix is not Host to nginx).
        stop = hend = len(data)
        for blank in (b"\n\r\n", b"\n\n"):
            i = data.find(blank, eol)
            if 0 <= i < stop:
                stop, hend = i, i + len(blank)
        head = data[eol:stop].lower()
        seen = head.count(b"\nhost:")
        if seen:
            i = head.find(b"\nhost:") + 6
            while True:
                j = head.find(b"\n", i)
                h = _http_host(data[eol + i:eol + j if j >= 0 else stop].strip(b" \t\r"))
                hosts.append(h)
                if authority is None and host is None:
                    host = h
                i = head.find(b"\nhost:", i)
                if i < 0:
                    break
                i += 6
        if seen > 1:
            doubt = doubt or "duplicate_host"
        elif seen and authority is not None and hosts[-1] != host and doubt is None:
            doubt = "host_conflict"                      # the server reads the authority only (RFC
            del hosts[1:]                                # 9112 3.2.2): rules too; never bypassed
        if hend < len(data):                            # more after the head: a body, or requests
            if b"\ntransfer-encoding:" in head:
                doubt = doubt or "pipelined_body"        # chunked: where the next request starts is unsure
            else:
                cl = head.find(b"\ncontent-length:")
                if cl >= 0:
                    j = head.find(b"\n", cl + 1)
                    value = head[cl + 16:j if j >= 0 else len(head)].strip(b" \t\r")
                    hend += int(value) if value.isdigit() and len(value) < 10 else 0
                rest = data[hend:]
                if rest.strip(b"\r\n"):
                    nxt = _read_http(rest, depth + 1) if depth < 8 else "too_many_requests"
                    if nxt.__class__ is HttpRequest:
                        doubt = doubt or "pipelined"
                        if not hosts:
                            hosts.append(host)
                        hosts.extend(nxt.hosts or (nxt.host,))
                        paths = (path,) + (nxt.paths or (nxt.path,))
                    elif http_unparsed(rest) is not None:
                        doubt = doubt or "pipelined_unparsed"
    if doubt is None:
        return HttpRequest(method.decode("latin-1"), host, path)
    return HttpRequest(method.decode("latin-1"), host, path, tuple(dict.fromkeys(hosts)), doubt, paths)


def _http_host(value: bytes) -> str:
    """A Host value (or an authority) as nginx's server_name matching sees it: lowercase, the
    port dropped (after the first ':' outside brackets), the brackets of an IPv6 literal
    dropped, one trailing dot dropped."""
    if value.startswith(b"["):                           # [v6]:port
        close = value.find(b"]")
        if close > 0:
            value = value[1:close]
    else:
        colon = value.find(b":")
        if colon >= 0:
            value = value[:colon]
    if value.endswith(b"."):
        value = value[:-1]
    return value.decode("latin-1").lower()


def _http_path(target: bytes) -> str | None:
    """An origin-form target's path as nginx matches locations: every %XX decoded (the decoded
    octet then counts as what it is: ``%2F`` a slash, ``%2E`` a dot), slashes merged, ``.`` and
    ``..`` segments resolved; the query after ``?`` kept as sent. ``None`` where nginx answers
    400 (a bad escape, ``..`` above the root)."""
    path, q, query = target.partition(b"?")
    if b"%" in path:
        parts = path.split(b"%")
        out = [parts[0]]
        for part in parts[1:]:
            if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
                return None
            out.append(bytes((int(part[:2], 16),)) + part[2:])
        path = b"".join(out)
    if b"//" in path or b"/." in path:
        segs = []
        for seg in path.split(b"/")[1:]:
            if seg == b"" or seg == b".":
                continue
            if seg == b"..":
                if not segs:
                    return None
                segs.pop()
                continue
            segs.append(seg)
        last = path.rsplit(b"/", 1)[1]
        path = b"/" + b"/".join(segs)
        if segs and last in (b"", b".", b".."):
            path += b"/"
    text = path.decode("latin-1")
    return text + "?" + query.decode("latin-1") if q else text


def normalize_http_path(path: str) -> str:
    """A path (a rule's prefix) normalised as :attr:`HttpRequest.path` is; unchanged when
    nginx would refuse it."""
    norm = _http_path(path.encode("latin-1"))
    return path if norm is None else norm


def http_unparsed(data: bytes) -> str | None:
    """Why ``data``, which may still be the start of an HTTP request (a method token at its
    start, after any empty lines), is not one the parser can read: ``None`` when it is not a
    candidate or parses. The engine keeps such a flow inspected instead of bypassing it."""
    start = _skip_empty_lines(data) if data[:1] in (b"\r", b"\n") else 0
    if start >= len(data):
        return "incomplete" if data else None           # empty lines only, so far
    first = data[start]
    if not (0x41 <= first <= 0x5A or first == 0x5F or first == 0x2D):
        return None
    token = data[start:start + 64].split(b" ", 1)
    if token[0].translate(None, _METHOD_CHARS) or (len(token) == 1 and len(token[0]) == 64):
        return None                                     # not a method, or nothing like one
    r = _read_http(data)
    return r if r.__class__ is str else None


def http_head_missing(d: bytes) -> bool:
    """Whether ``d`` can be the start of an HTTP/1.x request whose Host line (or the end of its
    headers) has not arrived yet. An evader who sends the request head in pieces (one byte at a
    time, or cutting the Host line in two) must not get a decision on the first piece: the Host
    rules would see no host, or a truncated one. True only while ``d`` is a plausible prefix, read
    as the server reads it (empty lines first, CRLF or bare LF): a method being typed, or a valid
    request line followed by complete header lines, none of them Host, and no blank line yet."""
    start = _skip_empty_lines(d) if d[:1] in (b"\r", b"\n") else 0
    n = len(d)
    if start >= n:
        return 0 < n < _MAX_HTTP_LINE                    # only empty lines so far
    if d.find(b"\n\n", start) >= 0 or d.find(b"\n\r\n", start) >= 0:
        return False                                     # the head has ended (most requests: at once)
    eol = d.find(b"\n", start, start + _MAX_HTTP_LINE)
    if eol < 0:
        if n - start >= _MAX_HTTP_LINE:
            return False
        method = d[start:].split(b" ", 1)[0]
        return 0 < len(method) <= 16 and not method.translate(None, _METHOD_CHARS)
    if _parse_http(d[:eol + 1]) is None:
        return False                                     # not an HTTP request line: decide now
    pos = eol + 1
    while True:
        nxt = d.find(b"\n", pos)
        if nxt < 0:
            return True                                  # a header line still arriving
        if nxt == pos or d[pos:pos + 5].lower() == b"host:" or (nxt == pos + 1 and d[pos] == 13):
            return False                                 # end of headers, or a whole Host line
        pos = nxt + 1


# -- TLS ClientHello: records joined as a TLS server joins them ---------------------------------
# Limits measured against OpenSSL 3.0's s_server (docs/design.md, "TLS evasions"): a handshake
# record longer than 2**14 bytes is fatal (record_overflow), as are a 33rd empty record in a row
# (unexpected_message) and any record of another content type before the ClientHello is whole
# (unexpected_message). OpenSSL accepts a ClientHello of up to 131396 bytes; we join at most
# TLS_HELLO_MAX handshake bytes and TLS_HELLO_MAX_RECORDS records, and a larger one is never
# bypassed (see client_hello_problem()).
TLS_RECORD_MAX = 16384
TLS_MAX_EMPTY_RECORDS = 32
TLS_HELLO_MAX = 65536
TLS_HELLO_MAX_RECORDS = 16384
# Why a ClientHello gave no server_name a rule may trust (client_hello_problem(); the engine
# counts them in hellos_unparsed and never bypasses such a flow).
TLS_UNPARSED = ("interleaved", "record_overflow", "empty_records", "too_big", "too_many_records",
                "sni_malformed", "sni_duplicate", "hello_malformed", "incomplete")


def tls_client_hello(d: bytes) -> tuple[bytes, int, str | None]:
    """Join the handshake records at the start of ``d`` as a TLS server does: strip each record's
    header and concatenate their fragments, up to the end of the first handshake message.
    Returns ``(handshake bytes, missing, problem)``:

    - ``problem`` ``None``, ``missing`` 0: the ClientHello is whole (``handshake`` holds exactly it,
      its 4-byte header included), or ``d`` does not start a ClientHello at all (``handshake``
      empty: not our business; a server aborts on a first handshake message of another type, and
      a later segment of a flow decided already may start with a record too);
    - ``problem`` ``None``, ``missing`` > 0: a prefix of a ClientHello; at least that many more
      bytes must arrive (a lower bound: later record headers are not counted);
    - ``problem`` set: what a server would abort on, or what we will not join: ``"interleaved"``
      (another content type before the ClientHello is whole), ``"record_overflow"``,
      ``"empty_records"``, ``"too_big"``, ``"too_many_records"``.
    """
    n = len(d)
    if not n or d[0] != 22 or (n > 1 and d[1] != 3):
        return b"", 0, None                              # not a TLS handshake record (major 3)
    parts = []
    have = 0
    want = 0                                             # 4 + message length, once known
    pos = records = empty = 0
    while True:
        if pos + 5 > n:                                  # a record header still (partly) to come
            if pos < n and d[pos] != 22:
                return b"".join(parts), 0, "interleaved"
            if pos + 1 < n and d[pos + 1] != 3:
                return b"".join(parts), 0, "interleaved"
            need = (want - have) if want else 4 - have
            return b"".join(parts), (pos + 5 - n) + max(need, 1), None
        if d[pos] != 22 or d[pos + 1] != 3:
            return b"".join(parts), 0, "interleaved"
        rlen = _U16(d, pos + 3)[0]
        if rlen > TLS_RECORD_MAX:
            return b"".join(parts), 0, "record_overflow"
        records += 1
        if records > TLS_HELLO_MAX_RECORDS:
            return b"".join(parts), 0, "too_many_records"
        if rlen:
            empty = 0
        else:
            empty += 1
            if empty > TLS_MAX_EMPTY_RECORDS:
                return b"".join(parts), 0, "empty_records"
        frag = d[pos + 5:pos + 5 + rlen]
        if frag:
            if not have and frag[0] != 1:
                return b"", 0, None                      # another handshake message: not ours
            parts.append(frag)
            have += len(frag)
        if not want and have >= 4:
            hs = b"".join(parts)
            parts = [hs]
            want = 4 + int.from_bytes(hs[1:4], "big")
            if want > TLS_HELLO_MAX:
                return hs, 0, "too_big"
        if want and have >= want:
            return b"".join(parts)[:want], 0, None
        if len(frag) < rlen:                             # the record continues in a later segment
            need = (want - have) if want else 4 - have
            return b"".join(parts), max(rlen - len(frag), need), None
        pos += 5 + rlen


def _sni_in_hello(h: bytes) -> tuple[str | None, str | None]:
    """``(server_name, problem)`` of the ClientHello handshake message ``h`` (from its type byte;
    possibly a prefix), parsed as OpenSSL 3.0 parses it (RFC 8446 4.1.2, RFC 6066 3). The name is
    returned as sent (no case or dot change: the rules normalise). ``problem``: ``"sni_malformed"``
    (an empty or inconsistent list, a type other than host_name, more than one name, an empty,
    over-long or NUL-holding name: OpenSSL aborts on each), ``"sni_duplicate"`` (two server_name
    extensions), ``"hello_malformed"`` (lengths past the end of a whole message). A prefix that
    ends before the server_name extension gives ``(None, None)``."""
    n = len(h)
    if n < 4 or h[0] != 1:
        return None, None
    end = min(n, 4 + int.from_bytes(h[1:4], "big"))
    whole = end == 4 + int.from_bytes(h[1:4], "big")
    bad = (None, "hello_malformed") if whole else (None, None)
    pos = 4 + 2 + 32                                     # client_version, random
    if pos + 1 > end:
        return bad
    pos += 1 + h[pos]                                    # session_id
    if pos + 2 > end:
        return bad
    pos += 2 + _U16(h, pos)[0]                           # cipher_suites
    if pos + 1 > end:
        return bad
    pos += 1 + h[pos]                                    # compression_methods
    if pos == end and whole:
        return None, None                                # no extensions at all
    if pos + 2 > end:
        return bad
    ext_end = pos + 2 + _U16(h, pos)[0]
    if whole and ext_end != end:
        return bad
    ext_end = min(ext_end, end)
    pos += 2
    name = None
    while pos + 4 <= ext_end:
        etype, elen = _U16x2(h, pos)
        pos += 4
        if pos + elen > ext_end:
            return bad if whole else (name, None)
        if etype == 0:                                   # server_name
            if name is not None:
                return None, "sni_duplicate"
            lst = h[pos:pos + elen]
            # ServerNameList: exactly one host_name (OpenSSL accepts no other shape).
            if (len(lst) < 5 or _U16(lst, 0)[0] != len(lst) - 2 or lst[2] != 0
                    or _U16(lst, 3)[0] != len(lst) - 5):
                return None, "sni_malformed"
            raw = lst[5:]
            if not raw or len(raw) > 255 or 0 in raw:
                return None, "sni_malformed"
            name = raw.decode("latin-1")
        pos += elen
    if whole and pos != ext_end:
        return bad
    return name, None


def client_hello_sni(h: bytes) -> tuple[str | None, str | None]:
    """``(server_name, problem)`` of the whole ClientHello handshake message ``h`` (from its type
    byte, no TLS record around it: QUIC carries handshake messages in CRYPTO frames), read as
    :func:`_sni_in_hello` reads it; the name lower-cased as :func:`_parse_sni` gives it."""
    name, problem = _sni_in_hello(h)
    return (None if name is None else name.lower()), problem


def client_hello_names(h: bytes) -> tuple[str, ...]:
    """Every name a server might take from the ClientHello handshake message ``h`` when
    :func:`client_hello_sni` finds its server_name ambiguous or malformed: each entry of each
    server_name extension, of any name type, lower-cased, in order, duplicates once (OpenSSL
    refuses two server_name extensions, aioquic takes the last one). Lengths are followed only
    as far as the bytes go; nothing else is checked."""
    n = len(h)
    if n < 4 or h[0] != 1:
        return ()
    end = min(n, 4 + int.from_bytes(h[1:4], "big"))
    pos = 4 + 2 + 32                                     # client_version, random
    if pos + 1 > end:
        return ()
    pos += 1 + h[pos]                                    # session_id
    if pos + 2 > end:
        return ()
    pos += 2 + _U16(h, pos)[0]                           # cipher_suites
    if pos + 1 > end:
        return ()
    pos += 1 + h[pos]                                    # compression_methods
    if pos + 2 > end:
        return ()
    ext_end = min(end, pos + 2 + _U16(h, pos)[0])
    pos += 2
    names = []
    while pos + 4 <= ext_end:
        etype, elen = _U16x2(h, pos)
        pos += 4
        if etype == 0:                                   # server_name: its list's entries
            stop = min(pos + elen, ext_end)
            p = pos + 2
            while p + 3 <= stop:
                ln = _U16(h, p + 1)[0]
                raw = h[p + 3:min(p + 3 + ln, stop)]
                if raw:
                    names.append(raw.decode("latin-1").lower())
                p += 3 + ln
        pos += elen
    return tuple(dict.fromkeys(names))


def client_hello_problem(d: bytes) -> str | None:
    """Why the TLS ClientHello starting ``d`` (a segment's payload, or the bytes joined) gives
    no server_name a rule may trust: a reason of :func:`tls_client_hello` or :func:`_sni_in_hello`,
    or ``"incomplete"`` (the bytes end before the server_name extension does: a join given up).
    ``None`` when a name is found, when the ClientHello is whole and has none, or when ``d`` is
    not a TLS handshake record. The engine never bypasses a flow with a problem."""
    hs, missing, problem = tls_client_hello(d)
    if problem:
        return problem
    name, problem = _sni_in_hello(hs)
    if problem or name is not None:
        return problem
    return "incomplete" if missing else None


def client_hello_missing(d: bytes) -> int:
    """How many more bytes (at least) the TLS ClientHello starting at ``d`` needs before its
    server_name can be read, over any number of handshake records (0: not a ClientHello, whole,
    the name already readable, or a problem that no more bytes would cure). A ClientHello split
    over TCP segments or TLS records, by post-quantum key shares or on purpose to slip past SNI
    filtering, shows its SNI only once the engine has joined the pieces."""
    hs, missing, problem = tls_client_hello(d)
    if problem or not missing:
        return 0
    name, problem = _sni_in_hello(hs)
    if problem or name is not None:
        return 0
    return missing


def _parse_sni(d: bytes) -> str | None:
    """ClientHello -> server_name, the handshake message joined from its records first
    (:func:`tls_client_hello`). Only the bytes present are read: a ClientHello cut after its
    SNI extension (a later TCP segment) still answers. Lower-cased as before (OpenSSL compares
    names case-blind); a final dot is kept (the rules drop it). ``None`` when there is no name,
    or when it is ambiguous or malformed (see :func:`client_hello_problem`)."""
    if len(d) < 6 or d[0] != 22:
        return None
    name = _sni_in_hello(tls_client_hello(d)[0])[0]
    return None if name is None else name.lower()


# Why a DNS question name was not read exactly (Packet.dns_unparsed; the engine's stats count
# them). "several-questions" and "odd-label" still give a name: the first question's, and the
# label bytes joined with dots (a label holding a dot reads as the dotted name, so a rule on
# that name matches it too); every other reason gives no name. What dnsmasq 2.90 does with each
# is in docs/design.md ("DNS evasions and how each is handled").
DNS_UNPARSED = ("truncated", "no-question", "several-questions", "label-type", "forward-pointer",
                "pointer-loop", "too-long", "odd-label", "tcp-no-prefix", "several-messages")
DNS_MAX_JUMPS = 32            # compression pointers followed in one name (each one lower: <= 6 in practice)
_NO_DNS = (None, None, None)
_ODD_LABEL = frozenset(b".\0")


def _parse_dns_tcp(d: bytes) -> tuple:
    """The DNS view of a TCP segment to or from port 53. Normally a 2-byte length and the
    message. A client may send the length alone and the message in the next segment (the server
    joins them): a segment whose prefixed reading fails but that reads cleanly as a message on
    its own is decided on that ("tcp-no-prefix"). Bytes after the first message are another
    pipelined message the server answers too: counted "several-messages", the first decides."""
    r = _parse_dns(d, 2)
    if r[2] is not None and len(d) >= 12:
        r0 = _parse_dns(d, 0)
        if r0[2] is None:
            return (r0[0], r0[1], "tcp-no-prefix")
    if r[2] is None and len(d) > 2 + _U16(d, 0)[0]:
        return (r[0], r[1], "several-messages")
    return r


def _parse_dns(d: bytes, prefix: int) -> tuple:
    """(is_response, first question name, reason or None) of the DNS message at d[prefix:]
    (RFC 1035 4.1). TCP gives ``prefix=2``: the message is the 2-byte length's worth of bytes
    after it, and pointers count from its first byte. Never raises; every loop is bounded by
    the 255-byte name limit and :data:`DNS_MAX_JUMPS`."""
    n = len(d)
    base = prefix
    if n < base + 12:
        return (None, None, "truncated")
    if prefix:                                           # TCP: 2-byte length prefix
        n = min(n, base + _U16(d, 0)[0])
        if n < base + 12:
            return (None, None, "truncated")
    flags, qdcount = _U16x2(d, base + 2)
    is_response = bool(flags & 0x8000)
    if not qdcount:
        return (is_response, None, "no-question")
    name, why = _dns_name(d, base, base + 12, n)
    if why is None and qdcount != 1:
        why = "several-questions"
    return (is_response, name, why)


def _dns_name(d: bytes, base: int, pos: int, n: int) -> tuple:
    """(name, reason or None) of the wire-format name at d[pos:n] in the message starting at
    d[base] (RFC 1035 3.1, 4.1.4). As a server reads it: compression pointers followed, but
    only backwards, each one to below where the previous jump landed (so every legal
    compressor's output reads and no loop can: a pointer to itself, forwards or back into the
    part already read is "forward-pointer"/"pointer-loop", as dnsmasq refuses them too); at
    most 255 bytes in wire form and 63 per label; ASCII letters lower-cased (non-ASCII bytes
    are kept as they are, read as Latin-1: servers compare them byte for byte)."""
    labels = []
    total = 1                                            # the final zero byte
    floor = pos                                          # every pointer must land below this
    jumps = 0
    odd = False
    while pos < n:
        ln = d[pos]
        if ln == 0:
            name = b".".join(labels).lower().decode("latin-1")
            return (name.rstrip(".") if odd else name, "odd-label" if odd else None)
        if ln >= 0xC0:                                   # compression pointer
            if pos + 2 > n:
                return (None, "truncated")
            target = base + (((ln & 0x3F) << 8) | d[pos + 1])
            if target >= floor:
                return (None, "forward-pointer" if target > pos else "pointer-loop")
            jumps += 1
            if jumps > DNS_MAX_JUMPS:
                return (None, "pointer-loop")
            pos = floor = target
            continue
        if ln & 0xC0:                                    # 0x40/0x80: extended/reserved types
            return (None, "label-type")
        total += ln + 1
        if total > 255:
            return (None, "too-long")
        if pos + 1 + ln > n:
            return (None, "truncated")
        label = d[pos + 1:pos + 1 + ln]
        if not odd and not _ODD_LABEL.isdisjoint(label):
            odd = True
        labels.append(label)
        pos += 1 + ln
    return (None, "truncated")
