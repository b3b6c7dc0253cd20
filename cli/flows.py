"""hybridctl flows / block / bypass / unblock: the kernel flow table, and manual verdicts."""

from __future__ import annotations

import inspect
import ipaddress
import json
import sys

import click

from hybrid.datapath.maps import flow_info
from hybrid.errors import TableFullError
from hybrid.kernel import abi
from hybrid.observe import views

from .common import InputError

SORTS = {
    "flagged": lambda f: -f["flagged"],
    "packets": lambda f: -sum(f["packets"]),
    "bytes": lambda f: -sum(f["bytes"]),
    "age": lambda f: -f["age"],
    "idle": lambda f: f["idle"],
    "ttl": lambda f: (f["ttl"] is None, f["ttl"] or 0),
}
FLOW_HELP = """\b
FLOW is PROTO SRC:PORT DST:PORT for tcp and udp, PROTO SRC DST [id N] for icmp and icmpv6
(N: the echo identifier; without it, other ICMP), or a protocol number; IPv6 endpoints with a
port are written [ADDRESS]:PORT, a trailing 'vlan N' names a VLAN. The order of the endpoints
does not matter, and a line of 'hybridctl flows' can be pasted as is. PREFIX is a CIDR or one
address."""


def _flow_help(fn):
    """Append the FLOW/PREFIX syntax to a command's help (before click reads the docstring)."""
    fn.__doc__ = inspect.cleandoc(fn.__doc__) + "\n\n" + FLOW_HELP
    return fn


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" or n >= 100 else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.0f}P"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.0f}m{s % 60:02.0f}s"
    return f"{s / 3600:.0f}h{s % 3600 / 60:02.0f}m"


def _verdict_text(f: dict) -> str:
    if f["verdict"] == "none":
        return "none" + (f" ({f['expired_verdict']} expired)" if f.get("expired_verdict") else "")
    return (f["verdict"] + (f" {_duration(f['ttl'])}" if f["ttl"] is not None else " (no expiry)")
            + (" by name cache" if f.get("by_cache") else ""))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every field).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(0), metavar="N",
              help="Show the first N flows of the sort order (0: all).")
@click.option("--sort", "sort", type=click.Choice(list(SORTS)), default="flagged", show_default=True,
              help="Order: most flagged, packets or bytes first; oldest; most recently active; "
                   "verdict expiring soonest.")
@click.option("--verdict", "verdicts", multiple=True, type=click.Choice(list(abi.VERDICT_NAMES.values())),
              help="Only flows in this verdict (repeatable).")
def flows(as_json: bool, limit: int, sort: str, verdicts: tuple[str, ...]) -> None:
    """Show the kernel's flow table: endpoints (the side that sent first is SRC), protocol,
    verdict and its time left, age, idle time, packets and bytes per direction, packets
    flagged for the engine.

    An expired verdict shows as 'none (... expired)': the kernel reverts it on the flow's next
    packet. 'pinned (manual|engine)': the flow's BLOCK survives eviction from the table.

    \b
    Examples:
      hybridctl flows
      hybridctl flows --sort bytes --limit 10
      hybridctl flows --verdict block --json
    """
    with views.instance_maps() as (state, maps):
        rows = list(maps.flow_infos())
    total = len(rows)
    if verdicts:
        rows = [f for f in rows if f["verdict"] in verdicts]
    rows.sort(key=SORTS[sort])
    matching = len(rows)
    if limit:
        rows = rows[:limit]
    if as_json:
        click.echo(json.dumps({"instance": state.instance, "total": total, "matching": matching,
                               "flows": rows}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, just in (("FLOW", "left"), ("VERDICT", "left"), ("AGE", "right"), ("IDLE", "right"),
                      ("PKTS →/←", "right"), ("BYTES →/←", "right"), ("FLAGGED", "right"), ("", "left")):
        table.add_column(col, justify=just, no_wrap=col != "FLOW", overflow="fold", min_width=len(col))
    for f in rows:
        table.add_row(f["flow"], _verdict_text(f), _duration(f["age"]), _duration(f["idle"]),
                      f"{_human(f['packets'][0])}/{_human(f['packets'][1])}",
                      f"{_human(f['bytes'][0])}/{_human(f['bytes'][1])}", str(f["flagged"]),
                      ", ".join(([f"pinned ({f['pinned']})"] if f.get("pinned") else [])
                                + (["midstream"] if f["midstream"] else [])))
    Console(width=None if sys.stdout.isatty() else 1000).print(table)   # piped: never cut a FLOW
    shown = f"{len(rows)} of {matching} flows" + (f" ({total} in the table)" if matching != total else "")
    click.echo(f"{shown}, sorted by {sort}" + ("; --limit 0 shows all" if len(rows) < matching else ""))


@click.command()
@click.argument("target", nargs=-1, required=True, metavar="FLOW|PREFIX")
@click.option("--ttl", type=float, default=None, metavar="S",
              help="FLOW: seconds the block lasts (0: until unblocked; it survives eviction from the flow table)  "
                   "[default: 300]. A PREFIX block has no expiry.")
@_flow_help
def block(target, ttl) -> None:
    """Drop a flow, or every packet from or to a prefix, in the kernel (at XDP where it is
    attached, else at tc).

    A flow that is not in the table yet is added, so a connection can be blocked before it
    starts; a blocked TCP flow stays blocked when a SYN reuses its ports.

    \b
    Examples:
      hybridctl block tcp 198.18.1.2:40000 198.18.2.2:80 --ttl 600
      hybridctl block 'udp [2001:2:0:1::2]:5353 [2001:2:0:2::2]:53'
      hybridctl block 203.0.113.0/24
    """
    t = views.parse_target(target)
    with views.instance_maps() as (_, maps):
        if t.is_prefix:
            if ttl is not None:
                raise InputError(f"--ttl: a prefix block has no expiry in the kernel; remove it with "
                                 f"'hybridctl unblock {t.cidr}'")
            action = maps.prefixes().get(t.cidr, 0)
            maps.add_prefix(t.cidr, action | abi.PREFIX_BLOCK)
            click.echo(f"blocked {t.cidr}: dropped in the kernel until 'hybridctl unblock {t.cidr}'")
            return
        secs = views.check_ttl(300.0 if ttl is None else ttl)
        try:
            maps.set_verdict(t.key(), abi.VERDICT_BLOCK, secs, manual=True)
        except TableFullError as exc:
            raise click.ClickException(f"blocked {t.text} in the flow table, but not pinned: {exc}") from exc
    click.echo(f"blocked {t.text}" + (f" for {secs:g} s" if secs else " until unblocked"))



@click.command()
@click.argument("target", nargs=-1, required=True, metavar="FLOW")
@click.option("--ttl", type=float, default=None, metavar="S",
              help="Seconds the bypass lasts (0: until changed or the flow leaves the table)  [default: 300]")
@_flow_help
def bypass(target, ttl) -> None:
    """Keep a flow in the kernel: none of its packets is queued to the engine (odd TCP flags
    included) until the bypass expires.

    Prefixes cannot be bypassed: the kernel's prefix table only watches or blocks. A TCP SYN
    on the flow's ports starts a new connection over, and with it the verdict: bypass a
    connection once it is established.

    \b
    Example:
      hybridctl bypass tcp 198.18.1.2:40000 198.18.2.2:443 --ttl 3600
    """
    t = views.parse_target(target)
    if t.is_prefix:
        raise InputError(f"bypass takes a FLOW, not a prefix ({t.cidr}): the kernel's prefix table can only "
                         "watch or block; bypass the prefix's flows one by one")
    secs = views.check_ttl(300.0 if ttl is None else ttl)
    with views.instance_maps() as (_, maps):
        key = t.key()
        existed = maps.get_flow(key) is not None
        maps.set_verdict(key, abi.VERDICT_BYPASS, secs)
    click.echo(f"bypassed {t.text}" + (f" for {secs:g} s" if secs else " until changed"))
    if not existed and t.proto == 6:
        click.echo("note: the flow is not in the table yet; its first SYN will start it over without "
                   "the bypass", err=True)



@click.command()
@click.argument("target", nargs=-1, required=True, metavar="FLOW|PREFIX")
@_flow_help
def unblock(target) -> None:
    """Lift a block: a flow goes back to verdict none (the engine decides it again), a prefix
    leaves the prefix table (or stays only watched, if it was watched too).

    Unblocking what is not blocked changes nothing and says so.

    \b
    Examples:
      hybridctl unblock tcp 198.18.1.2:40000 198.18.2.2:80
      hybridctl unblock 203.0.113.0/24
    """
    t = views.parse_target(target)
    with views.instance_maps() as (_, maps):
        if t.is_prefix:
            prefixes = maps.prefixes()
            action = prefixes.get(t.cidr, 0)
            if action & abi.PREFIX_BLOCK:
                if action & ~abi.PREFIX_BLOCK:
                    maps.add_prefix(t.cidr, action & ~abi.PREFIX_BLOCK)
                else:
                    maps.del_prefix(t.cidr)
                click.echo(f"unblocked {t.cidr}")
            else:
                click.echo(f"{t.cidr} was not blocked; nothing changed")
            net = ipaddress.ip_network(t.cidr)
            wider = [p for p, a in prefixes.items() if a & abi.PREFIX_BLOCK and p != t.cidr
                     and ipaddress.ip_network(p).version == net.version and net.subnet_of(ipaddress.ip_network(p))]
            if wider:
                click.echo(f"note: still blocked by {', '.join(sorted(wider))}", err=True)
            return
        key = t.key()
        flow = maps.get_flow(key)
        pinned = maps.get_pinned(key) is not None
        if flow is None and not pinned:
            click.echo(f"{t.text} is not in the flow table; nothing changed")
            return
        info = _effective_verdict(key, flow) if flow is not None else "block"   # evicted, pinned
        if info != "block" and not pinned:
            click.echo(f"{t.text} was not blocked (verdict {info}); nothing changed")
            return
        maps.clear_verdict(key)
    click.echo(f"unblocked {t.text}")



def _effective_verdict(key, flow) -> str:
    return flow_info(key, flow)["verdict"]
