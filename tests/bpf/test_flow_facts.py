"""The per-connection facts tc keeps in the flow entry for the engine (BPF_PROG_TEST_RUN): the
highest TTL per direction, the initial sequence numbers of the handshake, connection-scoped
verdicts that a new connection on the same 5-tuple does not inherit (and an operator's verdict
that it does), and first fragments keyed so that a blocked flow's datagrams never reassemble.
Each sequence also runs through the reference model (tests/bpf/reference.py), which must agree."""

from __future__ import annotations

import time

import pytest
from bpfkit import A4, A6, B4, B6, IP, MARK_VALUE, TCP, UDP, IPv6, Raw, frame, tcp4
from reference import TC_ACT_PASS, TC_ACT_SHOT, XDP_DROP, XDP_PASS, Reference, key_tuple
from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrFragment

from hybrid.datapath.maps import flow_info, flow_key
from hybrid.kernel import abi

pytestmark = pytest.mark.bpf

C2S = {"src": A4, "dst": B4, "sport": 40000, "dport": 80}        # A4 < B4: direction 0
S2C = {"src": B4, "dst": A4, "sport": 80, "dport": 40000}


def t4(flags="A", payload=b"", seq=0, ttl=64, ack=0, reply=False) -> bytes:
    ends = S2C if reply else C2S
    l4 = TCP(sport=ends["sport"], dport=ends["dport"], flags=flags, seq=seq, ack=ack)
    return frame(IP(src=ends["src"], dst=ends["dst"], ttl=ttl) / (l4 / Raw(payload) if payload else l4))


def t6(flags="A", payload=b"", seq=0, hlim=64, reply=False) -> bytes:
    src, dst, sport, dport = (B6, A6, 80, 40000) if reply else (A6, B6, 40000, 80)
    l4 = TCP(sport=sport, dport=dport, flags=flags, seq=seq)
    return frame(IPv6(src=src, dst=dst, hlim=hlim) / (l4 / Raw(payload) if payload else l4))


KEY4 = flow_key(A4, B4, 40000, 80, 6)[0]
KEY6 = flow_key(A6, B6, 40000, 80, 6)[0]


class Both:
    """Runs each frame through the programs and the reference model, asserting they agree on
    action and mark, then on the flow table and the pinned table."""

    def __init__(self, run, maps):
        self.run, self.maps = run, maps
        self.ref = Reference(maps.get_config())
        self.now = time.monotonic_ns()        # the model's clock; expiries here are far from it

    def tc(self, f: bytes):
        got, want = self.run.tc(f), self.ref.tc(f, now_ns=self.now)
        assert (got.action, got.mark) == (want.action, want.mark), want
        return got

    def xdp(self, f: bytes) -> int:
        got, want = self.run.xdp(f), self.ref.xdp(f, now_ns=self.now)
        assert got == want.action, want
        return got

    def verdict(self, key, verdict: int, *, conn_scoped: bool, origin: int = abi.PIN_ENGINE) -> None:
        """Maps.write_verdict() (no expiry), mirrored into the model."""
        self.maps.write_verdict(key, verdict, None, origin=origin, conn_scoped=conn_scoped)
        self.ref.set_verdict(key_tuple(key), verdict, 0, self.now, conn_scoped=conn_scoped)
        if verdict == abi.VERDICT_BLOCK:
            self.ref.pin(key_tuple(key), verdict, 0, origin)

    def evict(self, key) -> None:
        assert self.maps.delete_flow(key)
        self.ref.evict(key_tuple(key))

    def check(self) -> None:
        kernel = {key_tuple(k): f for k, f in self.maps.flows()}
        assert set(kernel) == set(self.ref.flows)
        for k, rf in self.ref.flows.items():
            kf = kernel[k]
            isn = [kf.isn[d] if kf.flags & (abi.FLOW_ISN0, abi.FLOW_ISN1)[d] else None for d in (0, 1)]
            seq_end = [kf.seq_end[d] if kf.flags & (abi.FLOW_SEQ0, abi.FLOW_SEQ1)[d] else None for d in (0, 1)]
            assert (list(kf.packets), list(kf.payload_packets), kf.flags, kf.verdict, list(kf.ttl_max), isn,
                    seq_end, kf.follow, list(kf.follow_seq), list(kf.until_seq)) == \
                   (rf.packets, rf.payload_packets, rf.flags, rf.verdict, rf.ttl_max, rf.isn, rf.seq_end,
                    rf.follow, rf.follow_seq, rf.until_seq), k
        pinned = {key_tuple(k): (p.verdict, p.expires_ns, p.origin) for k, p in self.maps.pinned()}
        assert pinned == self.ref.pinned
        self.run.check_invariant()


@pytest.fixture
def both(run, maps) -> Both:
    return Both(run, maps)


# ---- the highest TTL per direction ----------------------------------------------------------------------
@pytest.mark.parametrize("make,key", [(t4, KEY4), (t6, KEY6)], ids=["ipv4-ttl", "ipv6-hop-limit"])
def test_ttl_max_per_direction(both, maps, make, key):
    ttl = "ttl" if make is t4 else "hlim"
    both.tc(make("S", seq=100, **{ttl: 60}))
    both.tc(make("SA", seq=500, reply=True, **{ttl: 50}))
    both.tc(make("PA", b"benign head", seq=101, **{ttl: 3}))       # expires before the server: lower
    assert list(maps.get_flow(key).ttl_max) == [60, 50]
    both.tc(make("PA", b"x", seq=112, **{ttl: 61}))                # a higher one raises it
    both.tc(make("A", seq=501, reply=True, **{ttl: 255}))
    both.tc(make("A", seq=112, **{ttl: 1}))
    assert list(maps.get_flow(key).ttl_max) == [61, 255]
    both.check()


def test_ttl_max_kept_on_bypassed_and_blocked_flows(both, maps):
    both.tc(t4("S", seq=7, ttl=30))
    both.verdict(KEY4, abi.VERDICT_BYPASS, conn_scoped=True)
    assert both.tc(t4("PA", b"data", seq=8, ttl=40)).action == TC_ACT_PASS
    both.verdict(KEY4, abi.VERDICT_BLOCK, conn_scoped=True)
    assert both.tc(t4("A", reply=True, ttl=99)).action == TC_ACT_SHOT
    assert list(maps.get_flow(KEY4).ttl_max) == [40, 99]
    both.check()


def test_flow_info_orients_the_facts_from_the_originator(both, maps):
    """The first packet came from the "hi" endpoint (B4): flow_info's [from src, from dst]
    turns the kernel's [from lo, from hi] around."""
    both.tc(t4("S", seq=1000, ttl=33, reply=True))
    both.tc(t4("SA", seq=2000, ttl=44))
    info = flow_info(KEY4, maps.get_flow(KEY4))
    assert (info["src"], info["ttl_max"], info["isn"], info["handshake"], info["conn_verdict"]) == \
           (B4, [33, 44], [1000, 2000], True, False)
    both.check()


# ---- the handshake's sequence numbers -------------------------------------------------------------------
@pytest.mark.parametrize("make,key", [(t4, KEY4), (t6, KEY6)], ids=["ipv4", "ipv6"])
def test_isn_from_syn_and_syn_ack(both, maps, make, key):
    both.tc(make("S", seq=0xFFFFFFF0))
    flow = maps.get_flow(key)
    assert flow.flags & (abi.FLOW_ISN0 | abi.FLOW_ISN1) == abi.FLOW_ISN0 and flow.isn[0] == 0xFFFFFFF0
    both.tc(make("SA", seq=777, reply=True))
    both.tc(make("SA", seq=999, reply=True))                         # a later SYN-ACK does not move it
    both.tc(make("A", seq=0xFFFFFFF1))
    both.tc(make("PA", b"GET / HTTP/1.1\r\n", seq=0xFFFFFFF1))
    flow = maps.get_flow(key)
    assert flow.flags & (abi.FLOW_ISN0 | abi.FLOW_ISN1) == abi.FLOW_ISN0 | abi.FLOW_ISN1
    assert list(flow.isn) == [0xFFFFFFF0, 777]
    assert flow_info(key, flow)["handshake"] is True
    both.check()


def test_no_isn_midstream(both, maps):
    both.tc(t4("PA", b"data", seq=5))
    both.tc(t4("A", seq=9, reply=True))
    flow = maps.get_flow(KEY4)
    assert flow.flags & (abi.FLOW_ISN0 | abi.FLOW_ISN1) == 0 and flow.flags & abi.FLOW_MIDSTREAM
    info = flow_info(KEY4, flow)
    assert (info["isn"], info["handshake"]) == ([None, None], False)
    both.check()


# ---- connection-scoped verdicts ----------------------------------------------------------------------------
def _connection(both, seq=100, data=b"GET / HTTP/1.1\r\nHost: benign\r\n\r\n"):
    both.tc(t4("S", seq=seq))
    both.tc(t4("SA", seq=5000, reply=True))
    both.tc(t4("A", seq=seq + 1))
    both.tc(t4("PA", data, seq=seq + 1))


def test_new_syn_starts_a_conn_scoped_bypass_over(both, run, maps):
    """The attack: make connection 1 benign (BYPASS 300 s), reconnect from the same port and
    send the blocked Host. The new connection's SYN and first payload are queued again."""
    _connection(both)
    both.verdict(KEY4, abi.VERDICT_BYPASS, conn_scoped=True)
    assert maps.get_flow(KEY4).flags & abi.FLOW_CONN_VERDICT
    assert both.tc(t4("PA", b"more", seq=200)).mark == 0            # connection 1 is bypassed
    r = both.tc(t4("S", seq=100))                                     # its SYN retransmitted: nothing changes
    assert (r.action, r.mark) == (TC_ACT_PASS, 0)
    assert maps.get_flow(KEY4).verdict == abi.VERDICT_BYPASS
    r = both.tc(t4("S", seq=9_000_000))                               # connection 2, same 5-tuple
    assert r.mark == MARK_VALUE
    flow = maps.get_flow(KEY4)
    assert (flow.verdict, list(flow.packets), list(flow.payload_packets), list(flow.isn)[:1]) == \
           (abi.VERDICT_NONE, [1, 0], [0, 0], [9_000_000])
    assert flow.flags == abi.FLOW_ISN0                               # no CONN_VERDICT, no SEQ, no ISN1
    assert both.tc(t4("PA", b"GET / HTTP/1.1\r\nHost: blocked\r\n\r\n", seq=9_000_001)).mark == MARK_VALUE
    assert run.nonzero()["conn_restart"] == 1
    both.check()


def test_new_syn_starts_a_conn_scoped_block_over_and_deletes_the_engine_pin(both, run, maps):
    """Spoofed packets earned a BLOCK on a victim's 5-tuple: the victim's next connection is not
    cut off. XDP passes only that SYN to tc; the retransmitted SYN and the blocked connection's
    other packets still drop at XDP."""
    _connection(both)
    both.verdict(KEY4, abi.VERDICT_BLOCK, conn_scoped=True)
    assert maps.get_pinned(KEY4).origin == abi.PIN_ENGINE
    assert both.xdp(t4("PA", b"x", seq=101)) == XDP_DROP
    assert both.xdp(t4("S", seq=100)) == XDP_DROP                   # retransmitted SYN
    assert both.xdp(t4("SA", seq=5000, reply=True)) == XDP_DROP
    assert both.tc(t4("S", seq=100)).action == TC_ACT_SHOT          # tc agrees
    new_syn = t4("S", seq=123_456)
    assert both.xdp(new_syn) == XDP_PASS
    assert both.xdp(t4("S", seq=123_456, reply=True)) == XDP_PASS   # not the isn of that side (5000)
    r = both.tc(new_syn)
    assert (r.action, r.mark) == (TC_ACT_PASS, MARK_VALUE)
    assert maps.get_flow(KEY4).verdict == abi.VERDICT_NONE
    assert maps.get_pinned(KEY4) is None                            # the old connection's pin is gone
    assert both.xdp(t4("A", seq=123_457)) == XDP_PASS
    c = run.nonzero()
    assert (c["conn_restart"], c["xdp_drop_flow"], c["drop_tc_flow"]) == (1, 3, 1)
    both.check()


def test_operator_block_survives_a_new_syn(both, run, maps):
    _connection(both)
    maps.write_verdict(KEY4, abi.VERDICT_BLOCK, None, origin=abi.PIN_MANUAL)   # hybridctl block
    both.ref.set_verdict(key_tuple(KEY4), abi.VERDICT_BLOCK, 0, both.now)
    both.ref.pin(key_tuple(KEY4), abi.VERDICT_BLOCK, 0, abi.PIN_MANUAL)
    assert both.xdp(t4("S", seq=424242)) == XDP_DROP
    assert both.tc(t4("S", seq=424242)).action == TC_ACT_SHOT
    assert maps.get_pinned(KEY4).origin == abi.PIN_MANUAL
    assert "conn_restart" not in run.nonzero()
    both.check()


def test_conn_scoped_false_clears_the_flag(both, maps):
    _connection(both)
    both.verdict(KEY4, abi.VERDICT_BLOCK, conn_scoped=True, origin=abi.PIN_MANUAL)
    both.verdict(KEY4, abi.VERDICT_BLOCK, conn_scoped=False, origin=abi.PIN_MANUAL)
    assert not maps.get_flow(KEY4).flags & abi.FLOW_CONN_VERDICT
    assert both.tc(t4("S", seq=31337)).action == TC_ACT_SHOT
    both.check()


def test_restart_keeps_an_operators_pin(both, run, maps):
    """A connection-scoped BYPASS over an operator's pinned BLOCK (a race of the engine with
    hybridctl block): the new connection's entry starts with the operator's BLOCK."""
    _connection(both)
    both.verdict(KEY4, abi.VERDICT_BLOCK, conn_scoped=False, origin=abi.PIN_MANUAL)
    both.verdict(KEY4, abi.VERDICT_BYPASS, conn_scoped=True)         # the engine's BYPASS keeps the pin
    assert both.tc(t4("S", seq=55)).action == TC_ACT_SHOT
    flow = maps.get_flow(KEY4)
    assert flow.verdict == abi.VERDICT_BLOCK and not flow.flags & abi.FLOW_CONN_VERDICT
    assert maps.get_pinned(KEY4).origin == abi.PIN_MANUAL
    assert run.nonzero()["conn_restart"] == 1
    both.check()


def test_evicted_engine_pin(both, run, maps):
    """An ENGINE pin is one connection's: a bare SYN after the eviction is a new connection
    (no restore, the pin deleted); any other packet restores the BLOCK, connection-scoped."""
    _connection(both)
    both.verdict(KEY4, abi.VERDICT_BLOCK, conn_scoped=True)
    both.evict(KEY4)
    assert both.tc(t4("A", seq=101)).action == TC_ACT_SHOT          # restored
    flow = maps.get_flow(KEY4)
    assert flow.verdict == abi.VERDICT_BLOCK and flow.flags & abi.FLOW_CONN_VERDICT
    both.evict(KEY4)
    r = both.tc(t4("S", seq=100))                                     # (its isn went with the entry)
    assert (r.action, r.mark) == (TC_ACT_PASS, MARK_VALUE)
    assert maps.get_pinned(KEY4) is None and maps.get_flow(KEY4).verdict == abi.VERDICT_NONE
    c = run.nonzero()
    assert c["evicted_decided"] == 1 and "conn_restart" not in c
    both.check()


def test_evicted_manual_pin_is_restored_by_a_syn(both, maps):
    _connection(both)
    both.verdict(KEY4, abi.VERDICT_BLOCK, conn_scoped=False, origin=abi.PIN_MANUAL)
    both.evict(KEY4)
    assert both.tc(t4("S", seq=8)).action == TC_ACT_SHOT
    flow = maps.get_flow(KEY4)
    assert flow.verdict == abi.VERDICT_BLOCK and not flow.flags & abi.FLOW_CONN_VERDICT
    both.check()


# ---- fragments ------------------------------------------------------------------------------------------------
def frag4(offset=0, mf=True, l4=None, proto=6, ports=C2S) -> bytes:
    if l4 is None:
        l4 = TCP(sport=ports["sport"], dport=ports["dport"], flags="PA") / Raw(b"GET / HTTP/1.1\r\nHost: blocked\r\n")
    return frame(IP(src=ports["src"], dst=ports["dst"], flags="MF" if mf else 0, frag=offset, proto=proto) / l4)


def frag6(offset=0, m=1, l4=None, ext=None, nh=None) -> bytes:
    if l4 is None:
        l4 = TCP(sport=40000, dport=80, flags="PA") / Raw(b"GET / HTTP/1.1\r\nHost: blocked\r\n")
    fh = IPv6ExtHdrFragment(offset=offset, m=m, id=7) if nh is None else IPv6ExtHdrFragment(offset=offset, m=m, id=7, nh=nh)
    l3 = IPv6(src=A6, dst=B6) / fh
    if ext is not None:
        l3 = l3 / ext
    return frame(l3 / l4)


FIRST = {
    "ipv4-tcp": (KEY4, frag4()),
    "ipv4-udp": (flow_key(A4, B4, 40000, 53, 17)[0],
                 frag4(proto=17, l4=UDP(sport=40000, dport=53) / Raw(b"q" * 40))),
    "ipv4-ports-only": (KEY4, frag4(l4=Raw(b"\x9c\x40\x00\x50\x00\x00\x00\x00"))),   # 8 bytes: ports, half a seq
    "ipv6-tcp": (KEY6, frag6()),
    "ipv6-atomic": (KEY6, frag6(m=0)),
    "ipv6-from-server": (KEY6, frame(IPv6(src=B6, dst=A6) / IPv6ExtHdrFragment(m=1, id=3)
                                     / TCP(sport=80, dport=40000, flags="A") / Raw(b"z" * 16))),
}


@pytest.mark.parametrize("name", list(FIRST))
def test_first_fragment_of_a_blocked_flow_drops_at_xdp_and_tc(both, run, maps, name):
    key, f = FIRST[name]
    both.verdict(key, abi.VERDICT_BLOCK, conn_scoped=True)
    assert both.xdp(f) == XDP_DROP
    assert both.tc(f).action == TC_ACT_SHOT
    assert run.nonzero() == {"xdp_packets": 1, "xdp_drop_flow": 1, "packets": 1, "drop_tc_flow": 1}
    assert sum(maps.get_flow(key).packets) == 0                      # looked up, never written
    both.check()


@pytest.mark.parametrize("name", list(FIRST))
def test_first_fragment_of_other_flows_is_flagged_and_creates_nothing(both, run, maps, name):
    key, f = FIRST[name]
    both.verdict(key, abi.VERDICT_BYPASS, conn_scoped=True)           # a bypass does not pass fragments
    assert both.xdp(f) == XDP_PASS
    r = both.tc(f)
    assert (r.action, r.mark) == (TC_ACT_PASS, MARK_VALUE)
    assert maps.delete_flow(key) and maps.flow_count() == 0            # no entry created
    both.ref.evict(key_tuple(key))
    assert both.tc(f).mark == MARK_VALUE and maps.flow_count() == 0
    assert run.nonzero() == {"xdp_packets": 1, "packets": 2, "flagged": 2, "reason_fragment": 2}
    both.check()


def test_first_fragment_of_an_evicted_block_drops_at_tc(both, maps):
    both.verdict(KEY4, abi.VERDICT_BLOCK, conn_scoped=False, origin=abi.PIN_MANUAL)
    both.evict(KEY4)
    assert both.xdp(frag4()) == XDP_PASS                               # XDP asks the flow table only
    assert both.tc(frag4()).action == TC_ACT_SHOT                      # tc asks the pinned table too
    assert maps.flow_count() == 0                                      # and restores nothing
    both.check()


NOT_KEYED = {
    "ipv4-middle": frag4(offset=4, l4=Raw(b"y" * 24)),
    "ipv4-last": frag4(offset=4, mf=False, l4=Raw(b"y" * 24)),
    "ipv4-first-too-short": frag4(l4=Raw(b"\x9c")),                     # not even the ports
    "ipv4-first-icmp": frag4(proto=1, l4=Raw(b"\x08\x00" + b"\x00" * 14)),
    "ipv6-middle": frag6(offset=8, l4=Raw(b"y" * 16), nh=6),
    "ipv6-last": frag6(offset=8, m=0, l4=Raw(b"y" * 16), nh=6),
    "ipv6-first-too-short": frag6(l4=Raw(b"\x9c\x40"), nh=6),
    "ipv6-first-behind-dstopt": frag6(ext=IPv6ExtHdrDestOpt()),         # only a header right after
}


@pytest.mark.parametrize("name", list(NOT_KEYED))
def test_other_fragments_of_a_blocked_flow_are_flagged(both, run, maps, name):
    for key in (KEY4, KEY6):
        both.verdict(key, abi.VERDICT_BLOCK, conn_scoped=True)
    f = NOT_KEYED[name]
    assert both.xdp(f) == XDP_PASS
    r = both.tc(f)
    assert (r.action, r.mark) == (TC_ACT_PASS, MARK_VALUE)
    assert run.nonzero() == {"xdp_packets": 1, "packets": 1, "flagged": 1, "reason_fragment": 1}
    both.check()
