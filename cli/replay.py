"""hybridctl replay: what hybrid would have done with a capture (docs/replay.md)."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import sys

import click

from hybrid.datapath.options import ATTACH, AttachOptions, Option
from hybrid.kernel import abi
from hybrid.replay.run import REPLAY_KEYS

from .config import default_text, schema_option

def replay_options(fn):
    """The classification options of ``attach`` (hybrid.datapath.options.ATTACH), with the same
    parsers and help; the command receives ``options``: {key: value} of the ones given."""
    schema = [o for o in ATTACH if o.key in REPLAY_KEYS]

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


def side_options(fn):
    fn = click.option("--server-iface", "server_ifaces", multiple=True, metavar="NAME",
                      help="Packets captured on this interface (pcapng if_name) came from the server side.")(fn)
    fn = click.option("--client-iface", "client_ifaces", multiple=True, metavar="NAME",
                      help="Packets captured on this interface (pcapng if_name) came from the client side.")(fn)
    fn = click.option("--client-net", "client_nets", multiple=True, metavar="CIDR",
                      help="Packets from these addresses came from the client side. Repeatable.")(fn)
    fn = click.option("--client-mac", "client_macs", multiple=True, metavar="MAC",
                      help="Packets from these MAC addresses came from the client side. Repeatable.")(fn)
    return fn


def build_options(options: dict) -> AttachOptions:
    opts = AttachOptions.from_values({"interfaces": ["replay"], **options})
    opts.validate()
    return opts


@contextlib.contextmanager
def _out_stream(path: str | None):
    if path is None:
        yield None
    elif path == "-":
        yield sys.stdout
    else:
        try:
            f = open(path, "w")  # noqa: SIM115
        except OSError as exc:
            raise click.ClickException(f"{path}: {exc.strerror}") from None
        with f:
            yield f


class Progress:
    """One line on the terminal, rewritten: packets, flows, rate, time left (from the file's
    bytes read). Nothing when standard error is not a terminal."""

    def __init__(self, cap):
        self.cap = cap
        self.shown = False

    def __call__(self, done: int, packets: int, flows: int, elapsed: float) -> None:
        rate = done / elapsed if elapsed > 0 else 0
        left = ""
        if self.cap.size and self.cap.offset and elapsed > 0:
            frac = self.cap.offset / self.cap.size
            if frac > 0:
                left = f", ~{elapsed * (1 - frac) / frac:.0f} s left"
        click.echo(f"\r{done:,} packets, {flows:,} flows, {rate:,.0f} packets/s{left}   ", err=True, nl=False)
        self.shown = True

    def end(self) -> None:
        if self.shown:
            click.echo("\r" + " " * 70 + "\r", err=True, nl=False)


def run_replay(capture: str, rules: str, options: dict, sides, *, log_path=None, write_passed=None,
               write_dropped=None, progress: bool = False):
    from hybrid.replay.capture import open_capture
    from hybrid.replay.run import Replay
    opts = build_options(options)
    cap = open_capture(capture)
    prog = Progress(cap) if progress else None
    with _out_stream(log_path) as stream:
        try:
            return Replay(rules, opts, sides, log_stream=stream, write_passed=write_passed,
                          write_dropped=write_dropped, progress=prog).run(cap)
        finally:
            if prog is not None:
                prog.end()


def _proto(p: int) -> str:
    return {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6"}.get(p, str(p))


def flow_lines(rep) -> list[str]:
    """The per-flow table."""
    rows = [("FIRST", "PROTO", "FROM -> TO", "PKTS", "BYTES", "FLAGGED", "DECIDED BY", "RULE", "VERDICT")]
    for f in rep.flows:
        why = ",".join(f"{k}" + (f"x{n}" if n > 1 else "") for k, n in f.reasons.items())
        flagged = f"{f.flagged}" + (f" ({why})" if why else "")
        if f.cache_packets:
            flagged += f" cache {f.cache_packets}"
        verdict = f.verdict + (f"/{f.flow_verdict}" if f.flow_verdict else "")
        rule = f.rule if f.rule is not None else ("(default)" if f.decided_by in ("engine", "kernel cache") else "-")
        rows.append((f"+{(f.first_seen_ns - rep.first_ns) / 1e9:.3f}", _proto(f.proto), f"{f.a} -> {f.b}",
                     f"{f.packets[0]}/{f.packets[1]}", f"{f.bytes[0]}/{f.bytes[1]}", flagged,
                     f.decided_by, rule, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def total_lines(rep) -> list[str]:
    """Totals, named as ``hybridctl status`` names them."""
    k = rep.kernel
    lines = []
    span = (rep.last_ns - rep.first_ns) / 1e9
    lines.append(f"capture: {rep.capture} ({rep.format}), {rep.packets:,} packets over {span:.3f} s; "
                 f"replayed {rep.replayed:,}" + (f"; skipped {sum(rep.skipped.values()):,}: "
                                                 + ", ".join(f"{r} {n:,}" for r, n in rep.skipped.items())
                                                 if rep.skipped else ""))
    if rep.flagged_not_forwarded:
        lines.append(f"flagged but never at the forward hook (link-local or multicast): {rep.flagged_not_forwarded:,} "
                     "(not queued; --hook input queues them)")
    if rep.cut_for_test_run:
        lines.append(f"longer than a test run takes: {rep.cut_for_test_run:,} (run on their first bytes)")
    if rep.truncated:
        lines.append(f"capture truncated: {rep.truncated} (what came before was replayed)")
    lines.append(f"verdicts: passed {rep.outcomes['passed']:,}, dropped {rep.outcomes['dropped']:,}, "
                 f"rewritten {rep.outcomes['rewritten']:,}")
    for side, st in rep.sides.items():
        lines.append(f"  {side} side: {st['packets']:,} packets, {st['bytes']:,} bytes, flagged {st['flagged']:,}, "
                     f"dropped {st['dropped']:,}")
    if k:
        reasons = ", ".join(f"{name} {k.get('reason_' + name, 0):,}" for name in abi.REASON_NAMES.values()
                            if k.get("reason_" + name))
        lines.append(f"kernel: packets {k.get('packets', 0):,}, flagged {k.get('flagged', 0):,}"
                     + (f" ({reasons})" if reasons else "")
                     + f", bypassed {k.get('bypassed', 0):,}, passed {k.get('passed', 0):,}, "
                     f"xdp drops {k.get('xdp_drop_flow', 0) + k.get('xdp_drop_prefix', 0) + k.get('xdp_drop_ban', 0) + k.get('xdp_drop_source', 0):,}, "
                     f"tc drops {k.get('drop_tc_flow', 0) + k.get('drop_tc_prefix', 0) + k.get('drop_tc_ban', 0):,}, "
                     f"over budget {k.get('over_drop', 0) + k.get('over_pass', 0):,}, new flows {k.get('flow_new', 0):,}")
        if k.get("cache_passed") or k.get("cache_dropped") or k.get("cache_miss"):
            lines.append(f"name cache: decided in the kernel {k.get('cache_passed', 0) + k.get('cache_dropped', 0):,} "
                         f"(passed {k.get('cache_passed', 0):,}, dropped {k.get('cache_dropped', 0):,}); to the engine: "
                         f"missed {k.get('cache_miss', 0):,}, expired {k.get('cache_expired', 0):,}, "
                         f"in doubt {k.get('cache_refused', 0):,}")
    e = rep.engine
    if e:
        acts = ", ".join(f"{a} {n:,}" for a, n in e["actions"].items() if n) or "none"
        fv = ", ".join(f"{a} {n:,}" for a, n in e["flow_verdicts"].items() if n) or "none"
        lines.append(f"engine: {e['packets']:,} packets queued; actions: {acts}; flow verdicts: {fv}"
                     + (f"; errors {e['errors']:,}" if e["errors"] else ""))
        rules = ", ".join(f"{r} {n:,}" for r, n in e["rules"].items() if n)
        lines.append(f"rules: {rules or 'none matched'}; default {e['default']:,}")
        if e["doubts"]:
            lines.append("doubts: " + ", ".join(f"{r} {n:,}" for r, n in e["doubts"].items()))
    rate = rep.replayed / rep.elapsed_s if rep.elapsed_s > 0 else 0
    lines.append(f"replayed in {rep.elapsed_s:.2f} s ({rate:,.0f} packets/s)")
    return lines


@click.command()
@click.argument("capture", type=click.Path(dir_okay=False))
@click.option("--rules", required=True, type=click.Path(dir_okay=False), help="The TOML rules file.")
@replay_options
@side_options
@click.option("--json", "as_json", is_flag=True, help="Print the flows and totals as JSON.")
@click.option("--log", "log_path", default=None, metavar="FILE",
              help="The verdict log, JSON lines as the engine writes it, with the capture's times ('-': standard output).")
@click.option("--write-passed", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Write what the gateway would have forwarded to a pcap (rewritten packets as rewritten).")
@click.option("--write-dropped", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Write what the gateway would have dropped to a pcap.")
def replay(capture, rules, options, client_ifaces, server_ifaces, client_nets, client_macs, as_json, log_path,
           write_passed, write_dropped) -> None:
    """Replay CAPTURE (pcap or pcapng) through the BPF programs and the verdict engine, offline.

    Every packet, in capture order and at the capture's time, runs through the real XDP and tc
    programs (compiled as `attach` compiles them, on private maps: nothing is attached, pinned
    or sent) and every packet tc flags through the engine's own decision code with RULES; the
    engine's flow verdicts and name-cache entries go back into the maps, so later packets are
    decided in the kernel as they would be live. Prints a table of flows (packets and bytes per
    direction, packets flagged and why, who decided: the engine, the kernel's name cache, the
    kernel (a blocked prefix or a ban) or nothing, the rule, the verdict) and totals.

    The side a packet came in on: the pcapng interface (--client-iface/--server-iface), else
    the source MAC (--client-mac), else the source address (--client-net); by default the side
    of an address that has sent a SYN is the client's. Packets a capture marks as sent by the
    capturing host (pcapng epb_flags, Linux SLL) are not replayed: they are copies of packets
    received on another link.

    Needs root (BPF_PROG_TEST_RUN) and bcc, as attach does.

    \b
    Examples:
      hybridctl replay lab.pcapng --rules examples/rules/realistic.toml
      hybridctl replay incident.pcap --rules policy.toml --name-cache --client-net 10.0.0.0/8 --json
      hybridctl replay in.pcap --rules policy.toml --write-passed out.pcap --log verdicts.jsonl
    """
    from hybrid.replay.run import Sides
    for n in client_nets:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError:
            raise click.BadParameter(f"{n!r}: write an address or a prefix, e.g. 198.18.1.0/24",
                                     param_hint="--client-net") from None
    sides = Sides.parse(client_ifaces, server_ifaces, client_macs, client_nets)
    if not os.path.exists(capture):
        raise click.BadParameter(f"{capture}: no such file", param_hint="CAPTURE")
    progress = sys.stderr.isatty() and not as_json
    rep = run_replay(capture, rules, options, sides, log_path=log_path, write_passed=write_passed,
                     write_dropped=write_dropped, progress=progress)
    if as_json:
        click.echo(json.dumps(rep.as_dict(), indent=1))
        return
    for line in flow_lines(rep):
        click.echo(line)
    click.echo("")
    for line in total_lines(rep):
        click.echo(line)
