"""Fixtures for BPF_PROG_TEST_RUN tests: one compiled datapath per module (private maps, nothing
attached, nothing pinned), built with the name cache (the superset: with HYBRID_CFG_NAMES off
its main program does what the default build does), and maps reset before every test. Helpers
live in bpfkit.py."""

from __future__ import annotations

import os

import pytest
from bpfkit import Runner, reset


@pytest.fixture(scope="module")
def datapath():
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF_PROG_TEST_RUN (run sudo ./scripts/test.sh)")
    from hybrid.datapath import loader
    dp = loader.compile_datapath(None, names=True)
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture(scope="module")
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
