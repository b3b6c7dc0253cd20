"""The rule language: every matcher alone, ordering, defaults, exact error lines, plugins, counters."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
from types import SimpleNamespace

import pytest

from hybrid.engine.rules import Decision, RulesError, Verdict, compile_rules, load_rules
from hybrid.errors import ConfigError

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


class Pkt:
    """Stand-in for hybrid.packet.Packet; the lazy fields raise unless given, so a test fails if
    a rule parses HTTP/TLS/DNS for a packet its cheap fields already ruled out."""

    LAZY = ("http", "tls_sni", "dns_qname", "payload")

    def __init__(self, src="198.18.1.10", dst="198.18.2.2", proto=6, sport=40000, dport=80, tcp_flags=0x18,
                 icmp_type=-1, icmp_code=-1, payload=b"", payload_len=None, fragment=False, indev=None, **lazy):
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        self.version = s.version
        self.src_int, self.dst_int = int(s), int(d)
        self.src_bytes = s.packed
        self.proto, self.sport, self.dport, self.tcp_flags = proto, sport, dport, tcp_flags
        self.icmp_type, self.icmp_code, self.fragment, self.indev = icmp_type, icmp_code, fragment, indev
        self.payload_len = len(payload) if payload_len is None else payload_len
        self._lazy = {"payload": payload, **lazy}

    def __getattr__(self, name):
        if name in Pkt.LAZY:
            if name not in self._lazy:
                raise AssertionError(f"rule touched lazy attribute {name!r}")
            return self._lazy[name]
        raise AttributeError(name)


def rs(body: str, top: str = "", filename: str = "t.toml"):
    return compile_rules(top + '\n[[rule]]\nname = "r"\naction = "drop"\n' + body, filename)


def http(method="GET", host="example.com", path="/"):
    return SimpleNamespace(method=method, host=host, path=path)


# --- every matcher alone: (rule body, packet that matches, packet that does not)
MATCHERS = [
    ('proto = "tcp"', Pkt(), Pkt(proto=17)),
    ('proto = "udp"', Pkt(proto=17), Pkt()),
    ('proto = "icmp"', Pkt(proto=1), Pkt(proto=58)),
    ('proto = "icmpv6"', Pkt(proto=58, src="2001:2::1", dst="2001:2::2"), Pkt(proto=1)),
    ("proto = 47", Pkt(proto=47), Pkt()),
    ('src = "198.18.1.0/24"', Pkt(), Pkt(src="198.18.3.1")),
    ('src = ["10.0.0.0/8", "2001:2:0:1::/64"]', Pkt(src="2001:2:0:1::5", dst="2001:2::2"),
     Pkt(src="2001:2:0:2::5", dst="2001:2::2")),
    ('src = "0.0.0.0/0"', Pkt(), Pkt(src="2001:2::1", dst="2001:2::2")),      # v4 any never matches v6
    ('dst = "198.18.2.2/32"', Pkt(), Pkt(dst="198.18.2.3")),
    ('dst = "::/0"', Pkt(src="2001:2::1", dst="2001:2::2"), Pkt()),
    ("sport = 40000", Pkt(), Pkt(sport=40001)),
    ('dport = [53, "1000-2000"]', Pkt(dport=1500), Pkt(dport=2001)),
    ('dport = [53, "1000-2000"]', Pkt(dport=53), Pkt(dport=54)),
    ("dport = 80", Pkt(), Pkt(proto=1, dport=80)),          # ports imply a protocol with ports
    ('port = "79-81"', Pkt(sport=80, dport=9), Pkt(sport=1, dport=2)),
    ("port = 80", Pkt(), Pkt(sport=1, dport=2)),
    ('tcp_flags = "S/SA"', Pkt(tcp_flags=2), Pkt(tcp_flags=0x12)),
    ('tcp_flags = "R"', Pkt(tcp_flags=0x14), Pkt(tcp_flags=0x10)),
    ('tcp_flags = "/S"', Pkt(tcp_flags=0x10), Pkt(proto=17, tcp_flags=0)),   # implies tcp
    ('iif = "to-client"', Pkt(indev="to-client"), Pkt(indev="eth0")),
    ('iif = ["a", "b"]', Pkt(indev="b"), Pkt(indev=None)),
    ("fragment = true", Pkt(fragment=True), Pkt()),
    ("icmp_type = 8", Pkt(proto=1, icmp_type=8), Pkt(proto=1, icmp_type=0)),
    ("icmp_type = 8", Pkt(proto=1, icmp_type=8), Pkt(proto=6, icmp_type=8)),
    ('icmp_code = "1-3"', Pkt(proto=58, icmp_type=1, icmp_code=3), Pkt(proto=58, icmp_type=1, icmp_code=4)),
    ("payload_len = 32", Pkt(payload_len=32), Pkt(payload_len=33)),
    ('payload_len = "1-100"', Pkt(payload_len=1), Pkt(payload_len=0)),
    ('payload_contains = "GET /secret"', Pkt(payload=b"xx GET /secret yy"), Pkt(payload=b"GET /public")),
    ('payload_hex = "dead beef"', Pkt(payload=b"\x00\xde\xad\xbe\xef"), Pkt(payload=b"\xde\xad")),
    ("payload_regex = '^\\x16\\x03'", Pkt(payload=b"\x16\x03\x01"), Pkt(payload=b"\x00\x16\x03")),
    ('http_method = "POST"', Pkt(http=http("POST")), Pkt(http=http("GET"))),
    ('http_method = "POST"', Pkt(http=http("POST")), Pkt(http=None)),
    ('http_host = "example.com"', Pkt(http=http(host="Example.COM:8080")), Pkt(http=http(host="www.example.com"))),
    ('http_host = ".example.com"', Pkt(http=http(host="example.com")), Pkt(http=http(host="badexample.com"))),
    ('http_host = ".example.com"', Pkt(http=http(host="a.b.example.com")), Pkt(http=http(host="example.org"))),
    ('http_host = "*.example.com"', Pkt(http=http(host="www.example.com")), Pkt(http=http(host="example.com"))),
    ('http_path = "/admin"', Pkt(http=http(path="/admin/users")), Pkt(http=http(path="/public/admin"))),
    ('tls_sni = "*.example.org"', Pkt(tls_sni="cdn.example.org"), Pkt(tls_sni="example.org")),
    ('tls_sni = "api.example.org"', Pkt(tls_sni="API.example.org"), Pkt(tls_sni=None)),
    ('dns_qname = ".example.net"', Pkt(proto=17, dns_qname="example.net"), Pkt(proto=17, dns_qname="xample.net")),
    ('dns_qname = ".example.net"', Pkt(proto=17, dns_qname="a.example.net"), Pkt(proto=17, dns_qname=None)),
]


@pytest.mark.parametrize("body, hit, miss", MATCHERS, ids=[m[0] for m in MATCHERS])
def test_matcher_alone(body, hit, miss):
    ruleset = rs(body)
    assert ruleset.decide(hit).rule == "r"
    assert ruleset.decide(miss).rule is None


def test_cheap_fields_are_checked_before_lazy_ones():
    ruleset = rs('tls_sni = "x.example"\ndns_qname = "x.example"\nhttp_host = "x.example"\n'
                 'payload_regex = "x"\nproto = "udp"')
    assert ruleset.decide(Pkt(proto=6)).rule is None        # Pkt raises if a lazy field is read


def test_all_matchers_of_a_rule_must_hold():
    ruleset = rs('proto = "tcp"\ndport = 443\ntls_sni = ".bad.example"')
    assert ruleset.decide(Pkt(dport=443, tls_sni="www.bad.example")).rule == "r"
    assert ruleset.decide(Pkt(dport=8443, tls_sni="www.bad.example")).rule is None
    assert ruleset.decide(Pkt(dport=443, tls_sni="good.example")).rule is None


def test_first_match_wins():
    ruleset = compile_rules('[[rule]]\nname = "a"\ndport = 80\naction = "accept"\n'
                            '[[rule]]\nname = "b"\nproto = "tcp"\naction = "drop"\n', "t.toml")
    assert ruleset.decide(Pkt(dport=80)).rule == "a"
    assert ruleset.decide(Pkt(dport=81)) == Decision("b", "drop", None, None, None, "none", 300, True)
    assert ruleset.counters == {"a": 1, "b": 1}


def test_default_action_and_flow():
    ruleset = compile_rules('default = "drop"\ndefault_flow = "block"\nflow_ttl = 42\n', "t.toml")
    assert ruleset.decide(Pkt()) == Decision(None, "drop", None, None, None, "block", 42, True)
    assert compile_rules("", "t.toml").decide(Pkt()) == Decision(None, "accept", None, None, None, "none", 300,
                                                                  False)
    assert len(compile_rules("", "t.toml")) == 0


def test_decision_fields():
    d = compile_rules('[[rule]]\nname = "w"\nproto = "udp"\naction = "rewrite"\nrewrite = { fill = "h", '
                      'end = "\\n" }\nflow = "inspect"\nttl = 9', "t").decide(Pkt(proto=17))
    assert (d.action, d.rewrite, d.flow, d.ttl, d.log) == ("rewrite", ("fill", b"h", b"\n"), "inspect", 9, True)
    d = compile_rules('[[rule]]\nname = "m"\naction = "mark"\nmark = "0x10/0xff"\nlog = true\n', "t").decide(Pkt())
    assert (d.action, d.mark, d.log) == ("mark", (0x10, 0xFF), True)
    assert rs('flow = "bypass"').decide(Pkt()).flow == "bypass"
    spec = {'{ replace = ["ab", "cd"] }': ("replace", b"ab", b"cd"), '{ set = "hi" }': ("set", b"hi"),
            '{ set_hex = "0a0b" }': ("set", b"\n\x0b")}
    for text, want in spec.items():
        ruleset = compile_rules(f'[[rule]]\nname = "w"\nproto = "udp"\naction = "rewrite"\nrewrite = {text}\n', "t")
        assert ruleset.decide(Pkt(proto=17)).rewrite == want


def test_reject_default_depends_on_protocol():
    ruleset = compile_rules('[[rule]]\nname = "rj"\naction = "reject"\n', "t")
    assert ruleset.decide(Pkt()).reject_with == "tcp-reset"
    assert ruleset.decide(Pkt(proto=17)).reject_with == "icmp-port-unreachable"
    ruleset = compile_rules('[[rule]]\nname = "rj"\nproto = "udp"\naction = "reject"\n'
                            'reject_with = "icmp-admin-prohibited"\n', "t")
    assert ruleset.decide(Pkt(proto=17)).reject_with == "icmp-admin-prohibited"


def test_counters_count_each_decided_packet():
    ruleset = rs("dport = 80")
    for _ in range(3):
        ruleset.decide(Pkt())
    ruleset.decide(Pkt(dport=1))
    assert ruleset.counters == {"r": 3}
    assert ruleset.default_count == 1


def test_describe_lists_rules_then_default():
    out = rs('dport = [80, "8000-8080"]\nflow = "block"\nttl = 600').describe()
    assert out[0]["order"] == 1 and out[0]["name"] == "r" and out[0]["line"] == 2
    assert out[0]["match"] == {"dport": "80,8000-8080"}
    assert (out[0]["action"], out[0]["flow"], out[0]["ttl"]) == ("drop", "block", 600)
    assert out[-1]["name"] is None and out[-1]["action"] == "accept"


# --- compile errors: exact FILE:LINE: message
BAD = [
    ("default = \n", "b.toml:1: TOML syntax: invalid value at column 11; check the TOML syntax (strings in quotes, "
                     "one key = value per line, [[rule]] headers)"),
    ('[[rule]]\nname = "a"\nname = "b"\n', "b.toml:3: TOML syntax: cannot overwrite a value at column 11; a key "
                                           "or table is given twice; keep one"),
    ('defualt = "drop"\n', "b.toml:1: unknown top-level key 'defualt', did you mean 'default'?"),
    ('default = "reject"\n', 'b.toml:1: default \'reject\': write "accept" or "drop"'),
    ('default_flow = "skip"\n', "b.toml:1: default_flow 'skip': write one of none, bypass, block, inspect"),
    ('dport = 80\n', "b.toml:1: 'dport' is a rule key: put it under a [[rule]] header"),
    ('[rule]\nname = "a"\n', "b.toml:1: rules are an array of tables: write each one under a [[rule]] header"),
    ('[[rule]]\nname = "a"\naction = "drop"\ndprot = 80\n', "b.toml:4: unknown rule key 'dprot', did you mean "
                                                            "'dport'?"),
    ('[[rule]]\naction = "drop"\n', 'b.toml:1: rule without a name: add name = "..." (unique, letters, digits, '
                                    '-_.:)'),
    ('[[rule]]\nname = "a"\n', "b.toml:1: rule 'a' has no action: add action = \"drop\" (one of accept, drop, "
                               "reject, rewrite, mark)"),
    ('[[rule]]\nname = "a"\naction = "dorp"\n', "b.toml:3: action 'dorp': write one of accept, drop, reject, "
                                                "rewrite, mark (did you mean 'drop'?)"),
    ('[[rule]]\nname = "a"\naction = "drop"\n\n[[rule]]\nname = "a"\naction = "accept"\n',
     "b.toml:6: duplicate rule name 'a' (first at line 1); give every rule a unique name"),
    ('[[rule]]\nname = "a"\naction = "drop"\nsrc = "198.18.1.1/24"\n',
     'b.toml:4: src \'198.18.1.1/24\': host bits are set; write "198.18.1.0/24"'),
    ('[[rule]]\nname = "a"\naction = "drop"\ndst = ["10.0.0.0/8", "nope"]\n',
     "b.toml:4: dst 'nope': not a CIDR ('nope' does not appear to be an IPv4 or IPv6 network); write e.g. "
     "\"198.18.1.0/24\" or \"2001:2::/48\""),
    ('[[rule]]\nname = "a"\naction = "drop"\ndport = "2000-1000"\n',
     "b.toml:4: dport '2000-1000': the range is backwards; write \"1000-2000\""),
    ('[[rule]]\nname = "a"\naction = "drop"\nsport = 70000\n', "b.toml:4: sport 70000: values must be 0-65535"),
    ('[[rule]]\nname = "a"\naction = "drop"\nport = "x"\n',
     "b.toml:4: port 'x': write a port like 443, a range like \"1000-2000\", or a list of them"),
    ('[[rule]]\nname = "a"\nproto = "icmp"\ndport = 80\naction = "drop"\n',
     'b.toml:4: dport needs a protocol with ports: write proto = "tcp" or "udp", or remove the port'),
    ('[[rule]]\nname = "a"\nproto = "sctpp"\naction = "drop"\n',
     "b.toml:3: proto 'sctpp': use tcp, udp, icmp, icmpv6 or an IP protocol number 0-255"),
    ('[[rule]]\nname = "a"\naction = "drop"\ntcp_flags = "SX"\n',
     "b.toml:4: tcp_flags 'SX': unknown flag 'X'; write flags/mask letters from FSRPAUEC, e.g. \"S/SA\" (SYN set, "
     "ACK clear) or \"R\""),
    ('[[rule]]\nname = "a"\nproto = "udp"\naction = "drop"\ntcp_flags = "S"\n',
     'b.toml:5: tcp_flags only match TCP: write proto = "tcp" or remove tcp_flags'),
    ('[[rule]]\nname = "a"\naction = "drop"\npayload_regex = \'(\'\n',
     "b.toml:4: payload_regex '(' does not compile: missing ), unterminated subpattern at position 0; fix the "
     "pattern (use single quotes so backslashes stay as written)"),
    ('[[rule]]\nname = "a"\naction = "drop"\npayload_hex = "xyz"\n',
     "b.toml:4: payload_hex 'xyz': not hex; write pairs of hex digits like \"de ad be ef\""),
    ('[[rule]]\nname = "a"\nproto = 47\naction = "rewrite"\nrewrite = { set = "x" }\n',
     'b.toml:5: rewrite needs a packet with a payload: proto 47 is not rewritable; use proto = "tcp", "udp", '
     '"icmp" or "icmpv6"'),
    ('[[rule]]\nname = "a"\npayload_len = 0\naction = "rewrite"\nrewrite = { set = "x" }\n',
     "b.toml:5: rewrite on a rule that only matches empty payloads (payload_len = 0): change payload_len or the "
     "action"),
    ('[[rule]]\nname = "a"\naction = "rewrite"\n',
     'b.toml:3: action = "rewrite" needs a rewrite: add rewrite = { fill = "h", end = "\\n" }, '
     '{ replace = ["from", "to"] } or { set = "text" }'),
    ('[[rule]]\nname = "a"\naction = "drop"\nrewrite = { set = "x" }\n',
     "b.toml:4: rewrite only goes with action = \"rewrite\" (this rule's is 'drop')"),
    ('[[rule]]\nname = "a"\naction = "rewrite"\nrewrite = { fil = "h" }\n',
     "b.toml:4: rewrite: unknown key 'fil', did you mean 'fill'?"),
    ('[[rule]]\nname = "a"\naction = "mark"\nmark = "0x110/0xff"\n',
     'b.toml:4: mark \'0x110/0xff\': the value has bits outside the mask; write "0x110/0x1ff"'),
    ('[[rule]]\nname = "a"\naction = "drop"\nreject_with = "tcp-reset"\n',
     "b.toml:4: reject_with only goes with action = \"reject\" (this rule's is 'drop')"),
    ('[[rule]]\nname = "a"\naction = "reject"\nreject_with = "tcp-reset"\n',
     'b.toml:4: reject_with = "tcp-reset" only answers TCP: add proto = "tcp" or use "icmp-port-unreachable"'),
    ('[[rule]]\nname = "a"\naction = "drop"\nflow = "forever"\n',
     "b.toml:4: flow 'forever': write one of none, bypass, block, inspect"),
    ('[[rule]]\nname = "a"\naction = "drop"\nttl = 60\n',
     'b.toml:4: ttl is how long the flow verdict lasts: add flow = "bypass", "block" or "inspect", or remove ttl'),
    ('[[rule]]\nname = "a"\naction = "drop"\nflow = "block"\nttl = -1\n',
     "b.toml:5: ttl -1: write seconds the flow verdict lasts, e.g. 600"),
    ('[[rule]]\nname = "a"\naction = "drop"\ntls_sni = "a.*.example"\n',
     "b.toml:4: tls_sni 'a.*.example': a wildcard is only allowed as a leading \"*.\", e.g. \"*.example.com\""),
    ('[[rule]]\nname = "a"\naction = "drop"\nplugin = "mod:f"\n',
     'b.toml:4: plugin \'mod:f\': no plugin_paths declared; add plugin_paths = ["plugins"] at the top of the file '
     'and put mod.py there'),
    ('[[rule]]\nname = "a"\naction = "drop"\nplugin = "../evil:f"\n',
     "b.toml:4: plugin '../evil:f': module and function must be plain names (no dots or paths); write "
     "\"module:function\", with module.py in one of plugin_paths"),
    ('[[rule]]\nname = "ok"\naction = "drop"\n\n[[rule]]\nname = "a"\naction = "drop"\n  log = "yes"\n',
     "b.toml:8: log 'yes': write true or false"),
]


@pytest.mark.parametrize("text, line", BAD, ids=[b[1].split(": ", 1)[1][:40] for b in BAD])
def test_compile_error_is_one_located_line(text, line, tmp_path):
    with pytest.raises(RulesError) as info:
        compile_rules(text, "b.toml")
    assert str(info.value) == line
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_load_rules_errors(tmp_path):
    with pytest.raises(RulesError, match=r"^.*/missing\.toml: cannot read the rules file: No such file"):
        load_rules(tmp_path / "missing.toml")
    p = tmp_path / "latin.toml"
    p.write_bytes(b'default = "accept"\n# caf\xe9\n')
    with pytest.raises(RulesError, match=r"latin\.toml:2: not UTF-8 text; save the file as UTF-8$"):
        load_rules(p)


# --- plugins


@pytest.fixture
def plugin_dir(tmp_path):
    (tmp_path / "plugins").mkdir(mode=0o755)
    os.chmod(tmp_path / "plugins", 0o755)        # plugins must not be group-writable, whatever the umask
    shutil.copy(os.path.join(EXAMPLES, "plugins", "sizecheck.py"), tmp_path / "plugins" / "sizecheck.py")
    os.chmod(tmp_path / "plugins" / "sizecheck.py", 0o644)
    (tmp_path / "outside.py").write_text("def decide(p):\n    return None\n")
    return tmp_path


def write(dirpath, text):
    path = dirpath / "rules.toml"
    path.write_text(text)
    return path


def test_plugin_decides_from_plugin_paths(plugin_dir):
    ruleset = load_rules(write(plugin_dir, 'plugin_paths = ["plugins"]\n[[rule]]\nname = "big-udp"\n'
                                           'proto = "udp"\nplugin = "sizecheck:decide"\n'))
    d = ruleset.decide(Pkt(proto=17, payload_len=1400))
    assert d == Decision("big-udp", "drop", None, None, None, "block", 30, True)
    assert ruleset.decide(Pkt(proto=17, payload_len=10)).rule is None          # plugin said None
    assert ruleset.counters == {"big-udp": 1}
    assert ruleset.describe()[0]["plugin"] == "sizecheck:decide"


def test_plugin_outside_plugin_paths_is_refused(plugin_dir):
    path = write(plugin_dir, 'plugin_paths = ["plugins"]\n[[rule]]\nname = "x"\naction = "drop"\n'
                             'plugin = "outside:decide"\n')
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value) == (f"{path}:5: plugin 'outside:decide': outside.py not found in plugin_paths "
                               f"({plugin_dir / 'plugins'}); put it there or fix the name")


def test_plugin_from_sys_path_is_refused(plugin_dir):
    path = write(plugin_dir, 'plugin_paths = ["plugins"]\n[[rule]]\nname = "x"\nplugin = "os:system"\n')
    with pytest.raises(RulesError, match=r":4: plugin 'os:system': os\.py not found in plugin_paths"):
        load_rules(path)


def test_plugin_errors(plugin_dir):
    path = write(plugin_dir, 'plugin_paths = ["nowhere"]\n')
    with pytest.raises(RulesError, match=r"rules\.toml:1: plugin_paths 'nowhere': no such directory"):
        load_rules(path)
    path = write(plugin_dir, 'plugin_paths = ["plugins"]\n[[rule]]\nname = "x"\nplugin = "sizecheck:decid"\n')
    with pytest.raises(RulesError, match=r":4: plugin 'sizecheck:decid': .*has no 'decid'; did you mean "
                                         r"sizecheck:decide\?$"):
        load_rules(path)
    (plugin_dir / "plugins" / "broken.py").write_text("raise ImportError('needs numpy')\n")
    path = write(plugin_dir, 'plugin_paths = ["plugins"]\n[[rule]]\nname = "x"\nplugin = "broken:f"\n')
    with pytest.raises(RulesError, match=r":4: plugin 'broken:f': importing .*broken\.py failed: ImportError: "
                                         r"needs numpy; fix the module$"):
        load_rules(path)


def test_failing_plugin_is_counted_not_matching_and_logged_rate_limited(plugin_dir, caplog):
    ruleset = load_rules(write(plugin_dir, 'plugin_paths = ["plugins"]\n[[rule]]\nname = "boom"\n'
                                           'plugin = "sizecheck:explode"\n[[rule]]\nname = "next"\n'
                                           'action = "drop"\n'))
    with caplog.at_level(logging.WARNING, logger="hybrid.engine.rules"):
        decisions = [ruleset.decide(Pkt()) for _ in range(5)]
    assert {d.rule for d in decisions} == {"next"}
    assert ruleset.plugin_errors == {"boom": 5}
    assert ruleset.counters == {"boom": 0, "next": 5}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["rule boom: plugin failed, rule treated as not matching: RuntimeError: example failure"]


def test_plugin_returning_garbage_counts_as_failure(plugin_dir):
    (plugin_dir / "plugins" / "odd.py").write_text(
        "from hybrid.plugin import Verdict\n"
        "def text(p):\n    return 'drop'\n"
        "def bad_action(p):\n    return Verdict('explode')\n"
        "def zero_ttl(p):\n    return Verdict('accept', flow='bypass', ttl=0)\n"
        "def text_ttl(p):\n    return Verdict('accept', flow='bypass', ttl='soon')\n"
        "def marks(p):\n    return Verdict('mark', mark=7)\n")
    ruleset = load_rules(write(plugin_dir, 'plugin_paths = ["plugins"]\n'
                                           '[[rule]]\nname = "t"\nplugin = "odd:text"\n'
                                           '[[rule]]\nname = "b"\nplugin = "odd:bad_action"\n'
                                           '[[rule]]\nname = "z"\nplugin = "odd:zero_ttl"\n'
                                           '[[rule]]\nname = "s"\nplugin = "odd:text_ttl"\n'
                                           '[[rule]]\nname = "m"\nplugin = "odd:marks"\n'))
    d = ruleset.decide(Pkt())
    assert (d.rule, d.action, d.mark) == ("m", "mark", (7, 0xFFFFFFFF))
    assert ruleset.plugin_errors == {"t": 1, "b": 1, "z": 1, "s": 1, "m": 0}


# --- plugins: who may own them, and checking without importing

NOBODY = 65534


def plugin_rules(plugin_dir, ref="side:decide"):
    return write(plugin_dir, f'plugin_paths = ["plugins"]\n[[rule]]\nname = "p"\nplugin = "{ref}"\n')


def side_effect_plugin(plugin_dir):
    """A plugin whose import writes a file: the proof that it ran."""
    proof = plugin_dir / "imported"
    (plugin_dir / "plugins" / "side.py").write_text(f"open({str(proof)!r}, 'w').close()\n"
                                                    "def decide(p):\n    return None\n")
    return proof


def test_checking_a_plugin_does_not_run_it(plugin_dir):
    proof = side_effect_plugin(plugin_dir)
    ruleset = load_rules(plugin_rules(plugin_dir), import_plugins=False)
    assert not proof.exists()
    assert ruleset.plugins_imported is False and ruleset.has_plugins
    assert ruleset.describe()[0]["plugin"] == "side:decide"
    assert ruleset.decide(Pkt()).rule is None and ruleset.plugin_errors == {"p": 1}   # never runs
    load_rules(plugin_rules(plugin_dir))                                               # the engine's way
    assert proof.exists()


@pytest.mark.parametrize("source, ref, error", [
    ("def decide(p):\n    return None\n", "side:decid", "has no 'decid'; did you mean side:decide?"),
    ("def helper(p):\n    return None\n", "side:other", "has no 'other'; define it"),
    ("class decide:\n    pass\n", "side:decide", None),
    ("try:\n    from x import decide\nexcept ImportError:\n    decide = None\n", "side:decide", None),
    ("if True:\n    def decide(p):\n        return None\n", "side:decide", None),
    ("a, (b, *decide) = 1, (2, 3)\n", "side:decide", None),
    ("import os\nos.decide = 1\nx: int\n", "side:decide", "has no 'decide'; define it"),
    ("def decide(p)\n    return None\n", "side:decide", "does not parse: SyntaxError: expected ':' (line 1); "
                                                       "fix the module"),
])
def test_checking_a_plugin_finds_the_function_at_top_level(plugin_dir, source, ref, error):
    (plugin_dir / "plugins" / "side.py").write_text(source)
    path = plugin_rules(plugin_dir, ref)
    if error is None:
        load_rules(path, import_plugins=False)
        return
    with pytest.raises(RulesError) as info:
        load_rules(path, import_plugins=False)
    assert str(info.value) == f"{path}:4: plugin '{ref}': {plugin_dir / 'plugins' / 'side.py'} {error}"


def test_group_writable_plugin_behind_a_symlink_is_refused(plugin_dir):
    lib = plugin_dir / "plugins" / "lib"
    lib.mkdir()
    target = lib / "real.py"
    target.write_text("def decide(p):\n    return None\n")
    os.chmod(target, 0o664)
    (plugin_dir / "plugins" / "side.py").symlink_to(target)
    path = plugin_rules(plugin_dir)
    for import_plugins in (True, False):
        with pytest.raises(RulesError) as info:
            load_rules(path, import_plugins=import_plugins)
        assert str(info.value) == (
            f"{path}:4: plugin 'side:decide': {target} (where {plugin_dir / 'plugins' / 'side.py'} leads) is "
            f"writable by group (mode 0664); plugins run as root in the engine: run chmod go-w {target}")
    os.chmod(target, 0o644)
    os.chmod(lib, 0o757)                 # the directory between the module and its plugin directory
    with pytest.raises(RulesError, match=rf":4: plugin 'side:decide': {lib} is writable by others \(mode 0757\); "
                                         rf"plugins run as root in the engine: run chmod go-w {lib}$"):
        load_rules(path)
    os.chmod(lib, 0o755)
    assert load_rules(path).decide(Pkt()).rule is None


def test_plugin_symlink_leading_out_of_its_directory_is_refused(plugin_dir):
    (plugin_dir / "plugins" / "side.py").symlink_to(plugin_dir / "outside.py")
    path = plugin_rules(plugin_dir)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value) == (
        f"{path}:4: plugin 'side:decide': {plugin_dir / 'plugins' / 'side.py'} leads to {plugin_dir / 'outside.py'}, "
        f"outside its plugin directory {plugin_dir / 'plugins'}; put the module itself there, or add its directory "
        f"to plugin_paths")


def test_world_writable_plugin_directory_is_refused(plugin_dir):
    proof = side_effect_plugin(plugin_dir)
    plugins = plugin_dir / "plugins"
    os.chmod(plugins, 0o777)
    path = plugin_rules(plugin_dir)
    with pytest.raises(RulesError) as info:
        load_rules(path, import_plugins=False)
    assert str(info.value) == (f"{path}:1: plugin_paths 'plugins': {plugins} is writable by group and others "
                               f"(mode 0777); plugins run as root in the engine: run chmod go-w {plugins}")
    os.chmod(plugins, 0o1777)            # sticky or not: anyone may add a module
    with pytest.raises(RulesError, match=r"\(mode 1777\)"):
        load_rules(path)
    assert not proof.exists()


def test_plugin_directory_through_a_symlink_is_checked_where_it_leads(plugin_dir):
    real = plugin_dir / "real-plugins"
    real.mkdir()
    (real / "side.py").write_text("def decide(p):\n    return None\n")
    shutil.rmtree(plugin_dir / "plugins")
    (plugin_dir / "plugins").symlink_to(real)
    path = plugin_rules(plugin_dir)
    load_rules(path)
    os.chmod(real, 0o775)
    with pytest.raises(RulesError, match=rf"^{path}:1: plugin_paths 'plugins': {real} \(where "
                                         rf"{plugin_dir / 'plugins'} leads\) is writable by group \(mode 0775\)"):
        load_rules(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_plugin_owned_by_another_user_is_refused(plugin_dir):
    proof = side_effect_plugin(plugin_dir)
    module = plugin_dir / "plugins" / "side.py"
    os.chown(module, NOBODY, NOBODY)
    path = plugin_rules(plugin_dir)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value).startswith(f"{path}:4: plugin 'side:decide': {module} is owned by uid {NOBODY}")
    assert str(info.value).endswith(f", not root; plugins run as root in the engine: run chown root: {module} && "
                                    f"chmod go-w {module}")
    os.chmod(module, 0o666)
    with pytest.raises(RulesError, match=r", not root and writable by group and others \(mode 0666\); plugins run "
                                         r"as root in the engine: run chown root: "):
        load_rules(path)
    assert not proof.exists()
    os.chown(module, 0, 0)
    os.chown(plugin_dir / "plugins", NOBODY, NOBODY)
    with pytest.raises(RulesError, match=rf"^{path}:1: plugin_paths 'plugins': {plugin_dir / 'plugins'} is owned by "
                                         rf"uid {NOBODY}"):
        load_rules(path)


def test_plugin_owners_are_root_and_a_non_root_invoker(monkeypatch):
    from hybrid.engine import rules
    monkeypatch.setattr(rules.os, "geteuid", lambda: 0)
    assert rules.plugin_owners() == (0,)
    monkeypatch.setattr(rules.os, "geteuid", lambda: 4242)        # a developer's `rules check`
    assert rules.plugin_owners() == (0, 4242)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_not_running_as_root_another_users_plugin_is_refused(plugin_dir, monkeypatch):
    from hybrid.engine import rules
    module = plugin_dir / "plugins" / "side.py"
    side_effect_plugin(plugin_dir)
    os.chown(module, NOBODY, NOBODY)
    path = plugin_rules(plugin_dir)
    monkeypatch.setattr(rules.os, "geteuid", lambda: NOBODY)      # nobody checking nobody's plugin
    load_rules(path, import_plugins=False)
    monkeypatch.setattr(rules.os, "geteuid", lambda: 4242)
    with pytest.raises(RulesError, match=rf"{module} is owned by uid {NOBODY}.*, not root or you \(uid 4242\); "):
        load_rules(path, import_plugins=False)


# --- marks: hybrid's own bits are not a rule's or a plugin's to set

MASK = 0x100000


@pytest.mark.parametrize("mark, error", [
    ('"0x100000/0x100000"', "mark '0x100000/0x100000': its mask 0x100000 overlaps hybrid's mark mask 0x100000, "
                            "bits the engine owns (setting them would send the packet back to the queue for ever); "
                            "use bits outside 0x100000"),
    ('"0x10/0x1000ff"', "mark '0x10/0x1000ff': its mask 0x1000ff overlaps hybrid's mark mask 0x100000, bits the "
                        "engine owns (setting them would send the packet back to the queue for ever); leave them "
                        "out: mark = \"0x10/0xff\""),
    ("16", "mark 16: a bare number means mask 0xffffffff, which overlaps hybrid's mark mask 0x100000, bits the "
           "engine owns (setting them would send the packet back to the queue for ever); leave them out: "
           "mark = \"0x10/0xffefffff\""),
])
def test_mark_overlapping_hybrids_mask_is_refused(mark, error):
    text = f'[[rule]]\nname = "a"\naction = "mark"\nmark = {mark}\n'
    with pytest.raises(RulesError) as info:
        compile_rules(text, "b.toml", mark_mask=MASK)
    assert str(info.value) == f"b.toml:4: {error}"
    compile_rules(text, "b.toml")                                  # no mask given: not checked
    compile_rules(text.replace(mark, '"0x10/0xff"'), "b.toml", mark_mask=MASK)


def test_plugin_mark_overlapping_hybrids_mask_is_a_plugin_failure(plugin_dir, caplog):
    (plugin_dir / "plugins" / "marks.py").write_text(
        "from hybrid.plugin import Verdict\n"
        "def ours(p):\n    return Verdict('mark', mark=(0x100000, 0x100000))\n"
        "def whole(p):\n    return Verdict('mark', mark=7)\n"
        "def fine(p):\n    return Verdict('mark', mark=(0x42, 0xff))\n")
    path = write(plugin_dir, 'plugin_paths = ["plugins"]\n'
                             '[[rule]]\nname = "o"\nplugin = "marks:ours"\n'
                             '[[rule]]\nname = "w"\nplugin = "marks:whole"\n'
                             '[[rule]]\nname = "f"\nplugin = "marks:fine"\n')
    ruleset = load_rules(path, mark_mask=MASK)
    with caplog.at_level(logging.WARNING, logger="hybrid.engine.rules"):
        d = ruleset.decide(Pkt())
    assert (d.rule, d.action, d.mark) == ("f", "mark", (0x42, 0xFF))
    assert ruleset.plugin_errors == {"o": 1, "w": 1, "f": 0}
    assert caplog.records[0].getMessage() == (
        "rule o: plugin failed, rule treated as not matching: ValueError: Verdict mark 0x100000/0x100000 overlaps "
        "hybrid's mark mask 0x100000 (the packet would be queued again for ever); not applied")
    assert load_rules(path).decide(Pkt()).rule == "o"              # no mask given: not checked


def test_verdict_defaults():
    assert Verdict("drop") == ("drop", None, None, None, None, None, None)


# --- the example files


def test_example_rewrite():
    ruleset = load_rules(os.path.join(EXAMPLES, "rules", "rewrite.toml"))
    d = ruleset.decide(Pkt(proto=17, dport=10010, payload=b"hello"))
    assert (d.action, d.rewrite) == ("rewrite", ("fill", b"h", b"\n"))
    assert ruleset.decide(Pkt(proto=17, dport=10086, payload=b"x")).action == "drop"
    assert ruleset.decide(Pkt(proto=1, icmp_type=8, icmp_code=0, payload=b"a" * 32)).rule == "ping-32-accept"
    assert ruleset.decide(Pkt(proto=1, icmp_type=8, icmp_code=0, payload=b"a" * 56)).action == "drop"
    assert ruleset.decide(Pkt(proto=1, icmp_type=0, icmp_code=0, payload=b"a" * 56)).rule is None   # reply
    assert ruleset.decide(Pkt(proto=17, dport=10087, payload=b"x")) == ruleset.default
    assert ruleset.default.action == "accept"


def test_example_realistic():
    ruleset = load_rules(os.path.join(EXAMPLES, "rules", "realistic.toml"))
    d = ruleset.decide(Pkt(dport=80, payload=b"GET", http=http(host="www.blocked.example")))
    assert (d.rule, d.action, d.reject_with, d.flow) == ("block-http-host", "reject", "tcp-reset", "block")
    d = ruleset.decide(Pkt(dport=443, payload=b"\x16", http=None, tls_sni="t.tracker.example"))
    assert (d.rule, d.flow, d.ttl) == ("block-tls-sni", "block", 600)
    d = ruleset.decide(Pkt(proto=17, sport=5353, dport=53, payload=b"q", dns_qname="x.ads.example"))
    assert (d.rule, d.action, d.flow, d.ttl) == ("block-dns-name", "drop", "block", 60)
    syn = ruleset.decide(Pkt(tcp_flags=2, http=None, tls_sni=None))
    assert (syn.rule, syn.flow) == ("wait-for-payload", "none")     # no bypass before the ClientHello
    d = ruleset.decide(Pkt(dport=443, payload=b"\x16", http=None, tls_sni="www.example.org"))
    assert (d.rule, d.action, d.flow) == (None, "accept", "bypass")
    d = ruleset.decide(Pkt(proto=17, dport=53, payload=b"q", dns_qname="example.org"))
    assert (d.rule, d.flow) == (None, "bypass")


def test_example_realistic_with_the_real_decoder():
    import struct

    from hybrid.engine import packet

    def ipv4_tcp(payload: bytes, flags: int) -> bytes:
        tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, flags, 65535, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0, 64, 6, 0,
                         bytes([198, 18, 1, 10]), bytes([198, 18, 2, 2]))
        return ip + tcp + payload

    ruleset = load_rules(os.path.join(EXAMPLES, "rules", "realistic.toml"))
    req = b"GET / HTTP/1.1\r\nHost: shop.blocked.example\r\n\r\n"
    assert ruleset.decide(packet.decode(ipv4_tcp(req, 0x18))).rule == "block-http-host"
    assert ruleset.decide(packet.decode(ipv4_tcp(b"", 0x02))).rule == "wait-for-payload"


# --- the compiler's table of match keys


def test_every_rule_key_is_the_name_a_match_key_or_a_decision_key():
    from hybrid.engine.rules import DECISION_KEYS, MATCH_KEYS, RULE_KEYS
    names = [k.name for k in MATCH_KEYS]
    assert sorted(RULE_KEYS) == sorted(["name", *names, *DECISION_KEYS])
    assert len(set(names)) == len(names) and not set(names) & set(DECISION_KEYS)


def test_rules_check_shows_the_parsed_values_in_table_order():
    out = rs("http_host = [\"Example.COM.\", \"*.a.example\"]\npayload_regex = '^\\x16'\n"
             'src = ["10.0.0.0/8", "2001:2::/48"]\ntcp_flags = "sa/sa"\nsport = [443, "1000-2000", 443]\n'
             'proto = "tcp"\n').describe()
    assert out[0]["match"] == {"proto": "tcp", "sport": "443,1000-2000,443", "tcp_flags": "SA/SA",
                               "src": "10.0.0.0/8,2001:2::/48", "payload_regex": "'^\\\\x16'",
                               "http_host": "example.com,*.a.example"}


def test_an_error_in_a_rule_sub_table_names_the_sub_table():
    with pytest.raises(RulesError) as info:
        compile_rules('[[rule]]\nname = "a"\naction = "drop"\n\n[rule.rewrite]\nset = "x"\n', "b.toml")
    assert str(info.value) == "b.toml:5: rewrite only goes with action = \"rewrite\" (this rule's is 'drop')"
