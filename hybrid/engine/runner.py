"""Running engines for an attached instance: what an engine takes from the attachment it
serves, one engine in this process, one engine process per queue in the foreground, and the one
way to start an engine process (:func:`start_engine`) or any other hybridctl command
(:func:`hybridctl_argv`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from hybrid import instance as inst
from hybrid.datapath.attach import State, pin_access
from hybrid.datapath.maps import Maps
from hybrid.engine.loop import Engine
from hybrid.engine.rules import load_rules
from hybrid.errors import HybridError
from hybrid.kernel import caps, sysutil

log = logging.getLogger(__name__)

QUEUE_LEN = 4096      # packets the kernel holds for an engine before the queue overflows (default)


# -- starting engine processes ------------------------------------------------------------------
def hybridctl_argv() -> list[str]:
    """The command that runs this installation's hybridctl in a new process, also inside another
    network namespace whose PATH may not have it: the console script installed next to the
    running Python, else that Python running the package (a checkout used without installing)."""
    exe = os.path.join(os.path.dirname(sys.executable), "hybridctl")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "hybrid.cli.main"]


def engine_argv(rules: str, *, queue: int | None = None, queue_len: int | None = None,
                fail_open: bool | None = None, log_path: str | None = None, netns: str | None = None,
                cpu: int | None = None) -> list[str]:
    """``hybridctl engine --rules RULES``: one engine process per queue of the attachment, or with
    ``queue`` one engine serving that queue in the process itself (what :func:`serve` starts).
    Options left None take the command's defaults (the attachment's fail-open policy, a queue of
    QUEUE_LEN packets, no verdict log). ``cpu``: pinned to that CPU (taskset); ``netns``: run in that
    network namespace (ip netns exec), where the attachment is."""
    argv = [*hybridctl_argv(), "engine", "--rules", rules]
    if queue is not None:
        argv += ["--queue", str(queue)]
    if queue_len is not None:
        argv += ["--queue-len", str(queue_len)]
    if fail_open is not None:
        argv.append("--fail-open" if fail_open else "--fail-closed")
    if log_path:
        argv += ["--log", log_path]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    return sysutil.netns_prefix(netns) + argv


def start_engine(rules: str, *, queue: int | None = None, queue_len: int | None = None,
                 fail_open: bool | None = None, log_path: str | None = None, netns: str | None = None,
                 cpu: int | None = None, **popen) -> subprocess.Popen:
    """Start ``hybridctl engine`` (see :func:`engine_argv`) as a child process; ``popen`` goes to
    :class:`subprocess.Popen` (stdout, stderr, start_new_session, ...). The caller stops it."""
    return subprocess.Popen(engine_argv(rules, queue=queue, queue_len=queue_len, fail_open=fail_open,
                                        log_path=log_path, netns=netns, cpu=cpu), **popen)


# -- running engines for an attached instance ---------------------------------------------------
@dataclass
class EngineSettings:
    """What an engine takes from the attachment it serves (its state file), overridable."""

    queues: tuple[int, int]
    mark_mask: int
    fail_open: bool
    pin_access: str | None
    instance: str


def settings_for_instance(queues: tuple[int, int] | None = None, fail_open: bool | None = None,
                          instance: str | None = None) -> EngineSettings:
    instance = instance or inst.name()
    state = State.load(instance)
    if state is None or not state.interfaces:
        raise HybridError(f"hybrid is not attached in this network namespace ({instance}): "
                          "run 'hybridctl attach IFACE...' first, or 'hybridctl attach IFACE... --rules FILE'")
    opts = state.options
    q = queues or (opts.get("queue_first", 0), opts.get("queue_last", 0))
    return EngineSettings(queues=q, mark_mask=opts.get("mark_mask", 0),
                          fail_open=opts.get("fail_open", True) if fail_open is None else fail_open,
                          pin_access=pin_access(instance), instance=instance)


def serve_one(queue: int, rules_path: str, settings: EngineSettings, *, maxlen: int = QUEUE_LEN,
              log_stream=None) -> dict:
    """Run one engine in this process until SIGTERM/SIGINT; returns its final counters.

    Run as root, the process gives up for good every capability the engine does not use
    (``caps.ENGINE``) once the maps are open (through /proc/2/root they may need them all) and
    before it reads the rules: call it in a process of its own (``hybridctl engine --queue Q``)."""
    maps = Maps.open_pinned(settings.pin_access) if settings.pin_access else None
    try:
        if os.geteuid() == 0:
            kept = caps.limit_to(caps.ENGINE)
            log.info("engine for queue %d keeps %s (bounding set %s, no new privileges)", queue,
                     " ".join(caps.names(kept.effective)) or "no capabilities",
                     " ".join(caps.names(kept.bounding)) or "empty")
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


def serve(rules_path: str, settings: EngineSettings, *, queue_len: int = QUEUE_LEN, log_path: str | None = None,
          on_start=None) -> int:
    """One engine process per queue of ``settings.queues`` (``hybridctl engine --queue Q``, see
    :func:`start_engine`); SIGHUP is passed on to every child, SIGTERM/SIGINT stop them all.
    Returns the worst exit status of the children."""
    load_rules(rules_path)   # a broken file fails here, once, before anything starts
    first, last = settings.queues
    children = [start_engine(rules_path, queue=q, queue_len=queue_len, fail_open=settings.fail_open,
                             log_path=log_path) for q in range(first, last + 1)]
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
            rc = c.wait()
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
