"""Fixtures for BPF_PROG_TEST_RUN tests: one compiled datapath for the whole session (private
maps, nothing attached, nothing pinned), built with the name cache (the superset: with
HYBRID_CFG_NAMES off its main program does what the default build does), and every map reset
before every test. Helpers live in bpfkit.py.

One compile, not one per module: a bcc compile and load takes 6-10 s on the CI machine, and the
modules share nothing through it but map contents, which ``maps`` resets (bpfkit.reset empties
every map but the names scratch, and refuses to run if the datapath has a map it does not know). A
test that needs other compile flags compiles its own (test_pinned's small tables, test_abi's
pinned pair).

Every compile here is bcc's own: these tests prove the loader and what bcc builds, so the
session's compile cache (tests/conftest.py) is set aside for them; test_objcache compares the
cache's builds with bcc's."""

from __future__ import annotations

import os

import pytest
from bpfkit import Runner, reset

from hybrid.datapath import objcache


@pytest.fixture(autouse=True)
def bcc_compiles(monkeypatch):
    """No compile cache for what a test compiles itself (it may set one of its own)."""
    monkeypatch.delenv(objcache.ENV, raising=False)


@pytest.fixture(scope="session")
def datapath():
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF_PROG_TEST_RUN (run sudo ./scripts/test.sh)")
    from hybrid.datapath import loader
    cache = os.environ.pop(objcache.ENV, None)      # set up before bcc_compiles runs
    try:
        dp = loader.compile_datapath(None, names=True)
    finally:
        if cache is not None:
            os.environ[objcache.ENV] = cache
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture(scope="session")
def module_maps(datapath):
    with datapath.maps() as maps:
        yield maps


@pytest.fixture
def maps(module_maps):
    reset(module_maps)
    return module_maps


@pytest.fixture
def run(datapath, maps) -> Runner:
    return Runner(datapath, maps)
