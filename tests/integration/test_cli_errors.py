"""Every hybridctl subcommand given wrong input, run as an operator would (the installed entry
point, in a lab's gateway namespace so that nothing could touch the machine): a usage error exits
2, a failed operation 1, and either way stderr is exactly one line that says what to fix, with no
traceback anywhere. As a non-root user, a missing privilege is one line too.

Every case is a fresh hybridctl process (most of its time is Python starting and importing), and
none of them changes anything (each fails before acting): they all start at once, a few at a
time, when the module begins, and each test checks its own case's result."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from gwlab import HYBRIDCTL

pytestmark = pytest.mark.integration
RULES_OK = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "rules", "realistic.toml")

# (arguments, exit status, text the one line must contain). {bad} is a broken TOML file,
# {missing} a file that does not exist.
CASES = [
    # the group itself
    (["--bogus"], 2, "No such option '--bogus'"),
    (["statu"], 2, "No such command 'statu'. Did you mean 'status'?"),
    # attach: unknown option, bad ints, bad choices, bad CIDRs, bad ranges, files, interfaces
    (["attach"], 2, "Missing argument 'IFACE...'"),
    (["attach", "to-client", "--jsn"], 2, "No such option '--jsn'. Did you mean '--json'?"),
    (["attach", "to-client", "--first-n", "-1"], 2, "Invalid value for '--first-n'"),
    (["attach", "to-client", "--first-n", "many"], 2, "Invalid value for '--first-n'"),
    (["attach", "to-client", "--watch-port", "0"], 2, "Invalid value for '--watch-port'"),
    (["attach", "to-client", "--watch-port", "70000"], 2, "Invalid value for '--watch-port'"),
    (["attach", "to-client", "--xdp-mode", "weird"], 2, "Invalid value for '--xdp-mode'"),
    (["attach", "to-client", "--hook", "output"], 2, "Invalid value for '--hook'"),
    (["attach", "to-client", "--over-budget", "maybe"], 2, "Invalid value for '--over-budget'"),
    (["attach", "to-client", "--global-rate", "-5"], 2, "Invalid value for '--global-rate'"),
    (["attach", "to-client", "--flow-table-size", "10"], 2, "Invalid value for '--flow-table-size'"),
    (["attach", "to-client", "--queues", "5-2"], 2, "--queues '5-2': need 0 <= FIRST <= LAST <= 65535"),
    (["attach", "to-client", "--queues", "x"], 2, "--queues 'x': use N or FIRST-LAST"),
    (["attach", "to-client", "--mark", "zz"], 2, "--mark 'zz': expected a number"),
    (["attach", "to-client", "--mark", "0x3", "--mark-mask", "0x1"], 2, "the mask must be non-zero and contain"),
    (["attach", "to-client", "--flag", "syn,bogus"], 2, "--flag 'bogus': use a comma-separated list"),
    (["attach", "to-client", "--watch-prefix", "300.1.1.1/8"], 2, "'300.1.1.1/8' is not an IPv4 or IPv6 CIDR"),
    (["attach", "to-client", "--block-prefix", "nonsense"], 2, "'nonsense' is not an IPv4 or IPv6 CIDR"),
    (["attach", "to-client", "to-client"], 2, "an interface is named twice"),
    (["attach", "to-client", "--rules", "{missing}"], 2, "cannot read the rules file: No such file"),
    (["attach", "to-client", "--rules", "{bad}"], 2, "TOML syntax"),
    # an interface that does not exist is a failed operation (it may exist later), not bad usage
    (["attach", "nosuchif0"], 1, "interface 'nosuchif0' does not exist in this network namespace"),
    # detach / status
    (["detach"], 2, "name the interfaces to detach, or give --all (not both)"),
    (["detach", "to-client", "--all"], 2, "name the interfaces to detach, or give --all (not both)"),
    (["status", "--bogus"], 2, "No such option '--bogus'"),
    # engine
    (["engine"], 2, "Missing option '--rules'"),
    (["engine", "--rules", "{missing}"], 2, "cannot read the rules file: No such file"),
    (["engine", "--rules", "{bad}"], 2, "TOML syntax"),
    (["engine", "--rules", RULES_OK, "--queues", "a"], 2, "--queues 'a': use N or FIRST-LAST"),
    (["engine", "--rules", RULES_OK, "--queue-len", "0"], 2, "Invalid value for '--queue-len'"),
    (["engine", "--rules", RULES_OK], 1, "hybrid is not attached in this network namespace"),
    # rules
    (["rules", "check"], 2, "Missing argument 'FILE'"),
    (["rules", "check", "{missing}"], 2, "cannot read the rules file: No such file"),
    (["rules", "check", "{bad}"], 2, "TOML syntax"),
    (["rules", "frob"], 2, "No such command 'frob'"),
    # lab
    (["lab", "up", "--name", "BAD_NAME"], 2, "lab name 'BAD_NAME': use 1-21 lowercase letters"),
    (["lab", "exec", "nobody", "--", "true"], 2, "Invalid value for '{client|gw|server}'"),
    (["lab", "exec", "client"], 2, "Missing argument 'COMMAND...'"),
    # bench (fails before any lab is built)
    (["bench", "--modes", "nope"], 2, "mode 'nope': use any of"),
    (["bench", "--workloads", "nope"], 2, "workload 'nope': use any of"),
    (["bench", "-r", "0"], 2, "Invalid value for '-r' / '--repetitions'"),
    (["bench", "--seconds", "abc"], 2, "Invalid value for '--seconds'"),
    # demo, doctor
    (["demo", "--bogus"], 2, "No such option '--bogus'"),
    (["doctor", "--bogus"], 2, "No such option '--bogus'"),
    # config, run, flows, block, bypass, unblock, top, install-service
    (["config", "frob"], 2, "No such command 'frob'"),
    (["run", "--config", "{missing}"], 2, "cannot read the configuration: No such file"),
    (["run", "--config", "{bad}"], 2, "TOML syntax"),
    (["flows", "--sort", "name"], 2, "Invalid value for '--sort'"),
    (["flows", "--limit", "x"], 2, "Invalid value for '--limit'"),
    (["block", "300.1.1.1/8"], 2, "'300.1.1.1/8' is neither a prefix nor a flow"),
    (["block", "tcp 198.18.1.2:1 198.18.2.2:99999"], 2, "the port must be a number 0-65535"),
    (["bypass"], 2, "Missing argument 'FLOW'"),
    (["unblock", "nonsense"], 2, "'nonsense' is neither a prefix nor a flow"),
    (["block", "198.18.0.0/15"], 1, "hybrid is not attached in this network namespace"),
    (["top", "--bogus"], 2, "No such option '--bogus'"),
    (["install-service", "--bogus"], 2, "No such option '--bogus'"),
]

# As an unprivileged user (runuser -u nobody): one line saying to use root.
AS_NOBODY = [
    (["status"], 1, "run it with sudo"),
    (["attach", "to-client"], 1, "attach needs root"),
    (["detach", "--all"], 1, "detach needs root"),
    (["engine", "--rules", RULES_OK], 1, "run it with sudo"),
    (["lab", "up", "--name", "nobodylab"], 1, "lab up needs root"),
    (["lab", "down", "--name", "nobodylab"], 1, "lab down needs root"),
    (["bench", "--quick"], 1, "bench needs root"),
    (["demo"], 1, "demo needs root"),
    # a rules file it may not read is bad input, whoever asks
    (["rules", "check", "{unreadable}"], 2, "cannot read the rules file: Permission denied"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-errors")
    bad = d / "bad.toml"
    bad.write_text("default = [\n")
    unreadable = d / "private.toml"
    unreadable.write_text('default = "accept"\n')
    os.chmod(unreadable, 0o600)
    return {"bad": str(bad), "missing": str(d / "missing.toml"), "unreadable": str(unreadable)}


def run_in_gw(lab, argv: list[str], user: str | None = None) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", user, "--"] if user else []
    return subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *prefix, *HYBRIDCTL, *argv],
                          capture_output=True, text=True, timeout=60, cwd="/")


def _check(proc, argv, rc: int, text: str) -> None:
    lines = proc.stderr.strip().splitlines()
    where = f"hybridctl {' '.join(argv)} -> {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, where
    assert proc.returncode == rc, where
    assert len(lines) == 1, where
    assert text in lines[0], where


@pytest.fixture(scope="module")
def ran(lab, files):
    """(user, argv) -> the Future of its run, for every case of the module, all started at once
    (a pool as wide as the machine has CPUs, and one more)."""
    cases = [(None, args) for args, _, _ in CASES] + [("nobody", args) for args, _, _ in AS_NOBODY]
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) + 1) as pool:
        futures: dict[tuple, Future] = {}
        for user, args in cases:
            argv = [a.format(**files) for a in args]
            futures[(user, tuple(argv))] = pool.submit(run_in_gw, lab, argv, user)
        yield futures


@pytest.mark.parametrize("args,rc,text", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line(ran, files, args, rc, text):
    argv = [a.format(**files) for a in args]
    _check(ran[(None, tuple(argv))].result(), argv, rc, text)


@pytest.mark.parametrize("args,rc,text", AS_NOBODY, ids=[" ".join(c[0]) for c in AS_NOBODY])
def test_missing_privilege_is_one_line(ran, files, args, rc, text):
    argv = [a.format(**files) for a in args]
    _check(ran[("nobody", tuple(argv))].result(), argv, rc, text)


def test_nothing_was_left_behind(lab, ran):
    """None of the above changed anything in the gateway namespace."""
    for save in ("iptables-save", "ip6tables-save"):
        assert "HYBRID" not in lab.run("gw", [save]).stdout
    assert not os.path.exists(f"/run/hybrid/instances/{lab.netns('gw')}")
    assert "xdp" not in lab.run("gw", ["ip", "link", "show", "to-client"]).stdout
