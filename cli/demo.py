"""hybridctl demo: the main job on an embedded default, end to end, leaving nothing behind."""

from __future__ import annotations

import json

import click

from hybrid.kernel import abi
from hybrid.lab import demo as demomod


@click.command()
@click.option("--lab-name", default="hdemo", show_default=True, help="Name (prefix) of the temporary lab.")
@click.option("--seconds", default=3.0, show_default=True, type=click.FloatRange(0.5, 60),
              help="Length of the bulk TCP transfer.")
@click.option("--requests", default=20, show_default=True, type=click.IntRange(1, 10000),
              help="Short HTTP connections (curl -> nginx) to drive.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of prose.")
def demo(lab_name: str, seconds: float, requests: int, as_json: bool) -> None:
    """Build a client -- gateway -- server lab, attach hybrid on the gateway, drive a bulk TCP
    transfer and short HTTP connections, show what the kernel classified and queued, then
    remove everything (also on failure or Ctrl-C).

    \b
    Example:
      sudo hybridctl demo --seconds 5
    """
    say = (lambda _m: None) if as_json else (lambda m: click.echo(f"* {m}"))
    rep = demomod.run_demo(say, lab_name=lab_name, seconds=seconds, requests=requests)
    if as_json:
        click.echo(json.dumps(rep.__dict__, indent=1))
        return
    share = rep.queued_packets / rep.kernel_packets if rep.kernel_packets else 0.0
    click.echo("")
    click.echo(f"The gateway's tc program classified {rep.kernel_packets:,} packets; "
               f"{rep.queued_packets:,} ({share:.2%}) matched the queue rule, everything else stayed in the kernel.")
    if rep.consumer_packets is not None:
        extra = (" (more than the rule counted: the kernel splits a queued GSO super-packet into segments)"
                 if rep.consumer_packets > rep.queued_packets else "")
        click.echo(f"The Python verdict engine decided {rep.consumer_packets:,} packets{extra}.")
    rules = rep.engine.get("rules", {})
    if rules:
        click.echo("Engine rules: " + ", ".join(f"{k} {v}" for k, v in rules.items())
                   + f", default {rep.engine.get('default', 0)}; flow verdicts sent to the kernel: "
                   + ", ".join(f"{k} {v}" for k, v in rep.engine.get("flow_verdicts", {}).items() if v))
    reasons: dict[str, int] = {}
    for e in rep.status.get("interfaces", {}).values():
        for k, v in e["counters"].items():
            if k.startswith("reason_") and v:
                reasons[abi.reason_written(k)] = reasons.get(abi.reason_written(k), 0) + v
    if reasons:
        click.echo("Flagged because: " + ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items())))
    click.echo(f"{rep.status.get('flows', 0)} flows were in the kernel flow table; "
               f"bulk {rep.bulk_gbps:.2f} Gbit/s, HTTP {rep.http_ok}/{rep.http_total} ok.")
