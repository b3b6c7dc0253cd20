"""The queues' own accounting: what each queue took, dropped and lost since its engine bound,
and what a full queue let through uninspected (fail-open overflow), which no kernel counter
counts. The engine records the counters when it binds; status, top and the metrics report."""

from __future__ import annotations

import logging
import os
import time

from hybrid import instance as inst
from hybrid.errors import HybridError
from hybrid.kernel import netfilter
from hybrid.kernel.nfq import counters

log = logging.getLogger(__name__)


# -- packets the queue let through uninspected ----------------------------------------------------
# The kernel does not count them. In __nfqnl_enqueue_packet (net/netfilter/nfnetlink_queue.c), a
# full queue with NFQA_CFG_F_FAIL_OPEN re-injects the packet with NF_ACCEPT and counts nothing:
# queue_dropped is incremented only without the flag, and id_sequence only for packets that got
# a place in the queue. So we count what arrives at the queue rule (its iptables counter) and
# subtract what the queue took (id_sequence), dropped (queue_dropped) or lost (user_dropped),
# since the engine bound. The rule counter at that moment is recorded by the engine's bind
# (record_baseline, called by the engine right after it configured the queue); the queue's own counters start at 0 with the bind.


def _rule_packets() -> int:
    """Packets that matched hybrid's queue rule, all families (0 when there is none)."""
    try:
        return sum(s.queued_packets for s in netfilter.status())
    except HybridError:
        return 0


def record_baseline(queue_num: int, instance: str | None = None) -> dict | None:
    """Write the counters at the moment an engine bound ``queue_num`` next to hybrid's state, for
    :func:`queue_report`. Only where hybrid is attached (its instance directory exists); the file
    goes with that directory on detach. The queue's counters are read before the rule's, so a
    packet arriving in between counts as queued, never as passed: the figure errs low, not high."""
    instance = instance or inst.name()
    if not os.path.isdir(inst.directory(instance)):
        return None
    c = counters().get(queue_num)
    if c is None:
        return None
    base = {"queue": queue_num, "portid": c.portid, "queued": c.id_sequence, "dropped": c.dropped,
            "user_dropped": c.user_dropped, "rule_packets": _rule_packets(), "time": time.time()}
    try:
        inst.write_json(inst.queue_baseline_path(instance, queue_num), base)
    except OSError as exc:
        log.warning("cannot record queue %d's counters at bind: %s", queue_num, exc)
        return None
    return base


def queue_report(first: int, last: int, fail_open: bool, instance: str | None = None,
                 rule_packets: int | None = None) -> dict:
    """The queues ``first``..``last`` as the kernel sees them, and what overflowed.

    ``queues``: per queue, whether an engine is bound and its counters since it bound: queued,
    waiting, dropped because the queue was full (fail-closed), user_dropped (the socket buffer
    was full, fail-closed). ``passed_overflow``: packets a full queue let through uninspected
    (fail-open) since the engines bound, over all the queues; None when it cannot be computed
    (an engine not bound, or bound without a recorded baseline). A lower bound when flagged
    packets are GSO super-packets: the rule counts one, the queue one per segment.
    ``rule_packets``: the queue rule's counter, when the caller has just read it."""
    instance = instance or inst.name()
    live = counters()
    queues, bases = [], []
    for q in range(first, last + 1):
        c = live.get(q)
        entry: dict = {"queue": q, "bound": c is not None}
        if c is not None:
            base = _load_baseline(instance, q)
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


def _load_baseline(instance: str, queue: int) -> dict | None:
    try:
        base = inst.read_json(inst.queue_baseline_path(instance, queue))
    except OSError:
        return None
    return base if isinstance(base, dict) and {"portid", "queued", "rule_packets"} <= base.keys() else None
