"""A passive AF_PACKET consumer: the field report's "shared ring" option, for the bench.

It reads every packet that arrives on some interfaces from a memory-mapped ``AF_PACKET`` ring
(TPACKET_V3: the kernel fills whole blocks of frames and hands a block over at once, so one
wake-up serves many packets), decodes each IP packet with the engine's decoder
(hybrid.engine.packet) and runs it through the engine's rules, as the queued modes do. It sees a
*copy*: it cannot drop, delay or rewrite anything, and what it does not read in time is lost to
it (the kernel's ring drops, PACKET_STATISTICS ``tp_drops``), never to the traffic.

    python -m hybrid.lab.afpacket --ifaces to-client,to-server --rules scripts/bench-rules.toml

One worker process per CPU, each pinned to its CPU, each with its own ring, all in one
``PACKET_FANOUT`` group. The fanout is by flow hash (``PACKET_FANOUT_HASH``, the kernel's
symmetric flow hash), not by CPU: an inspector must see both directions of a connection in one
process to follow it (Suricata's ``cluster_flow`` is the same choice), and ``PACKET_FANOUT_CPU``
splits a flow whenever its packets are received on another CPU (on veth, the CPU of whoever
sent them: the client's for one direction, the server's for the other). The price: one flow is
one worker, so a single stream gets one CPU of inspection at most.

The sockets are bound to no interface (fanout requires every member to be bound alike, and one
group over both ports keeps a flow's two directions together); a classic BPF filter keeps only
the asked-for interfaces' frames, so nothing else is copied into the rings.
Ingress only, so a forwarded packet is counted once (where it came in), not again where it
leaves: ``PACKET_IGNORE_OUTGOING`` on each socket, and ``PACKET_FANOUT_FLAG_IGNORE_OUTGOING`` on
the group, whose own hook ignores the members' option (without it every forwarded packet was
read twice; tests/integration/test_bench_modes.py counts pings to prove it).

Prints ``ready`` when every worker's ring is in place, and on SIGTERM or SIGINT one line
``afpacket {JSON}`` with the totals (frames, bytes, IP packets decoded, rule hits, the kernel's
counts and drops). Errors are one line on stderr, exit 1. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

# <linux/if_packet.h>, <linux/if_ether.h>, <linux/filter.h>
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_FANOUT = 18
PACKET_IGNORE_OUTGOING = 23
TPACKET_V3 = 2
PACKET_FANOUT_HASH = 0
# A fanout group receives through a hook of its own, which does not inherit a member's
# PACKET_IGNORE_OUTGOING: the group must be asked for it (Linux 6.5+; not in older headers).
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
SKF_AD_IFINDEX = -0x1000 + 8          # SKF_AD_OFF + SKF_AD_IFINDEX: the receiving interface

# struct tpacket_block_desc with its tpacket_hdr_v1 (native byte order): version,
# offset_to_priv, block_status, num_pkts, offset_to_first_pkt, blk_len, seq_num.
BLOCK_DESC = struct.Struct("=IIIIIIQ")
BLOCK_STATUS_OFF = 8
# struct tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac,
# tp_net, then hv1 (rxhash, vlan_tci, vlan_tpid, padding) and 8 bytes of padding: 48 bytes.
FRAME_HDR = struct.Struct("=IIIIIIHH")
FRAME_HDR_SIZE = 48
# struct sockaddr_ll right after the frame header (TPACKET_ALIGN(sizeof(tpacket3_hdr)) = 48):
# family, protocol (network order), ifindex.
SLL = struct.Struct("=HHi")
TPACKET_REQ3 = struct.Struct("=7I")   # block_size, block_nr, frame_size, frame_nr, retire_tov, priv, feature
STATS_V3 = struct.Struct("=III")      # tp_packets (drops included), tp_drops, tp_freeze_q_cnt

# Ring geometry. A block must hold the largest frame whole: on veth a GSO super-packet of up
# to 64 KiB arrives as one skb, and a frame longer than a block is cut (its payload then does
# not decode). 1 MiB blocks, 32 of them per worker; a block that is not full is handed over
# after RETIRE_MS, so a trickle of packets is seen without waiting for a block to fill.
BLOCK_SIZE = 1 << 20
BLOCK_NR = 32
FRAME_SIZE = 2048                     # nominal in V3; only the block count check uses it
RETIRE_MS = 10

ETH_HLEN = 14
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
ETHERTYPE_IP = (0x0800, 0x86DD)


class CaptureError(Exception):
    """A ring could not be set up; the message is the one line the user sees."""


@dataclass
class Frame:
    """One frame of a block: where its bytes are in the ring and what the kernel said of it."""
    offset: int          # the frame's header in the ring
    snaplen: int         # bytes captured (from tp_mac)
    length: int          # the packet's length on the wire
    mac: int             # link-layer header, relative to ``offset``
    net: int             # network header, relative to ``offset``
    ifindex: int
    protocol: int        # ethertype, host order


def block_frames(buf, block: int) -> list[Frame]:
    """The frames of the block that starts at ``block`` in ``buf`` (the ring, or any buffer
    laid out like one), in the kernel's order: the first at ``offset_to_first_pkt``, each next
    one ``tp_next_offset`` further."""
    _v, _p, _status, num, first, _len, _seq = BLOCK_DESC.unpack_from(buf, block)
    out = []
    off = block + first
    for _ in range(num):
        nxt, _sec, _nsec, snaplen, length, _st, mac, net = FRAME_HDR.unpack_from(buf, off)
        _fam, proto, ifindex = SLL.unpack_from(buf, off + FRAME_HDR_SIZE)
        out.append(Frame(off, snaplen, length, mac, net, ifindex, socket.ntohs(proto)))
        if not nxt:
            break
        off += nxt
    return out


def block_ready(buf, block: int) -> bool:
    return bool(struct.unpack_from("=I", buf, block + BLOCK_STATUS_OFF)[0] & TP_STATUS_USER)


def release_block(buf, block: int) -> None:
    """Give the block back to the kernel (after which its frames must not be read)."""
    struct.pack_into("=I", buf, block + BLOCK_STATUS_OFF, TP_STATUS_KERNEL)


@dataclass
class Counts:
    frames: int = 0           # frames read from the ring
    bytes: int = 0            # their length on the wire (tp_len)
    ip: int = 0               # frames carrying IPv4/IPv6
    decoded: int = 0          # IP packets the decoder read without error
    undecodable: int = 0
    truncated: int = 0        # frames the ring cut short (longer than a block)
    rule_hits: dict[str, int] = field(default_factory=dict)   # rule name -> packets it matched
    by_proto: dict[str, int] = field(default_factory=dict)    # "tcp", "udp", "icmp", "icmpv6", ... -> packets
    by_iface: dict[str, int] = field(default_factory=dict)    # interface -> frames
    kernel_packets: int = 0   # the kernel's count of packets for this socket, drops included
    drops: int = 0            # packets the kernel dropped because the ring was full
    freeze_q: int = 0

    def merge(self, other: dict) -> None:
        for k, v in other.items():
            if isinstance(v, dict):
                mine = getattr(self, k)
                for name, n in v.items():
                    mine[name] = mine.get(name, 0) + n
            else:
                setattr(self, k, getattr(self, k) + v)

    def summary(self) -> dict:
        d = asdict(self)
        seen = self.frames + self.drops
        d["seen_share"] = self.frames / seen if seen else None
        return d


def inspect_block(buf, block: int, counts: Counts, decide: Callable | None, names: dict[int, str],
                  decode_ip: bool = True) -> None:
    """Read every frame of one block into ``counts``: decode the IP ones, run the rules
    (``decode_ip=False``: count them only)."""
    from hybrid.engine.packet import decode
    for fr in block_frames(buf, block):
        counts.frames += 1
        counts.bytes += fr.length
        name = names.get(fr.ifindex, str(fr.ifindex))
        counts.by_iface[name] = counts.by_iface.get(name, 0) + 1
        if fr.protocol not in ETHERTYPE_IP:
            continue
        counts.ip += 1
        if fr.snaplen < fr.length:
            counts.truncated += 1
        if not decode_ip:
            continue
        start = fr.offset + fr.net
        pkt = decode(buf[start:fr.offset + fr.mac + fr.snaplen])
        if pkt.error is not None:
            counts.undecodable += 1
            continue
        counts.decoded += 1
        proto = PROTO_NAMES.get(pkt.proto) or str(pkt.proto)
        counts.by_proto[proto] = counts.by_proto.get(proto, 0) + 1
        if decide is not None:
            pkt.indev = name
            rule = decide(pkt).rule
            if rule is not None:
                counts.rule_hits[rule] = counts.rule_hits.get(rule, 0) + 1


def ifindex_filter(ifindexes: list[int]) -> bytes:
    """A classic BPF program that accepts (whole) frames received on ``ifindexes`` only."""
    ld_abs, jeq_k, ret_k = 0x20, 0x15, 0x06            # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    n = len(ifindexes)
    prog = [(ld_abs, 0, 0, SKF_AD_IFINDEX & 0xFFFFFFFF)]
    prog += [(jeq_k, n - i, 0, idx) for i, idx in enumerate(ifindexes)]   # jump to the accept
    prog += [(ret_k, 0, 0, 0), (ret_k, 0, 0, 0xFFFFFFFF)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


class Ring:
    """One worker's socket, ring and place in the fanout group."""

    def __init__(self, ifindexes: list[int], group: int, *, block_size: int = BLOCK_SIZE,
                 block_nr: int = BLOCK_NR):
        self.block_size, self.block_nr = block_size, block_nr
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)   # protocol 0: not receiving yet
        try:
            self._setup(ifindexes, group)
        except CaptureError:
            self.sock.close()
            raise
        except OSError as exc:
            self.sock.close()
            raise CaptureError(f"AF_PACKET ring: {exc.strerror or exc}") from None
        self.next = 0

    def _setup(self, ifindexes: list[int], group: int) -> None:
        s = self.sock
        code = ifindex_filter(ifindexes)
        insns = ctypes.create_string_buffer(code, len(code))
        s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                     struct.pack("HL", len(code) // 8, ctypes.addressof(insns)))   # struct sock_fprog
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        frames = self.block_size // FRAME_SIZE * self.block_nr
        s.setsockopt(SOL_PACKET, PACKET_RX_RING,
                     TPACKET_REQ3.pack(self.block_size, self.block_nr, FRAME_SIZE, frames, RETIRE_MS, 0, 0))
        self.map = mmap.mmap(s.fileno(), self.block_size * self.block_nr, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        _bind_all(s)                                       # every interface; the filter picks
        fanout = PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_IGNORE_OUTGOING
        try:
            s.setsockopt(SOL_PACKET, PACKET_FANOUT, (group & 0xFFFF) | (fanout << 16))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise CaptureError("the kernel refused an ingress-only fanout group "
                                   "(PACKET_FANOUT_FLAG_IGNORE_OUTGOING): it needs a newer kernel") from None
            raise

    def ready_blocks(self) -> Iterator[int]:
        """Offsets of the blocks the kernel has handed over, in ring order; each is released
        when the caller asks for the next one."""
        while block_ready(self.map, off := self.next * self.block_size):
            yield off
            release_block(self.map, off)
            self.next = (self.next + 1) % self.block_nr

    def stats(self) -> tuple[int, int, int]:
        """(packets, drops, freezes) since the last call (reading resets the kernel's counters)."""
        return STATS_V3.unpack(self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, STATS_V3.size))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.map.close()
        self.sock.close()


def _bind_all(sock: socket.socket) -> None:
    """Bind to every interface (ifindex 0) for ETH_P_ALL, which starts the socket receiving.
    Python's bind() for AF_PACKET wants an interface name, so libc's is called directly."""
    addr = struct.pack("=HHiHBB8s", socket.AF_PACKET, socket.htons(ETH_P_ALL), 0, 0, 0, 0, b"")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.bind(sock.fileno(), ctypes.c_char_p(addr), len(addr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _worker(cpu: int, ifaces: dict[int, str], group: int, rules: str | None, out: int,
            decode_ip: bool = True) -> None:
    """A forked worker: pinned to ``cpu``, reads its ring until SIGTERM, writes its counts as
    JSON to the pipe ``out``. Never returns."""
    code = 0
    try:
        _die_with_parent()
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})
        decide = None
        if rules:
            from hybrid.engine.rules import load_rules
            decide = load_rules(rules).decide
        ring = Ring(list(ifaces), group)
        os.write(out, b"ready\n")
        counts = Counts()
        poller = select.poll()
        poller.register(ring.sock, select.POLLIN | select.POLLERR)
        while not stop:
            got = False
            for block in ring.ready_blocks():
                inspect_block(ring.map, block, counts, decide, ifaces, decode_ip)
                got = True
            if not got:
                poller.poll(100)
        time.sleep(3 * RETIRE_MS / 1000)                   # the open block is retired by then
        for block in ring.ready_blocks():
            inspect_block(ring.map, block, counts, decide, ifaces, decode_ip)
        packets, drops, freezes = ring.stats()
        counts.kernel_packets, counts.drops, counts.freeze_q = packets, drops, freezes
        ring.close()
        os.write(out, (json.dumps(asdict(counts)) + "\n").encode())
    except CaptureError as exc:
        os.write(out, f"error {exc}\n".encode())
        code = 1
    except BaseException as exc:                           # one line for the parent, never a traceback
        os.write(out, f"error {type(exc).__name__}: {exc}\n".encode())
        code = 1
    finally:
        os._exit(code)


def _read_line(fd: int, timeout: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return ""
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode().strip()


def capture(ifnames: list[str], rules: str | None, cpus: list[int], group: int,
            ready: Callable[[], None], decode_ip: bool = True) -> dict:
    """Run one worker per CPU until SIGTERM/SIGINT; return the summed counts."""
    ifaces: dict[int, str] = {}
    for name in ifnames:
        try:
            ifaces[socket.if_nametoindex(name)] = name
        except OSError:
            raise CaptureError(f"no interface {name!r} here") from None
    if rules:
        from hybrid.engine.rules import load_rules
        load_rules(rules)                                   # a bad rules file fails here, once
    stop = []
    old = {s: signal.signal(s, lambda *_: stop.append(1)) for s in (signal.SIGTERM, signal.SIGINT)}
    workers: list[tuple[int, int]] = []
    try:
        for cpu in cpus:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _worker(cpu, ifaces, group, rules, w, decode_ip)
            os.close(w)
            workers.append((pid, r))
        for _pid, r in workers:
            line = _read_line(r, 30)
            if line != "ready":
                raise CaptureError(line[len("error "):] if line.startswith("error ") else
                                   "a capture worker did not start")
        ready()
        while not stop:
            if any(os.waitpid(pid, os.WNOHANG)[0] for pid, _ in workers):
                raise CaptureError("a capture worker died")
            time.sleep(0.1)
        total = Counts()
        for pid, _r in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for _pid, r in workers:
            line = _read_line(r, 30)
            if not line.startswith("{"):
                raise CaptureError(line[len("error "):] if line.startswith("error ") else
                                   "a capture worker did not report")
            total.merge(json.loads(line))
        return total.summary()
    finally:
        for pid, r in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            os.close(r)
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hybrid.lab.afpacket", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ifaces", required=True, help="comma-separated interfaces to read (ingress)")
    ap.add_argument("--rules", help="a rules file every IP packet is run through (see, never act)")
    ap.add_argument("--cpus", help="comma-separated CPUs, one worker each (default: every CPU)")
    ap.add_argument("--group", type=int, default=os.getpid() & 0xFFFF, help="the PACKET_FANOUT group id")
    ap.add_argument("--count-only", action="store_true",
                    help="count frames and bytes only: no decoding, no rules (what the ring alone costs)")
    args = ap.parse_args(argv)
    try:
        cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else sorted(os.sched_getaffinity(0))
    except ValueError:
        print(f"afpacket: --cpus {args.cpus!r}: give CPU numbers like 0,1", file=sys.stderr)
        return 2
    try:
        if args.count_only and args.rules:
            print("afpacket: --count-only runs no rules: drop --rules", file=sys.stderr)
            return 2
        res = capture([i for i in args.ifaces.split(",") if i], args.rules, cpus, args.group,
                      ready=lambda: print("ready", flush=True), decode_ip=not args.count_only)
    except CaptureError as exc:
        print(f"afpacket: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:                                # e.g. a rules file that does not compile
        print(f"afpacket: {exc}", file=sys.stderr)
        return 1
    print("afpacket " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
