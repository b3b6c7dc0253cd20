"""hybridctl attach / detach / status: the kernel side."""

from __future__ import annotations

import json

import click

from hybrid.datapath import attach as att
from hybrid.engine import runner
from hybrid.engine.rules import load_rules
from hybrid.kernel import abi
from hybrid.kernel.sysutil import pid_alive
from hybrid.observe.status import status as status_view

from .common import InputError, parse_int, parse_queues
from .engine import run_engines


def _reasons(value: str) -> tuple[str, ...]:
    names = tuple(r.strip() for r in value.split(",") if r.strip())
    bad = [r for r in names if r not in abi.REASON_BITS]
    if bad:
        raise InputError(f"--flag {bad[0]!r}: use a comma-separated list of {', '.join(abi.REASON_BITS)}")
    return names


@click.command()
@click.argument("interfaces", nargs=-1, required=True, metavar="IFACE...")
@click.option("--xdp-mode", type=click.Choice(att.XDP_MODES), default="auto", show_default=True,
              help="auto: native XDP on physical NICs, none on veth/virtual links (measured: XDP costs "
                   "throughput there and tc drops just as early); off: tc only.")
@click.option("--hook", "hooks", multiple=True, type=click.Choice(["forward", "input"]),
              help="Netfilter hook whose marked packets are queued  [default: forward; input for a host]")
@click.option("--mark", default=hex(att.DEFAULT_MARK), show_default=True, help="Bit(s) set on flagged packets.")
@click.option("--mark-mask", default=hex(att.DEFAULT_MASK), show_default=True,
              help="Bits hybrid owns in the packet mark; others are never touched.")
@click.option("--queues", default="0", show_default=True, metavar="N|A-B",
              help="NFQUEUE number, or a range spread with --queue-balance.")
@click.option("--fail-open/--fail-closed", default=True, show_default=True,
              help="With no engine bound: let flagged packets pass (--queue-bypass) or drop them.")
@click.option("--queue-cpu-fanout", "cpu_fanout", is_flag=True,
              help="With a range of queues: pick the queue by the CPU the packet is on, not by a hash "
                   "of its addresses (which sends every connection between two hosts to one engine). "
                   "Needs a NIC that keeps each flow on one CPU (RSS) for split ClientHellos and "
                   "request heads to be joined.")
@click.option("--flag", "flag", default=",".join(att.DEFAULT_REASONS), show_default=True,
              help="Comma-separated flag reasons to enable.")
@click.option("--first-n", default=att.DEFAULT_FIRST_N, show_default=True, type=click.IntRange(0, 1_000_000),
              help="Payload-carrying packets queued per direction at the start of every flow.")
@click.option("--watch-port", "watch_ports", multiple=True, type=click.IntRange(1, 65535),
              help="Queue every packet of flows on this port (repeatable).")
@click.option("--watch-prefix", "watch_prefixes", multiple=True, metavar="CIDR",
              help="Queue every packet from or to this prefix (repeatable).")
@click.option("--block-prefix", "block_prefixes", multiple=True, metavar="CIDR",
              help="Drop every packet from or to this prefix in the kernel (repeatable).")
@click.option("--family", "families", multiple=True, type=click.Choice(["ipv4", "ipv6"]),
              help="Netfilter families to install the queue rule in  [default: both]")
@click.option("--flow-table-size", default=131072, show_default=True, type=click.IntRange(1024, 1 << 24),
              help="Entries in the kernel flow table (LRU).")
@click.option("--source-rate", default=0, show_default=True, type=click.IntRange(0, 100_000_000),
              metavar="N", help="Admission: new flows per second one source may send to the engine (0: off).")
@click.option("--source-burst", default=0, type=click.IntRange(0, 100_000_000), metavar="N",
              help="Admission: burst allowed above --source-rate  [default: one second's worth]")
@click.option("--global-rate", default=att.DEFAULT_GLOBAL_RATE, show_default=True,
              type=click.IntRange(0, 100_000_000), metavar="N",
              help="Admission: flagged packets per second for the whole gateway, so the engine is "
                   "never flooded (0: off).")
@click.option("--global-burst", default=0, type=click.IntRange(0, 100_000_000), metavar="N",
              help="Admission: burst allowed above --global-rate  [default: one second's worth]")
@click.option("--over-budget", type=click.Choice(att.OVER_BUDGET), default="pass", show_default=True,
              help="An over-budget flagged packet without payload: pass it unflagged, or drop it. "
                   "One with payload is always dropped (never passed uninspected).")
@click.option("--rules", type=click.Path(dir_okay=False), default=None,
              help="Run the verdict engine with these rules in the foreground after attaching.")
@click.option("--keep", is_flag=True, help="With --rules: leave hybrid attached when the engine stops.")
@click.option("--log", "log_path", default=None, metavar="FILE",
              help="With --rules: the verdict log, JSON lines ('-' for standard output).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def attach(interfaces, xdp_mode, hooks, mark, mark_mask, queues, fail_open, cpu_fanout, flag, first_n, watch_ports,
           watch_prefixes, block_prefixes, families, flow_table_size, source_rate, source_burst, global_rate,
           global_burst, over_budget, rules, keep, log_path, as_json) -> None:
    """Attach hybrid's XDP/tc programs to IFACE... and install the queue rule.

    All or nothing: if any step fails (an interface is missing, a foreign XDP program is
    attached, iptables refuses), everything done so far is undone. Attaching again replaces the
    programs in place and reuses the pinned flow table: no rule is ever duplicated.

    \b
    Examples:
      hybridctl attach eth0 eth1                       # a gateway, FORWARD path
      hybridctl attach eth0 --hook input               # a host
      hybridctl attach eth0 --queues 0-1 --watch-port 53 --block-prefix 203.0.113.0/24
      hybridctl attach eth0 eth1 --rules examples/rules/realistic.toml   # attach + engine; Ctrl-C detaches
    """
    if rules is not None:
        load_rules(rules)          # a broken rules file is reported before anything is attached
    qa, qb = parse_queues(queues)
    opts = att.AttachOptions(
        interfaces=list(interfaces), xdp_mode=xdp_mode, hooks=tuple(hooks) or ("forward",),
        mark=parse_int(mark, "--mark"), mark_mask=parse_int(mark_mask, "--mark-mask"),
        queue_first=qa, queue_last=qb, fail_open=fail_open, queue_cpu_fanout=cpu_fanout, reasons=_reasons(flag),
        first_n=first_n,
        watch_ports=tuple(watch_ports), watch_prefixes=tuple(watch_prefixes),
        block_prefixes=tuple(block_prefixes), families=tuple(families) or ("ipv4", "ipv6"),
        flow_table_size=flow_table_size, source_rate=source_rate, source_burst=source_burst,
        global_rate=global_rate, global_burst=global_burst, over_budget=over_budget)
    res = att.attach(opts)
    if as_json:
        click.echo(json.dumps(res.__dict__, indent=1))
    if rules is not None:
        _engine_in_foreground(rules, keep, log_path)
        return
    if as_json:
        return
    for name, mode in res.interfaces.items():
        click.echo(f"attached {name}: tc ingress + " + ("no XDP" if mode == "off" else f"XDP {mode}"))
    click.echo(f"maps pinned in {res.pin_dir}" + (" (reused: verdicts and counters kept)" if res.reused_pins else ""))
    click.echo("marked packets go to NFQUEUE " + (f"{qa}" if qa == qb else f"{qa}-{qb}") +
               (" (fail-open)" if fail_open else " (fail-closed)") + "; see: hybridctl status")


def _engine_in_foreground(rules: str, keep: bool, log_path: str | None) -> None:

    rc = 1
    try:
        rc = run_engines(rules, runner.settings_for_instance(), log_path, 4096)
    finally:
        if keep:
            click.echo("engine stopped; hybrid stays attached (--keep)", err=True)
        else:
            att.detach(None)
            click.echo("engine stopped; hybrid detached", err=True)
    raise SystemExit(rc)


@click.command()
@click.argument("interfaces", nargs=-1, metavar="[IFACE...]")
@click.option("--all", "all_", is_flag=True, help="Detach from every interface and remove all of hybrid's state.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def detach(interfaces, all_, as_json) -> None:
    """Remove exactly what hybrid added: XDP program, tc filter (and the clsact qdisc if hybrid
    created it), and, once no interface is left, the netfilter chain, jumps and pinned maps.

    Idempotent, and works from a fresh process after the attaching one was killed.

    \b
    Examples:
      hybridctl detach eth0
      hybridctl detach --all
    """
    if bool(interfaces) == all_:
        raise InputError("name the interfaces to detach, or give --all (not both)")
    res = att.detach(None if all_ else list(interfaces))
    if as_json:
        click.echo(json.dumps(res.__dict__, indent=1))
        return
    if not (res.interfaces or res.netfilter_families or res.pins_removed):
        click.echo("nothing of hybrid to remove")
        return
    if res.interfaces:
        click.echo(f"detached from {', '.join(res.interfaces)}")
    if res.netfilter_families:
        click.echo(f"removed the queue chain ({', '.join(res.netfilter_families)})")
    if res.pins_removed:
        click.echo("removed the pinned maps")
    if res.remaining:
        click.echo(f"still attached: {', '.join(res.remaining)}")
    for name in res.kept_clsact:
        click.echo(f"kept the clsact qdisc on {name}: without hybrid's state file it cannot tell whether "
                   f"it created it (remove it with: tc qdisc del dev {name} clsact)")


_SHOWN = [("packets", "seen (tc)"), ("flagged", "flagged"), ("bypassed", "bypassed"), ("passed", "passed"),
          ("xdp_drop_flow", "dropped at XDP, flow"), ("xdp_drop_prefix", "dropped at XDP, prefix"),
          ("drop_tc_flow", "dropped at tc, flow"), ("drop_tc_prefix", "dropped at tc, prefix"),
          ("not_ip", "not IP"), ("malformed_l3", "malformed IP"),
          ("over_pass", "over budget, passed"), ("over_drop", "over budget, dropped"),
          ("over_source", "  refused: source budget"), ("over_global", "  refused: global budget"),
          ("xdp_drop_source", "dropped at XDP, source")]


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Show what is attached in this network namespace and what the kernel counted
    (summed over CPUs): packets seen, flagged by reason, bypassed, dropped, flows."""
    st = status_view()
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    if not st["attached"]:
        click.echo(f"hybrid is not attached in this namespace ({st['instance']})")
        if st.get("warning"):
            click.echo(f"warning: {st['warning']}")
        return
    click.echo(f"instance {st['instance']}, maps in {st['pin_dir']}, {st['flows']} flows in the table")
    if st["config"]:
        c = st["config"]
        click.echo(f"mark {c['mark']}, first {c['first_n']} payload packets per direction, "
                   f"flagging: {', '.join(c['reasons'])}")
        if c.get("skipped_by_engine"):
            click.echo(f"not queued because the engine's rules decide nothing on them: "
                       f"{', '.join(c['skipped_by_engine'])}")
        adm = c.get("admission") or {}
        budgets = [f"{k} {v['rate']:,}/s (burst {v['burst']:,})" for k in ("source", "global")
                   if (v := adm.get(k))]
        if budgets:
            click.echo(f"admission: {', '.join(budgets)}; over budget without payload: {adm['over_budget']}")
    for name, e in st["interfaces"].items():
        where = "MISSING" if e.get("missing") else (
            f"tc {'ok' if e.get('tc_attached') else 'MISSING'}, XDP "
            + ("off" if e["xdp_mode"] == "off" else f"{e['xdp_mode']} {'ok' if e.get('xdp_attached') else 'MISSING'}"))
        click.echo(f"{name}: {where}")
        cnt = e["counters"]
        for key, label in _SHOWN:
            if cnt.get(key):
                click.echo(f"  {label:<24}{cnt[key]:>14,}")
        reasons = [(abi.reason_written(k), v) for k, v in cnt.items() if k.startswith("reason_") and v]
        if reasons:
            click.echo("  flagged by reason: " + ", ".join(f"{k} {v:,}" for k, v in reasons))
    for nf in st["netfilter"]:
        if nf["installed"]:
            click.echo(f"netfilter {nf['family']}: chain HYBRID from {', '.join(nf['hooks']) or 'no hook'}, "
                       f"{nf['queued_packets']:,} packets matched the queue rule")
    _print_queues(st.get("queue"))
    for e in st.get("engines", []):
        alive = pid_alive(e.get("pid"))
        click.echo(f"engine queue {e['queue']} ({'running, pid ' + str(e['pid']) if alive else 'stopped'}): "
                   f"{e['packets']:,} packets, " + ", ".join(f"{k} {v:,}" for k, v in e["actions"].items() if v)
                   + (f", {e['errors']} errors (accepted)" if e.get("errors") else ""))
        for rule, n in e.get("rules", {}).items():
            click.echo(f"  rule {rule:<28}{n:>12,}")
        click.echo(f"  {'(default)':<33}{e.get('default', 0):>12,}")
        if e.get("last_reload_error"):
            click.echo(f"  last reload refused: {e['last_reload_error']}")
    for queue, pid in sorted(st.get("spares", {}).items(), key=lambda kv: int(kv[0])):
        click.echo(f"spare engine queue {queue} (waiting, pid {pid}): takes the queue over if its engine dies")
    if st.get("warning"):
        click.echo(f"warning: {st['warning']}")


def _print_queues(rep: dict | None) -> None:
    """The kernel's side of each queue, and what overflowed since the engines bound."""
    if not rep:
        return
    for q in rep["queues"]:
        if not q["bound"]:
            click.echo(f"queue {q['queue']}: no engine bound (" + ("flagged packets pass uninspected, --queue-bypass"
                       if rep["fail_open"] else "flagged packets are dropped") + ")")
            continue
        click.echo(f"queue {q['queue']}: engine bound, {q['queued']:,} packets queued since it bound, "
                   f"{q['waiting']:,} waiting for a verdict")
    if not any(q["bound"] for q in rep["queues"]):
        return
    passed = rep["passed_overflow"]
    click.echo(f"  {'passed by fail-open overflow':<36}" + (f"{passed:>12,}" if passed is not None else
               f"{'unknown':>12}  (not every queue has an engine that recorded its start)"))
    click.echo(f"  {'dropped by overflow (fail-closed)':<36}{rep['dropped_overflow']:>12,}")
    click.echo(f"  {'dropped, socket buffer full':<36}{rep['user_dropped']:>12,}")
