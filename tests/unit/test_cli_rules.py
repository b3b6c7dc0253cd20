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
        "  on doubt: inspect (what a packet the server may read otherwise gets; docs/rules.md)",
        '  quic: inspect (tls_sni rules without proto = "tcp" read QUIC Initials; docs/rules.md)',
        f"{path}: 4 rules ok",
    ]


def test_check_shows_quic_block(tmp_path):
    path = tmp_path / "q.toml"
    path.write_text('quic = "block"\n[[rule]]\nname = "a"\nproto = "tcp"\ntls_sni = "x.example"\naction = "drop"\n')
    res = run("rules", "check", str(path))
    assert res.exit_code == 0, res.output
    assert "  quic: block (every QUIC handshake dropped: browsers fall back to TCP; docs/rules.md)" \
        in res.output.splitlines()
    assert json.loads(run("rules", "check", str(path), "--json").output)["quic"] == "block"


def test_check_realistic_shows_flow_and_ttl():
    res = run("rules", "check", os.path.join(EXAMPLES, "realistic.toml"))
    assert res.exit_code == 0, res.output
    assert "  3 block-quic-sni    proto=udp dport=443 tls_sni=*.tracker.example  -> drop  flow=block/600s  log" \
        in res.output.splitlines()
    assert "  4 block-dns-name    proto=udp dport=53 dns_qname=.ads.example  -> drop  flow=block/60s  log" \
        in res.output.splitlines()
    assert "  - default           *  -> accept  flow=bypass/300s" in res.output.splitlines()


def test_check_json():
    res = run("rules", "check", os.path.join(EXAMPLES, "realistic.toml"), "--json")
    assert res.exit_code == 0
    doc = json.loads(res.output)
    assert [r["name"] for r in doc["rules"]] == ["block-http-host", "block-tls-sni", "block-quic-sni",
                                                 "block-dns-name", "wait-for-payload"]
    assert doc["default"]["flow"] == "bypass" and doc["quic"] == "inspect"


@pytest.mark.parametrize("text, message", [
    ('[[rule]]\nname = "a"\naction = "drop"\ndprot = 80\n', "4: unknown rule key 'dprot', did you mean 'dport'?"),
    ("default = \n", "1: TOML syntax: invalid value at column 11; check the TOML syntax (strings in quotes, "
                     "one key = value per line, [[rule]] headers)"),
    ('quic = "drop"\n', "1: quic 'drop': write \"inspect\" (tls_sni rules read QUIC's SNI) or \"block\" (drop "
                        "every QUIC handshake; browsers fall back to TCP)"),
    ('qiuc = "block"\n', "1: unknown top-level key 'qiuc', did you mean 'quic'?"),
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


# --- plugins are checked, not imported, unless --import-plugins; marks against hybrid's mask


@pytest.fixture
def side_effect(tmp_path):
    """A rules file whose plugin writes a file when imported; returns (rules file, that file)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    os.chmod(plugins, 0o755)
    proof = tmp_path / "imported"
    (plugins / "side.py").write_text(f"open({str(proof)!r}, 'w').close()\ndef decide(p):\n    return None\n")
    os.chmod(plugins / "side.py", 0o644)
    path = tmp_path / "rules.toml"
    path.write_text('plugin_paths = ["plugins"]\n[[rule]]\nname = "p"\nplugin = "side:decide"\n')
    return path, proof


def test_check_does_not_import_plugins(side_effect):
    path, proof = side_effect
    res = run("rules", "check", str(path))
    assert res.exit_code == 0, res.output
    assert not proof.exists()
    assert res.output.splitlines()[-1] == (f"{path}: 1 rule ok (plugins checked, not imported: --import-plugins "
                                           f"runs them)")
    res = run("rules", "check", str(path), "--json")
    assert json.loads(res.output)["plugins_imported"] is False and not proof.exists()
    res = run("rules", "check", str(path), "--import-plugins")
    assert res.exit_code == 0, res.output
    assert proof.exists()
    assert res.output.splitlines()[-1] == f"{path}: 1 rule ok"


def test_check_refuses_an_unsafe_plugin_without_importing_it(side_effect):
    path, proof = side_effect
    module = path.parent / "plugins" / "side.py"
    os.chmod(module, 0o666)
    res = run("rules", "check", str(path))
    assert res.exit_code == 2
    assert res.output.splitlines() == [
        f"{path}:4: plugin 'side:decide': {module} is writable by group and others (mode 0666); plugins run as root "
        f"in the engine: run chmod go-w {module}"]
    assert run("rules", "check", str(path), "--import-plugins").exit_code == 2
    assert not proof.exists()


def test_check_refuses_a_mark_on_hybrids_bits(tmp_path):
    path = tmp_path / "mark.toml"
    path.write_text('[[rule]]\nname = "m"\naction = "mark"\nmark = "0x100000/0x100000"\n')
    res = run("rules", "check", str(path))
    assert res.exit_code == 2
    assert res.output.splitlines() == [
        f"{path}:4: mark '0x100000/0x100000': its mask 0x100000 overlaps hybrid's mark mask 0x100000, bits the "
        f"engine owns (setting them would send the packet back to the queue for ever); use bits outside 0x100000"]
    res = run("rules", "check", str(path), "--mark-mask", "0x200000")
    assert res.exit_code == 0, res.output
    assert "  1 m        any  -> mark(0x100000/0x100000)  flow=none" in res.output.splitlines()
    res = run("rules", "check", str(path), "--mark-mask", "0x300000")
    assert res.exit_code == 2 and "hybrid's mark mask 0x300000" in res.output
    res = run("rules", "check", str(path), "--mark-mask", "nope")
    assert res.exit_code == 2 and "Invalid value for '--mark-mask': 'nope': expected a number" in res.output


def test_config_check_does_not_import_plugins_and_uses_the_configured_mask(side_effect):
    path, proof = side_effect
    conf = path.parent / "hybrid.toml"
    conf.write_text(f'[attach]\ninterfaces = ["eth0"]\n[engine]\nrules = "{path.name}"\n')
    res = run("config", "check", str(conf))
    assert res.exit_code == 0, res.output
    assert not proof.exists()
    assert f"rules {path} (1 rule) (plugins checked, not imported: --import-plugins runs them); metrics off" \
        in res.output
    res = run("config", "check", str(conf), "--import-plugins")
    assert res.exit_code == 0, res.output
    assert proof.exists() and "not imported" not in res.output

    path.write_text('[[rule]]\nname = "m"\naction = "mark"\nmark = "0x4/0xf"\n')
    assert run("config", "check", str(conf)).exit_code == 0
    conf.write_text(f'[attach]\ninterfaces = ["eth0"]\nmark = 0x2\nmark_mask = 0x2\n[engine]\nrules = "{path.name}"\n')
    res = run("config", "check", str(conf))
    assert res.exit_code == 2
    assert res.output.startswith(f"{path}:4: mark '0x4/0xf': its mask 0xf overlaps hybrid's mark mask 0x2, ")


def test_check_refuses_a_catastrophic_regex_in_one_line(tmp_path):
    path = tmp_path / "rx.toml"
    path.write_text('[[rule]]\nname = "rx"\naction = "drop"\npayload_regex = \'\\d*\\d*x\'\n')
    res = run("rules", "check", str(path))
    assert res.exit_code == 2
    assert res.output.splitlines() == [
        f"{path}:4: payload_regex '\\\\d*\\\\d*x' can take polynomial time on a crafted payload: \\d* and \\d* "
        f"can take the same bytes with nothing between them that the first cannot take, so every split is tried "
        f"before a failure; make the first possessive (\\d*+), or put a byte neither can match between them"]


def test_check_notes_the_regex_window(tmp_path):
    from hybrid.engine.rules import REGEX_WINDOW
    path = tmp_path / "rx.toml"
    path.write_text('[[rule]]\nname = "tls"\naction = "drop"\npayload_regex = \'^\\x16\\x03\'\n'
                    '[[rule]]\nname = "port"\ndport = 80\nproto = "tcp"\naction = "drop"\n'
                    '[[rule]]\nname = "pw"\naction = "drop"\npayload_regex = \'(?i)password=\'\n')
    res = run("rules", "check", str(path))
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-2:] == [
        f"note: payload_regex reads the first {REGEX_WINDOW} bytes of a payload (tls, pw); see docs/rules.md",
        f"{path}: 3 rules ok"]
    assert json.loads(run("rules", "check", str(path), "--json").output)["regex_window"] == REGEX_WINDOW
    res = run("rules", "check", os.path.join(EXAMPLES, "rewrite.toml"))
    assert "note:" not in res.output                             # no regex, no note
