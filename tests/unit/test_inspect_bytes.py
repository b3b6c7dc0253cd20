"""inspect_bytes, a rule's byte budget: how it is written, what the compiler refuses (one line),
and that a decision with a budget is never cached in the kernel (the kernel could not write it)."""

from __future__ import annotations

import pytest

from hybrid.engine.namecache import kernel_can_apply
from hybrid.engine.rules import RulesError, compile_rules

BASE = 'name = "r"\nproto = "tcp"\nhttp_host = "a.example"\naction = "accept"\nflow = "bypass"\n'


def rule(extra: str, base: str = BASE):
    return compile_rules(f"[[rule]]\n{base}{extra}\n", "t.toml")


@pytest.mark.parametrize("text, want", [
    ("inspect_bytes = 65536", (65536, 0)),
    ("inspect_bytes = { client = 1000, server = 20 }", (1000, 20)),
    ("inspect_bytes = { server = 4096 }", (0, 4096)),
])
def test_written_forms(text, want):
    r = rule(text)
    assert r.compiled[0].decision.inspect_bytes == want
    assert not kernel_can_apply(r.compiled[0].decision)
    assert r.describe()[0]["inspect_bytes"] == {"client": want[0], "server": want[1]}


@pytest.mark.parametrize("text, base, words", [
    ("inspect_bytes = -1", BASE, "from 0 to"),
    ("inspect_bytes = 0", BASE, "sees nothing"),
    ("inspect_bytes = { client = 5, side = 1 }", BASE, "unknown key 'side'"),
    ("inspect_bytes = true", BASE, "number of bytes"),
    ("inspect_bytes = 2147483648", BASE, "from 0 to"),
    ("inspect_bytes = 100", BASE.replace('action = "accept"', 'action = "drop"'), "nothing left to see"),
    ("inspect_bytes = 100", BASE.replace('flow = "bypass"', 'flow = "block"'), "nothing left to see"),
    ("inspect_bytes = 100", 'name = "r"\nproto = "udp"\naction = "accept"\n', "TCP stream"),
])
def test_refused_in_one_line(text, base, words):
    with pytest.raises(RulesError) as e:
        rule(text, base)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.startswith("t.toml:")


def test_without_it_there_is_no_budget():
    assert rule("").compiled[0].decision.inspect_bytes is None
