"""The one way to start hybridctl and engine processes (hybrid.engine.runner): the command built
for each option, and the fallback when the console script is not installed."""

import os
import subprocess
import sys

import pytest

from hybrid.engine import runner
from hybrid.kernel import sysutil

pytestmark = pytest.mark.unit


def test_hybridctl_is_the_console_script_next_to_python(tmp_path, monkeypatch):
    (tmp_path / "hybridctl").write_text("")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert runner.hybridctl_argv() == [str(tmp_path / "hybridctl")]


def test_hybridctl_without_the_console_script_runs_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert runner.hybridctl_argv() == [str(tmp_path / "python"), "-m", "hybrid.cli.main"]


def test_engine_argv_leaves_defaults_to_the_command():
    assert runner.engine_argv("r.toml") == [*runner.hybridctl_argv(), "engine", "--rules", "r.toml"]


def test_engine_argv_with_every_option():
    argv = runner.engine_argv("r.toml", queue=3, queue_len=16, fail_open=False, log_path="v.jsonl",
                              cpu=1, netns="gw")
    assert argv == [*sysutil.netns_prefix("gw"), "taskset", "-c", "1", *runner.hybridctl_argv(), "engine",
                    "--rules", "r.toml", "--queue", "3", "--queue-len", "16", "--fail-closed", "--log", "v.jsonl"]
    assert runner.engine_argv("r.toml", fail_open=True)[-1] == "--fail-open"


def test_start_engine_runs_the_command(tmp_path, monkeypatch):
    """The engine process runs exactly engine_argv (here a stand-in that prints its arguments)."""
    fake = tmp_path / "hybridctl"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    os.chmod(fake, 0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    proc = runner.start_engine("r.toml", queue=0, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=10)
    assert out == "engine --rules r.toml --queue 0\n"
