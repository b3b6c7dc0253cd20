"""hybridctl rules: check a verdict-engine rules file."""

from __future__ import annotations

import json

import click

from hybrid.datapath.options import ATTACH, DEFAULT_MASK
from hybrid.engine.rules import REGEX_WINDOW, RulesError, load_rules

from .common import InputError


class LocatedError(InputError):
    """A rules error printed bare, ``FILE:LINE: message``, so editors and CI can jump to it."""

    def show(self, file=None) -> None:
        click.echo(self.format_message(), err=True, file=file)


@click.group()
def rules() -> None:
    """Work with the verdict engine's rules files (TOML; see examples/rules/)."""


_MARK_MASK = next(o for o in ATTACH if o.key == "mark_mask")

IMPORT_PLUGINS_HELP = ("Import the plugins (runs their code, as the engine does); by default each is only "
                       "checked: its file's owner and mode, and the function defined at its top level.")


def _mark_mask(ctx, param, value):
    """--mark-mask parsed by the attach option's own parser (hybrid.datapath.options)."""
    try:
        return _MARK_MASK.parse(value)
    except ValueError as exc:
        raise click.BadParameter(getattr(exc, "arg", None) or str(exc), ctx, param) from None


def plugins_note(ruleset) -> str:
    """What the output says about plugins: nothing when the rules use none or were imported."""
    if ruleset.plugins_imported or not ruleset.has_plugins:
        return ""
    return " (plugins checked, not imported: --import-plugins runs them)"


@rules.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--mark-mask", "mark_mask", default=f"{DEFAULT_MASK:#x}", show_default=True, callback=_mark_mask,
              metavar="N", help="Hybrid's mark bits (the attachment's --mark-mask): a rule's mark may not touch them.")
@click.option("--import-plugins", is_flag=True, help=IMPORT_PLUGINS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the compiled rules as JSON.")
def check(file: str, mark_mask: int, import_plugins: bool, as_json: bool) -> None:
    """Compile FILE and print its rules in the order they are tried, with the default last.

    On an error, prints one line FILE:LINE: what is wrong and what to write instead, and exits 2.

    Plugins are not imported (no plugin code runs) unless --import-plugins is given: each plugin
    module must exist in the file's plugin_paths and define the function at its top level, and
    the module, its plugin directory and the directories between them (symlinks resolved) must
    not be writable by group or others and must be owned by root, as the engine (root) requires;
    run as another user, this command also accepts files that user owns.

    A rule's mark may not touch hybrid's own mark bits (--mark-mask, 0x100000 unless the
    attachment says otherwise): the engine would queue the packet again, for ever.

    A payload_regex that a crafted payload can make backtrack for a long time ((a+)+$, \\d*\\d*x)
    is refused with how to fix it (a possessive repeat or an atomic group). The engine searches
    only a payload's first bytes: a note below the rules that use a regex says how many.

    The line "quic:" says what the engine does with QUIC handshakes (the file's top-level quic):
    read their SNI for the tls_sni rules whose proto is not "tcp" (inspect), or drop them all so
    that browsers use TCP (block).

    \b
    Examples:
      hybridctl rules check examples/rules/realistic.toml
      hybridctl rules check policy.toml --json
      hybridctl rules check policy.toml --mark-mask 0x300000 --import-plugins
    """
    try:
        ruleset = load_rules(file, mark_mask=mark_mask, import_plugins=import_plugins)
    except RulesError as exc:
        raise LocatedError(str(exc)) from None
    described = ruleset.describe()
    if as_json:
        click.echo(json.dumps({"file": file, "rules": described[:-1], "default": described[-1],
                               "on_doubt": ruleset.on_doubt, "quic": ruleset.quic,
                               "dns_ports": sorted(ruleset.dns_ports),
                               "plugins_imported": ruleset.plugins_imported, "regex_window": REGEX_WINDOW},
                              indent=1))
        return
    width = max([len(d["name"]) for d in described[:-1]] + [7])
    for d in described:
        order = "-" if d["order"] is None else str(d["order"])
        name = d["name"] or "default"
        match = " ".join(f"{k}={v}" for k, v in d["match"].items())
        if d["plugin"]:
            match = (match + " " if match else "") + f"plugin={d['plugin']}"
        click.echo(f"{order:>3} {name:<{width}}  {match or ('*' if d['order'] is None else 'any')}  -> "
                   f"{_action(d)}  flow={d['flow']}" + (f"/{d['ttl']}s" if d["flow"] != "none" else "")
                   + (f"  inspect_bytes={d['inspect_bytes']['client']}/{d['inspect_bytes']['server']}"
                      if d.get("inspect_bytes") else "")
                   + (f"  share={d['share']['ban']}/{d['share']['duration']}s" if d.get("share") else "")
                   + ("  log" if d["log"] else ""))
    n = len(described) - 1
    click.echo(f"  on doubt: {ruleset.on_doubt} (what a packet the server may read otherwise gets; "
               f"docs/rules.md)")
    click.echo("  quic: block (every QUIC handshake dropped: browsers fall back to TCP; docs/rules.md)"
               if ruleset.quic == "block" else
               "  quic: inspect (tls_sni rules without proto = \"tcp\" read QUIC Initials; docs/rules.md)")
    if ruleset.dns_ports != {53}:
        click.echo(f"  dns ports: {', '.join(map(str, sorted(ruleset.dns_ports)))} (their datagrams and "
                   "messages are DNS: dns_qname reads them, every one is decided)")
    regexes = [d["name"] for d in described[:-1] if "payload_regex" in d["match"]]
    if regexes:
        click.echo(f"note: payload_regex reads the first {REGEX_WINDOW} bytes of a payload "
                   f"({', '.join(regexes)}); see docs/rules.md")
    click.echo(f"{file}: {n} rule{'s' if n != 1 else ''} ok{plugins_note(ruleset)}")


def _action(d: dict) -> str:
    if d["action"] == "reject":
        return f"reject({d['reject_with']})"
    if d["action"] == "mark":
        return f"mark({d['mark']})"
    if d["action"] == "rewrite" and d["rewrite"]:
        return f"rewrite({d['rewrite']})"
    return d["action"]


@rules.command("test")
@click.argument("directories", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True),
                metavar="DIR...")
@click.option("--json", "as_json", is_flag=True, help="Print each directory's differences as JSON.")
def test_rules(directories, as_json: bool) -> None:
    """Replay each DIR's capture with its rules and check what its expect.toml says.

    A DIR holds a capture (pcap or pcapng), a rules file (rules.toml) and expect.toml: the
    replay options, totals, datapath counters, rules that must or must not fire, and per-flow
    verdicts (docs/replay.md describes every key). Each DIR is replayed as `hybridctl replay`
    replays (root, bcc). Prints one line per directory, and below a failing one each
    expectation that does not hold; exits 0 when all hold, 1 otherwise (2: a directory that
    cannot be read).

    \b
    Example:
      hybridctl rules test examples/rules-tests/*
    """
    from hybrid.replay.expect import check, load_case
    from hybrid.replay.run import Sides

    from .replay import run_replay
    cases = [load_case(d) for d in directories]     # every file read before anything is replayed
    failed = 0
    results = []
    for case in cases:
        try:
            load_rules(case.rules)
        except RulesError as exc:
            raise LocatedError(str(exc)) from None
        sides = Sides.parse(case.sides.get("client_iface", ()), case.sides.get("server_iface", ()),
                            case.sides.get("client_mac", ()), case.sides.get("client_net", ()))
        rep = run_replay(case.capture, case.rules, case.options, sides)
        diff = check(case, rep)
        failed += bool(diff)
        results.append({"directory": case.directory, "ok": not diff, "differences": diff,
                        "flows": len(rep.flows), "packets": rep.replayed})
        if not as_json:
            click.echo(f"{'ok  ' if not diff else 'FAIL'} {case.directory}: {rep.replayed:,} packets, "
                       f"{len(rep.flows):,} flows" + (f", {len(diff)} difference{'s' if len(diff) > 1 else ''}"
                                                      if diff else ""))
            for line in diff:
                click.echo(f"     {line}")
    if as_json:
        click.echo(json.dumps(results, indent=1))
    elif len(cases) > 1:
        click.echo(f"{len(cases) - failed} of {len(cases)} passed")
    if failed:
        raise SystemExit(1)
