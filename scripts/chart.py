#!/usr/bin/env python3
"""Draw the benchmark chart: each mode's ratio to the baseline measured in the same run, per
workload, from the JSON that ``scripts/bench.py --json`` writes.

    .venv/bin/python scripts/chart.py bench-results/comparison.json docs/benchmarks.png

payload-visibility has no baseline ratio (nothing is inspected without an engine); its bars are
the share of connections whose first payload the engine saw, on the same 0-1 scale, and the
chart says so. Values are printed on the bars, so a collapse to 0.04 stays readable. Modes whose
userspace side cannot block (the passive ones: the JSON's ``capabilities``) are hatched and
labelled so: a fast bar that cannot stop anything is not the same kind of bar.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VISIBILITY = "payload-visibility"


def value(r: dict) -> float | None:
    if r["workload"] == VISIBILITY:
        return r["median"]                       # already a share, 0..1
    return r.get("ratio_to_baseline")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: chart.py RESULTS.json OUT.png", file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as f:
            doc = json.load(f)
        results = doc["results"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"chart.py: cannot read benchmark results from {argv[1]}: {exc}", file=sys.stderr)
        return 2
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    modes = [m for m in dict.fromkeys(r["mode"] for r in results) if m != "baseline"]
    by = {(r["mode"], r["workload"]): value(r) for r in results}

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(workloads)), 4.8), dpi=120)
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            v = by.get((mode, w))
            if v is not None:
                xs.append(j + (i - (len(modes) - 1) / 2) * width)
                ys.append(v)
        passive = doc.get("capabilities", {}).get(mode, {}).get("blocks") == "no"
        bars = ax.bar(xs, ys, width, label=mode + (" (cannot block)" if passive else ""),
                      hatch="//" if passive else None, edgecolor="white" if passive else None)
        for bar, v in zip(bars, ys):
            ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=6, rotation=90, xytext=(0, 2),
                        textcoords="offset points")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([w + ("\n(share seen)" if w == VISIBILITY else "") for w in workloads])
    ax.set_ylabel("ratio to baseline (same run, medians)")
    top = max([v for v in by.values() if v is not None] + [1.0])
    ax.set_ylim(0, top * 1.18)
    m = doc.get("machine", {})
    lab = f", {doc['lab']} lab" if doc.get("lab") else ""
    ax.set_title(f"hybrid vs other ways of feeding a userspace engine — {m.get('cpus', '?')} CPUs, "
                 f"Linux {m.get('kernel', '?')}, {doc.get('repetitions', '?')} repetitions{lab}", fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(modes)), loc="upper right")
    fig.tight_layout()
    fig.savefig(argv[2])
    print(f"wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
