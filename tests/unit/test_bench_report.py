"""The bench's report: a mode's ratio is the median of its paired ratios (each sample over the
baseline sample measured right before it), with their spread; old reports without pairs keep the
ratio of the medians."""

import pytest

from hybrid.lab.bench import Report, Result, table

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
