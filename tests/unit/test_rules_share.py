"""share, a rule's report of its blocks to the fleet: how it is written, what the compiler refuses
(one line), that a sharing rule is never cached in the kernel (each block must reach the engine),
and that a plugin's verdict keeps it only while it still blocks."""

from __future__ import annotations

import pytest

from hybrid.engine.namecache import kernel_can_apply
from hybrid.engine.rules import RulesError, compile_rules, parse_duration

BASE = 'name = "r"\nproto = "tcp"\ndport = 22\naction = "drop"\n'


def rule(extra: str, base: str = BASE):
    return compile_rules(f"[[rule]]\n{base}{extra}\n", "t.toml")


@pytest.mark.parametrize("text, want", [
    ('share = { ban = "source", duration = "4h" }', ("source", 14400, "blocked by hybrid rule r")),
    ('share = { ban = "destination", duration = 90, reason = "c2" }', ("destination", 90, "c2")),
    ('share = { ban = "source", duration = "1h30m" }', ("source", 5400, "blocked by hybrid rule r")),
    ('share = { ban = "source", duration = "2d" }', ("source", 172800, "blocked by hybrid rule r")),
])
def test_written_forms(text, want):
    r = rule(text)
    d = r.compiled[0].decision
    assert d.share == want
    assert not kernel_can_apply(d)
    assert r.describe()[0]["share"] == {"ban": want[0], "duration": want[1], "reason": want[2]}


def test_reject_shares_too():
    r = rule('share = { ban = "source", duration = 60 }', BASE.replace('"drop"', '"reject"'))
    assert r.compiled[0].decision.share == ("source", 60, "blocked by hybrid rule r")
    assert r.compiled[0].decision_tcp is None or r.compiled[0].decision_tcp.share is not None


@pytest.mark.parametrize("text, base, words", [
    ('share = "4h"', BASE, "write a table"),
    ('share = { duration = "4h" }', BASE, 'ban = "source" or "destination"'),
    ('share = { ban = "client", duration = "4h" }', BASE, 'ban = "source" or "destination"'),
    ('share = { ban = "source" }', BASE, "needs a duration"),
    ('share = { ban = "source", duration = "4 hours" }', BASE, "duration"),
    ('share = { ban = "source", duration = 0 }', BASE, "1 second to 365 days"),
    ('share = { ban = "source", duration = "400d" }', BASE, "1 second to 365 days"),
    ('share = { ban = "source", duration = 60, why = "x" }', BASE, "unknown key 'why'"),
    ('share = { ban = "source", duration = 60, reason = "" }', BASE, "reason"),
    ('share = { ban = "source", duration = 60, reason = "a\\nb" }', BASE, "reason"),
    ('share = { ban = "source", duration = 60 }', BASE.replace('"drop"', '"accept"'), "goes with action"),
])
def test_refused_in_one_line(text, base, words):
    with pytest.raises(RulesError) as e:
        rule(text, base)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.startswith("t.toml:")


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("1h", 3600), (5, 5), ("1d2h3m4s", 93784)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_a_plugin_that_accepts_drops_the_share():
    from hybrid.engine.rules import _merge_verdict
    from hybrid.plugin import Verdict
    base = rule('share = { ban = "source", duration = 60 }').compiled[0].decision

    class P:
        proto = 6
    assert _merge_verdict(base, Verdict(action="accept"), P()).share is None
    assert _merge_verdict(base, Verdict(), P()).share == base.share
