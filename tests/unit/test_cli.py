"""The command line's contract: help everywhere, one-line errors, exit 2 for bad input, 1 for a
failed operation, never a traceback."""

import os

import pytest
from click.testing import CliRunner
from hybrid.cli.main import main

pytestmark = pytest.mark.unit


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("cmd", [[], ["attach"], ["detach"], ["status"], ["lab"], ["lab", "up"], ["demo"],
                                 ["doctor"], ["bench"]])
def test_help(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0
    assert "Usage: " in res.output


def test_version():
    assert run("--version").output.startswith("hybridctl, version ")


@pytest.mark.parametrize("args, line", [
    (["attach", "eth0", "--queues", "x"], "Error: --queues 'x': use N or FIRST-LAST, e.g. 0 or 0-1"),
    (["attach", "eth0", "--queues", "3-1"], "Error: --queues '3-1': need 0 <= FIRST <= LAST <= 65535"),
    (["attach", "eth0", "--mark", "zz"], "Error: --mark 'zz': expected a number like 1048576 or 0x100000"),
    (["attach", "eth0", "--flag", "syn,bogus"],
     "Error: --flag 'bogus': use a comma-separated list of syn, first-n, port, prefix, suspicious, fragment, "
     "inspect, malformed, follow"),
    (["attach", "eth0", "--mark", "0x3", "--mark-mask", "0x1"],
     "Error: mark 0x3/0x1: the mask must be non-zero and contain every bit of the mark"),
    (["detach"], "Error: name the interfaces to detach, or give --all (not both)"),
    (["detach", "eth0", "--all"], "Error: name the interfaces to detach, or give --all (not both)"),
    (["lab", "up", "--name", "Bad_Name"],
     "Error: lab name 'Bad_Name': use 1-21 lowercase letters, digits or '-', starting with a letter"),
    (["bench", "--modes", "warp"], None),
])
def test_bad_input_is_one_line_and_exit_2(args, line, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)   # reach the validation, not the root check
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    if line:
        assert lines[0] == line
    else:
        assert lines[0].startswith("Error: mode 'warp': use any of baseline, ")


@pytest.mark.parametrize("args, action", [(["attach", "eth0"], "attach"), (["detach", "--all"], "detach"),
                                          (["lab", "up"], "lab up"), (["demo"], "demo")])
def test_not_root_says_so_in_one_line(args, action, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert res.output.strip() == f"Error: {action} needs root (CAP_NET_ADMIN and CAP_BPF): run it with sudo"
