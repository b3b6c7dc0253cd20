"""scripts/chart.py draws a PNG from bench JSON, and refuses unreadable input in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
CHART = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "chart.py")


def test_chart_from_results(tmp_path):
    results = [
        {"mode": "baseline", "workload": "bulk-1", "median": 20.0, "ratio_to_baseline": 1.0},
        {"mode": "hybrid", "workload": "bulk-1", "median": 19.0, "ratio_to_baseline": 0.95},
        {"mode": "nfq-all", "workload": "bulk-1", "median": 0.8, "ratio_to_baseline": 0.04},
        {"mode": "baseline", "workload": "payload-visibility", "median": 0.0, "ratio_to_baseline": None},
        {"mode": "hybrid", "workload": "payload-visibility", "median": 1.0, "ratio_to_baseline": None},
    ]
    src = tmp_path / "r.json"
    src.write_text(json.dumps({"results": results, "machine": {"cpus": 2, "kernel": "x"}, "repetitions": 5}))
    out = tmp_path / "c.png"
    p = subprocess.run([sys.executable, CHART, str(src), str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_draws_a_report_with_capabilities_and_a_lab(tmp_path):
    results = [
        {"mode": "baseline", "workload": "bulk-1", "median": 20.0, "ratio_to_baseline": 1.0},
        {"mode": "afpacket", "workload": "bulk-1", "median": 13.0, "ratio_to_baseline": 0.65},
    ]
    caps = {"baseline": {"blocks": "no"}, "afpacket": {"blocks": "no"}}
    src = tmp_path / "r.json"
    src.write_text(json.dumps({"results": results, "capabilities": caps, "lab": "bridge", "machine": {},
                               "repetitions": 1}))
    out = tmp_path / "c.png"
    p = subprocess.run([sys.executable, CHART, str(src), str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreadable_results_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    p = subprocess.run([sys.executable, CHART, str(bad), str(tmp_path / "c.png")], capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
