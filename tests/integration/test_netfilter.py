"""The HYBRID chain on a real (nf_tables or legacy) iptables inside a namespace."""

import itertools
import time

import pytest
from gwlab import wait_for

from hybrid.kernel import netfilter as nf
from hybrid.lab import craft
from hybrid.lab.servers import UdpSink

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


# -- fragments: the queue rule makes the namespace reassemble ---------------------------------------
MARK = "0x100000/0x100000"


def counted(lab, family: str, chain: str, comment: str, table: str = "filter") -> int:
    """Packets counted by the rule of ``chain`` that carries ``comment``."""
    out = lab.run("gw", [nf.FAMILIES[family][0], "-t", table, "-c"]).stdout
    return sum(int(ln[1:].split(":", 1)[0]) for ln in out.splitlines()
               if f"-A {chain} " in ln and f"--comment {comment}" in ln)


def addrs(lab, family: str, to_gw: bool = False) -> tuple[str, str]:
    v6 = family == "ipv6"
    far = lab.info.gw_client if to_gw else lab.info.server
    return ((lab.info.client.ipv6, far.ipv6) if v6 else (lab.info.client.ipv4, far.ipv4))


_idents = itertools.count(0x5150)


def send_fragmented(lab, family: str, to_gw: bool = False, port: int = 9999) -> None:
    """One 64-byte UDP datagram client -> server (or the gateway) in three fragments."""
    src, dst = addrs(lab, family, to_gw)
    seg = craft.udp(src, dst, 40000, port, bytes(range(56)))
    craft.send_ip(lab.netns("client"), craft.fragments(src, dst, craft.UDP, seg, (16, 40), ident=next(_idents)))


def probed(lab, family: str) -> int:
    return counted(lab, family, "FORWARD", "probe", table="mangle")


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_queue_rule_sees_whole_datagrams_and_removal_gives_fragments_back(lab, family):
    """A fragmented datagram meets the queue rule once, reassembled, in FORWARD and INPUT; the
    server still gets it. Without hybrid's rule the gateway namespace (which uses no conntrack)
    forwards the fragments one by one, and does so again once the rule is removed."""
    gw, ipt = lab.netns("gw"), nf.FAMILIES[family][0].replace("-save", "")
    # Counted in mangle FORWARD, which runs before the filter table's queue rule.
    probe = ["-t", "mangle", "FORWARD", "-s", addrs(lab, family)[0], "-m", "comment", "--comment", "probe"]
    lab.run("gw", [ipt, *probe[:2], "-A", *probe[2:]])
    lab.run("gw", [ipt, "-t", "mangle", "-A", "PREROUTING", "-s", addrs(lab, family)[0],
                   "-j", "MARK", "--set-xmark", MARK])
    try:
        with UdpSink(lab, port=9999) as sink:
            send_fragmented(lab, family)
            sink.wait(1)
            assert probed(lab, family) == 3      # the problem: one by one
            nf.install(nf.QueueRule(0x100000, 0x100000, hooks=("forward", "input"), families=(family,)), netns=gw)
            st = nf.status((family,), netns=gw)[0]
            assert st.reassembles and st.queued_packets == 0
            send_fragmented(lab, family)
            sink.wait(2)
            assert probed(lab, family) == 4
            assert nf.status((family,), netns=gw)[0].queued_packets == 1
            send_fragmented(lab, family, to_gw=True)                  # INPUT
            wait_for(lambda: nf.status((family,), netns=gw)[0].queued_packets == 2, what="the INPUT datagram")
            assert nf.remove((family,), netns=gw) == [family]
            # The defrag hooks go with the last conntrack user, asynchronously: a datagram sent
            # meanwhile may be counted whole, or lost half-reassembled at the gateway.
            deadline = time.monotonic() + 10
            while True:
                before, got = probed(lab, family), len(sink.received)
                send_fragmented(lab, family)
                time.sleep(0.3)
                if probed(lab, family) - before == 3 or time.monotonic() > deadline:
                    break
            assert probed(lab, family) - before == 3
            sink.wait(got + 1)                  # ... and the server reassembles them
    finally:
        lab.run("gw", [ipt, "-t", "mangle", "-F", "PREROUTING"])
        lab.run("gw", [ipt, *probe[:2], "-D", *probe[2:]])
        nf.remove(netns=gw)


STATES = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED")


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_conntrack_match_lets_every_marked_packet_through_to_the_queue(lab, family):
    """The match is there for defragmentation only: marked packets in each conntrack state (a
    ping and its replies, an ICMP port unreachable, a SYN+FIN, an untracked datagram) all meet
    the queue rule, counted against a rule per state in front of it."""
    gw = lab.netns("gw")
    ipt = nf.FAMILIES[family][0].replace("-save", "")
    src, dst = addrs(lab, family)
    nf.install(nf.QueueRule(0x100000, 0x100000, families=(family,)), netns=gw)
    try:
        lab.run("gw", [ipt, "-t", "mangle", "-A", "PREROUTING", "-j", "MARK", "--set-xmark", MARK])
        lab.run("gw", [ipt, "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "9", "-j", "CT", "--notrack"])
        for state in STATES:
            lab.run("gw", [ipt, "-I", "FORWARD", "1", "-m", "conntrack", "--ctstate", state,
                           "-m", "comment", "--comment", f"state-{state}"])
        assert lab.ping("client", dst, count=3)                                    # NEW, ESTABLISHED
        craft.send_ip(lab.netns("client"), [craft.fragment(src, dst, craft.UDP, craft.udp(src, dst, 40001, 7, b"x"),
                                                           0, False, 0)])          # port unreachable: RELATED
        craft.send_ip(lab.netns("client"), [craft.fragment(src, dst, craft.UDP, craft.udp(src, dst, 40002, 9, b"x"),
                                                           0, False, 0)])          # UNTRACKED
        craft.send_ip(lab.netns("client"), [craft.fragment(
            src, dst, craft.TCP, craft.tcp(src, dst, 40003, 80, 1, 0, craft.SYN | craft.FIN), 0, False, 0)])  # INVALID
        per_state = {}

        def settled():
            per_state.update({s: counted(lab, family, "FORWARD", f"state-{s}") for s in STATES})
            return all(per_state.values()) and nf.status((family,), netns=gw)[0].queued_packets == sum(
                per_state.values())
        wait_for(settled, timeout=5, what=f"every state counted and queued: {per_state}")
    finally:
        for table in ("mangle", "raw"):
            lab.run("gw", [ipt, "-t", table, "-F", "PREROUTING"])
        for state in STATES:
            lab.run("gw", [ipt, "-D", "FORWARD", "-m", "conntrack", "--ctstate", state,
                           "-m", "comment", "--comment", f"state-{state}"], check=False)
        nf.remove(netns=gw)
