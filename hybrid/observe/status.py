"""``hybridctl status``: what is attached in this network namespace, and what the kernel, the
netfilter queue and the engines counted. Reads; changes nothing."""

from __future__ import annotations

import time
from dataclasses import asdict

from hybrid import instance as inst
from hybrid.datapath import attach, queues
from hybrid.errors import NotFoundError
from hybrid.kernel import abi, netfilter
from hybrid.observe import views


def status() -> dict:
    """What is attached in this namespace and what the kernel counted (summed over CPUs)."""
    instance = inst.name()
    state = attach.State.load(instance)
    out: dict = {"instance": instance, "attached": state is not None and bool(state.interfaces),
                 "pin_dir": state.pin_dir if state else None, "interfaces": {}, "netfilter": [],
                 "flows": None, "pinned": None, "config": None}
    if state is None:
        discovered = attach.discover_attached()
        if discovered:
            out["warning"] = (f"hybrid programs on {', '.join(discovered)} but no state file: "
                              "run 'hybridctl detach --all' to clean up")
        return out
    maps = attach.open_maps(state)
    try:
        stats = maps.stats() if maps else {}
        kernel = [stats.get(0, {})]       # packets on interfaces hybrid did not register count too
        for name, ist in state.interfaces.items():
            entry: dict = {"ifindex": ist.ifindex, "xdp_mode": ist.xdp_mode}
            try:
                entry["xdp_attached"], entry["tc_attached"] = attach.programs_on(name)
            except NotFoundError:
                entry["missing"] = True
            entry["counters"] = stats.get(ist.ifindex, {})
            kernel.append(entry["counters"])
            out["interfaces"][name] = entry
        if maps:
            out["flows"] = maps.flow_count()
            out["name_cache"] = views.name_cache(maps, kernel, inst.engine_stats(instance))
            out["pinned"] = _pinned_view(maps)
            cfg = maps.get_config()
            out["config"] = {"mark": f"0x{cfg.mark_value:x}/0x{cfg.mark_mask:x}", "first_n": cfg.first_n,
                             "reasons": [r for r, bit in abi.REASON_BITS.items() if cfg.reasons & bit],
                             "skipped_by_engine": [r for r, bit in abi.REASON_BITS.items() if cfg.skip_reasons & bit],
                             "admission": _admission_view(cfg)}
        else:
            out["warning"] = f"pinned maps missing under {state.pin_dir}: re-run attach or detach"
    finally:
        if maps:
            maps.close()
    out["netfilter"] = [asdict(s) for s in netfilter.status()]
    out["engines"] = inst.engine_stats(instance)
    out["spares"] = inst.spares(instance)
    o = state.options
    out["queue"] = queues.queue_report(o.get("queue_first", 0), o.get("queue_last", 0), o.get("fail_open", True),
                                    instance, rule_packets=sum(s["queued_packets"] for s in out["netfilter"]))
    out["fail_open"] = views.fail_open(kernel, out["engines"], out["queue"])
    out["doubts"] = views.doubts(out["engines"])
    out["follow"] = views.follow(out["engines"])
    out["quic"] = views.quic(out["engines"])
    out["crowdsec"] = views.crowdsec(inst.crowdsec_status(instance), kernel, out["engines"])
    out["bridge"] = views.bridge(state)
    return out


TOP_REASONS = 5     # doubt reasons named on the status line; the rest are counted ("and 3 more")


def summary_lines(st: dict) -> list[str]:
    """The fail-open and doubt lines of ``hybridctl status`` for a :func:`status` result: one line
    that says whether any way of passing uninspected moved since attach, one line per way that
    did, the doubts by reason with the engines' policy, and the verdicts scoped to the side that
    spoke. Only the ways and reasons in ``st`` are named, whatever they are."""
    lines: list[str] = []
    fo = st.get("fail_open")
    if fo:
        ways = fo.get("ways", {})
        moved = [w for w in fo.get("moved", []) if ways.get(w)]
        unknown = [w for w, n in ways.items() if n is None]
        if moved:
            lines.append(f"fail-open: {len(moved)} way{'s' if len(moved) > 1 else ''} moved since attach: "
                         + ", ".join(f"{w} {ways[w]:,}" for w in moved))
            for w in moved:
                lines.append(f"  {w:<20}{ways[w]:>12,}  {views.FAIL_OPEN_WAYS.get(w, '')}".rstrip())
            if fo.get("join_reasons") and "join-abandoned" in moved:
                lines.append("  joins abandoned by reason: "
                             + ", ".join(f"{k} {v:,}" for k, v in fo["join_reasons"].items()))
        else:
            lines.append("fail-open: none" + (" counted" if unknown or fo.get("unbound_queues") else ""))
        if unknown:
            lines.append(f"  not counted now: {', '.join(unknown)} (not every queue has an engine that "
                         "recorded its start)")
        for q in fo.get("unbound_queues", []):
            lines.append(f"  queue {q} has no engine: its flagged packets pass uninspected and uncounted "
                         "(--queue-bypass)")
    d = st.get("doubts")
    if d and (st.get("engines") or d.get("total")):
        policies = sorted(set(d.get("policy", {}).values()))
        if len(policies) == 1:
            policy = f"policy {policies[0]}"
        else:
            policy = "policy " + ", ".join(f"{p} (queue {q})" for q, p in sorted(d["policy"].items()))
        acted = [f"{a} {n:,}" for a, n in d.get("actions", {}).items() if n]
        how = "; ".join(x for x in (policy if policies else "", ", ".join(acted)) if x)
        reasons = [(r, n) for r, n in d.get("reasons", {}).items() if n]
        if not d.get("total"):
            lines.append("doubts: none" + (f" ({how})" if how else ""))
        else:
            shown = ", ".join(f"{r} {n:,}" for r, n in reasons[:TOP_REASONS])
            more = len(reasons) - TOP_REASONS
            lines.append(f"doubts: {d['total']:,}" + (f" ({how})" if how else "") + f": {shown}"
                         + (f", and {more} more reason{'s' if more > 1 else ''}" if more > 0 else ""))
    nc = st.get("name_cache")
    if nc:
        rate = f"{nc['hit_rate']:.1%}" if nc["hit_rate"] is not None else "-"
        lines.append(f"name cache: {nc['current']:,} names of the current rules ({nc['entries']:,} of "
                     f"{nc['capacity']:,} entries); decided in the kernel {nc['hits']:,} (passed {nc['passed']:,}, "
                     f"dropped {nc['dropped']:,}), hit rate {rate}; to the engine: missed {nc['misses']:,}, "
                     f"expired {nc['expired']:,}, in doubt {nc['refused']:,}; evicted ~{nc['evicted']:,}"
                     + (f"; EVENTS LOST {nc['events_lost']:,} (the engines' logs and counters miss them)"
                        if nc["events_lost"] else ""))
    fw = st.get("follow")
    if fw and st.get("engines"):
        lines.append(f"follow: decided after a flow's first message: {fw['http_requests']:,} HTTP requests, "
                     f"{fw['dns_messages']:,} TCP DNS messages; {fw['started']:,} directions followed, "
                     f"{fw['stopped']:,} stopped (no longer HTTP), {fw['held']:,} cut messages carried")
    q = st.get("quic")
    if q and st.get("engines") and any(q.values()):
        lines.append(f"quic: {q['quic_initials']:,} Initials read, {q['quic_snis']:,} server names decided, "
                     f"{q['quic_held']:,} datagrams held while joining, {q['quic_blocked']:,} dropped by quic = block")
    lines.extend(crowdsec_lines(st.get("crowdsec")))
    scoped = [(k, n) for k, n in (d or {}).get("scoped", {}).items() if n]
    if scoped:
        lines.append("flow verdicts scoped to the side that spoke: " + ", ".join(f"{k} {n:,}" for k, n in scoped))
    return lines


def _counts(d: dict | None) -> str:
    return ", ".join(f"{k} {n:,}" for k, n in sorted((d or {}).items(), key=lambda kv: -kv[1]) if n)


def crowdsec_lines(cs: dict | None) -> list[str]:
    """The CrowdSec link's lines of ``hybridctl status`` (views.crowdsec)."""
    if not cs:
        return []
    if not cs.get("alive"):
        return [f"crowdsec: no link running (the last report, {cs.get('age_s')} s old, is from a supervisor "
                "that is gone); bans in the kernel expire on their own"]
    b, sh = cs.get("bouncer"), cs.get("share")
    if cs.get("connected"):
        what = "pull" if b is not None else "push"
        at = cs.get(f"last_{what}")
        head = f"crowdsec: connected to {cs['url']}, last {what} " + (f"{time.time() - at:.1f} s ago" if at else "not yet")
    elif cs.get("connected") is None:
        head = f"crowdsec: connecting to {cs['url']}"
    else:
        head = (f"crowdsec: DOWN ({cs.get('error_kind')}: {cs.get('last_error')}); the kernel keeps its bans "
                "until they expire, retrying")
    lines = [head]
    if b is not None:
        lines.append(f"  bans: {b['decisions']:,} decisions in the kernel"
                     + (f" ({_counts(b['applied'])})" if b["applied"] else "")
                     + f"; dropped {cs['dropped_xdp'] + cs['dropped_tc']:,} packets (XDP {cs['dropped_xdp']:,}, "
                     f"tc {cs['dropped_tc']:,})")
        if b["refused"]:
            lines.append(f"  refused (would blackhole the gateway): {_counts(b['refused'])}")
        if b["filtered"]:
            lines.append(f"  not enforced: {_counts(b['unsupported'])}"
                         + (f", origin filtered {b['filtered'].get('origin', 0):,}" if b["filtered"].get("origin") else ""))
    if sh is not None:
        es = cs.get("engines_share") or {}
        lines.append(f"  shared blocks: pushed {sh['pushed']:,}, pending {sh['pending']:,}, deduplicated "
                     f"{sh['deduplicated'] + es.get('repeated', 0):,}, rate-limited {sh['rate_limited']:,}, "
                     f"protected {sh['protected']:,}" + (f", lost {es['dropped']:,}" if es.get("dropped") else ""))
    errors = {**{f"pull {k}": n for k, n in cs.get("errors", {}).items()},
              **{f"push {k}": n for k, n in cs.get("push_errors", {}).items()}}
    if errors:
        lines.append(f"  errors since start: {_counts(errors)}")
    return lines


def _pinned_view(maps) -> dict:
    """The pinned verdicts (BLOCKs that survive eviction from the flow table), by origin, and
    the table's size: a full one refuses new BLOCKs their protection."""
    by_origin = {name: 0 for name in abi.PIN_ORIGIN_NAMES.values()}
    total = 0
    for _, pin in maps.pinned():
        total += 1
        name = abi.PIN_ORIGIN_NAMES.get(pin.origin)
        if name:
            by_origin[name] += 1
    return {"count": total, "size": maps.pinned_capacity(), **by_origin}


def _admission_view(cfg: abi.Config) -> dict:
    """The budgets as rates (per second, whole gateway) and the over-budget policy."""
    def rate(interval: int, tolerance: int) -> dict | None:
        if not interval:
            return None
        return {"rate": round(1e9 / interval), "burst": tolerance // interval + 1}
    return {"source": rate(cfg.source_interval_ns, cfg.source_tolerance_ns),
            "global": rate(cfg.global_interval_ns, cfg.global_tolerance_ns),
            "over_budget": "drop" if cfg.flags & abi.CFG_OVER_DROP else "pass"}
