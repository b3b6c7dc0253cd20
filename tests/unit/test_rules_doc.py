"""docs/rules.md is kept in step with the rules compiler (hybrid/engine/rules.py): every key the
compiler accepts is in the doc's key tables, every key those tables list is accepted, every
value of the enumerated keys is named, and every TOML example in the doc compiles."""

from __future__ import annotations

import os
import re

import pytest

from hybrid.engine import rules as R

pytestmark = pytest.mark.unit

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
DOC = os.path.join(REPO, "docs", "rules.md")
_ROW = re.compile(r"^\| `([a-z_.]+)` \|")


def doc_text() -> str:
    with open(DOC) as f:
        return f.read()


def section(title: str) -> str:
    """The text under ``## title`` up to the next ``## `` heading."""
    text = doc_text()
    start = text.find(f"\n## {title}\n")
    assert start >= 0, f"docs/rules.md has no '## {title}' section"
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def table_keys(title: str) -> list[str]:
    """The first column (a key in backquotes) of every table row in the section."""
    return [m[1] for line in section(title).splitlines() if (m := _ROW.match(line))]


def compare(documented: list[str], accepted: tuple[str, ...] | frozenset[str], what: str) -> None:
    dupes = sorted({k for k in documented if documented.count(k) > 1})
    assert not dupes, f"docs/rules.md lists {what} {', '.join(dupes)} twice"
    missing = [k for k in accepted if k not in documented]
    assert not missing, f"{what} {', '.join(missing)} accepted by hybrid/engine/rules.py but not in docs/rules.md"
    extra = [k for k in documented if k not in accepted]
    assert not extra, f"docs/rules.md lists {what} {', '.join(extra)}, which the rules compiler does not accept"


def test_top_level_keys_are_the_compilers():
    compare(table_keys("Top-level keys"), R.TOP_KEYS, "top-level key")


def test_rule_keys_are_the_compilers():
    keys = table_keys("Rule keys")
    compare([k for k in keys if "." not in k], R.RULE_KEYS, "rule key")
    assert {k.name for k in R.MATCH_KEYS} <= set(R.RULE_KEYS)


def test_rewrite_keys_are_the_compilers():
    keys = table_keys("Rule keys")
    compare([k.split(".", 1)[1] for k in keys if k.startswith("rewrite.")], R.REWRITE_KEYS, "rewrite key")


def _error(text: str) -> str | None:
    try:
        R.compile_rules(text, import_plugins=False)
    except R.RulesError as exc:
        return exc.reason
    return None


def test_the_compiler_refuses_what_is_not_listed():
    """The constants the doc is compared with are the compiler's own gate."""
    assert "unknown top-level key" in _error('nonsense = 1\n')
    assert "unknown rule key" in _error('[[rule]]\nname = "r"\naction = "drop"\nnonsense = 1\n')
    assert "unknown key" in _error('[[rule]]\nname = "r"\naction = "drop"\nshare = { nonsense = 1 }\n')
    assert "unknown key" in _error('[[rule]]\nname = "r"\naction = "accept"\ninspect_bytes = { nonsense = 1 }\n')


@pytest.mark.parametrize("key", [k for k in table_keys("Top-level keys") if k != "rule"])
def test_every_listed_top_level_key_is_accepted(key):
    err = _error(f"{key} = 12345\n") or ""          # a wrong value is fine: the key is known
    assert "unknown top-level key" not in err and "rule key" not in err, f"{key}: {err}"


@pytest.mark.parametrize("key", [k for k in table_keys("Rule keys") if "." not in k and k != "name"])
def test_every_listed_rule_key_is_accepted(key):
    err = _error(f'[[rule]]\nname = "r"\n{key} = 12345\n') or ""
    assert "unknown rule key" not in err, f"{key}: {err}"


# Each key inside a table, in a rule that compiles: (the rule around the table, the keys the
# table needs anyway, a working value of each listed key).
_SUB = {
    "share": ('[[rule]]\nname = "r"\naction = "drop"\nshare = {{ {table} }}\n',
              {"ban": '"source"', "duration": '"1h"'},
              {"ban": '"destination"', "duration": '"30m"', "reason": '"why"'}),
    "inspect_bytes": ('[[rule]]\nname = "r"\nproto = "tcp"\naction = "accept"\ninspect_bytes = {{ {table} }}\n',
                      {}, {"client": "100", "server": "100"}),
}


@pytest.mark.parametrize("key", [k for k in table_keys("Rule keys") if k.split(".")[0] in _SUB and "." in k])
def test_every_listed_key_inside_a_table_is_accepted(key):
    name, sub = key.split(".", 1)
    template, base, values = _SUB[name]
    assert sub in values, f"docs/rules.md lists {key}: give the test a value for it"
    table = ", ".join(f"{k} = {v}" for k, v in {**base, sub: values[sub]}.items())
    assert _error(template.format(table=table)) is None


@pytest.mark.parametrize("values", [R.DEFAULT_ACTIONS, R.ACTIONS, R.FLOWS, R.ON_DOUBT, R.QUIC_MODES, R.REJECT_WITH,
                                    R.SHARE_SIDES])
def test_every_value_of_an_enumerated_key_is_named(values):
    text = doc_text()
    missing = [v for v in values if f'"{v}"' not in text]
    assert not missing, f"docs/rules.md never names the value(s) {', '.join(missing)}"


EXPECT_EXAMPLE = os.path.join(REPO, "examples", "rules-tests", "dns-name-cache", "expect.toml")


def test_every_toml_example_compiles():
    blocks = re.findall(r"```toml\n(.*?)```", doc_text(), re.S)
    assert len(blocks) >= 5
    for block in blocks:
        if block.startswith("description = "):
            continue        # the worked rules-test example: an expect.toml, checked below
        err = _error(block)
        assert err is None, f"a TOML example in docs/rules.md does not compile: {err}\n{block}"


def test_the_rules_test_section_is_there():
    assert "`hybridctl rules test" in section("Testing rules against captures")


def test_the_worked_rules_test_example_is_the_shipped_one():
    """The doc's expect.toml is the one CI runs (tests/integration/test_replay_examples.py)."""
    blocks = re.findall(r"```toml\n(.*?)```", section("Testing rules against captures"), re.S)
    with open(EXPECT_EXAMPLE) as f:
        assert blocks and blocks[0] == f.read(), "docs/rules.md's worked example differs from " + EXPECT_EXAMPLE
