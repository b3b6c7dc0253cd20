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
