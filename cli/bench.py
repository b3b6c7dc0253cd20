"""hybridctl bench: the side-by-side performance comparison (also scripts/bench.py)."""

from __future__ import annotations

import json
import os
import shlex
import sys

import click

from hybrid.lab import bench as benchmod

DEFAULT_MODES = "baseline,nfq-all,ct-new,connbytes,hybrid"
DEFAULT_WORKLOADS = "bulk-1,bulk-4,newconn,udp-small,payload-visibility,flood,synflood"
QUICK_WORKLOADS = ["bulk-1"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--modes", default=DEFAULT_MODES, show_default=True,
              help=f"Comma-separated modes: {', '.join(benchmod.MODES)}.")
@click.option("--workloads", default=DEFAULT_WORKLOADS, show_default=True,
              help=f"Comma-separated workloads: {', '.join(benchmod.WORKLOADS)}.")
@click.option("-r", "--repetitions", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(0.5, 300),
              help="Length of each measurement.")
@click.option("--quick", is_flag=True, help="Smoke run: 1 repetition of 1 s; bulk-1 only unless --workloads is given.")
@click.option("--json", "json_path", metavar="FILE", help="Also write the results as JSON ('-' for stdout).")
@click.option("--lab-name", default="hbench", show_default=True)
@click.option("--lab", "lab_kind", type=click.Choice(["router", "bridge"]), default="router", show_default=True,
              help="The lab the modes run on: the gateway routes, or bridges its two ports (br0); "
                   "bridge-flood needs the bridge.")
@click.option("--engine-pps", "engine_rules", metavar="RULES", default=None,
              help="Instead: packets/s through the engine with RULES vs a bare accept-all consumer.")
@click.option("--takeover", is_flag=True,
              help="Instead: how long a killed engine's queue stays unbound under `hybridctl run`, with "
                   "a spare engine waiting and without (one fresh run per sample).")
def bench(modes, workloads, repetitions, seconds, quick, json_path, lab_name, lab_kind, engine_rules,
          takeover) -> None:
    """Measure modes of feeding a userspace engine side by side, in one run, on a fresh lab.

    Reports the median of the repetitions and its ratio to `baseline` (nothing attached): each
    sample is paired with a baseline sample measured right before it, and the table gives the
    median of the paired ratios and their lowest and highest. Every queued mode
    (all but baseline and nfq-all-bare) runs the engine with scripts/bench-rules.toml. The
    table shows each workload's main metric; --json has the extras too (newconn: p50/p99
    latency, packets queued per request, and the name cache's hit ratio under hybrid-cache;
    newconn-zipf: the same, each request's Host drawn from 10,000 names by a Zipf law (s = 1);
    newconn-unique: each request's Host never seen before, the cache's worst case; keepalive: wrk
    on persistent connections, many requests each (every request still decided), with packets
    queued per request; udp-small: packets sent and lost; payload-visibility: connections seen; flood: the
    same mode's Gbit/s without the flood, the share kept, and where the flood's packets died;
    synflood: connections/s without the flood, the share kept and completed, packets queued).

    The passive modes read a copy of the traffic with an AF_PACKET consumer that decodes it and
    runs the same rules but cannot act: afpacket on the gateway's ports, bridge-flood (--lab
    bridge) at a monitor port the bridge floods every frame to. Their extras (capture_*) count
    what the consumer read and the packets its ring dropped. A capability table follows the
    figures: what each mode sees (and the share a passive mode read), whether it can block or
    rewrite inline.

    \b
    Example:
      sudo hybridctl bench --modes baseline,hybrid --workloads bulk-1 -r 5
      sudo hybridctl bench --quick --modes ct-new,connbytes --workloads newconn,payload-visibility
      sudo hybridctl bench --lab bridge --modes nfq-all,afpacket,bridge-flood,hybrid \
           --workloads bulk-1,newconn -r 5
    """
    say = (lambda m: click.echo(m, err=True))
    if takeover:
        res = benchmod.takeover(1 if quick else repetitions, lab_name=lab_name, progress=say)
        if json_path == "-":
            click.echo(json.dumps(res, indent=1))
            return
        click.echo("\n".join(f"{kind:<9} median {res['median'][kind] * 1000:7.1f} ms unbound  (samples: "
                             + ", ".join(f"{x * 1000:.1f}" for x in res["samples"][kind]) + ")"
                             for kind in ("spare", "no-spare")))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(res, f, indent=1)
        return
    if engine_rules is not None:
        if quick:
            repetitions, seconds = 1, 1.0
        res = benchmod.engine_vs_bare(engine_rules, repetitions, seconds, lab_name=lab_name, progress=say)
        if json_path == "-":
            click.echo(json.dumps(res, indent=1))
            return
        click.echo(f"bare accept-all   {res['median']['bare']:12,.0f} packets/s\n"
                   f"engine ({os.path.basename(engine_rules)}) {res['median']['engine']:12,.0f} packets/s"
                   f"   ratio {res['ratio']:.3f}")
        if json_path:
            with open(json_path, "w") as f:
                json.dump(res, f, indent=1)
        return
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    wl_list = [w.strip() for w in workloads.split(",") if w.strip()]
    if quick:
        repetitions, seconds = 1, 1.0
        if click.get_current_context().get_parameter_source("workloads") is click.core.ParameterSource.DEFAULT:
            wl_list = QUICK_WORKLOADS
    report = benchmod.run(mode_list, wl_list, repetitions, seconds, lab_name=lab_name, progress=say,
                          command=" ".join(shlex.quote(a) for a in sys.argv), lab_kind=lab_kind)
    if json_path == "-":
        click.echo(json.dumps(report.as_dict(), indent=1))
        return
    click.echo(benchmod.table(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report.as_dict(), f, indent=1)
        click.echo(f"results written to {json_path}", err=True)
