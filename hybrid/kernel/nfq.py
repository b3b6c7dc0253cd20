"""NFQUEUE set-up that the NetfilterQueue binding does not expose: queue flags, a large receive
buffer, NETLINK_NO_ENOBUFS, and the kernel's own per-queue counters.

Queue flags (``NFQA_CFG_F_FAIL_OPEN``: pass packets when the queue is full instead of dropping
them) are set with an ``NFQNL_MSG_CONFIG`` message carrying ``NFQA_CFG_MASK`` and
``NFQA_CFG_FLAGS`` (big-endian u32). The kernel only accepts it from the socket the queue is
bound with (it checks the sender's port id), so it is sent on NetfilterQueue's own socket
(``get_fd()``). Its acknowledgement is read back when it is the next message on the socket;
if packets were already waiting in front of it, the binding's receive loop swallows the ack
later (libnetfilter_queue ignores NLMSG_ERROR messages), and we say the flags are unconfirmed.
"""

from __future__ import annotations

import errno as E
import logging
import os
import socket
import struct
from dataclasses import dataclass

from hybrid.errors import HybridError

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33   # asm-generic/socket.h; Python 3.11 does not export it
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_CONNTRACK = 1 << 1
NFQA_CFG_F_GSO = 1 << 2

PROC_QUEUES = "/proc/net/netfilter/nfnetlink_queue"


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def config_message(queue_num: int, seq: int, *, flags: int | None = None, mask: int | None = None,
                   maxlen: int | None = None) -> bytes:
    """An NFQNL_MSG_CONFIG request for ``queue_num`` (nfgenmsg res_id is big-endian)."""
    attrs = b""
    if maxlen is not None:
        attrs += _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
    if flags is not None:
        attrs += _attr(NFQA_CFG_MASK, struct.pack("!I", mask if mask is not None else flags))
        attrs += _attr(NFQA_CFG_FLAGS, struct.pack("!I", flags))
    nfgen = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue_num))
    body = nfgen + attrs
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG,
                         NLM_F_REQUEST | NLM_F_ACK, seq, 0)
    return header + body


def parse_ack(data: bytes, seq: int) -> int | None:
    """The errno carried by an NLMSG_ERROR for ``seq`` (0 = success), or None if ``data`` is
    not that acknowledgement."""
    if len(data) < 36:
        return None
    _length, kind, _flags, got_seq, _pid = struct.unpack_from("=IHHII", data)
    if kind != NLMSG_ERROR or got_seq != seq:
        return None
    (error,) = struct.unpack_from("=i", data, 16)
    return -error


@dataclass
class QueueSetup:
    queue_num: int
    fail_open: bool
    maxlen: int
    rcvbuf: int            # what the kernel granted (it doubles the request)
    flags_confirmed: bool  # the kernel's acknowledgement was read back and said 0


def configure(fd: int, queue_num: int, *, fail_open: bool = True, maxlen: int = 4096,
              rcvbuf: int = 16 << 20, seq: int = 0x4859) -> QueueSetup:
    """Configure the queue bound on netlink socket ``fd`` (NetfilterQueue.get_fd()).

    - fail-open (or explicitly fail-closed: the flag is cleared under its mask);
    - the queue length;
    - a receive buffer of ``rcvbuf`` bytes (SO_RCVBUFFORCE: we are root) so bursts wait in
      the socket instead of overflowing it;
    - NETLINK_NO_ENOBUFS: an overflow must not surface as a recv() error (the binding would
      skip it silently anyway); overflows are read from the kernel's counters instead.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER, fileno=os.dup(fd))
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        msg = config_message(queue_num, seq, flags=NFQA_CFG_F_FAIL_OPEN if fail_open else 0,
                             mask=NFQA_CFG_F_FAIL_OPEN, maxlen=maxlen)
        sock.sendto(msg, (0, 0))
        confirmed = False
        try:
            head = sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            head = b""
        err = parse_ack(head, seq)
        if err is not None:
            sock.recv(64)              # it was our ack: consume it
            if err:
                raise HybridError(f"configuring NFQUEUE {queue_num}: {os.strerror(err)}"
                                  + (" (is the queue bound by this process?)" if err == E.EPERM else ""),
                                  errno=err)
            confirmed = True
        else:
            log.info("queue %d: flags sent; the ack sits behind queued packets", queue_num)
        return QueueSetup(queue_num, fail_open, maxlen, granted, confirmed)
    finally:
        sock.close()   # closes our dup only; the binding keeps its own descriptor


@dataclass
class QueueCounters:
    queue_num: int
    portid: int
    waiting: int           # packets queued to userspace, no verdict yet
    dropped: int           # dropped by the kernel: queue full (fail-closed) or netlink failure
    user_dropped: int      # dropped because the socket buffer was full
    id_sequence: int       # packets ever queued (the last packet id)


def counters(netns_proc: str = PROC_QUEUES) -> dict[int, QueueCounters]:
    """The kernel's per-queue counters for the current network namespace."""
    out = {}
    try:
        with open(netns_proc) as f:
            for line in f:
                v = [int(x) for x in line.split()]
                if len(v) >= 8:
                    out[v[0]] = QueueCounters(v[0], v[1], v[2], v[5], v[6], v[7])
    except FileNotFoundError:
        pass
    return out
