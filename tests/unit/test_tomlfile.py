"""hybrid/tomlfile.py, the TOML front-end of rules files and the service configuration: reading
with FILE:LINE errors, locating a key in a table, an array-of-tables entry or a dotted key, the
did-you-mean suggestion, and the located-error classes both file kinds derive from."""

from __future__ import annotations

import textwrap

import pytest

from hybrid.engine.rules import RULES_FILE, RulesError
from hybrid.errors import ConfigError
from hybrid.service.config import CONFIG_FILE, ConfigFileError
from hybrid.tomlfile import TomlFileError, TomlFormat, TomlSource, close_match, suggest

pytestmark = pytest.mark.unit

PLAIN = TomlFormat(TomlFileError, "the test file", "[section] headers", missing_hint=" (make one)")


def source(text: str) -> TomlSource:
    return PLAIN.parse(textwrap.dedent(text), "f.toml")


# -- the error classes ----------------------------------------------------------------------------

def test_located_error_is_one_line_with_or_without_a_line():
    err = TomlFileError("f.toml", 7, "bad value")
    assert str(err) == "f.toml:7: bad value"
    assert (err.filename, err.line, err.reason) == ("f.toml", 7, "bad value")
    assert str(TomlFileError("f.toml", None, "cannot read")) == "f.toml: cannot read"
    assert isinstance(err, ConfigError)


def test_rules_and_configuration_errors_share_the_base():
    assert issubclass(RulesError, TomlFileError) and issubclass(ConfigFileError, TomlFileError)
    err = ConfigFileError("--queues", None, "'x': write a number")
    assert str(err) == "--queues: 'x': write a number" and err.where == "--queues" and err.line is None
    assert RULES_FILE.error is RulesError and CONFIG_FILE.error is ConfigFileError


# -- reading ----------------------------------------------------------------------------------------

def test_read_gives_text_and_document(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('top = 1\n[a]\nb = "c"\n')
    src = PLAIN.read(path)
    assert src.doc == {"top": 1, "a": {"b": "c"}}
    assert src.text == 'top = 1\n[a]\nb = "c"\n' and src.filename == str(path)


def test_missing_file_names_what_it_is_and_the_hint(tmp_path):
    with pytest.raises(TomlFileError) as info:
        PLAIN.read(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: cannot read the test file: No such file or directory " \
                              "(make one)"


def test_unreadable_file_gets_no_missing_hint(tmp_path):
    with pytest.raises(TomlFileError) as info:
        PLAIN.read(tmp_path)                             # a directory: not "missing"
    assert str(info.value) == f"{tmp_path}: cannot read the test file: Is a directory"


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes(b'a = 1\nb = "caf\xe9"\n')
    with pytest.raises(RulesError) as info:              # the format's own error class
        RULES_FILE.read(path)
    assert str(info.value) == f"{path}:2: not UTF-8 text; save the file as UTF-8"


@pytest.mark.parametrize("text, message", [
    ("a = \n", "f.toml:1: TOML syntax: invalid value at column 5; check the TOML syntax (strings in quotes, "
               "one key = value per line, [section] headers)"),
    ('a = 1\na = 2\n', "f.toml:2: TOML syntax: cannot overwrite a value at column 6; a key or table is given "
                       "twice; keep one"),
    ('[a]\n[a]\n', "f.toml:2: TOML syntax: cannot declare ('a',) twice at column 3; a key or table is given "
                   "twice; keep one"),
    ('a = [1,\n', "f.toml:1: TOML syntax: invalid value at the end of the file; check the TOML syntax "
                  "(strings in quotes, one key = value per line, [section] headers)"),
])
def test_syntax_errors_are_located(text, message):
    with pytest.raises(TomlFileError) as info:
        PLAIN.parse(text, "f.toml")
    assert str(info.value) == message


def test_each_format_names_its_own_headers():
    with pytest.raises(RulesError, match=r"\[\[rule\]\] headers\)$"):
        RULES_FILE.parse("x = \n", "r.toml")
    with pytest.raises(ConfigFileError, match=r"\[section\] headers\)$"):
        CONFIG_FILE.parse("x = \n", "c.toml")


# -- locating keys ----------------------------------------------------------------------------------

CONFIG = """\
# a comment
top = 1
"quoted" = 2
engine.rules = "r.toml"

[attach]            # the attach table
interfaces = ["eth0"]
  mark = 3
sub.x = 1

[metrics]
listen = ":1"
[attach.extra]
y = 2
"""


@pytest.mark.parametrize("place, key, line", [
    (None, "top", 2),
    (None, "quoted", 3),
    (None, "missing", 1),                # the top level's own "header" is the file's first line
    (None, "attach", 6),                 # a table is found by its header
    ("attach", None, 6),
    ("attach", "interfaces", 7),
    ("attach", "mark", 8),               # indented
    ("attach", "sub", 9),                # the start of a dotted key
    ("attach", "extra", 13),             # a sub-table further down
    ("attach", "listen", 6),             # in another table: not this one's, so the header
    ("metrics", "listen", 12),
    ("engine", "rules", 4),              # a table written only as dotted keys at the top level
    ("engine", None, None),              # ... has no header
    ("nowhere", "x", None),
])
def test_line_of_a_key_in_a_table(place, key, line):
    assert source(CONFIG).line(place, key) == line


RULES = """\
default = "accept"

[[rule]]
name = "a"
action = "drop"

[[ rule ]]   # spaced
name = "b"
rewrite.fill = "h"

[[rule]]
name = "c"
[rule.rewrite]
set = "x"
[[rule]]
name = "d"
"""


@pytest.mark.parametrize("place, key, line", [
    (("rule", 0), None, 3),
    (("rule", 0), "action", 5),
    (("rule", 0), "rewrite", 3),         # not written in this entry: its header
    (("rule", 1), None, 7),
    (("rule", 1), "name", 8),
    (("rule", 1), "rewrite", 9),         # dotted
    (("rule", 2), "rewrite", 13),        # its own sub-table
    (("rule", 3), "rewrite", 15),        # the sub-table above belongs to the entry before
    (("rule", 3), "name", 16),
    (("rule", 4), "name", None),         # no such entry
    (None, "default", 1),
    (None, "rule", 3),                   # the first [[rule]] header
])
def test_line_of_a_key_in_an_array_entry(place, key, line):
    assert source(RULES).line(place, key) == line


def test_a_value_line_starting_with_a_bracket_is_not_a_header():
    src = source('a = [\n  [1, 2],\n  [3],\n]\nb = 1\n')
    assert src.line(None, "b") == 5


def test_empty_file_has_no_line():
    assert source("").line(None, "x") is None


def test_error_uses_the_format_class_and_the_located_line():
    src = CONFIG_FILE.parse('[attach]\nmark = "x"\n', "c.toml")
    err = src.error("attach", "mark", "mark 'x': write a number")
    assert isinstance(err, ConfigFileError) and str(err) == "c.toml:2: mark 'x': write a number"


# -- did you mean -----------------------------------------------------------------------------------

def test_suggest_prefers_swapped_letters():
    # difflib alone would pick "tips" (closer by ratio); two swapped letters are the likelier typo
    assert close_match("tops", ("tips", "stop")) == "stop"
    assert suggest("dprot", ("sport", "dport", "port")) == "did you mean 'dport'?"


def test_suggest_falls_back_to_the_closest_spelling_then_the_list():
    assert suggest("mark_msk", ["mark", "mark_mask"]) == "did you mean 'mark_mask'?"
    assert close_match("zzz", ("attach", "engine")) is None
    assert suggest("zzz", ("attach", "engine")) == "valid keys: attach, engine"
