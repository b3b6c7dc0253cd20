"""hybridctl name-cache show / flush: the kernel's name-verdict cache (bpf/namecache.h)."""

from __future__ import annotations

import json
import time

import click

from hybrid.errors import NotFoundError
from hybrid.kernel import abi
from hybrid.observe import views

@click.group("name-cache")
def name_cache() -> None:
    """The names the engine taught the kernel to decide (attach option --name-cache)."""


@name_cache.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", default=50, show_default=True, help="Entries to print (most hits first).")
def show(as_json: bool, limit: int) -> None:
    """The cached decisions of the current rules, most used first: what a name decides in the
    kernel, for how long, and how often it did."""
    now = time.monotonic_ns()
    with views.instance_maps() as (_, maps):
        if not maps.has_name_cache:
            raise NotFoundError("this attach has no name cache: attach again with --name-cache")
        gen = maps.name_state().generation
        rows = []
        for key, v in maps.name_verdicts():
            if key.generation != gen or v.expires_ns <= now:
                continue
            rows.append({"kind": abi.NAME_KINDS.get(key.kind, str(key.kind)), "name": bytes(key.name[:key.len]).decode("ascii", "replace"),
                         "proto": abi.PROTO_NAMES.get(key.proto, str(key.proto)), "port": key.port,
                         "action": abi.NAME_ACTIONS.get(v.action, "?"),
                         "flow": abi.VERDICT_NAMES.get(v.verdict, "?"), "hits": v.hits,
                         "expires_in": round((v.expires_ns - now) / 1e9, 1)})
    rows.sort(key=lambda r: -r["hits"])
    if as_json:
        click.echo(json.dumps({"generation": gen, "entries": rows}, indent=1))
        return
    click.echo(f"generation {gen}: {len(rows):,} live names")
    for r in rows[:limit]:
        click.echo(f"  {r['kind']:<5}{r['name']:<40} {r['proto']}/{r['port']:<6} {r['action']:<7}"
                   f"flow {r['flow']:<7}{r['hits']:>10,} hits, {r['expires_in']:>7g} s left")


@name_cache.command("flush")
def flush() -> None:
    """Delete every cached decision. New connections go to the engine again, which teaches the
    names back as they come (the rules do not change: to apply new rules, reload the engine)."""
    with views.instance_maps() as (_, maps):
        if not maps.has_name_cache:
            raise NotFoundError("this attach has no name cache: attach again with --name-cache")
        n = maps.flush_names()
    click.echo(f"flushed {n:,} cached name decisions")
