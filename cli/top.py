"""hybridctl top: a live view of one instance: packet rates from counter deltas, the queue, the
engines and the flows with the most flagged packets."""

from __future__ import annotations

import json
import sys
import time

import click

from hybrid.errors import NotFoundError
from hybrid.kernel import abi
from hybrid.observe import status, views

# (total name, label) in display order; rates are per second over the last interval.
ROWS = [
    ("seen", "seen by tc"),
    ("seen_xdp", "seen by XDP"),
    ("flagged", "flagged"),
    *[(f"reason_{r}", f"  {abi.reason_written(r)}") for r in abi.REASON_NAMES.values()],
    ("queued", "queued to the engine"),
    ("accepted", "accepted by the engine"),
    ("dropped_user", "dropped by the engine"),
    ("dropped_xdp", "dropped at XDP"),
    ("dropped_tc", "dropped at tc"),
    ("bypassed", "bypassed (kept in kernel)"),
    ("cache_passed", "passed by the name cache"),
    ("cache_dropped", "dropped by the name cache"),
    ("passed", "passed unflagged"),
    ("queue_overflow", "queue overflow"),
    ("flows_new", "new flows"),
]


def _sample(top_flows: int) -> dict:
    snap = views.snapshot(top_flows=top_flows)
    if not snap["attached"]:
        raise NotFoundError(f"hybrid is not attached in this network namespace ({snap['instance']}): "
                            "run 'hybridctl attach IFACE...' first")
    return snap


def frame(before: dict, after: dict) -> dict:
    """What one refresh shows, as data (also the --json output)."""
    seconds = max(after["time"] - before["time"], 1e-6)
    t0, t1 = views.totals(before), views.totals(after)
    slots0, _ = views.merge_decisions(before["engines"])
    slots1, _ = views.merge_decisions(after["engines"])
    if len(slots1) < len(slots0) or any(b < a for a, b in zip(slots0, slots1)):   # an engine restarted
        slots0 = []
    delta = [n - (slots0[i] if i < len(slots0) else 0) for i, n in enumerate(slots1)]
    return {
        "instance": after["instance"], "interval": round(seconds, 3),
        "rates": {k: round(v, 1) for k, v in views.rates(t0, t1, seconds).items()},
        "totals": t1,
        "queue_waiting": t1["queue_waiting"],
        "queues": {str(q): c for q, c in sorted(after["queues"].items())},
        "flows": after["flows"], "flows_by_verdict": after["flows_by_verdict"],
        "flow_table_size": after["flow_table_size"],
        "engines": [{"queue": e.get("queue"), "alive": e.get("alive"), "packets": e.get("packets", 0),
                     "errors": e.get("errors", 0)} for e in sorted(after["engines"], key=lambda e: e.get("queue", 0))],
        "decision_ns": {"p50": views.quantile_ns(delta, 0.5), "p99": views.quantile_ns(delta, 0.99),
                        "packets": sum(delta)},
        "top_flows": after["top_flows"],
        "crowdsec": status.crowdsec_lines(after.get("crowdsec")),
    }


def _fmt_rate(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.1f}"


def _fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    return f"{ns / 1e3:.0f} µs" if ns < 1e6 else f"{ns / 1e6:.1f} ms"


def render(f: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    rates, totals = f["rates"], f["totals"]
    head = Text(f"hybrid {f['instance']}  every {f['interval']:.1f}s  flows {f['flows']:,}"
                + (f"/{f['flow_table_size']:,}" if f["flow_table_size"] else "")
                + "  (" + ", ".join(f"{k} {v:,}" for k, v in (f["flows_by_verdict"] or {}).items() if v) + ")",
                style="bold")
    pk = Table(box=None, pad_edge=False, header_style="bold")
    pk.add_column("packets")
    pk.add_column("per second", justify="right")
    pk.add_column("total", justify="right")
    for key, label in ROWS:
        if key.startswith("reason_") and not totals.get(key):
            continue
        pk.add_row(label, _fmt_rate(rates.get(key, 0.0)), f"{totals.get(key, 0):,}")
    q = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("queue", "waiting", "overflow", "engine", "decided", "errors"):
        q.add_column(col, justify="right" if col != "engine" else "left")
    engines = {str(e["queue"]): e for e in f["engines"]}
    for name in sorted(set(f["queues"]) | set(engines), key=int):
        c, e = f["queues"].get(name, {}), engines.get(name, {})
        q.add_row(name, f"{c.get('waiting', 0):,}" if c else "-",
                  f"{c.get('dropped', 0) + c.get('user_dropped', 0):,}" if c else "-",
                  "running" if e.get("alive") else ("stopped" if e else "none"),
                  f"{e.get('packets', 0):,}" if e else "-", f"{e.get('errors', 0):,}" if e else "-")
    d = f["decision_ns"]
    dec = Text(f"engine decision time over the interval: p50 < {_fmt_ns(d['p50'])}, p99 < {_fmt_ns(d['p99'])} "
               f"({d['packets']:,} packets)" if d["packets"] else "engine decision time: no packets in the interval")
    fl = Table(box=None, pad_edge=False, header_style="bold", title="top flows by flagged packets",
               title_justify="left")
    for col in ("flow", "verdict", "flagged", "packets", "bytes"):
        fl.add_column(col, justify="left" if col in ("flow", "verdict") else "right", no_wrap=col != "flow",
                      overflow="fold")
    for x in f["top_flows"]:
        fl.add_row(x["flow"], x["verdict"], f"{x['flagged']:,}", f"{sum(x['packets']):,}", f"{sum(x['bytes']):,}")
    parts = [head, Text(""), pk, Text(""), q, dec]
    if f.get("crowdsec"):
        parts += [Text(""), *(Text(line) for line in f["crowdsec"])]
    if f["top_flows"]:
        parts += [Text(""), fl]
    return Group(*parts)


@click.command()
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 3600), metavar="S",
              help="Seconds between refreshes (rates are over this interval).")
@click.option("--iterations", default=0, type=click.IntRange(0), metavar="N",
              help="Stop after N refreshes  [default: run until Ctrl-C]")
@click.option("--once", is_flag=True, help="Print one refresh and exit (same as --iterations 1, no live screen).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per refresh instead of the screen (with --iterations; default 1).")
@click.option("--flows", "top_flows", default=10, show_default=True, type=click.IntRange(0, 1000), metavar="N",
              help="Flows shown, those with the most flagged packets (0: none, and no flow-table scan).")
def top(interval: float, iterations: int, once: bool, as_json: bool, top_flows: int) -> None:
    """Live view of this namespace's hybrid instance: packets per second seen, flagged (by
    reason), queued, accepted and dropped by the engine, dropped at XDP and tc, bypassed; the
    queue's depth and overflow; the engine's decision time; the flows with the most flagged
    packets.

    Rates are counter deltas over each interval; the first screen appears after one interval.

    \b
    Examples:
      hybridctl top
      hybridctl top --once
      hybridctl top --json --iterations 5 --interval 2
    """
    if once or (as_json and not iterations):
        iterations = 1
    prev = _sample(top_flows)
    if as_json or iterations == 1:
        for _ in range(iterations):
            time.sleep(interval)
            cur = _sample(top_flows)
            f = frame(prev, cur)
            if as_json:
                click.echo(json.dumps(f, separators=(",", ":")))
            else:
                from rich.console import Console
                Console(width=None if sys.stdout.isatty() else 1000).print(render(f))
            prev = cur
        return
    from rich.live import Live
    with Live("waiting for the first interval...", auto_refresh=False, screen=False) as live:
        n = 0
        try:
            while not iterations or n < iterations:
                time.sleep(interval)
                cur = _sample(top_flows)
                live.update(render(frame(prev, cur)), refresh=True)
                prev = cur
                n += 1
        except KeyboardInterrupt:   # Ctrl-C is how a live view ends
            pass
