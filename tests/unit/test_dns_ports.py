"""dns_ports: which ports carry DNS (the dns_qname view, the following of every message)."""

from __future__ import annotations

import pytest
from scapy.all import DNS, DNSQR, IP, UDP

from hybrid.engine.packet import Packet, decode
from hybrid.engine.rules import RulesError, compile_rules

RULE = '[[rule]]\nname = "ads"\ndns_qname = ".ads.example"\naction = "drop"\n'


def query(dport: int) -> Packet:
    return decode(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=40000, dport=dport)
                        / DNS(rd=1, qd=DNSQR(qname="x.ads.example"))))


@pytest.fixture(autouse=True)
def _restore():
    yield
    Packet.dns_ports = frozenset((53,))


def test_default_is_53_only():
    rs = compile_rules(RULE, "t.toml")
    assert rs.dns_ports == {53}
    assert rs.decide(query(53)).action == "drop"
    assert rs.decide(query(5353)).action == "accept"


def test_configured_ports_are_read_as_dns():
    rs = compile_rules("dns_ports = [53, 5353]\n" + RULE, "t.toml")
    assert rs.decide(query(5353)).action == "drop" and rs.decide(query(53)).action == "drop"
    other = compile_rules(RULE, "u.toml")                 # the next rules decide with their own ports
    assert other.decide(query(5353)).action == "accept"


@pytest.mark.parametrize("value", ["[]", "[0]", "[70000]", '"53"', "[true]", "53"])
def test_bad_values_are_one_line(value):
    with pytest.raises(RulesError) as e:
        compile_rules(f"dns_ports = {value}\n" + RULE, "t.toml")
    assert "dns_ports" in str(e.value) and "\n" not in str(e.value)
