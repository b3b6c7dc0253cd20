"""The shipped rules tests (examples/rules-tests/: captures of real lab traffic, the example rules
files, what the live gateway did) hold under ``hybridctl rules test``, and a test that does not
hold fails with a line per difference. No lab: a replay needs root and bcc only."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from gwlab import HYBRIDCTL

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "rules-tests"
DIRS = sorted(p for p in EXAMPLES.iterdir() if (p / "expect.toml").is_file())


def rules_test(*dirs) -> subprocess.CompletedProcess:
    return subprocess.run([*HYBRIDCTL, "rules", "test", *map(str, dirs)], capture_output=True, text=True,
                          timeout=600)


def test_the_shipped_rules_tests_hold():
    assert len(DIRS) >= 3
    proc = rules_test(*DIRS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == f"{len(DIRS)} of {len(DIRS)} passed", proc.stdout
    assert "Traceback" not in proc.stderr


def test_a_wrong_expectation_is_a_diff_and_exit_1(tmp_path):
    case = tmp_path / "web"
    shutil.copytree(EXAMPLES / "web-host-and-sni", case)
    text = (case / "expect.toml").read_text()
    text = text.replace('rules_file = "../../rules/realistic.toml"',
                        f'rules_file = "{EXAMPLES.parent / "rules" / "realistic.toml"}"')
    text = text.replace("flows = 4", "flows = 5").replace('fired = ["block-http-host", "block-tls-sni"]',
                                                          'fired = ["block-http-host", "block-dns-name"]')
    text = text.replace('nth = 2\nverdict = "dropped"\nrule = "block-http-host"',
                        'nth = 2\nverdict = "passed"\nrule = "block-http-host"')
    (case / "expect.toml").write_text(text)
    proc = rules_test(case)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"FAIL {case}: ") and lines[0].endswith("3 differences"), lines
    assert sorted(ln.strip() for ln in lines[1:]) == sorted([
        "totals flows: expected 5, got 4",
        "rule block-dns-name: expected to fire, it did not",
        f"flow #3 (tcp to 198.18.2.2:80 #2) {_flow_a(proc, case)} -> 198.18.2.2:80: verdict expected 'passed', got 'dropped'",
    ]), lines


def _flow_a(proc, case) -> str:
    """The client endpoint of the blocked HTTP flow, as the diff names it."""
    for ln in proc.stdout.splitlines():
        if "verdict expected" in ln:
            return ln.split(") ", 1)[1].split(" -> ")[0]
    return "?"


@pytest.mark.parametrize("content,message", [
    ("capture = 'capture.pcapng'\n[totals]\nflws = 1\n", "unknown key flws"),
    ("capture = 'missing.pcap'\n", "does not exist"),
    ("[[flow]]\nverdict = 'maybe'\n", "verdict 'maybe'"),
])
def test_a_bad_expectations_file_is_one_line_and_exit_2(tmp_path, content, message):
    shutil.copy(EXAMPLES / "web-host-and-sni" / "capture.pcapng", tmp_path / "capture.pcapng")
    shutil.copy(EXAMPLES.parent / "rules" / "realistic.toml", tmp_path / "rules.toml")
    (tmp_path / "expect.toml").write_text(content)
    proc = rules_test(tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_write_passed_dropped_and_the_verdict_log(tmp_path):
    """The rewrite capture: what passes carries the rewritten datagram ("hhhhhhhhhhh\\n", as the
    live server received it), what is dropped holds the datagram to 10086 and the 64-byte ping,
    and the verdict log is the engine's JSON lines with the capture's times."""
    import json

    import dpkt
    case = EXAMPLES / "rewrite-and-ping"
    passed, dropped, log = tmp_path / "p.pcap", tmp_path / "d.pcap", tmp_path / "v.jsonl"
    proc = subprocess.run([*HYBRIDCTL, "replay", str(case / "capture.pcapng"), "--rules",
                           str(EXAMPLES.parent / "rules" / "rewrite.toml"), "--client-net", "198.18.1.0/24",
                           "--write-passed", str(passed), "--write-dropped", str(dropped), "--log", str(log)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr      # piped: no progress line

    def frames(path):
        with open(path, "rb") as f:
            return [(float(ts), dpkt.ethernet.Ethernet(buf)) for ts, buf in dpkt.pcap.Reader(f)]

    udp_out = [e.data.data.data for _, e in frames(passed)
               if isinstance(e.data, dpkt.ip.IP) and isinstance(e.data.data, dpkt.udp.UDP)]
    assert udp_out == [b"hhhhhhhhhhh\n"], udp_out
    gone = [e.data.data for _, e in frames(dropped)]
    assert [type(x).__name__ for x in gone] == ["UDP", "ICMP"], gone
    assert gone[0].dport == 10086 and len(gone[1].data.data) == 64
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert {(x["rule"], x["action"]) for x in lines} >= {("udp-10010-fill", "rewrite"), ("udp-10086-drop", "drop")}
    first_ts = frames(passed)[0][0]
    assert all(abs(x["time"] - first_ts) < 5 for x in lines), (lines, first_ts)   # capture time, not now


def test_progress_on_a_terminal(tmp_path):
    """On a terminal, a progress line on standard error (packets, flows, rate; rewritten in
    place, cleared at the end): the first at the 1,024th packet."""
    import os
    import pty

    from hybrid.replay import benchcaps
    capture = str(tmp_path / "short.pcap")
    benchcaps.short(capture, 200)                            # 1,600 packets
    pid, fd = pty.fork()
    if pid == 0:                                             # the child: hybridctl on the pty
        os.execvp(HYBRIDCTL[0], [*HYBRIDCTL, "replay", capture, "--rules",
                                 str(EXAMPLES.parent / "rules" / "realistic.toml")])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"\r1,024 packets, 128 flows, " in out and b"Traceback" not in out, out[-2000:]
    assert b"replayed 1,600" in out
