"""The HYBRID chain on a real (nf_tables or legacy) iptables inside a namespace."""

import pytest

from hybrid.kernel import netfilter as nf

pytestmark = pytest.mark.integration


def save(lab, cmd="iptables-save"):
    """The filter table without iptables-save's timestamped comment lines."""
    out = lab.run("gw", [cmd, "-t", "filter"]).stdout
    return "".join(ln for ln in out.splitlines(keepends=True) if not ln.startswith("#"))


def test_install_is_idempotent_and_removal_complete(lab):
    gw = lab.netns("gw")
    lab.run("gw", ["iptables", "-A", "FORWARD", "-s", "192.0.2.0/24", "-j", "DROP"])  # a user's rule
    before = save(lab)
    rule = nf.QueueRule(0x100000, 0x100000, 0, 1, hooks=("forward", "input"))
    nf.install(rule, netns=gw)
    nf.install(rule, netns=gw)
    text = save(lab)
    assert text.count("-j HYBRID") == 2           # one jump per hook, not four
    assert text.count("NFQUEUE --queue-balance 0:1 --queue-bypass") == 1
    assert save(lab, "ip6tables-save").count("-j HYBRID") == 2
    st = {s.family: s for s in nf.status(netns=gw)}
    assert st["ipv4"].installed and sorted(st["ipv4"].hooks) == ["forward", "input"]
    assert nf.remove(netns=gw) == ["ipv4", "ipv6"]
    assert nf.remove(netns=gw) == []
    assert save(lab) == before                    # the user's rule untouched, nothing of ours left
    assert nf.leftovers(gw) == []


def test_marked_packets_match_the_queue_rule_and_pass_with_bypass(lab):
    """With --queue-bypass and no engine bound, marked packets still pass (fail-open), and the
    queue rule counts exactly the marked ones."""
    gw = lab.netns("gw")
    nf.install(nf.QueueRule(0x100000, 0x100000), netns=gw)
    try:
        # Mark ICMP echo requests from the client the way the tc program would.
        lab.run("gw", ["iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "icmp", "--icmp-type", "echo-request",
                       "-j", "MARK", "--set-xmark", "0x100000/0x100000"])
        assert lab.ping("client", lab.info.server.ipv4, count=3)
        st = {s.family: s for s in nf.status(netns=gw)}
        assert st["ipv4"].queued_packets == 3
    finally:
        lab.run("gw", ["iptables", "-t", "mangle", "-F", "PREROUTING"])
        nf.remove(netns=gw)


def test_fail_closed_drops_marked_packets_without_engine(lab):
    gw = lab.netns("gw")
    nf.install(nf.QueueRule(0x100000, 0x100000, fail_open=False, families=("ipv4",)), netns=gw)
    try:
        lab.run("gw", ["iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "icmp", "--icmp-type", "echo-request",
                       "-j", "MARK", "--set-xmark", "0x100000/0x100000"])
        assert not lab.ping("client", lab.info.server.ipv4, count=1, timeout=1)
        assert lab.ping("client", lab.info.server.ipv6)   # ipv6 not queued: unaffected
    finally:
        lab.run("gw", ["iptables", "-t", "mangle", "-F", "PREROUTING"])
        nf.remove(netns=gw)
