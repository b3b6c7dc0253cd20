"""Test harness: markers, root detection, per-module labs, and the session-end leak check.

Markers (registered in pyproject.toml):
  unit         pure logic; no privileges
  bpf          BPF programs alone through BPF_PROG_TEST_RUN; root, no namespaces
  integration  real kernel, real namespaces, real iptables/NFQUEUE/XDP/tc; root
Root-only tests skip with a reason when not root; CI runs as root, so there they run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import leakcheck
import pytest
from leakcheck import new_lab_name

from hybrid.datapath import objcache
from hybrid.lab.topology import Lab

IS_ROOT = os.geteuid() == 0
LEAK_GRACE_S = 3.0

# The machines here set PYTHONDONTWRITEBYTECODE=1, so in a fresh clone nothing is ever cached:
# every hybridctl, engine and helper process the tests start (hundreds) compiled hybrid's modules
# from source again (~0.16 s of CPU each, a quarter of a hybridctl run), and collection compiled
# every test module (12 s instead of 5). Bytecode goes to __pycache__ (git-ignored), as on an
# operator's machine; it changes no behaviour.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# A bcc compile of the datapath takes 5-10 s of CPU, and the integration tests attach it about a
# hundred times (hybridctl attach, run, bench, demo) with a handful of different flag sets. The
# session keeps a compile cache (hybrid.datapath.objcache) that every process it starts
# inherits: each flag set is compiled by bcc once, and every later attach loads that same build
# (the same instructions on the same maps, verified by the kernel at every load; test_objcache
# proves it equal to bcc's). tests/bpf compiles with bcc alone (its conftest), and so do the
# sandboxed runs, which cannot see /tmp. A cache the caller set already is used as it is.
_BPF_CACHE = None
if IS_ROOT and not os.environ.get(objcache.ENV):
    _BPF_CACHE = os.environ[objcache.ENV] = tempfile.mkdtemp(prefix="hybrid-bpf-cache-")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs root: run sudo ./scripts/test.sh")
    for item in items:
        if not IS_ROOT and ("integration" in item.keywords or "bpf" in item.keywords):
            item.add_marker(skip)
    if os.environ.get(SHARD_ENV):
        _keep_shard(config, items, os.environ[SHARD_ENV])


# -- shards: scripts/test.sh runs the whole suite as concurrent sessions ---------------------------
# Most integration tests wait (on servers, timeouts, the kernel) more than they compute: one session
# kept a 2-core machine at a load of 0.7. Each session keeps the modules of its shard, whole (a
# module's lab fixture stays in one session), assigned longest first to the shard with the least
# time so far, by tests/shard_weights.json (seconds per module as measured; a module not listed
# counts 0.05 s per unit test, 3 s per other test). Every session computes the same assignment from the same
# collection. Sessions do not disturb each other: every namespace, lab, pin and run file is named
# after the session (leakcheck.session_tag), and so is the leak check.
SHARD_ENV = "HYBRID_TEST_SHARD"       # "I/N": keep shard I of N (1-based)
SHARD_WEIGHTS = os.path.join(os.path.dirname(__file__), "shard_weights.json")


def _keep_shard(config, items, spec: str) -> None:
    try:
        index, count = (int(x) for x in spec.split("/"))
        if not 1 <= index <= count:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"{SHARD_ENV}={spec!r}: write I/N with 1 <= I <= N") from None
    import json
    with open(SHARD_WEIGHTS) as f:
        weights = json.load(f)
    modules: dict[str, int] = {}
    for item in items:
        mod = item.nodeid.split("::", 1)[0]
        modules[mod] = modules.get(mod, 0) + 1
    def weight(mod: str) -> float:
        return weights.get(mod, modules[mod] * (0.05 if mod.startswith("tests/unit/") else 3.0))

    load = [0.0] * count
    shard_of = {}
    for mod in sorted(modules, key=lambda m: (-weight(m), m)):
        i = min(range(count), key=lambda k: (load[k], k))
        shard_of[mod] = i
        load[i] += weight(mod)
    keep = [it for it in items if shard_of[it.nodeid.split("::", 1)[0]] == index - 1]
    dropped = [it for it in items if shard_of[it.nodeid.split("::", 1)[0]] != index - 1]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_unconfigure(config):
    if _BPF_CACHE is not None:
        shutil.rmtree(_BPF_CACHE, ignore_errors=True)


def pytest_sessionstart(session):
    session.config._hybrid_before = leakcheck.snapshot() if IS_ROOT else None


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_hybrid_before", None)
    if before is None:
        return
    # A process told to stop may still be on its way out: look again for a moment before
    # calling anything a leak.
    deadline = time.monotonic() + LEAK_GRACE_S
    while (leaks := leakcheck.leaked(before, leakcheck.snapshot(), leakcheck.ours)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if leaks:
        lines = [f"  {kind}: {', '.join(items)}" for kind, items in leaks.items()]
        sys.stderr.write("\nLEAK CHECK FAILED: the tests left these behind:\n" + "\n".join(lines) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="module")
def lab():
    """A client -- gateway -- server lab for the whole module, removed afterwards (also when a
    test fails or the module errors)."""
    if not IS_ROOT:
        pytest.skip("needs root: run sudo ./scripts/test.sh")
    with Lab(new_lab_name()) as lab:
        yield lab


@pytest.fixture(scope="module")
def bridge_lab():
    """A client -- bridge -- server lab (the gateway bridges its two ports, one subnet) for the
    whole module, removed afterwards."""
    if not IS_ROOT:
        pytest.skip("needs root: run sudo ./scripts/test.sh")
    with Lab(new_lab_name(), kind="bridge") as lab:
        yield lab


@pytest.fixture
def fresh_lab():
    """A lab of its own for one test."""
    if not IS_ROOT:
        pytest.skip("needs root: run sudo ./scripts/test.sh")
    with Lab(new_lab_name()) as lab:
        yield lab
