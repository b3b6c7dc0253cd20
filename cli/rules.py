"""hybridctl rules: check a verdict-engine rules file."""

from __future__ import annotations

import json

import click

from hybrid.engine.rules import RulesError, load_rules

from .common import InputError


class LocatedError(InputError):
    """A rules error printed bare, ``FILE:LINE: message``, so editors and CI can jump to it."""

    def show(self, file=None) -> None:
        click.echo(self.format_message(), err=True, file=file)


@click.group()
def rules() -> None:
    """Work with the verdict engine's rules files (TOML; see examples/rules/)."""


@rules.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the compiled rules as JSON.")
def check(file: str, as_json: bool) -> None:
    """Compile FILE and print its rules in the order they are tried, with the default last.

    On an error, prints one line FILE:LINE: what is wrong and what to write instead, and exits 2.

    \b
    Examples:
      hybridctl rules check examples/rules/realistic.toml
      hybridctl rules check policy.toml --json
    """
    try:
        ruleset = load_rules(file)
    except RulesError as exc:
        raise LocatedError(str(exc)) from None
    described = ruleset.describe()
    if as_json:
        click.echo(json.dumps({"file": file, "rules": described[:-1], "default": described[-1]}, indent=1))
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
                   + ("  log" if d["log"] else ""))
    n = len(described) - 1
    click.echo(f"{file}: {n} rule{'s' if n != 1 else ''} ok")


def _action(d: dict) -> str:
    if d["action"] == "reject":
        return f"reject({d['reject_with']})"
    if d["action"] == "mark":
        return f"mark({d['mark']})"
    if d["action"] == "rewrite" and d["rewrite"]:
        return f"rewrite({d['rewrite']})"
    return d["action"]
