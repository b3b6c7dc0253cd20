"""RuleSet.needs_syn: whether any bare TCP SYN can get a decision other than a silent accept that
leaves its flow alone. When not, the engine tells the kernel not to queue SYNs; being wrong in
that direction would let a rule miss packets it should act on, so every doubtful rule says True.
The last test checks the analysis against the real decisions on real SYN packets."""

from __future__ import annotations

import textwrap

import pytest

from hybrid.engine.packet import decode
from hybrid.engine.rules import load_rules

pytestmark = pytest.mark.unit

WAIT = '''
[[rule]]
name = "wait-for-payload"
proto = "tcp"
payload_len = 0
action = "accept"
flow = "none"
log = false
'''


def needs(tmp_path, body: str, head: str = 'default = "accept"\ndefault_flow = "bypass"\n') -> bool:
    p = tmp_path / "r.toml"
    p.write_text(head + textwrap.dedent(body))
    return load_rules(p).needs_syn


def test_payload_rules_then_wait_for_payload_need_no_syn(tmp_path):
    assert not needs(tmp_path, '''
        [[rule]]
        name = "host"
        proto = "tcp"
        http_host = ".blocked.example"
        action = "reject"
        flow = "block"
        ''' + WAIT)


def test_default_bypass_without_a_wait_rule_decides_on_the_syn(tmp_path):
    # The SYN itself would be accepted *and bypassed*: an effect, so SYNs must be queued.
    assert needs(tmp_path, "")


def test_default_accept_flow_none_needs_no_syn(tmp_path):
    assert not needs(tmp_path, "", head='default = "accept"\ndefault_flow = "none"\n')


@pytest.mark.parametrize("rule", [
    'proto = "tcp"\ndport = 22\naction = "drop"',                       # acts on SYNs to a port
    'src = "198.18.9.0/24"\naction = "reject"',                         # by address, any proto
    'proto = "tcp"\ntcp_flags = "S/SA"\naction = "accept"\nlog = true',  # logs SYNs
    'proto = "tcp"\npayload_len = 0\naction = "accept"\nflow = "bypass"',  # bypasses on the SYN
    'proto = "tcp"\npayload_regex = "^"\naction = "drop"',              # a regex may match nothing
])
def test_a_rule_that_may_act_on_a_syn_before_the_wait_rule_needs_it(tmp_path, rule):
    assert needs(tmp_path, f"[[rule]]\nname = \"r\"\n{rule}\n" + WAIT)


@pytest.mark.parametrize("rule", [
    'proto = "udp"\ndport = 53\naction = "drop"',                       # not TCP
    'proto = "tcp"\npayload_len = "1-100"\naction = "drop"',            # needs payload
    'proto = "tcp"\ntcp_flags = "R"\naction = "drop"',                  # not a SYN
    'fragment = true\naction = "drop"',                                 # SYNs are not fragments
    'proto = "tcp"\ndns_qname = "x.example"\naction = "drop"',
])
def test_rules_that_cannot_match_a_syn_do_not_count(tmp_path, rule):
    assert not needs(tmp_path, f"[[rule]]\nname = \"r\"\n{rule}\n" + WAIT)


def test_a_silent_accept_of_some_syns_does_not_stop_the_search(tmp_path):
    # Port 80's SYNs are accepted silently, but others reach the default, which bypasses.
    assert needs(tmp_path, '''
        [[rule]]
        name = "web"
        proto = "tcp"
        dport = 80
        action = "accept"
        flow = "none"
        log = false
        ''')


def test_a_plugin_that_may_see_syns_needs_them(tmp_path):
    plugdir = tmp_path / "plugins"
    plugdir.mkdir()
    (plugdir / "p.py").write_text("def check(pkt):\n    return None\n")
    assert needs(tmp_path, '''
        [[rule]]
        name = "plug"
        proto = "tcp"
        plugin = "p:check"
        ''' + WAIT, head=f'default = "accept"\ndefault_flow = "bypass"\nplugin_paths = ["{plugdir}"]\n')


@pytest.mark.parametrize("path", ["examples/rules/realistic.toml", "scripts/bench-rules.toml",
                                  "examples/rules/rewrite.toml"])
def test_analysis_agrees_with_real_decisions_on_syns(path):
    """For the shipped rule files: when needs_syn is False, real SYNs (IPv4 and IPv6, plain
    and with ECN bits, to the ports the files mention) are all decided as a silent accept."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    rules = load_rules(path)
    if rules.needs_syn:
        pytest.skip(f"{path} needs SYNs: nothing to cross-check")
    for ip in (IP(src="198.18.1.2", dst="198.18.2.2"), IPv6(src="2001:2:0:1::2", dst="2001:2:0:2::2")):
        for dport in (22, 53, 80, 443, 8080):
            for flags in ("S", "SE", "SEC"):
                pkt = decode(bytes(ip / TCP(sport=40000, dport=dport, flags=flags)))
                d = rules.decide(pkt)
                assert (d.action, d.flow, d.mark, d.rewrite, d.log) == ("accept", "none", None, None, False), \
                    (path, dport, flags, d)


@pytest.mark.parametrize("rule", [
    'proto = "tcp"\npayload_contains = "\'\'"\naction = "drop"',     # its text shows as quotes: still text
    'proto = "tcp"\ntcp_flags = "sa/sa"\naction = "drop"',            # SYN-ACKs only, however it is written
    'proto = "tcp"\npayload_len = "1-1"\naction = "drop"',
])
def test_the_analysis_reads_the_parsed_values(tmp_path, rule):
    assert not needs(tmp_path, f"[[rule]]\nname = \"r\"\n{rule}\n" + WAIT)
