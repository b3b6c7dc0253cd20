"""hybridctl engine: the verdict engine for an attachment made earlier (and the shared code that
``attach --rules`` uses to run engines in the foreground)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import click

from hybrid.datapath import options as opts
from hybrid.engine import runner
from hybrid.engine.rules import load_rules

from .config import SchemaValue

log = logging.getLogger("hybridctl")


@contextlib.contextmanager
def _log_stream(path: str | None):
    if path is None:
        yield None
    elif path == "-":
        yield sys.stdout
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            yield f


def run_engines(rules: str, settings: runner.EngineSettings, log_path: str | None, queue_len: int) -> int:
    """One engine process per queue, in the foreground, until SIGTERM/SIGINT."""
    rules = os.path.abspath(rules)
    first, last = settings.queues
    click.echo(f"engine: queue{'s' if last > first else ''} {first}{'' if last == first else f'-{last}'}, "
               f"rules {rules}, {'fail-open' if settings.fail_open else 'fail-closed'}; "
               "SIGHUP reloads the rules, Ctrl-C stops", err=True)
    return runner.serve(rules, settings, queue_len=queue_len, log_path=log_path)


@click.command()
@click.option("--rules", required=True, type=click.Path(dir_okay=False), help="The TOML rules file.")
@click.option("--queues", default=None, metavar="N|A-B", type=SchemaValue(opts.BY_KEY["queues"], opts.queues),
              help="Queues to serve, one engine process each  [default: the attachment's]")
@click.option("--queue", type=click.IntRange(0, 65535), default=None, hidden=True)
@click.option("--fail-open/--fail-closed", default=None,
              help="On queue overflow let packets pass or drop them  [default: the attachment's]")
@click.option("--queue-len", default=runner.QUEUE_LEN, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Packets the kernel holds for the engine before overflowing.")
@click.option("--log", "log_path", default=None, metavar="FILE",
              help="Verdict log, JSON lines, rate-limited ('-' for standard output).")
def engine(rules, queues, queue, fail_open, queue_len, log_path) -> None:
    """Run the verdict engine against an attachment made earlier with `hybridctl attach`.

    Queued packets are decoded and matched against the rules; flow verdicts (bypass, block,
    inspect) go into the kernel's flow table before the packet's own verdict. SIGHUP reloads
    the rules (a broken file keeps the old ones and says why); SIGTERM or Ctrl-C stops.

    \b
    Example:
      hybridctl attach eth0 eth1 --queues 0-1
      hybridctl engine --rules examples/rules/realistic.toml --log /var/log/hybrid-verdicts.jsonl
    """
    load_rules(rules)   # bad input first: a broken or missing rules file is exit 2 even when not attached
    settings = runner.settings_for_instance(queues and opts.queue_range(queues), fail_open)
    if queue is not None:           # one engine, in this process (what run_engines starts)
        with _log_stream(log_path) as stream:
            runner.serve_one(queue, rules, settings, maxlen=queue_len, log_stream=stream)
        return
    raise SystemExit(run_engines(rules, settings, log_path, queue_len))
