"""hybridctl attach / detach / status: the kernel side."""

from __future__ import annotations

import functools
import json

import click

from hybrid.datapath import attach as att
from hybrid.datapath.options import ATTACH, AttachOptions, Option
from hybrid.engine import runner
from hybrid.engine.rules import load_rules
from hybrid.kernel import abi
from hybrid.kernel.sysutil import pid_alive
from hybrid.observe.status import status as status_view
from hybrid.observe import views
from hybrid.observe.status import summary_lines

from .common import InputError
from .config import default_text, schema_option
from .engine import run_engines


def attach_options(fn):
    """An option per attach option of the schema (hybrid.datapath.options.ATTACH) but the
    interfaces, which are the IFACE... arguments. The command receives ``options``: {key: parsed
    value} of the options given; AttachOptions takes the schema's defaults for the rest."""
    schema = [o for o in ATTACH if o.key != "interfaces"]

    def dest(o: Option) -> str:
        return "opt__" + o.key

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        given = {o.key: v for o in schema if (v := kwargs.pop(dest(o))) is not None and v != ()}
        return fn(*args, options=given, **kwargs)

    for o in reversed(schema):
        default = default_text(o)
        wrapper = schema_option(o, dest(o), f"  [default: {default}]" if default else "")(wrapper)
    return wrapper


@click.command()
@click.argument("interfaces", nargs=-1, required=True, metavar="IFACE...")
@attach_options
@click.option("--rules", type=click.Path(dir_okay=False), default=None,
              help="Run the verdict engine with these rules in the foreground after attaching.")
@click.option("--keep", is_flag=True, help="With --rules: leave hybrid attached when the engine stops.")
@click.option("--log", "log_path", default=None, metavar="FILE",
              help="With --rules: the verdict log, JSON lines ('-' for standard output).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def attach(interfaces, options, rules, keep, log_path, as_json) -> None:
    """Attach hybrid's XDP/tc programs to IFACE... and install the queue rule.

    All or nothing: if any step fails (an interface is missing, a foreign XDP program is
    attached, iptables refuses), everything done so far is undone. Attaching again replaces the
    programs in place and reuses the pinned flow table: no rule is ever duplicated. Every option
    is also a key of the [attach] table of `hybridctl run`'s configuration file.

    \b
    Examples:
      hybridctl attach eth0 eth1                       # a gateway, FORWARD path
      hybridctl attach br0                             # a transparent bridge: its ports
      hybridctl attach eth0 --hook input               # a host
      hybridctl attach eth0 --queues 0-1 --watch-port 53 --block-prefix 203.0.113.0/24
      hybridctl attach eth0 eth1 --rules examples/rules/realistic.toml   # attach + engine; Ctrl-C detaches
    """
    if rules is not None:
        load_rules(rules)          # a broken rules file is reported before anything is attached
    opts = AttachOptions.from_values({**options, "interfaces": list(interfaces)})
    res = att.attach(opts)
    if as_json:
        click.echo(json.dumps(res.__dict__, indent=1))
    if rules is not None:
        _engine_in_foreground(rules, keep, log_path)
        return
    if as_json:
        return
    qa, qb = opts.queue_first, opts.queue_last
    for name, mode in res.interfaces.items():
        click.echo(f"attached {name}: tc ingress + " + ("no XDP" if mode == "off" else f"XDP {mode}"))
    for br, ports in res.bridges.items():
        click.echo(f"bridge mode: {br} (ports {', '.join(ports)}); a port added to {br} later is not inspected "
                   "until attached too")
    if res.sysctls:
        click.echo("set " + ", ".join(f"{k}={v}" for k, v in res.sysctls.items()) + " (restored by detach)")
    click.echo(f"maps pinned in {res.pin_dir}" + (" (reused: verdicts and counters kept)" if res.reused_pins else ""))
    click.echo("marked packets go to NFQUEUE " + (f"{qa}" if qa == qb else f"{qa}-{qb}") +
               (" (fail-open)" if opts.fail_open else " (fail-closed)") + "; see: hybridctl status")


def _engine_in_foreground(rules: str, keep: bool, log_path: str | None) -> None:
    """The engines of ``attach --rules``, one process per queue, then detach unless ``keep``."""
    rc = 1
    try:
        rc = run_engines(rules, runner.settings_for_instance(), log_path, runner.QUEUE_LEN)
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
    if not (res.interfaces or res.netfilter_families or res.pins_removed or res.sysctls):
        click.echo("nothing of hybrid to remove")
        return
    if res.interfaces:
        click.echo(f"detached from {', '.join(res.interfaces)}")
    chains = [f for f in res.netfilter_families if f != "bridge"]
    if chains:
        click.echo(f"removed the queue chain ({', '.join(chains)})")
    if "bridge" in res.netfilter_families:
        click.echo("removed the bridge table (nft: table bridge hybrid)")
    if res.pins_removed:
        click.echo("removed the pinned maps")
    for line in res.sysctls:
        click.echo(line)
    if res.remaining:
        click.echo(f"still attached: {', '.join(res.remaining)}")
    for name in res.kept_clsact:
        click.echo(f"kept the clsact qdisc on {name}: without hybrid's state file it cannot tell whether "
                   f"it created it (remove it with: tc qdisc del dev {name} clsact)")


_SHOWN = [("packets", "seen (tc)"), ("flagged", "flagged"), ("bypassed", "bypassed"), ("passed", "passed"),
          ("cache_passed", "passed by name cache"), ("cache_dropped", "dropped by name cache"),
          ("xdp_drop_flow", "dropped at XDP, flow"), ("xdp_drop_prefix", "dropped at XDP, prefix"),
          ("xdp_drop_ban", "dropped at XDP, ban"),
          ("drop_tc_flow", "dropped at tc, flow"), ("drop_tc_prefix", "dropped at tc, prefix"),
          ("drop_tc_ban", "dropped at tc, ban"),
          ("not_ip", "not IP"), ("malformed_l3", "malformed IP"),
          ("over_pass", "over budget, passed"), ("over_drop", "over budget, dropped"),
          ("over_source", "  refused: source budget"), ("over_global", "  refused: global budget"),
          ("xdp_drop_source", "dropped at XDP, source"),
          ("evicted_decided", "decided flows restored"),
          ("conn_restart", "connections restarted")]


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
    for line in views.bridge_lines(st.get("bridge")):
        click.echo(line)
    if st.get("pinned"):
        p = st["pinned"]
        evicted = sum(e["counters"].get("evicted_decided", 0) for e in st["interfaces"].values())
        click.echo(f"pinned blocks: {p['count']:,} of {p['size']:,} ({p['manual']:,} manual, {p['engine']:,} by the "
                   f"engine); decided flows evicted from the table and restored: {evicted:,}"
                   + ("; FULL: new blocks are not protected from eviction" if p["count"] >= p["size"] else ""))
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
                       f"{nf['queued_packets']:,} packets matched the queue rule"
                       + ("" if nf.get("reassembles", True) else
                          "; WARNING: no conntrack match, fragments reach the engine one by one"))
    _print_queues(st.get("queue"))
    for e in st.get("engines", []):
        alive = pid_alive(e.get("pid"))
        click.echo(f"engine queue {e['queue']} ({'running, pid ' + str(e['pid']) if alive else 'stopped'}): "
                   f"{e['packets']:,} packets, " + ", ".join(f"{k} {v:,}" for k, v in e["actions"].items() if v)
                   + (f", {e['errors']} errors (accepted)" if e.get("errors") else "")
                   + (f", {e['reject_send_errors']} reject messages not sent (dropped)"
                      if e.get("reject_send_errors") else "")
                   + (f", {e['pinned_write_errors']} blocks not pinned (pinned table full)"
                      if e.get("pinned_write_errors") else ""))
        in_kernel = (e.get("name_cache") or {}).get("kernel_rules") or {}
        for rule, n in e.get("rules", {}).items():
            k = in_kernel.get(rule, 0)
            click.echo(f"  rule {rule:<28}{n:>12,}" + (f"  and {k:,} in the kernel (name cache)" if k else ""))
        k = in_kernel.get("(default)", 0)
        click.echo(f"  {'(default)':<33}{e.get('default', 0):>12,}"
                   + (f"  and {k:,} in the kernel (name cache)" if k else ""))
        if e.get("last_reload_error"):
            click.echo(f"  last reload refused: {e['last_reload_error']}")
    for queue, pid in sorted(st.get("spares", {}).items(), key=lambda kv: int(kv[0])):
        click.echo(f"spare engine queue {queue} (waiting, pid {pid}): takes the queue over if its engine dies")
    for line in summary_lines(st):
        click.echo(line)
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
