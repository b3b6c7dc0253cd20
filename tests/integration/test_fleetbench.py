"""The fleet bench runs (a small propagation run, the part every other part builds on), reports
what docs/crowdsec.md quotes, and leaves nothing behind; a full run is scripts/crowdsec-bench.sh."""

from __future__ import annotations

import json

import pytest

from hybrid.lab import fleetbench

pytestmark = pytest.mark.integration


def test_propagation_smoke(tmp_path, capsys):
    out = tmp_path / "fleet.json"
    assert fleetbench.main(["--parts", "propagation", "--samples", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    p = doc["propagation"]
    assert p["poll_interval"] == 1.0 and p["seconds"]["n"] == 2 and p["cscli_seconds"]["n"] == 2
    assert 0 < p["seconds"]["min"] <= p["seconds"]["p50"] <= p["seconds"]["max"]
    assert json.loads(capsys.readouterr().out) == doc


def test_bad_parts_are_one_line(capsys):
    assert fleetbench.main(["--parts", "nope"]) == 2
    assert capsys.readouterr().err.strip() == "fleetbench: unknown part 'nope': use propagation, share, load"
