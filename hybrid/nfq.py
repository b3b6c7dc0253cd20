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
import json
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass

from .errors import HybridError

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
        try:
            record_baseline(queue_num)
        except Exception as exc:  # noqa: BLE001 - a missing figure in status must not stop an engine
            log.warning("queue %d: counters at bind not recorded: %s", queue_num, exc)
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


# -- packets the queue let through uninspected ----------------------------------------------------
# The kernel does not count them. In __nfqnl_enqueue_packet (net/netfilter/nfnetlink_queue.c), a
# full queue with NFQA_CFG_F_FAIL_OPEN re-injects the packet with NF_ACCEPT and counts nothing:
# queue_dropped is incremented only without the flag, and id_sequence only for packets that got
# a place in the queue. So we count what arrives at the queue rule (its iptables counter) and
# subtract what the queue took (id_sequence), dropped (queue_dropped) or lost (user_dropped),
# since the engine bound. The rule counter at that moment is recorded by the engine's bind
# (record_baseline, called from configure); the queue's own counters start at 0 with the bind.
BASELINE_FILE = "nfq-{queue}.json"


def _instance_dir() -> str:
    from .attach import STATE_ROOT, instance_name   # the layout belongs to attach
    return os.path.join(STATE_ROOT, instance_name())


def _rule_packets() -> int:
    """Packets that matched hybrid's queue rule, all families (0 when there is none)."""
    from . import netfilter
    try:
        return sum(s.queued_packets for s in netfilter.status())
    except HybridError:
        return 0


def record_baseline(queue_num: int, instance_dir: str | None = None) -> dict | None:
    """Write the counters at the moment an engine bound ``queue_num`` next to hybrid's state, for
    :func:`queue_report`. Only where hybrid is attached (its instance directory exists); the file
    goes with that directory on detach. The queue's counters are read before the rule's, so a
    packet arriving in between counts as queued, never as passed: the figure errs low, not high."""
    instance_dir = instance_dir or _instance_dir()
    if not os.path.isdir(instance_dir):
        return None
    c = counters().get(queue_num)
    if c is None:
        return None
    base = {"queue": queue_num, "portid": c.portid, "queued": c.id_sequence, "dropped": c.dropped,
            "user_dropped": c.user_dropped, "rule_packets": _rule_packets(), "time": time.time()}
    path = os.path.join(instance_dir, BASELINE_FILE.format(queue=queue_num))
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(base, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record queue %d's counters at bind: %s", queue_num, exc)
        return None
    return base


def queue_report(first: int, last: int, fail_open: bool, instance_dir: str | None = None,
                 rule_packets: int | None = None) -> dict:
    """The queues ``first``..``last`` as the kernel sees them, and what overflowed.

    ``queues``: per queue, whether an engine is bound and its counters since it bound: queued,
    waiting, dropped because the queue was full (fail-closed), user_dropped (the socket buffer
    was full, fail-closed). ``passed_overflow``: packets a full queue let through uninspected
    (fail-open) since the engines bound, over all the queues; None when it cannot be computed
    (an engine not bound, or bound without a recorded baseline). A lower bound when flagged
    packets are GSO super-packets: the rule counts one, the queue one per segment.
    ``rule_packets``: the queue rule's counter, when the caller has just read it."""
    instance_dir = instance_dir or _instance_dir()
    live = counters()
    queues, bases = [], []
    for q in range(first, last + 1):
        c = live.get(q)
        entry: dict = {"queue": q, "bound": c is not None}
        if c is not None:
            base = _load_baseline(instance_dir, q)
            if base is not None and base.get("portid") != c.portid:
                base = None       # a file from an earlier engine on this queue
            b = base or {"queued": 0, "dropped": 0, "user_dropped": 0}
            entry.update(portid=c.portid, waiting=c.waiting, queued=c.id_sequence - b["queued"],
                         dropped_full=c.dropped - b["dropped"], user_dropped=c.user_dropped - b["user_dropped"],
                         since=base["time"] if base else None)
            bases.append(base)
        queues.append(entry)
    passed = None
    if queues and all(e["bound"] for e in queues) and all(b is not None for b in bases):
        now = _rule_packets() if rule_packets is None else rule_packets
        arrived = now - min(b["rule_packets"] for b in bases)
        handled = sum(e["queued"] + e["dropped_full"] + e["user_dropped"] for e in queues)
        passed = max(0, arrived - handled)   # fail-closed: 0 but for conntrack's rare drops
    return {"fail_open": fail_open, "queues": queues, "passed_overflow": passed,
            "dropped_overflow": sum(e.get("dropped_full", 0) for e in queues),
            "user_dropped": sum(e.get("user_dropped", 0) for e in queues)}


def _load_baseline(instance_dir: str, queue: int) -> dict | None:
    try:
        with open(os.path.join(instance_dir, BASELINE_FILE.format(queue=queue))) as f:
            base = json.load(f)
        return base if isinstance(base, dict) and {"portid", "queued", "rule_packets"} <= base.keys() else None
    except (OSError, ValueError):
        return None
