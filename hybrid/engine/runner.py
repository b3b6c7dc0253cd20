"""Running engines for an attached instance: what an engine takes from the attachment it
serves, one engine in this process, and one engine process per queue in the foreground."""

from __future__ import annotations

import logging
import signal
import subprocess
from dataclasses import dataclass

from hybrid import instance as inst
from hybrid.datapath.attach import State, pin_access
from hybrid.datapath.maps import Maps
from hybrid.engine.loop import Engine
from hybrid.engine.rules import load_rules
from hybrid.errors import HybridError

log = logging.getLogger(__name__)


# -- running engines for an attached instance ---------------------------------------------------
@dataclass
class EngineSettings:
    """What an engine takes from the attachment it serves (its state file), overridable."""

    queues: tuple[int, int]
    mark_mask: int
    fail_open: bool
    pin_access: str | None
    instance: str


def settings_for_instance(queues: tuple[int, int] | None = None, fail_open: bool | None = None) -> EngineSettings:
    instance = inst.name()
    state = State.load(instance)
    if state is None or not state.interfaces:
        raise HybridError(f"hybrid is not attached in this network namespace ({instance}): "
                          "run 'hybridctl attach IFACE...' first, or 'hybridctl attach IFACE... --rules FILE'")
    opts = state.options
    q = queues or (opts.get("queue_first", 0), opts.get("queue_last", 0))
    return EngineSettings(queues=q, mark_mask=opts.get("mark_mask", 0),
                          fail_open=opts.get("fail_open", True) if fail_open is None else fail_open,
                          pin_access=pin_access(instance), instance=instance)


def serve_one(queue: int, rules_path: str, settings: EngineSettings, *, maxlen: int = 4096,
              log_stream=None) -> dict:
    """Run one engine in this process until SIGTERM/SIGINT; returns its final counters."""
    maps = Maps.open_pinned(settings.pin_access) if settings.pin_access else None
    try:
        eng = Engine(queue, rules_path, maps=maps, mark_mask=settings.mark_mask,
                     fail_open=settings.fail_open, maxlen=maxlen, log_stream=log_stream,
                     stats_path=inst.engine_stats_path(settings.instance, queue))
        eng.install_signals()
        eng.bind()
        log.info("engine bound to queue %d (%s)", queue, "fail-open" if settings.fail_open else "fail-closed")
        eng.run()
        return eng.snapshot()
    finally:
        if maps is not None:
            maps.close()


def serve(rules_path: str, settings: EngineSettings, argv_for_queue, *, on_start=None) -> int:
    """One engine process per queue of ``settings.queues`` (children run ``argv_for_queue(q)``);
    SIGHUP is passed on to every child, SIGTERM/SIGINT stop them all. Returns the worst exit
    status of the children."""
    load_rules(rules_path)   # a broken file fails here, once, before anything starts
    first, last = settings.queues
    children = [subprocess.Popen(argv_for_queue(q)) for q in range(first, last + 1)]
    stopping = False

    def forward(sig, _frame):
        nonlocal stopping
        if sig != signal.SIGHUP:
            stopping = True
        for c in children:
            if c.poll() is None:
                c.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    try:
        if on_start:
            on_start([c.pid for c in children])
        worst = 0
        for c in children:
            while True:
                try:
                    rc = c.wait()
                    break
                except InterruptedError:   # pragma: no cover - PEP 475 retries for us
                    continue
            if rc not in (0, -signal.SIGTERM, -signal.SIGINT, 130, 143):
                worst = max(worst, 1)
            if not stopping:      # one engine died on its own: stop the others, report it
                forward(signal.SIGTERM, None)
        return worst
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
