"""What ``hybridctl top``, ``hybridctl flows`` and the metrics endpoint show, computed once: a
snapshot of one instance's counters (kernel, netfilter queue, engines), totals and rates from
two snapshots, the engine's decision-time histogram in Prometheus buckets, and the FLOW and
PREFIX syntax of ``hybridctl block|bypass|unblock``.

Everything is read, nothing changed: the pinned maps (hybrid.datapath.maps), the netfilter queue's
counters in /proc/net/netfilter/nfnetlink_queue (hybrid.kernel.nfq), the engines' stats files
(hybrid.instance.engine_stats). The instance is the one of the calling process's network
namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from dataclasses import dataclass

from hybrid import instance as inst
from hybrid.datapath import queues
from hybrid.datapath.attach import State, pin_access
from hybrid.datapath.maps import Maps, flow_info, flow_key
from hybrid.errors import ConfigError, NotFoundError
from hybrid.kernel import abi, nfq
from hybrid.kernel.sysutil import pid_alive

# ---- the instance's maps --------------------------------------------------------------------------


def instance_state(instance: str | None = None):
    """(instance name, attach.State or None) of the current network namespace."""
    name = instance or inst.name()
    return name, State.load(name)


@contextlib.contextmanager
def instance_maps(instance: str | None = None):
    """The pinned maps of the attached instance, closed on exit; a one-line error when hybrid is
    not attached here."""
    name, state = instance_state(instance)
    if state is None or not state.interfaces:
        raise NotFoundError(f"hybrid is not attached in this network namespace ({name}): "
                            "run 'hybridctl attach IFACE...' first")
    pin = pin_access(name)
    if pin is None:
        raise NotFoundError(f"the hybrid bpffs is not mounted, so the maps of {name} are unreachable: "
                            "re-run 'hybridctl attach' or 'hybridctl detach --all'")
    maps = Maps.open_pinned(pin)
    try:
        yield state, maps
    finally:
        maps.close()


# ---- one snapshot -----------------------------------------------------------------------------------
def snapshot(instance: str | None = None, *, top_flows: int = 0, flow_scan: bool = True) -> dict:
    """Everything the views show, read at (nearly) one instant.

    ``flow_scan``: walk the flow table to count flows by verdict (and keep the ``top_flows``
    entries with the most flagged packets); without it only the total is counted.
    """
    name, state = instance_state(instance)
    snap: dict = {"instance": name, "time": time.monotonic(), "attached": bool(state and state.interfaces),
                  "interfaces": {}, "unregistered": {}, "flows": None, "flows_by_verdict": None,
                  "flow_table_size": None, "top_flows": [], "queues": {}, "engines": []}
    first, last = 0, 65535
    if state is not None and state.interfaces:
        opts = state.options
        first, last = opts.get("queue_first", 0), opts.get("queue_last", 0)
        snap["flow_table_size"] = opts.get("flow_table_size")
        snap["queue_range"] = [first, last]
        with instance_maps(name) as (_, maps):
            stats = maps.stats()
            for ifname, ist in sorted(state.interfaces.items()):
                snap["interfaces"][ifname] = stats.get(ist.ifindex, {})
            snap["unregistered"] = stats.get(0, {})
            if flow_scan:
                by_verdict = {v: 0 for v in abi.VERDICT_NAMES.values()}
                top: list[dict] = []
                n = 0
                now = time.monotonic_ns()
                for key, flow in maps.flows():
                    n += 1
                    info = None
                    if top_flows and flow.flagged and (len(top) < top_flows or flow.flagged > top[-1]["flagged"]):
                        info = flow_info(key, flow, now)
                        top.append(info)
                        top.sort(key=lambda f: -f["flagged"])
                        del top[top_flows:]
                    if flow.verdict == abi.VERDICT_NONE:
                        by_verdict["none"] += 1
                    else:
                        info = info or flow_info(key, flow, now)
                        by_verdict[info["verdict"]] = by_verdict.get(info["verdict"], 0) + 1
                snap["flows"], snap["flows_by_verdict"], snap["top_flows"] = n, by_verdict, top
            else:
                snap["flows"] = maps.flow_count()
    for q, c in nfq.counters().items():
        if first <= q <= last:
            snap["queues"][q] = {"waiting": c.waiting, "dropped": c.dropped, "user_dropped": c.user_dropped,
                                 "queued_total": c.id_sequence}
    if state is not None and state.interfaces:
        # Fail-open overflow is counted by no kernel counter: nfq derives it from the queue
        # rule's counter and the queues' since the engines bound (None when it cannot).
        rep = queues.queue_report(first, last, state.options.get("fail_open", True), name)
        snap["overflow"] = {k: rep[k] for k in ("passed_overflow", "dropped_overflow", "user_dropped")}
    else:
        rep = None
    if state is not None:
        for e in inst.engine_stats(name):
            e["alive"] = pid_alive(e.get("pid"))
            snap["engines"].append(e)
    counters = [*snap["interfaces"].values(), snap["unregistered"]]
    snap["fail_open"] = fail_open(counters, snap["engines"], rep)
    snap["doubts"] = doubts(snap["engines"])
    snap["crowdsec"] = crowdsec(inst.crowdsec_status(name), counters, snap["engines"])
    return snap


# ---- totals and rates -------------------------------------------------------------------------------
# Kernel counters summed over the instance's interfaces (and the unregistered slot).
_KERNEL_TOTALS = {
    "seen": ("packets",),
    "seen_xdp": ("xdp_packets",),
    "flagged": ("flagged",),
    "bypassed": ("bypassed",),
    "passed": ("passed",),
    "dropped_xdp": ("xdp_drop_flow", "xdp_drop_prefix", "xdp_drop_ban"),
    "dropped_tc": ("drop_tc_flow", "drop_tc_prefix", "drop_tc_ban"),
    "flows_new": ("flow_new",),
    "cache_passed": ("cache_passed",),
    "cache_dropped": ("cache_dropped",),
}
USERSPACE_DROPS = ("drop", "reject")


def totals(snap: dict) -> dict[str, int]:
    """Flat named totals of a snapshot: kernel (seen, flagged, reason_*, bypassed, passed,
    dropped_xdp, dropped_tc, flows_new), queue (queued, queue_overflow, queue_waiting) and
    engine (engine_packets, accepted, dropped_user). Engines that stopped keep counting with
    their last published figures."""
    out: dict[str, int] = {}
    counters = [*snap["interfaces"].values(), snap.get("unregistered") or {}]
    for name, keys in _KERNEL_TOTALS.items():
        out[name] = sum(c.get(k, 0) for c in counters for k in keys)
    for reason in abi.REASON_NAMES.values():
        out[f"reason_{reason}"] = sum(c.get(f"reason_{reason}", 0) for c in counters)
    queues = snap["queues"].values()
    out["queued"] = sum(q["queued_total"] for q in queues)
    out["queue_overflow"] = sum(q["dropped"] + q["user_dropped"] for q in queues)
    out["queue_waiting"] = sum(q["waiting"] for q in queues)
    engines = snap["engines"]
    out["engine_packets"] = sum(e.get("packets", 0) for e in engines)
    out["accepted"] = sum(n for e in engines for a, n in e.get("actions", {}).items() if a not in USERSPACE_DROPS)
    out["dropped_user"] = sum(e.get("actions", {}).get(a, 0) for e in engines for a in USERSPACE_DROPS)
    return out


# Totals that are levels, not counters: no rate.
GAUGES = frozenset({"queue_waiting"})


def rates(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, float]:
    """Per-second rates of every counter in ``after``. A counter that went down was reset (an
    engine restarted, a queue was re-bound): its rate counts from zero, as Prometheus does."""
    if seconds <= 0:
        raise ValueError("rates need a positive interval")
    out = {}
    for name, value in after.items():
        if name in GAUGES:
            continue
        prev = before.get(name, 0)
        out[name] = ((value - prev) if value >= prev else value) / seconds
    return out


# ---- fail-open and doubts ---------------------------------------------------------------------------
# Every way a flagged packet can pass uninspected, with what one count of it is. Each has a
# counter: the kernel's (summed over interfaces), the queues' own accounting (hybrid.datapath.
# queues) or the engines' stats files (summed over engines; a stopped engine's last figures
# count). Not in the list because nothing passes: a BLOCK evicted from the flow table and
# restored from the pinned table (evicted_decided: its packets are dropped), an invalid IP
# header (malformed_l3: the stack drops it), a reject whose RST could not be sent (dropped).
FAIL_OPEN_WAYS: dict[str, str] = {
    "queue-overflow": "flagged packets a full queue let through uninspected (fail-open), since the engines "
                      "bound; derived from the queue rule's counter",
    "over-budget": "flagged packets without payload over an admission budget, passed unflagged "
                   "(--over-budget pass; kernel counter over_pass)",
    "flow-table-full": "packets whose flow could not be entered in the flow table, so no flow verdict "
                       "holds for them (kernel counter flow_full)",
    "decode-error": "packets whose handling raised in the engine, accepted with no rule applied "
                    "(the engines' errors)",
    "join-abandoned": "split ClientHellos and HTTP request heads the engine gave up joining, decided "
                      "on the bytes it had",
    "flow-write-error": "flow verdicts the engine could not write to the kernel: the flow goes on "
                        "without them",
    "block-not-pinned": "BLOCK verdicts not pinned (pinned table full): an eviction from the flow "
                        "table lifts them",
}
_KERNEL_WAYS = {"over-budget": "over_pass", "flow-table-full": "flow_full"}
_ENGINE_WAYS = {"decode-error": "errors", "flow-write-error": "flow_write_errors",
                "block-not-pinned": "pinned_write_errors"}
# Stats files from before the engine counted ``doubts``: their per-protocol dicts, as reasons.
_LEGACY_DOUBTS = (("hellos_unparsed", "tls"), ("http_unparsed", "http"), ("dns_unparsed", "dns"))


def _num(value) -> int:
    """A count from a stats file, 0 for anything that is not one (a key missing, or from another version)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _merge(into: dict[str, int], counts, prefix: str = "") -> dict[str, int]:
    if isinstance(counts, dict):
        for key, n in counts.items():
            name = f"{prefix}{key}"
            into[name] = into.get(name, 0) + _num(n)
    return into


def engine_doubts(engine: dict) -> dict[str, int]:
    """One engine's doubts by reason (``"http:several-hosts"``, ...): its ``doubts``, or in a stats
    file written before the engine had them, ``hellos_unparsed``, ``http_unparsed`` and
    ``dns_unparsed`` as ``tls:``, ``http:`` and ``dns:`` reasons."""
    if isinstance(engine.get("doubts"), dict):
        return _merge({}, engine["doubts"])
    out: dict[str, int] = {}
    for key, proto in _LEGACY_DOUBTS:
        _merge(out, engine.get(key), f"{proto}:")
    return out


def _joins_abandoned(engine: dict) -> tuple[int, dict[str, int]]:
    """(total, by reason) of one engine's abandoned joins: ``joins_abandoned`` by reason when it
    publishes that, else ``hellos_abandoned`` + ``http_heads_abandoned`` (the same joins: never both)."""
    if isinstance(engine.get("joins_abandoned"), dict):
        by = _merge({}, engine["joins_abandoned"])
        return sum(by.values()), by
    return _num(engine.get("hellos_abandoned")) + _num(engine.get("http_heads_abandoned")), {}


def fail_open(counters: list[dict], engines: list[dict], queue_report: dict | None) -> dict:
    """Every way of :data:`FAIL_OPEN_WAYS` with its count, from kernel ``counters`` (one dict per
    interface), the ``engines``' stats and the queues' report (hybrid.datapath.queues; None when
    not attached). ``ways``: way -> count, None when it cannot be counted now (queue-overflow
    before every queue's engine recorded its start); ``moved``: the ways whose count is above 0;
    ``unbound_queues``: fail-open queues with no engine, whose flagged packets pass uncounted
    (--queue-bypass); ``join_reasons``: abandoned joins by reason, when the engines say."""
    ways: dict[str, int | None] = dict.fromkeys(FAIL_OPEN_WAYS, 0)
    rep = queue_report or {}
    ways["queue-overflow"] = rep.get("passed_overflow") if queue_report is not None else None
    if ways["queue-overflow"] is not None:
        ways["queue-overflow"] = _num(ways["queue-overflow"])
    for way, key in _KERNEL_WAYS.items():
        ways[way] = sum(_num(c.get(key)) for c in counters)
    for way, key in _ENGINE_WAYS.items():
        ways[way] = sum(_num(e.get(key)) for e in engines)
    reasons: dict[str, int] = {}
    joins = 0
    for e in engines:
        n, by = _joins_abandoned(e)
        joins += n
        _merge(reasons, by)
    ways["join-abandoned"] = joins
    unbound = [q["queue"] for q in rep.get("queues", ()) if not q.get("bound")] if rep.get("fail_open") else []
    return {"ways": ways, "moved": [w for w, n in ways.items() if n], "unbound_queues": unbound,
            "join_reasons": {k: v for k, v in reasons.items() if v}}


def doubts(engines: list[dict]) -> dict:
    """The packets the engines could not be sure about, summed over engines: ``total``,
    ``reasons`` (reason -> count, every reason an engine published, largest first),
    ``policy`` (queue -> what the engine does with a doubt: inspect, drop or reset; engines that
    do not say are left out), ``actions`` (action -> count) and ``scoped`` (flow verdicts
    narrowed to the side that spoke, by kind)."""
    reasons: dict[str, int] = {}
    actions: dict[str, int] = {}
    scoped: dict[str, int] = {}
    policy: dict[str, str] = {}
    for e in engines:
        _merge(reasons, engine_doubts(e))
        _merge(actions, e.get("doubt_actions"))
        _merge(scoped, e.get("scoped"))
        if isinstance(e.get("doubt_policy"), str):
            policy[str(e.get("queue", ""))] = e["doubt_policy"]
    ordered = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return {"total": sum(reasons.values()), "reasons": ordered, "policy": policy, "actions": actions,
            "scoped": scoped}


FOLLOW_WHAT = {
    "started": "flow directions whose messages the engines began to follow",
    "http_requests": "HTTP request heads decided after a connection's first",
    "dns_messages": "DNS messages of a TCP connection decided after its first",
    "held": "packets whose last message was cut and carried to the next packet",
    "stopped": "followed directions that stopped being HTTP (a tunnel, an upgrade, refused bytes)",
}


QUIC_WHAT = {
    "quic_initials": "QUIC Initial packets the engines read",
    "quic_snis": "QUIC ClientHellos whose server names the rules decided",
    "quic_held": "QUIC datagrams held while their ClientHello was joined",
    "quic_blocked": "QUIC Initials dropped by quic = \"block\"",
}


def quic(engines: list[dict]) -> dict:
    """The engines' QUIC counters (hybrid/engine/quic.py), summed: each of QUIC_WHAT."""
    out = dict.fromkeys(QUIC_WHAT, 0)
    for e in engines:
        for k in QUIC_WHAT:
            v = e.get(k)
            if isinstance(v, int):
                out[k] += v
    return out


def follow(engines: list[dict]) -> dict:
    """The engines' following of flows' messages (hybrid/engine/follow.py), summed: each of
    FOLLOW_WHAT, and ``states`` (directions with a carry or a long body's length kept now)."""
    out = dict.fromkeys((*FOLLOW_WHAT, "states"), 0)
    for e in engines:
        _merge(out, e.get("follow"))
    return out


# ---- the engine's decision-time histogram -------------------------------------------------------------
# Prometheus bucket bounds (seconds): powers of two from 2**9 ns (0.5 us) to 2**30 ns (~1.07 s).
# Engine slot i counts 2**(i-1) <= dt < 2**i ns, so every slot falls entirely below one bound.
HIST_FIRST, HIST_LAST = 9, 30


def crowdsec(link: dict | None, counters: list[dict], engines: list[dict]) -> dict | None:
    """The CrowdSec link as ``hybridctl run`` last published it (hybrid/fleet/link.py), with the
    kernel's ban drops and the engines' shared blocks; None when no link ever ran here. ``alive``:
    the process that published it still runs (a killed supervisor leaves a stale report)."""
    if link is None:
        return None
    out = dict(link)
    pid = link.get("pid")
    out["alive"] = isinstance(pid, int) and pid > 0 and pid_alive(pid)
    out["age_s"] = round(time.time() - link["updated"], 1) if isinstance(link.get("updated"), (int, float)) else None
    out["dropped_xdp"] = sum(_num(c.get("xdp_drop_ban")) for c in counters)
    out["dropped_tc"] = sum(_num(c.get("drop_tc_ban")) for c in counters)
    sent = dict.fromkeys(("sent", "repeated", "dropped", "unsent"), 0)
    for e in engines:
        for k in sent:
            sent[k] += _num((e.get("share") or {}).get(k))
    out["engines_share"] = sent
    return out


def decision_buckets(log2_counts: list[int]) -> list[tuple[float, int]]:
    """Cumulative (upper bound in seconds, count) pairs, the last bound +inf, from an engine's
    ``decision_ns_log2`` slots (a slot's durations are all < 2**slot ns <= its bound)."""
    out = []
    slots = list(log2_counts)
    cum = sum(slots[:HIST_FIRST + 1])
    out.append((2 ** HIST_FIRST / 1e9, cum))
    for i in range(HIST_FIRST + 1, HIST_LAST + 1):
        cum += slots[i] if i < len(slots) else 0
        out.append((2 ** i / 1e9, cum))
    out.append((float("inf"), sum(slots)))
    return out


def merge_decisions(engines: list[dict]) -> tuple[list[int], int]:
    """Sum of the engines' decision-time slots and ns sums."""
    slots: list[int] = []
    total = 0
    for e in engines:
        for i, n in enumerate(e.get("decision_ns_log2") or ()):
            if i >= len(slots):
                slots.extend([0] * (i + 1 - len(slots)))
            slots[i] += n
        total += e.get("decision_ns_sum", 0)
    return slots, total


def quantile_ns(log2_counts: list[int], q: float) -> float | None:
    """Upper bound (ns) of the slot holding quantile ``q``: within a factor of two of the truth."""
    n = sum(log2_counts)
    if not n:
        return None
    rank = q * n
    cum = 0
    for i, c in enumerate(log2_counts):
        cum += c
        if cum >= rank and c:
            return float(2 ** i)
    return float(2 ** (len(log2_counts) - 1))


# ---- FLOW and PREFIX --------------------------------------------------------------------------------
FLOW_SYNTAX = ("PROTO SRC:PORT DST:PORT (tcp, udp), PROTO SRC DST [id N] (icmp, icmpv6), or a "
               "prefix like 198.18.1.0/24; IPv6 with ports as [2001:db8::1]:443")


@dataclass
class Target:
    """What a block/bypass/unblock names: a prefix (``cidr``) or one flow (``key``)."""

    text: str
    cidr: str | None = None
    proto: int = 0
    src: str = ""
    dst: str = ""
    sport: int = 0
    dport: int = 0
    vlan: int = 0

    @property
    def is_prefix(self) -> bool:
        return self.cidr is not None

    def key(self):
        return flow_key(self.src, self.dst, self.sport, self.dport, self.proto, self.vlan)[0]


def _endpoint(word: str, with_port: bool) -> tuple[str, int]:
    if not with_port:
        return str(_address(word)), 0
    if word.startswith("["):
        addr, sep, port = word[1:].partition("]:")
        if not sep:
            raise ConfigError(f"'{word}': write an IPv6 endpoint as [ADDRESS]:PORT")
    else:
        addr, sep, port = word.rpartition(":")
        if not sep or ":" in addr:
            raise ConfigError(f"'{word}': expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"'{word}': the port must be a number 0-65535")
    return str(_address(addr)), int(port)


def _address(word: str):
    try:
        return ipaddress.ip_address(word)
    except ValueError:
        raise ConfigError(f"'{word}' is not an IPv4 or IPv6 address") from None


def parse_target(words: list[str] | tuple[str, ...]) -> Target:
    """A FLOW or a PREFIX from command-line words (quoted as one word or not). FLOW: ``tcp
    198.18.1.2:40000 198.18.2.2:80``; the order of the endpoints does not matter, ``<->`` or
    ``->`` between them and a trailing ``vlan N`` are accepted (so a line of ``hybridctl flows``
    can be pasted). PREFIX: one CIDR or address."""
    parts = [w for word in words for w in word.split() if w not in ("<->", "->")]
    text = " ".join(parts)
    if not parts:
        raise ConfigError(f"name a flow or a prefix: {FLOW_SYNTAX}")
    if len(parts) == 1:
        try:
            net = ipaddress.ip_network(parts[0], strict=False)
        except ValueError:
            raise ConfigError(f"'{parts[0]}' is neither a prefix nor a flow: {FLOW_SYNTAX}") from None
        return Target(text, cidr=str(net))
    proto_word = parts[0].lower()
    if proto_word in abi.PROTO_NUMBERS:
        proto = abi.PROTO_NUMBERS[proto_word]
    elif proto_word.isdigit() and 0 <= int(proto_word) <= 255:
        proto = int(proto_word)
    else:
        raise ConfigError(f"'{parts[0]}' is not a protocol (tcp, udp, icmp, icmpv6 or a number): {FLOW_SYNTAX}")
    rest = parts[1:]
    vlan = 0
    if len(rest) >= 2 and rest[-2].lower() == "vlan":
        if not rest[-1].isdigit() or int(rest[-1]) > 4095:
            raise ConfigError(f"vlan '{rest[-1]}': expected a number 0-4095")
        vlan = int(rest[-1])
        rest = rest[:-2]
    ident = 0
    if proto in (1, 58) and len(rest) == 4 and rest[2].lower() == "id":
        if not rest[3].isdigit() or int(rest[3]) > 65535:
            raise ConfigError(f"id '{rest[3]}': expected the ICMP echo identifier, 0-65535")
        ident = int(rest[3])
        rest = rest[:2]
    if len(rest) != 2:
        raise ConfigError(f"'{text}': expected {FLOW_SYNTAX}")
    with_port = proto in (6, 17)
    (src, sport), (dst, dport) = _endpoint(rest[0], with_port), _endpoint(rest[1], with_port)
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise ConfigError(f"'{text}': both endpoints must be IPv4 or both IPv6")
    if proto in (1, 58):
        sport = dport = ident
    return Target(text, proto=proto, src=src, dst=dst, sport=sport, dport=dport, vlan=vlan)


def check_ttl(ttl: float | None) -> float | None:
    """--ttl in seconds: positive, or 0 for "until changed" (None)."""
    if ttl is None or ttl == 0:
        return None
    if ttl < 0:
        raise ConfigError(f"--ttl {ttl:g}: give seconds > 0, or 0 for no expiry")
    return float(ttl)


def name_cache(maps, counters: list[dict], engines: list[dict]) -> dict | None:
    """The name-verdict cache (bpf/namecache.h) for ``hybridctl status``: its entries (those of
    the current generation are the ones that can decide), what the kernel did with the names it
    read (``counters``: the tc counters of every interface), and what the engines taught it.
    ``evicted`` is an estimate: entries the engines inserted that are neither present nor
    deleted as expired (the LRU map does not count its evictions). None without a cache."""
    if maps is None or not maps.has_name_cache:
        return None
    state = maps.name_state()
    present = current = hits_in_entries = 0
    for key, entry in maps.name_verdicts():
        present += 1
        if key.generation == state.generation:
            current += 1
            hits_in_entries += entry.hits
    got = {k: sum(_num(c.get(k)) for c in counters)
           for k in ("cache_passed", "cache_dropped", "cache_miss", "cache_expired", "cache_refused",
                     "cache_lost", "names_no_prog")}
    hits = got["cache_passed"] + got["cache_dropped"]
    asked = hits + got["cache_miss"] + got["cache_expired"] + got["cache_refused"]
    taught = [e.get("name_cache") or {} for e in engines]
    inserted = sum(_num(t.get("inserted")) for t in taught)
    return {"generation": state.generation, "entries": present, "current": current,
            "capacity": abi.NAME_CACHE_SIZE, "hits": hits, "passed": got["cache_passed"],
            "dropped": got["cache_dropped"], "misses": got["cache_miss"], "expired": got["cache_expired"],
            "refused": got["cache_refused"], "events_lost": got["cache_lost"],
            "hit_rate": round(hits / asked, 4) if asked else None,
            "inserted": inserted, "evicted": max(0, inserted - present - got["cache_expired"]),
            "not_cacheable": sum(_num(t.get("not_cacheable")) for t in taught),
            "reported": sum(_num(t.get("kernel_decisions")) for t in taught)}


def bridge(state) -> dict | None:
    """Bridge mode (docs/deployment.md, "On a bridge"): the bridges hybrid is attached to, their
    ports attached, ports added since attach (not inspected), and the br_netfilter sysctls hybrid
    set with their values now; None on a router."""
    from hybrid.datapath import attach
    from hybrid.kernel import netfilter, sysutil
    if not state.bridges:
        return None
    return {"bridges": {br: list(ports) for br, ports in state.bridges.items()},
            "not_inspected": attach.unattached_ports(state),
            "sysctls": {name: sysutil.read_sysctl(name) for name in state.sysctls},
            "dropped_two_tags": netfilter.bridge_dropped()}


def bridge_lines(b: dict | None) -> list[str]:
    """``hybridctl status``'s bridge lines for :func:`bridge`'s view."""
    if not b:
        return []
    lines = ["bridge mode: " + "; ".join(f"{br} (ports {', '.join(p)})" for br, p in b["bridges"].items())
             + (f"; flagged frames under two VLAN tags dropped (br_netfilter cannot queue them): "
                f"{b['dropped_two_tags']:,}" if b.get("dropped_two_tags") is not None else
                "; warning: the bridge table (nft) is missing: frames under two VLAN tags pass uninspected")]
    for br, ports in b["not_inspected"].items():
        lines.append(f"warning: {br}'s port(s) {', '.join(ports)} added after attach are not inspected "
                     f"(hybridctl attach {' '.join(ports)})")
    off = [n for n, v in b["sysctls"].items() if v != "1"]
    if off:
        lines.append(f"warning: {', '.join(off)} no longer 1: bridged packets (or VLAN-tagged ones) are not queued; "
                     "attach again")
    return lines
