"""The on-disk layout of hybrid's instances under /run/hybrid: the one place that knows a path.

One instance per network namespace, named after it (:func:`name`). Everything below is root's
(directories 0700, files 0600):

    /run/hybrid/
      instances/<instance>/state.json      what attach did, written ahead of each step (datapath.attach)
      instances/<instance>/engine-<q>.json the counters each engine publishes (engine.loop)
      instances/<instance>/nfq-<q>.json    the queue's counters when its engine bound (kernel.nfq)
      run-<instance>.lock                  one `hybridctl run` per instance (an flock)
      run-<instance>.spares.json           the spare engines that run keeps waiting
      labs/<lab>.json                      the lab testbeds that are up (hybrid.lab)
      bpffs/                               hybrid's own bpffs and the pinned maps (kernel.bpffs)

Writers replace files whole (:func:`write_json`): a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from hybrid.kernel import sysutil

RUN_ROOT = "/run/hybrid"
INSTANCES = os.path.join(RUN_ROOT, "instances")
LABS = os.path.join(RUN_ROOT, "labs")


def name() -> str:
    """The instance of the calling process: one per network namespace, named after it."""
    return sysutil.netns_id()


def directory(instance: str | None = None) -> str:
    return os.path.join(INSTANCES, instance or name())


def state_path(instance: str) -> str:
    return os.path.join(INSTANCES, instance, "state.json")


def engine_stats_path(instance: str, queue: int) -> str:
    return os.path.join(INSTANCES, instance, f"engine-{queue}.json")


def queue_baseline_path(instance: str, queue: int) -> str:
    return os.path.join(INSTANCES, instance, f"nfq-{queue}.json")


def lock_path(instance: str | None = None) -> str:
    return os.path.join(RUN_ROOT, f"run-{instance or name()}.lock")


def spares_path(instance: str | None = None) -> str:
    return os.path.join(RUN_ROOT, f"run-{instance or name()}.spares.json")


def crowdsec_path(instance: str | None = None) -> str:
    """What the CrowdSec link of `hybridctl run` last published (hybrid/fleet/link.py)."""
    return os.path.join(RUN_ROOT, f"run-{instance or name()}.crowdsec.json")


def lab_record_path(lab: str) -> str:
    return os.path.join(LABS, f"{lab}.json")


def make_dirs(instance: str | None = None) -> str:
    """Create the instance's directory (and the root-only directories above it); returns it."""
    for d in (RUN_ROOT, INSTANCES):
        os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(INSTANCES, 0o700)          # instance names are namespace names: root's business
    path = directory(instance)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def write_json(path: str, doc, *, indent: int | None = None) -> None:
    """Write ``doc`` to ``path`` (mode 0600) through a temporary file and a rename, so that a
    reader sees the old file or the new one, never a part. OSError is the caller's to handle."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=indent)
    os.replace(tmp, path)


def read_json(path: str):
    """The JSON document at ``path``, or None when it is missing or unreadable as JSON.
    PermissionError propagates (the caller says what privilege is missing)."""
    try:
        with open(path) as f:
            return json.load(f)
    except PermissionError:
        raise
    except (OSError, ValueError):
        return None


def engine_stats(instance: str) -> list[dict]:
    """The counters every engine of ``instance`` published (one file per queue), by queue."""
    out = []
    try:
        names = sorted(os.listdir(directory(instance)))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for fname in names:
        if fname.startswith("engine-") and fname.endswith(".json"):
            with contextlib.suppress(OSError):
                doc = read_json(os.path.join(directory(instance), fname))
                if isinstance(doc, dict):
                    out.append(doc)
    return out


def spares(instance: str | None = None) -> dict[str, int]:
    """queue -> pid of each spare engine waiting, as `hybridctl run` published them; {} when no
    run is up (or it died without removing the file: its spares went with it)."""
    try:
        doc = read_json(spares_path(instance))
    except OSError:
        return {}
    if not isinstance(doc, dict) or not sysutil.pid_alive(doc.get("supervisor")):
        return {}
    return {str(q): int(pid) for q, pid in (doc.get("spares") or {}).items() if sysutil.pid_alive(pid)}


def crowdsec_status(instance: str | None = None) -> dict | None:
    """The CrowdSec link's last report, or None (no link ran here, or its file is unreadable)."""
    try:
        doc = read_json(crowdsec_path(instance))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def instances() -> list[str]:
    """Instances that have a state file."""
    try:
        return sorted(d for d in os.listdir(INSTANCES) if os.path.exists(state_path(d)))
    except (FileNotFoundError, PermissionError):
        return []


def remove(instance: str) -> None:
    """Forget an instance's files (state, engine counters, queue baselines)."""
    shutil.rmtree(directory(instance), ignore_errors=True)
