"""Test harness: markers, root detection, per-module labs, and the session-end leak check.

Markers (registered in pyproject.toml):
  unit         pure logic; no privileges
  bpf          BPF programs alone through BPF_PROG_TEST_RUN; root, no namespaces
  integration  real kernel, real namespaces, real iptables/NFQUEUE/XDP/tc; root
Root-only tests skip with a reason when not root; CI runs as root, so there they run.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import leakcheck  # noqa: E402
from leakcheck import new_lab_name  # noqa: E402

from hybrid.lab.topology import Lab  # noqa: E402

IS_ROOT = os.geteuid() == 0
TAG = leakcheck.session_tag()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs root: run sudo ./scripts/test.sh")
    for item in items:
        if not IS_ROOT and ("integration" in item.keywords or "bpf" in item.keywords):
            item.add_marker(skip)


def pytest_sessionstart(session):
    session.config._hybrid_before = leakcheck.snapshot() if IS_ROOT else None


def _ours(kind: str, item: str) -> bool:
    if kind in ("network namespaces", "lab records", "hybrid instances (state files)"):
        return item.startswith(TAG) or item.startswith("hybrid-doctor-")
    if kind == "pinned BPF objects":
        return item.startswith(TAG)
    return True


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_hybrid_before", None)
    if before is None:
        return
    leaks = leakcheck.leaked(before, leakcheck.snapshot(), _ours)
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


@pytest.fixture
def fresh_lab():
    """A lab of its own for one test."""
    if not IS_ROOT:
        pytest.skip("needs root: run sudo ./scripts/test.sh")
    with Lab(new_lab_name()) as lab:
        yield lab
