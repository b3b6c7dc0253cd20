"""hybridctl config check|show, and the options every configuration-driven command shares:
``--config FILE`` and one override option per configuration key (generated from
hybrid.config.FIELDS, so the file and the command line can never drift apart)."""

from __future__ import annotations

import functools
import json

import click

from hybrid.engine.rules import load_rules
from hybrid.errors import ConfigError
from hybrid.service import config as hcfg

from .rules import LocatedError


def _dest(f: hcfg.Field) -> str:
    return "cfg__" + f.name.replace(".", "__")


def config_options(fn):
    """``--config FILE`` plus an override option per configuration key. The command receives
    ``config_path`` and ``overrides`` ({"section.key": value} for the options given)."""
    @functools.wraps(fn)
    def wrapper(*args, config_path, **kwargs):
        overrides = {f.name: kwargs.pop(_dest(f)) for f in hcfg.FIELDS}
        return fn(*args, config_path=config_path, overrides=overrides, **kwargs)

    for f in reversed(hcfg.FIELDS):
        where = f"  [file: {f.key} in [{f.section}]]"
        if f.kind == "flag":
            opt = click.option(f.cli, _dest(f), default=None, help=f.help + where)
        elif f.kind == "list":
            opt = click.option(f.cli, _dest(f), multiple=True, metavar=f.metavar,
                               help=f.help + " Repeatable." + where)
        else:
            metavar = f.metavar or ("N" if isinstance(f.default, int) or f.default is None else "VALUE")
            opt = click.option(f.cli, _dest(f), default=None, metavar=metavar, help=f.help + where)
        wrapper = opt(wrapper)
    wrapper = click.option("--config", "config_path", default=hcfg.DEFAULT_PATH, show_default=True,
                           type=click.Path(dir_okay=False), help="The configuration file (TOML).")(wrapper)
    return wrapper


def load_located(config_path: str, overrides: dict | None = None, *, with_rules: bool = True):
    """The effective configuration (and the compiled rules), or one bare ``FILE:LINE: ...`` line
    with exit status 2."""
    try:
        cfg = hcfg.load(config_path, overrides)
        ruleset = load_rules(cfg["engine.rules"], cfg["engine.flow_ttl"]) if with_rules else None
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
@click.option("--config", "config_path", default=hcfg.DEFAULT_PATH, show_default=True,
              type=click.Path(dir_okay=False), help="The configuration file (TOML).")
def check(config_path: str) -> None:
    """Validate the configuration file and the rules file it names.

    On an error, prints one line FILE:LINE: what is wrong and what to write instead (for the
    configuration or the rules file), and exits 2.

    \b
    Examples:
      hybridctl config check
      hybridctl config check --config examples/hybrid.toml
    """
    cfg, ruleset = load_located(config_path)
    n = len(ruleset)
    click.echo(f"{cfg.path}: ok: attach {', '.join(cfg['attach.interfaces'])}, queue{'s' if '-' in cfg['attach.queues'] else ''} "
               f"{cfg['attach.queues']} ({'fail-open' if cfg['attach.fail_open'] else 'fail-closed'}); "
               f"rules {cfg['engine.rules']} ({n} rule{'s' if n != 1 else ''}); metrics "
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
