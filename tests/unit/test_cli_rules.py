"""hybridctl rules check: the compiled rules on success, one bare FILE:LINE line and exit 2 on error."""

import json
import os

import pytest
from click.testing import CliRunner
from hybrid.cli.main import main

pytestmark = pytest.mark.unit

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "examples", "rules")


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help():
    assert run("rules", "check", "--help").exit_code == 0


def test_check_ok():
    path = os.path.join(EXAMPLES, "rewrite.toml")
    res = run("rules", "check", path)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        "  1 udp-10010-fill   proto=udp dport=10010  -> rewrite(fill 'h' '\\n')  flow=none  log",
        "  2 udp-10086-drop   proto=udp dport=10086  -> drop  flow=none  log",
        "  3 ping-32-accept   proto=icmp icmp_type=8 payload_len=32  -> accept  flow=none",
        "  4 ping-other-drop  proto=icmp icmp_type=8  -> drop  flow=none  log",
        "  - default          *  -> accept  flow=none",
        f"{path}: 4 rules ok",
    ]


def test_check_realistic_shows_flow_and_ttl():
    res = run("rules", "check", os.path.join(EXAMPLES, "realistic.toml"))
    assert res.exit_code == 0, res.output
    assert "  3 block-dns-name    proto=udp dport=53 dns_qname=.ads.example  -> drop  flow=block/60s  log" \
        in res.output.splitlines()
    assert "  - default           *  -> accept  flow=bypass/300s" in res.output.splitlines()


def test_check_json():
    res = run("rules", "check", os.path.join(EXAMPLES, "realistic.toml"), "--json")
    assert res.exit_code == 0
    doc = json.loads(res.output)
    assert [r["name"] for r in doc["rules"]] == ["block-http-host", "block-tls-sni", "block-dns-name",
                                                 "wait-for-payload"]
    assert doc["default"]["flow"] == "bypass"


@pytest.mark.parametrize("text, message", [
    ('[[rule]]\nname = "a"\naction = "drop"\ndprot = 80\n', "4: unknown rule key 'dprot', did you mean 'dport'?"),
    ("default = \n", "1: TOML syntax: invalid value at column 11; check the TOML syntax (strings in quotes, "
                     "one key = value per line, [[rule]] headers)"),
])
def test_bad_file_is_one_line_exit_2(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    res = run("rules", "check", str(path))
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert res.output.splitlines() == [f"{path}:{message}"]


def test_missing_file_is_one_line_exit_2(tmp_path):
    res = run("rules", "check", str(tmp_path / "nope.toml"))
    assert res.exit_code == 2
    assert res.output.splitlines() == [f"{tmp_path / 'nope.toml'}: cannot read the rules file: No such file or "
                                       f"directory"]
