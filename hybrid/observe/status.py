"""``hybridctl status``: what is attached in this network namespace, and what the kernel, the
netfilter queue and the engines counted. Reads; changes nothing."""

from __future__ import annotations

from dataclasses import asdict

from hybrid import instance as inst
from hybrid.datapath import attach, queues
from hybrid.errors import NotFoundError
from hybrid.kernel import abi, netfilter


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
        for name, ist in state.interfaces.items():
            entry: dict = {"ifindex": ist.ifindex, "xdp_mode": ist.xdp_mode}
            try:
                entry["xdp_attached"], entry["tc_attached"] = attach.programs_on(name)
            except NotFoundError:
                entry["missing"] = True
            entry["counters"] = stats.get(ist.ifindex, {})
            out["interfaces"][name] = entry
        if maps:
            out["flows"] = maps.flow_count()
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
    return out


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
