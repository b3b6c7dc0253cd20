"""The bench's report: a mode's ratio is the median of its paired ratios (each sample over the
baseline sample measured right before it), with their spread; old reports without pairs keep the
ratio of the medians."""

import pytest

from hybrid.lab.bench import MODES, Report, Result, capabilities, table

pytestmark = pytest.mark.unit


def report(paired: bool) -> Report:
    base = Result("baseline", "bulk-1", "Gbit/s", samples=[20.0, 30.0, 25.0])
    hyb = Result("hybrid", "bulk-1", "Gbit/s", samples=[19.0, 27.0, 20.0])
    if paired:
        hyb.paired = [19.0 / 20.0, 27.0 / 30.0, 20.0 / 25.0]
    return Report("bench", {}, 3, 5.0, [base, hyb])


def test_the_ratio_is_the_median_of_paired_ratios_with_its_spread():
    r = report(paired=True)
    assert r.ratio("hybrid", "bulk-1") == pytest.approx(0.9)        # pairs 0.95, 0.90, 0.80
    assert r.ratio("baseline", "bulk-1") == 1.0
    d = {x["mode"]: x for x in r.as_dict()["results"]}
    assert d["hybrid"]["paired_spread"] == pytest.approx((0.8, 0.95)) and d["baseline"]["paired_spread"] is None
    assert "0.900 of base 0.80-0.95" in table(r)


def test_a_report_without_pairs_keeps_the_ratio_of_medians():
    assert report(paired=False).ratio("hybrid", "bulk-1") == pytest.approx(20.0 / 25.0)


def test_the_capability_table_has_every_mode_and_the_share_a_passive_consumer_read():
    base = Result("baseline", "bulk-1", "Gbit/s", samples=[20.0])
    af = Result("afpacket", "bulk-1", "Gbit/s", samples=[10.0, 12.0], paired=[0.5, 0.6],
                extra={"capture_seen_share": [0.25, 0.75, 0.5]})
    hyb = Result("hybrid", "bulk-1", "Gbit/s", samples=[19.0], paired=[0.95])
    r = Report("bench", {}, 1, 1.0, [base, af, hyb], lab="bridge")
    caps = capabilities(r)
    assert list(caps) == ["baseline", "afpacket", "hybrid"]
    assert caps["afpacket"] == {"sees": MODES["afpacket"].sees, "seen_share": {"bulk-1": 0.5},
                                "blocks": "no", "rewrites": "no"}
    assert caps["hybrid"]["seen_share"] is None and caps["hybrid"]["blocks"].startswith("yes")
    assert r.as_dict()["capabilities"] == caps and r.as_dict()["lab"] == "bridge"
    lines = table(r).splitlines()
    assert any(ln.startswith("afpacket ") and "bulk-1 0.50" in ln and ln.split()[-2:] == ["no", "no"]
               for ln in lines)


def test_every_mode_says_what_it_sees_and_can_do():
    for m in MODES.values():
        assert m.sees and m.blocks and m.rewrites, m.name
    assert {m.name for m in MODES.values() if m.lab == "bridge"} == {"bridge-flood", "bridge-flood-bare"}
