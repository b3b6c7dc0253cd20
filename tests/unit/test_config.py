"""The service configuration: schema, FILE:LINE errors, defaults, command-line overrides, the
mapping onto AttachOptions, and `hybridctl config check|show`."""

import io
import json
import logging
import os
import textwrap

import click
import pytest
from click.testing import CliRunner
from hybrid.cli.main import main

from hybrid.datapath import options as att
from hybrid.engine.rules import compile_rules, load_rules
from hybrid.errors import ConfigError
from hybrid.service import config as hcfg
from hybrid.service.supervisor import JsonFormatter, event

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "hybrid.toml")
MINIMAL = '[attach]\ninterfaces = ["eth0"]\n[engine]\nrules = "rules.toml"\n'


@pytest.fixture
def write(tmp_path):
    (tmp_path / "rules.toml").write_text('default = "accept"\n')

    def write(text: str) -> str:
        p = tmp_path / "hybrid.toml"
        p.write_text(textwrap.dedent(text))
        return str(p)
    return write


def cli(*args):
    return CliRunner().invoke(main, list(args))


def error_of(path, overrides=None) -> str:
    with pytest.raises(hcfg.ConfigFileError) as exc:
        hcfg.load(path, overrides)
    return str(exc.value)


# -- loading ---------------------------------------------------------------------------------------

def test_minimal_file_gets_the_attach_defaults(write, tmp_path):
    cfg = hcfg.load(write(MINIMAL))
    opts = cfg.attach_options()
    assert opts == att.AttachOptions(interfaces=["eth0"])      # every attach default, unchanged
    assert cfg["engine.rules"] == str(tmp_path / "rules.toml")  # relative to the file
    assert cfg["engine.flow_ttl"] is None and cfg["engine.queue_len"] == 4096
    assert cfg["metrics.enabled"] is False and cfg["metrics.listen"] == "unix:/run/hybrid/metrics.sock"
    assert cfg["service.keep_attached_on_stop"] is False
    assert cfg.origin["attach.interfaces"] == "file" and cfg.origin["attach.mark"] == "default"


def test_every_attach_key_maps_onto_attach_options(write):
    cfg = hcfg.load(write("""\
        [attach]
        interfaces = ["eth0", "eth1"]
        xdp_mode = "generic"
        hook = ["forward", "input"]
        mark = 0x200000
        mark_mask = "0x600000"
        queues = "2-3"
        fail_open = false
        flag = ["syn", "first-n"]
        first_n = 5
        watch_port = 53
        watch_prefix = ["192.0.2.0/24"]
        block_prefix = ["203.0.113.7/24", "2001:db8:bad::/48"]
        family = "ipv4"
        flow_table_size = 4096
        source_rate = 100
        source_burst = 200
        global_rate = 5000
        global_burst = 10000
        over_budget = "drop"
        [engine]
        rules = "rules.toml"
        """))
    assert cfg.attach_options() == att.AttachOptions(
        interfaces=["eth0", "eth1"], xdp_mode="generic", hooks=("forward", "input"), mark=0x200000,
        mark_mask=0x600000, queue_first=2, queue_last=3, fail_open=False, reasons=("syn", "first-n"),
        first_n=5, watch_ports=(53,), watch_prefixes=("192.0.2.0/24",),
        block_prefixes=("203.0.113.0/24", "2001:db8:bad::/48"), families=("ipv4",), flow_table_size=4096,
        source_rate=100, source_burst=200, global_rate=5000, global_burst=10000, over_budget="drop")


def test_every_attach_option_has_a_key():
    """The config covers what the attach command line covers (AttachOptions' fields)."""
    keys = {f.key for f in hcfg.FIELDS if f.section == "attach"}
    renamed = {"interfaces": "interfaces", "hooks": "hook", "reasons": "flag", "watch_ports": "watch_port",
               "watch_prefixes": "watch_prefix", "block_prefixes": "block_prefix", "families": "family",
               "queue_first": "queues", "queue_last": "queues"}
    fields = set(att.AttachOptions.__dataclass_fields__)
    assert {renamed.get(f, f) for f in fields} == keys


def test_overrides_beat_the_file_and_say_so(write):
    cfg = hcfg.load(write(MINIMAL), {"attach.interfaces": ("to-client", "to-server"), "attach.queues": "0-1",
                                     "attach.fail_open": False, "attach.flag": "syn,first-n",
                                     "attach.first_n": "7", "engine.flow_ttl": "60", "attach.mark": None,
                                     "attach.watch_port": ()})
    assert cfg["attach.interfaces"] == ["to-client", "to-server"] and cfg.queues == (0, 1)
    assert cfg["attach.fail_open"] is False and cfg["attach.flag"] == ["syn", "first-n"]
    assert cfg["attach.first_n"] == 7 and cfg["engine.flow_ttl"] == 60
    assert cfg.origin["attach.queues"] == "command line"
    assert cfg.origin["attach.mark"] == "default" and cfg.origin["attach.watch_port"] == "default"


def test_no_file_and_everything_on_the_command_line(tmp_path):
    cfg = hcfg.load(None, {"attach.interfaces": ["eth0"], "engine.rules": "r.toml"})
    assert cfg["engine.rules"] == os.path.abspath("r.toml")


def test_show_output_loads_back_to_the_same_values(write, tmp_path):
    cfg = hcfg.load(write(MINIMAL + "[metrics]\nenabled = true\nlisten = \"[::1]:9000\"\n"),
                    {"attach.mark": "0x4", "attach.mark_mask": "0xc", "engine.flow_ttl": 30})
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml(origins=True))
    assert hcfg.load(str(again)).values == cfg.values


def test_example_configuration_is_valid_and_shows_the_defaults():
    cfg = hcfg.load(EXAMPLE)
    load_rules(cfg["engine.rules"], cfg["engine.flow_ttl"])
    # The example shows the defaults: the only keys that differ from a bare file are the required ones.
    differ = [f.name for f in hcfg.FIELDS if f.default is not hcfg.REQUIRED and cfg[f.name] != f.default]
    assert differ == []


def test_flow_ttl_overrides_the_rules_file_default():
    text = 'default = "accept"\ndefault_flow = "bypass"\nflow_ttl = 300\n' \
           '[[rule]]\nname = "a"\nproto = "udp"\naction = "accept"\nflow = "bypass"\n' \
           '[[rule]]\nname = "b"\nproto = "tcp"\naction = "accept"\nflow = "block"\nttl = 9\n'
    plain, over = compile_rules(text), compile_rules(text, flow_ttl=42)
    assert [d["ttl"] for d in plain.describe()] == [300, 9, 300]
    assert [d["ttl"] for d in over.describe()] == [42, 9, 42]    # a rule's own ttl still wins


# -- errors: one line, FILE:LINE ---------------------------------------------------------------------

@pytest.mark.parametrize("text, line, message", [
    ('[attach]\ninterfaces = ["eth0"]\nmark = "bit 20"\n[engine]\nrules = "r"\n', 3,
     "mark 'bit 20': write a number, e.g. 0x100000"),
    ('[attach]\ninterfaces = ["eth0"]\nqueues = "3-1"\n[engine]\nrules = "r"\n', 3,
     "queues '3-1': need 0 <= first <= last <= 65535"),
    ('[attach]\ninterfaces = ["eth0"]\nfail_open = "yes"\n[engine]\nrules = "r"\n', 3,
     "fail_open 'yes': write true or false (no quotes)"),
    ('[attach]\ninterfaces = ["eth0"]\n\nflag = ["syn", "firstn"]\n[engine]\nrules = "r"\n', 4,
     "flag 'firstn': write one of syn, first-n, port, prefix, suspicious, fragment, inspect, malformed, follow"),
    ('[attach]\ninterfaces = ["eth0"]\nwatch_port = [53, 70000]\n[engine]\nrules = "r"\n', 3,
     "watch_port 70000: use 1 to 65535"),
    ('[attach]\ninterfaces = ["eth0"]\nblock_prefix = ["10.0.0.300/8"]\n[engine]\nrules = "r"\n', 3,
     "block_prefix '10.0.0.300/8': not an IPv4 or IPv6 CIDR; write e.g. \"198.18.0.0/15\" or \"2001:db8::/32\""),
    ('[attach]\ninterfaces = ["eth0"]\nmark_msk = 4\n[engine]\nrules = "r"\n', 3,
     "unknown key 'mark_msk' in [attach], did you mean 'mark_mask'?"),
    ('[attach]\ninterfaces = ["eth0"]\nrules = "r"\n', 3,
     "unknown key 'rules' in [attach], it belongs in [engine]"),
    ('interfaces = ["eth0"]\n', 1, "'interfaces' belongs in the [attach] table: put it under a [attach] header"),
    ('[atach]\ninterfaces = ["eth0"]\n', 1, "unknown table 'atach', did you mean 'attach'?"),
    ('[attach]\ninterfaces = ["eth0"]\n[engine]\nrules = "r"\n\n[metrics]\nlisten = "localhost"\n', 7,
     "listen 'localhost': write \"HOST:PORT\", e.g. \"127.0.0.1:9469\" or \"[::1]:9469\""),
    ('[attach]\ninterfaces = ["eth0"]\nmark = 0x3\nmark_mask = 0x1\n[engine]\nrules = "r"\n', 3,
     "mark 0x3 has bits outside mark_mask 0x1: the mask must contain every bit of the mark"),
    ('[attach]\ninterfaces = ["eth0", "eth0"]\n[engine]\nrules = "r"\n', 2, "interfaces 'eth0' is given twice; keep one"),
    ('[attach]\ninterfaces = []\n[engine]\nrules = "r"\n', 2, "interfaces the list is empty; give at least one"),
    ('[attach]\ninterfaces = ["eth0"]\n[engine]\nrules = "r"\nqueue_len = 0\n', 5, "queue_len 0: use 1 to 1048576"),
    ('[attach]\ninterfaces = ["eth0"]\n[engine]\n', 3, "engine.rules is required: set rules under [engine] "
                                                         "(or give --rules)"),
    ('[attach]\ninterfaces = ["eth0"\n[engine]\n', 3, "TOML syntax: unclosed array"),
    ('[attach]\ninterfaces = ["eth0"]\n[attach]\n', 3, "TOML syntax: "),
])
def test_errors_name_the_file_and_line(write, text, line, message):
    path = write(text)
    err = error_of(path)
    assert err.startswith(f"{path}:{line}: " + message), err
    assert "\n" not in err


def test_toml_duplicate_table_hint(write):
    assert error_of(write('[attach]\ninterfaces = ["eth0"]\n[attach]\n')).endswith(
        "a key or table is given twice; keep one")


def test_missing_file_says_how_to_get_one(tmp_path):
    err = error_of(str(tmp_path / "nope.toml"))
    assert err == f"{tmp_path / 'nope.toml'}: cannot read the configuration: No such file or directory " \
                  "(write one from examples/hybrid.toml, or give --config)"


def test_bad_override_names_the_option(write):
    assert error_of(write(MINIMAL), {"attach.queues": "x"}) == \
        "--queues: 'x': write a queue number or a range, e.g. 0 or \"0-1\""
    assert error_of(write(MINIMAL), {"attach.mark": "0x3", "attach.mark_mask": "0x1"}) == \
        "--mark: mark 0x3 has bits outside mark_mask 0x1: the mask must contain every bit of the mark"


# -- the commands ------------------------------------------------------------------------------------

def test_config_check_ok(write, tmp_path):
    res = cli("config", "check", "--config", write(MINIMAL))
    assert res.exit_code == 0, res.output
    assert res.output == f"{tmp_path / 'hybrid.toml'}: ok: attach eth0, queue 0 (fail-open); rules " \
                         f"{tmp_path / 'rules.toml'} (0 rules); metrics off\n"


def test_config_check_takes_the_file_as_an_argument_too(write, tmp_path):
    path = write(MINIMAL)
    by_option = cli("config", "check", "--config", path)
    for args in ([path], [path, "--config", path], [os.path.relpath(path), "--config", path]):
        res = cli("config", "check", *args)
        assert res.exit_code == 0, res.output
        assert res.output == by_option.output
    other = str(tmp_path / "other.toml")
    res = cli("config", "check", path, "--config", other)
    assert res.exit_code == 2
    assert res.output == f"Error: two configuration files, {path} and --config {other}: give one " \
                         "(see 'main config check --help')\n"
    assert "hybridctl config check examples/hybrid.toml" in cli("config", "check", "--help").output


def test_config_check_error_is_one_bare_line(write):
    path = write('[attach]\ninterfaces = ["eth0"]\nxdp_mode = "fast"\n[engine]\nrules = "rules.toml"\n')
    res = cli("config", "check", "--config", path)
    assert res.exit_code == 2
    assert res.output == f"{path}:3: xdp_mode 'fast': write one of auto, native, generic, off\n"


def test_config_check_reports_the_rules_file_line(write, tmp_path):
    (tmp_path / "rules.toml").write_text('default = "accept"\n\n[[rule]]\nname = "x"\nacton = "drop"\n')
    res = cli("config", "check", "--config", write(MINIMAL))
    assert res.exit_code == 2
    assert res.output.startswith(f"{tmp_path / 'rules.toml'}:5: unknown rule key 'acton'")


def test_config_show_prints_the_effective_configuration(write):
    res = cli("config", "show", "--config", write(MINIMAL), "--queues", "0-1", "--no-metrics", "--origins")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert 'interfaces = ["eth0"]  # file' in lines
    assert 'queues = "0-1"  # command line' in lines
    assert "mark = 0x100000  # default" in lines
    assert "enabled = false  # command line" in lines
    assert "# flow_ttl = (not set)  # default" in lines


def test_config_show_json(write):
    res = cli("config", "show", "--config", write(MINIMAL), "--json", "--interface", "a", "--interface", "b")
    doc = json.loads(res.output)
    assert doc["attach"]["interfaces"] == ["a", "b"] and doc["metrics"] == {
        "enabled": False, "listen": "unix:/run/hybrid/metrics.sock", "socket_group": None, "token_file": None}


def test_run_refuses_a_bad_file_before_changing_anything(write):
    res = cli("run", "--config", write('[attach]\ninterfaces = ["eth0"]\n[engine]\nrules = "missing.toml"\n'))
    assert res.exit_code == 2
    assert res.output.endswith("missing.toml: cannot read the rules file: No such file or directory\n")


def test_run_and_show_offer_an_override_for_every_key():
    for cmd in ("run", "show"):
        args = ["run", "--help"] if cmd == "run" else ["config", "show", "--help"]
        text = cli(*args).output
        for f in hcfg.FIELDS:
            assert f"[file: {f.key} in [{f.section}]]" in " ".join(text.split()), (cmd, f.name)


def _help_of(command) -> dict[str, str]:
    """option spelling -> help text of a click command."""
    return {name: p.help for p in command.params if isinstance(p, click.Option)
            for name in p.opts + p.secondary_opts}


def test_every_attach_option_is_a_key_an_attach_option_and_a_run_option():
    """One schema: every entry is a key of [attach], an option of `hybridctl attach` (but the
    interfaces, its arguments) and an override of `hybridctl run` and `config show`, each with
    the schema's help text."""
    assert [f for f in hcfg.FIELDS if f.section == "attach"] == list(att.ATTACH)
    attach_help = _help_of(main.commands["attach"])
    run_help = _help_of(main.commands["run"])
    show_help = _help_of(main.commands["config"].commands["show"])
    for opt in att.ATTACH:
        assert run_help[opt.option].startswith(opt.help), opt.key
        assert show_help[opt.option] == run_help[opt.option], opt.key
        if opt.key == "interfaces":
            assert "interfaces" in [p.name for p in main.commands["attach"].params if isinstance(p, click.Argument)]
            continue
        assert attach_help[opt.option].startswith(opt.help), opt.key
        for spelling in opt.cli.split("/"):
            assert spelling in attach_help and spelling in run_help, spelling


def test_attach_options_default_to_the_schema():
    """AttachOptions' defaults are the schema's, and the values round-trip through the parsers."""
    opts = att.AttachOptions(interfaces=["eth0"])
    values = opts.values()
    for opt in att.ATTACH:
        if opt.key != "interfaces":
            assert opt.parse(values[opt.key]) == opt.default, opt.key
    assert att.AttachOptions.from_values(values) == opts
    assert att.AttachOptions.from_values({"interfaces": ["eth0"], "queues": "2-3"}).queue_rule().queue_target() == \
        "NFQUEUE --queue-balance 2:3 --queue-bypass"


def test_attach_help_shows_each_default_once():
    text = " ".join(cli("attach", "--help").output.split())
    for shown in ("[default: 0x100000]", "[default: forward]", "[default: fail-open]", "[default: all]",
                  f"[default: {att.DEFAULT_GLOBAL_RATE}]", "[default: ipv4, ipv6]", "[default: pass]"):
        assert shown in text, shown


def test_validate_refuses_what_the_parsers_refuse():
    with pytest.raises(ConfigError, match=r"^first_n 2000000: use 0 to 1000000$"):
        att.AttachOptions(interfaces=["eth0"], first_n=2_000_000).validate()
    with pytest.raises(ConfigError, match=r"^flag 'nope': write one of syn, "):
        att.AttachOptions(interfaces=["eth0"], reasons=("syn", "nope")).validate()
    with pytest.raises(ConfigError, match=r"^an interface is named twice$"):
        att.AttachOptions(interfaces=["eth0", "eth0"]).validate()


# -- the log format ----------------------------------------------------------------------------------

def test_json_log_lines():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("hybrid.service.supervisor")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        event(logging.INFO, "reloaded", "configuration reloaded", changed=["attach.mark"], level="not me")
        logging.getLogger("hybrid.service.supervisor").warning("plain %s", "message")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["level"] == "info" and first["event"] == "reloaded" and first["changed"] == ["attach.mark"]
    assert first["msg"] == "configuration reloaded" and first["ts"].endswith("Z")
    assert second["event"] == "log" and second["msg"] == "plain message" and second["level"] == "warning"
    assert second["logger"] == "hybrid.service.supervisor"


def test_deployment_doc_lists_every_key():
    with open(os.path.join(ROOT, "docs", "deployment.md")) as f:
        doc = f.read()
    with open(EXAMPLE) as f:
        example = f.read()
    for f in hcfg.FIELDS:
        assert f"`{f.key}`" in doc, f.name
        assert f"{f.key} =" in example, f.name           # the example shows every key
