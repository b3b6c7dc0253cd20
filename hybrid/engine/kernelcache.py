"""The engine's side of the name-verdict cache (bpf/namecache.h): it teaches the kernel the
decisions a name alone decides, and hears back which connections the kernel decided from them.

- **Generation.** The kernel matches only entries of the generation in ``hybrid_name_gen``.
  An engine that loads rules whose digest differs from the one recorded there starts a new
  generation (one map update): from that update on, no entry written under older rules matches,
  not even for one packet. Engines on a queue range that load the same rules share one.
- **Teaching.** After the engine decided a packet that carries a name the kernel reads (a DNS
  question to port 53, a TLS server_name, an HTTP Host), :func:`hybrid.engine.namecache.
  cached_decision` says whether the name's key alone decides; if so the decision is written
  under the current generation, with the rule's TTL as the entry's lifetime and the flow
  verdict's. Only decisions the kernel can carry out (accept or drop, the flow bypassed, blocked
  or left alone) are written. The kernel repeats the engine's doubts itself (namecache.h).
- **Hearing back.** Each decision the kernel takes from the cache comes as an event on the
  ``hybrid_name_ev`` ring buffer; a thread reads them without ever holding a packet and
  counts them per rule and action and writes them to the verdict log (``"by": "cache"``). Events lost to a full ring are counted by the
  kernel (``cache_lost``).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct
import threading
import time
from collections import OrderedDict

from hybrid.datapath.maps import addr_from16, key_ports
from hybrid.engine.namecache import NameKey, cached_decision
from hybrid.engine.packet import Packet
from hybrid.engine.rules import Decision, RuleSet
from hybrid.errors import HybridError
from hybrid.kernel import abi

log = logging.getLogger(__name__)

__all__ = ["KernelNameCache", "event_endpoints", "name_key_of"]

_KIND_CODES = {name: code for code, name in abi.NAME_KINDS.items()}
# struct hybrid_name_event's rule, generation (consecutive __u32) and action, verdict (__u8), as
# _event() reads them without decoding the whole event.
_EVENT_AT = abi.NameEvent.rule.offset
_EVENT_FIELDS = struct.Struct(f"=II{abi.NameEvent.action.offset - abi.NameEvent.generation.offset - 4}xBB")
assert abi.NameEvent.generation.offset == _EVENT_AT + 4 and abi.NameEvent.verdict.offset == abi.NameEvent.action.offset + 1
_VERDICTS = {"bypass": abi.VERDICT_BYPASS, "block": abi.VERDICT_BLOCK, "none": abi.VERDICT_NONE}
# What the kernel carries out: a pass that bypasses the flow or leaves it alone, a drop that
# blocks it or leaves it alone. An "inspect" needs the engine to see the flow's next packets from
# this one on (its joins start here), and a pass that blocks is no decision a rule means.
_KERNEL_PAIRS = frozenset({("accept", "bypass"), ("accept", "none"), ("drop", "block"), ("drop", "none")})
# A name is taught again (its entry rewritten) no sooner than this after the last time: the LRU
# may have evicted it, and its lifetime may have run out.
RETEACH_NS = 30 * 1_000_000_000
_TAUGHT_MAX = 65536          # names remembered as taught (or as not cacheable) per generation


def event_endpoints(ev) -> tuple[str, int, str, int]:
    """(src, sport, dst, dport) of the packet an event reports (its flow key and direction)."""
    lo, hi = addr_from16(bytes(ev.flow.addr_lo)), addr_from16(bytes(ev.flow.addr_hi))
    plo, phi = key_ports(ev.flow)
    if ev.dir:
        return str(hi), phi, str(lo), plo
    return str(lo), plo, str(hi), phi


def name_key_of(pkt: Packet) -> NameKey | None:
    """The key the kernel would look this packet's name up under, when it carries one the
    kernel reads: a DNS question to port 53, a TLS server_name or an HTTP Host over TCP."""
    if not pkt.payload_len or pkt.fragment:
        return None
    proto = pkt.proto
    if pkt.dport == 53:
        name = pkt.dns_qname
        kind = "dns"
    elif proto != 6:
        return None
    elif pkt.payload[0] == 0x16:
        name = pkt.tls_sni
        kind = "sni"
    else:
        http = pkt.http
        name = http.host if http is not None else None
        kind = "host"
    if not name or len(name) > abi.NAME_MAX or not name.isascii():
        return None
    return NameKey(kind, name, proto, pkt.dport)


class KernelNameCache:
    """One engine's link to the kernel's name cache (``maps.has_name_cache`` must be true)."""

    def __init__(self, maps, queue: int):
        self.maps = maps
        self.queue = queue
        self.generation = 0
        self.digest = 0
        self._rules: RuleSet | None = None
        self._rule_ids: dict[str | None, int] = {}
        self._rule_names: list[str | None] = [None]
        self._taught: OrderedDict[NameKey, int] = OrderedDict()
        self.taught = 0              # entries written
        self.inserted = 0            # ... of which new keys (the rest rewrote one still there)
        self.not_cacheable = 0       # names whose key alone does not decide
        self.write_errors = 0
        # What the kernel decided from the cache, as its events say (written by the reader
        # thread only; read by snapshots).
        self.kernel_decisions = 0
        self.kernel_rules: dict[str, int] = {}
        self.kernel_actions: dict[str, int] = {"accept": 0, "drop": 0}
        self.kernel_flow_verdicts: dict[str, int] = {"bypass": 0, "block": 0, "none": 0}
        self.kernel_stale = 0        # events of an older generation (a reload raced them)
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self.vlog = None
        self._changed = None

    # -- generation --------------------------------------------------------------------------------
    def start(self, rules: RuleSet) -> None:
        """Adopt ``rules``: a new generation unless the kernel's already is these rules'."""
        digest = rules.digest
        state = self.maps.name_state()
        if state.generation and state.rules_digest == digest:
            gen = state.generation
        else:
            gen = state.generation % 0xFFFFFFFF + 1            # never 0: "no engine yet"
            self.maps.set_name_state(gen, digest)
        self.generation, self.digest, self._rules = gen, digest, rules
        # Rule ids in the entries are positions in the rules (0: the default): the same for
        # every engine that loaded these rules, whichever of them reads the events.
        self._rule_names = [None] + [r.name for r in rules.compiled]
        self._rule_ids = {}
        for i, name in enumerate(self._rule_names):
            self._rule_ids.setdefault(name, i)
        self._taught.clear()
        log.info("queue %d: name cache generation %d", self.queue, gen)

    # -- teaching --------------------------------------------------------------------------------
    def teach(self, pkt: Packet) -> None:
        """Write the decision ``pkt``'s name alone decides, if it does (see the module)."""
        key = name_key_of(pkt)
        if key is None:
            return
        now = time.monotonic_ns()
        taught = self._taught
        until = taught.get(key)
        if until is not None and until > now:
            return
        if len(taught) >= _TAUGHT_MAX:
            taught.popitem(last=False)
        taught[key] = now + RETEACH_NS
        d = cached_decision(self._rules, key)
        if d is None or (d.action, d.flow) not in _KERNEL_PAIRS:
            self.not_cacheable += 1
            return
        self._write(key, d, now)

    def _follows(self, key: NameKey, d: Decision) -> int:
        """1 when the engine would follow the messages of a flow this entry passes (hybrid/engine/
        loop.py, _follow_start): an HTTP request when a rule reads HTTP, a DNS message when one
        reads the question. The kernel then moves the follow-up itself (bpf/namecache.h)."""
        rules = self._rules
        if d.action != "accept":
            return 0
        return int((key.kind == "host" and rules.needs_http) or (key.kind == "dns" and rules.needs_dns))

    def _write(self, key: NameKey, d: Decision, now: int) -> None:
        rid = self._rule_ids.get(d.rule, 0)
        ttl_ns = max(1, int(d.ttl * 1e9))
        value = abi.NameVerdict(expires_ns=now + ttl_ns,
                                flow_ttl_ns=ttl_ns if d.flow != "none" else 0,
                                rule=rid,
                                action=abi.NAME_ACT_ACCEPT if d.action == "accept" else abi.NAME_ACT_DROP,
                                verdict=_VERDICTS[d.flow], follow=self._follows(key, d))
        try:
            if self.maps.put_name_verdict(
                    self.maps.name_key(self.generation, _KIND_CODES[key.kind], key.name, key.proto, key.dport), value):
                self.inserted += 1
            self.taught += 1
        except (HybridError, ValueError) as exc:
            self.write_errors += 1
            if self.write_errors <= 10:
                log.error("queue %d: writing a name verdict failed: %s", self.queue, exc)

    # -- hearing back ----------------------------------------------------------------------------
    def start_reader(self, lock_path: str, vlog=None, changed=None) -> None:
        """Read the kernel's events in a thread, while this engine holds ``lock_path`` (a ring
        buffer has one reader: the engines of a queue range take turns, the next one taking
        over within a second when the reader stops)."""
        from hybrid.kernel.ringbuf import RingBuffer
        self.vlog = vlog
        self._changed = changed          # called after each event (the engine republishes its stats)
        ring = RingBuffer.open(self.maps.fd(abi.MAP_NAME_EVENTS))
        self._reader = threading.Thread(target=self._read, args=(ring, lock_path), name=f"names-q{self.queue}",
                                        daemon=True)
        self._reader.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None

    def _read(self, ring, lock_path: str) -> None:
        lock = None
        try:
            lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            while not self._stop.is_set():
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    self._stop.wait(1.0)            # another engine reads them
            while not self._stop.is_set():
                ring.poll(self._event, 0.2)
        except Exception:  # noqa: BLE001 - the reader must never take the engine down
            log.exception("queue %d: the name-cache event reader stopped", self.queue)
        finally:
            ring.close()
            if lock is not None:
                os.close(lock)                     # and with it the lock

    def _event(self, data) -> None:
        # Per event, only the fields the counters need are read (one unpack); the whole event is
        # decoded only for a verdict-log line the log's rate limit lets through. The kernel
        # decides a kept-alive connection's every request from the cache: tens of thousands of
        # events a second, on the engine's CPU.
        rule_id, generation, action_code, verdict = _EVENT_FIELDS.unpack_from(data, _EVENT_AT)
        if generation != self.generation:
            self.kernel_stale += 1
            rule = "(earlier rules)"
        else:
            names = self._rule_names
            rule = names[rule_id] if 0 < rule_id < len(names) else None
        action = abi.NAME_ACTIONS.get(action_code, "?")
        flow = abi.VERDICT_NAMES.get(verdict, "?")
        self.kernel_decisions += 1
        label = rule if rule is not None else "(default)"
        self.kernel_rules[label] = self.kernel_rules.get(label, 0) + 1
        self.kernel_actions[action] = self.kernel_actions.get(action, 0) + 1
        self.kernel_flow_verdicts[flow] = self.kernel_flow_verdicts.get(flow, 0) + 1
        if self.vlog is not None and self.vlog.admit():
            ev = abi.NameEvent.from_buffer_copy(bytes(data[:ctypes.sizeof(abi.NameEvent)]))
            rec = {"rule": rule, "action": action, "flow": flow, "kind": abi.NAME_KINDS.get(ev.kind, "?"),
                   "name": bytes(ev.name[:ev.len]).decode("ascii", "replace"), "port": ev.port,
                   "ifindex": ev.ifindex}
            self.vlog.write_cache(self.queue, ev, rec, admitted=True)
        if self._changed is not None:
            self._changed()

    def snapshot(self) -> dict:
        return {"generation": self.generation, "taught": self.taught, "inserted": self.inserted, "not_cacheable": self.not_cacheable,
                "write_errors": self.write_errors, "kernel_decisions": self.kernel_decisions,
                "kernel_rules": dict(self.kernel_rules), "kernel_actions": dict(self.kernel_actions),
                "kernel_flow_verdicts": dict(self.kernel_flow_verdicts), "kernel_stale": self.kernel_stale}
