"""payload_regex cannot stall the engine: the static check (hybrid/engine/regexcheck.py) refuses
patterns that backtrack super-linearly, the compiler and the engine's reload say so in one line,
and the search never reads more than REGEX_WINDOW bytes of a payload."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tomllib

import pytest
from scapy.all import IP, UDP, Raw

from hybrid.engine.loop import Engine
from hybrid.engine.packet import decode
from hybrid.engine.regexcheck import problem
from hybrid.engine.rules import REGEX_WINDOW, RulesError, compile_rules, load_rules

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check(pattern: str) -> str | None:
    return problem(pattern.encode("utf-8"), re.DOTALL)      # as rules.py compiles them


ACCEPTED = [
    r"^GET /admin", r"User-Agent: (curl|wget)", r"[0-9]{3}-[0-9]{4}", r"(?i)password=", r"\x00\x01.{4}\xff",
    r"(foo|bar)baz", r"^\x16\x03",
    r"a.*b",                        # one unbounded repeat: linear per start position
    r".*foo.*",                     # two of them, but nothing after the second can fail
    r"(a+)+",                       # nested, but nothing after it can fail: the first try succeeds
    r"(a++)+$", r"(?>a+)+$", r"(a+)++$", r"\d*+\d*x", r"(?>x.*y.*)z",      # the suggested fixes
    r"(\d+\.){3}\d+",               # each repetition ends on a byte the inner repeat cannot take
    r"(GET|POST|PUT) /", r"(cat|category)*x", r"(ab?)*c", r"[a-z]+ [a-z]+!", r"Host: [^\r\n]*\r\n",
    r"^(\w+=\w*&)*\w+$",            # the loop gives back whole repetitions, which \w+ cannot take
    r"(?i)(A|a)+b",                 # one byte set once case is folded
    r"\d?\d?\d?x", r"[a-z]{1,4}[a-z]{1,4}x",                 # narrow: a constant number of splits
]

REFUSED = [
    (r"(a+)+$", "exponential", "in (a+)+ the inner repeat a+"),
    (r"(a|aa)*b", "exponential", "the alternatives"),
    (r"(\w+\s?)*x", "exponential", "in (\\w+\\s?)* the inner repeat \\w+"),
    (r"(.*a){12}", "polynomial (degree up to 12)", "the inner repeat .*"),
    (r"\d*\d*x", "polynomial", "\\d* and \\d* can take the same bytes"),
    (r"x.*y.*z", "polynomial", ".* and .* can take the same bytes"),
    (r"(ab|[ab]b)*c", "exponential", "the alternatives ab and [ab]b can match the same bytes"),
    (r"(a*)*b", "exponential", "the inner repeat a*"),
    (r"(a{1,20})+b", "exponential", "the inner repeat a{1,20}"),
    (r"^(\w+\.?)+@", "exponential", "the inner repeat \\w+"),
    (r".{0,100}.{0,100}x", "polynomial", ".{0,100} and .{0,100}"),
    (r"(x+x+)+y", "exponential", "the inner repeat x+"),
    (r"((ab)*|a)*c", "exponential", "the alternatives"),
    (r"(\s*,\s*)*x", "exponential", "the inner repeat \\s*"),
    (r"(?i)(a+A+)+b", "exponential", "the inner repeat a+"),
    (r"(?:[a-z]+\d*)+$", "exponential", "the inner repeat [a-z]+"),
    (r"<(.*)(.*)>", "polynomial", ".* and .*"),
]


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_accepted(pattern):
    assert check(pattern) is None


@pytest.mark.parametrize("pattern, growth, where", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused(pattern, growth, where):
    why = check(pattern)
    assert why is not None and why.startswith(f"can take {growth} time on a crafted payload: ")
    assert where in why
    assert "possessive" in why or "atomic" in why                # the message says how to fix it
    assert "\n" not in why


def test_example_rules_and_their_regexes_pass():
    files = glob.glob(os.path.join(ROOT, "examples", "rules", "*.toml"))
    assert files
    for path in files:
        load_rules(path)
        with open(path, "rb") as f:
            for rule in tomllib.load(f).get("rule", []):
                if "payload_regex" in rule:
                    assert check(rule["payload_regex"]) is None, (path, rule["payload_regex"])


def test_the_compiler_refuses_with_one_line():
    body = '[[rule]]\nname = "a"\naction = "drop"\npayload_regex = \'(a+)+$\'\n'
    with pytest.raises(RulesError) as info:
        compile_rules(body, "b.toml")
    assert str(info.value) == (
        "b.toml:4: payload_regex '(a+)+$' can take exponential time on a crafted payload: in (a+)+ the inner "
        "repeat a+ and the outer one can split the same bytes in many ways; make the inner repeat possessive: "
        "a++ (or (?>...)), or make each repetition end on a byte the inner repeat cannot take")
    compile_rules(body.replace("(a+)+$", "(a++)+$"), "b.toml")    # the suggested fix compiles


def udp(payload: bytes) -> bytes:
    return bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=5000, dport=10010) / Raw(payload))


class Queued:
    """NetfilterQueue's packet, as far as a drop or accept verdict goes."""

    def __init__(self, payload: bytes):
        self.payload, self.mark, self.indev = payload, 0x100000, 1
        self.verdicts: list[str] = []

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return self.mark

    def set_mark(self, m):
        self.mark = m

    def repeat(self):
        self.verdicts.append("repeat")

    def drop(self):
        self.verdicts.append("drop")


def test_reload_keeps_the_old_rules_when_a_regex_is_refused(tmp_path):
    path = tmp_path / "rules.toml"
    good = '[[rule]]\nname = "x"\nproto = "udp"\naction = "drop"\npayload_regex = \'^x+$\'\n'
    path.write_text(good)
    e = Engine(0, str(path), maps=None, mark_mask=0x100000)
    old = e.rules
    path.write_text(good.replace("^x+$", "^(x+)+$"))
    assert e.reload() is False
    assert e.rules is old
    assert e.stats.reload_errors == 1
    assert e.stats.last_reload_error.startswith(f"{path}:5: payload_regex '^(x+)+$' can take exponential time")
    p = Queued(udp(b"xxxx"))
    e._handle(p)
    assert p.verdicts == ["drop"]                                # the old rule still decides
    with pytest.raises(RulesError):
        Engine(0, str(path), maps=None, mark_mask=0x100000)      # and a fresh start refuses the file


@pytest.mark.parametrize("pattern", [r"y", r"y$", r"^x*y"])
def test_the_search_stops_at_the_window(pattern):
    ruleset = compile_rules(f"[[rule]]\nname = \"r\"\naction = \"drop\"\npayload_regex = '{pattern}'\n", "t.toml")
    inside = decode(udp(b"x" * (REGEX_WINDOW - 1) + b"y"))
    beyond = decode(udp(b"x" * REGEX_WINDOW + b"y"))
    assert len(beyond.payload) == REGEX_WINDOW + 1                # the packet itself carries the byte
    assert ruleset.decide(inside).rule == "r"
    assert ruleset.decide(beyond).rule is None


# Proof that the check refuses what is really slow and accepts a rewrite that is not: each pair
# runs in a fresh interpreter on an adversarial payload. The refused pattern needs about 2**40
# steps, hours on any machine, so it must still be running at the deadline; the rewrite needs a
# few hundred steps and must finish well within it. A deadline bounds, it does not measure.
SLOW = [
    (r"(a+)+$", r"(a++)+$", b"a" * 40 + b"!"),
    (r"(\w+\s?)*x", r"(\w++\s?)*x", b"ab " * 20 + b"ab" * 10 + b"!"),
]
DEADLINE = 5.0
GENEROUS = 60.0


def _search_in_child(pattern: str, payload: bytes, timeout: float) -> bool:
    """Whether a fresh interpreter finished the search within `timeout` seconds."""
    code = "import re, sys; re.compile(sys.argv[1].encode(), re.DOTALL).search(bytes.fromhex(sys.argv[2]))"
    try:
        subprocess.run([sys.executable, "-c", code, pattern, payload.hex()], timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return False                                             # run() killed the child
    return True


@pytest.mark.parametrize("refused, rewrite, payload", SLOW, ids=[s[0] for s in SLOW])
def test_a_refused_pattern_is_really_slow_and_its_rewrite_is_not(refused, rewrite, payload):
    assert check(refused) is not None and check(rewrite) is None
    assert _search_in_child(rewrite, payload, GENEROUS)
    assert not _search_in_child(refused, payload, DEADLINE)
