"""hybridctl config check|show, and the command-line options generated from the schema
(hybrid.datapath.options.ATTACH, and hybrid.service.config.FIELDS for the other tables): one
click option per schema entry, with the entry's help text, parsed by the entry's own parser, so
the file, ``hybridctl attach`` and ``hybridctl run`` can never drift apart.

- :func:`config_options`: ``--config FILE`` and an override option per configuration key
  (``hybridctl run``, ``hybridctl config show``);
- :func:`schema_option`: the option of one entry (``hybridctl attach`` builds its own from it).
"""

from __future__ import annotations

import functools
import json
import os

import click

from hybrid.datapath.options import REQUIRED, Int, Option
from hybrid.engine.rules import load_rules
from hybrid.errors import ConfigError
from hybrid.service import config as hcfg

from .common import InputError
from .rules import IMPORT_PLUGINS_HELP, LocatedError, plugins_note


class SchemaValue(click.ParamType):
    """A command-line value parsed by its schema entry's parser (``parse``: the entry's, or its
    list's item parser)."""

    def __init__(self, opt: Option, parse):
        self.opt, self.parse, self.name = opt, parse, opt.key

    def convert(self, value, param, ctx):
        try:
            return self.parse(value)
        except ValueError as exc:
            _fail(self.opt, exc, param, ctx)


def _fail(opt: Option, exc: ValueError, param, ctx):
    """A refused value as one line: in the parser's command-line words when it has them
    (``--queues 'x': use N or FIRST-LAST, ...``), else as click says it (``Invalid value for
    '--first-n': ...``). Exit status 2 either way."""
    arg = getattr(exc, "arg", None)
    if arg:
        raise InputError(f"{opt.option} {arg}") from None
    raise click.BadParameter(str(exc), ctx, param) from None


def _whole_list(opt: Option):
    """What only the whole list can tell (an item given twice, an empty list)."""
    def check(ctx, param, value):
        if not value:
            return value
        try:
            return opt.parse(value)
        except ValueError as exc:
            _fail(opt, exc, param, ctx)
    return check


def _metavar(opt: Option) -> str:
    parse = getattr(opt.parse, "item", opt.parse)
    if opt.metavar:
        return opt.metavar
    if hasattr(parse, "choices"):
        return "|".join(parse.choices)
    return "N" if isinstance(parse, Int) else "VALUE"


def default_text(opt: Option) -> str | None:
    """The default as written on the command line; None for none (or an empty list)."""
    d = opt.default
    if d is REQUIRED or d is None or d == []:
        return None
    if opt.kind == "flag":
        return opt.cli.split("/")[0 if d else 1].lstrip("-")
    if opt.kind == "commas":
        return "all" if set(d) == set(getattr(opt.parse, "choices", ())) else ",".join(d)
    if isinstance(d, list):
        return ", ".join(map(str, d))
    return f"{d:#x}" if opt.hex else str(d)


def schema_option(opt: Option, dest: str, note: str = ""):
    """The click option of one schema entry, passing ``dest`` the parsed value (None or () when
    not given: the default is the schema's, applied by whoever builds from the values)."""
    text = opt.help + (" Repeatable." if opt.kind == "list" else "") + note
    if opt.kind == "flag":
        return click.option(opt.cli, dest, default=None, help=text)
    if opt.kind == "list":
        return click.option(opt.cli, dest, multiple=True, type=SchemaValue(opt, opt.parse.item),
                            callback=_whole_list(opt), metavar=_metavar(opt), help=text)
    return click.option(opt.cli, dest, default=None, type=SchemaValue(opt, opt.parse), metavar=_metavar(opt),
                        help=text)


def _dest(f: Option) -> str:
    return "cfg__" + f.name.replace(".", "__")


def config_options(fn):
    """``--config FILE`` plus an override option per configuration key. The command receives
    ``config_path`` and ``overrides`` ({"section.key": value} for the options given)."""
    @functools.wraps(fn)
    def wrapper(*args, config_path, **kwargs):
        overrides = {f.name: kwargs.pop(_dest(f)) for f in hcfg.FIELDS}
        return fn(*args, config_path=config_path, overrides=overrides, **kwargs)

    for f in reversed(hcfg.FIELDS):
        wrapper = schema_option(f, _dest(f), f"  [file: {f.key} in [{f.section}]]")(wrapper)
    wrapper = click.option("--config", "config_path", default=hcfg.DEFAULT_PATH, show_default=True,
                           type=click.Path(dir_okay=False), help="The configuration file (TOML).")(wrapper)
    return wrapper


def load_located(config_path: str, overrides: dict | None = None, *, with_rules: bool = True,
                 import_plugins: bool = True):
    """The effective configuration (and the compiled rules, checked against the configured mark
    mask; with ``import_plugins=False`` plugins are checked, not imported), or one bare
    ``FILE:LINE: ...`` line with exit status 2."""
    try:
        cfg = hcfg.load(config_path, overrides)
        ruleset = load_rules(cfg["engine.rules"], cfg["engine.flow_ttl"], mark_mask=cfg["attach.mark_mask"],
                             import_plugins=import_plugins) if with_rules else None
    except ConfigError as exc:
        raise LocatedError(str(exc)) from None
    return cfg, ruleset


@click.group()
def config() -> None:
    """Check or show the service configuration (TOML; see examples/hybrid.toml).

    Every key under [attach] is the `hybridctl attach` option of the same name with dashes as
    underscores; [engine], [log], [service] and [metrics] hold the rest (docs/deployment.md).
    """


@config.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False), metavar="[FILE]")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help=f"The configuration file (TOML), the same as FILE.  [default: {hcfg.DEFAULT_PATH}]")
@click.option("--import-plugins", is_flag=True, help=IMPORT_PLUGINS_HELP)
def check(file: str | None, config_path: str | None, import_plugins: bool) -> None:
    """Validate the configuration file FILE (or --config FILE) and the rules file it names.

    On an error, prints one line FILE:LINE: what is wrong and what to write instead (for the
    configuration or the rules file), and exits 2.

    The rules are checked as `hybridctl rules check` does, against the configured mark_mask:
    plugins are not imported unless --import-plugins is given.

    \b
    Examples:
      hybridctl config check                           # /etc/hybrid/hybrid.toml
      hybridctl config check examples/hybrid.toml
      hybridctl config check --config examples/hybrid.toml
    """
    if file and config_path and os.path.abspath(file) != os.path.abspath(config_path):
        raise click.UsageError(f"two configuration files, {file} and --config {config_path}: give one")
    config_path = file or config_path or hcfg.DEFAULT_PATH
    cfg, ruleset = load_located(config_path, import_plugins=import_plugins)
    n = len(ruleset)
    click.echo(f"{cfg.path}: ok: attach {', '.join(cfg['attach.interfaces'])}, queue{'s' if '-' in cfg['attach.queues'] else ''} "
               f"{cfg['attach.queues']} ({'fail-open' if cfg['attach.fail_open'] else 'fail-closed'}); "
               f"rules {cfg['engine.rules']} ({n} rule{'s' if n != 1 else ''}){plugins_note(ruleset)}; metrics "
               + (f"on {cfg['metrics.listen']}" if cfg["metrics.enabled"] else "off"))


@config.command()
@config_options
@click.option("--origins", is_flag=True, help="Say for each key whether it came from the file, a default "
                                              "or the command line.")
@click.option("--json", "as_json", is_flag=True, help="Print the configuration as JSON.")
def show(config_path: str, overrides: dict, origins: bool, as_json: bool) -> None:
    """Print the effective configuration: the file, defaults for what it leaves out, and the
    override options given here (the same as `hybridctl run` takes). The output is itself a
    valid configuration file.

    \b
    Examples:
      hybridctl config show
      hybridctl config show --config examples/hybrid.toml --queues 0-1 --origins
    """
    cfg, _ = load_located(config_path, overrides, with_rules=False)
    if as_json:
        out = cfg.as_dict()
        if origins:
            out["origins"] = cfg.origin
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(cfg.to_toml(origins=origins), nl=False)
