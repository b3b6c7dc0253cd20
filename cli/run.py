"""hybridctl run: hybrid as a service, driven by the configuration file."""

from __future__ import annotations

import json
import logging

import click

from hybrid.engine import runner
from hybrid.errors import HybridError
from hybrid.service import config as hcfg
from hybrid.service import supervisor as service

from .config import config_options, load_located


def child_argv(spec: dict) -> list[str]:
    """An engine of this supervisor: ``hybridctl run --engine-child SPEC`` (see :func:`_child`)."""
    return [*runner.hybridctl_argv(), "run", "--engine-child", json.dumps(spec)]


@click.command()
@config_options
@click.option("--engine-child", default=None, hidden=True)
def run(config_path: str, overrides: dict, engine_child: str | None) -> None:
    """Run hybrid as a service: attach as the configuration says, run one verdict engine per
    queue, stay in the foreground and log JSON lines to standard output.

    Options given here override the configuration file (each names its key). SIGHUP reloads the
    configuration and the rules (a broken file keeps the running ones and says why); SIGTERM or
    Ctrl-C stops the engines and detaches, or leaves the kernel side in place with
    keep_attached_on_stop = true in [service], so a restart has no blind window. Attaching again
    on start reuses the pinned flow table, verdicts and counters and never duplicates a rule.

    \b
    Examples:
      hybridctl run                                    # /etc/hybrid/hybrid.toml
      hybridctl run --config examples/hybrid.toml --interface eth0 --interface eth1
      systemctl start hybrid                           # the same, under systemd (install-service)
    """
    if engine_child is not None:
        _child(engine_child)
        return
    cfg, _ = load_located(config_path, overrides)      # bad input: one FILE:LINE line, exit 2
    service.setup_json_logging(cfg["log.level"])
    svc = service.Service(lambda: hcfg.load(config_path, overrides), child_argv)
    raise SystemExit(svc.run())


def _child(spec_text: str) -> None:
    spec = json.loads(spec_text)
    service.setup_json_logging(spec["level"])
    try:
        rc = service.run_engine_child(spec)
    except HybridError as exc:
        service.event(logging.ERROR, "engine_failed", f"queue {spec['queue']}: {exc}", queue=spec["queue"],
                      error=str(exc))
        rc = 1
    raise SystemExit(rc)
