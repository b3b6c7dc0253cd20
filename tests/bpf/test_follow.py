"""The engine's follow-up in the flow entry (BPF_PROG_TEST_RUN): a direction whose next message
the engine wants (an HTTP request head or a DNS message after the one it decided) has its packets
queued from that message on, and only those: the bytes before it keep the flow's verdict. And the
retransmission window's forgetting: a stream that carried a gigabyte past its last inspected
payload no longer has segments flagged as retransmissions of it when its sequence numbers wrap.
Each sequence also runs through the reference model (tests/bpf/reference.py), which must agree."""

from __future__ import annotations

import pytest
from bpfkit import A4, B4, IP, UDP, Raw, frame
from reference import key_tuple
from test_flow_facts import KEY4, Both, t4

from hybrid.kernel import abi

pytestmark = pytest.mark.bpf


def follow(both: Both, key, direction: int, seq, verdict=None, mode=abi.FOLLOW_M_MESSAGE) -> None:
    both.maps.write_verdict(key, verdict, None, conn_scoped=True, follow=(direction, seq, mode))
    if verdict is not None:
        both.ref.set_verdict(key_tuple(key), verdict, 0, both.now, conn_scoped=True)
    both.ref.set_follow(key_tuple(key), direction, seq, mode)


def reasons(both: Both, before: dict) -> dict:
    after = both.run.counters()
    return {k: after[k] - before.get(k, 0) for k in ("flagged", "bypassed", "passed", "reason_follow")}


def handshake(both: Both, isn: int = 1000) -> None:
    both.tc(t4("S", seq=isn))
    both.tc(t4("SA", seq=5000, reply=True))
    both.tc(t4("A", seq=isn + 1))


def test_bypassed_flow_queues_only_from_its_next_message(run, maps):
    both = Both(run, maps)
    handshake(both)
    both.tc(t4("PA", b"G" * 100, seq=1001))                       # the first request, flagged (first-N)
    follow(both, KEY4, 0, 1101, verdict=abi.VERDICT_BYPASS)        # decided; the next head at 1101
    before = run.counters()
    assert not both.tc(t4("PA", b"b" * 50, seq=1051)).mark        # ends at the boundary: a body's end
    assert both.tc(t4("PA", b"b" * 60, seq=1051)).mark            # reaches it: queued
    assert both.tc(t4("PA", b"n" * 60, seq=1101)).mark            # starts there
    assert both.tc(t4("PA", b"n" * 60, seq=1300)).mark            # after it (a hole before): queued
    assert not both.tc(t4("A", seq=1400)).mark                    # no payload: nothing to read
    assert not both.tc(t4("PA", b"r" * 500, seq=5001, reply=True)).mark   # the other direction: bypassed
    assert reasons(both, before) == {"flagged": 3, "bypassed": 3, "passed": 0, "reason_follow": 3}
    follow(both, KEY4, 0, 2000)                                   # the engine moved it on
    assert not both.tc(t4("PA", b"b" * 100, seq=1101)).mark
    follow(both, KEY4, 0, None)                                   # and stopped following
    assert not both.tc(t4("PA", b"x" * 100, seq=3000)).mark
    run.check_invariant()
    both.check()


def test_boundary_across_a_sequence_wrap(run, maps):
    both = Both(run, maps)
    handshake(both, isn=0xFFFFFF00)
    follow(both, KEY4, 0, 0x10, verdict=abi.VERDICT_BYPASS)        # 0x110 bytes on, past the wrap
    assert not both.tc(t4("PA", b"b" * 0xF0, seq=0xFFFFFF20)).mark     # ends at 0x10: before it
    assert both.tc(t4("PA", b"b" * 0xF1, seq=0xFFFFFF20)).mark         # one byte more reaches it
    assert both.tc(t4("PA", b"n" * 8, seq=0x10)).mark
    assert not both.tc(t4("PA", b"o" * 8, seq=0x80000100)).mark         # 2 GiB on: outside any window
    both.check()


def test_followed_direction_with_no_verdict_adds_the_reason(run, maps):
    both = Both(run, maps)
    handshake(both)
    for seq in (1001, 1101):                                      # first-N (2) spent
        both.tc(t4("PA", b"a" * 100, seq=seq))
    follow(both, KEY4, 0, 1301)
    before = run.counters()
    assert not both.tc(t4("PA", b"a" * 100, seq=1201)).mark       # before it, past first-N: passed
    got = both.tc(t4("PA", b"a" * 100, seq=1301))
    assert got.mark
    assert reasons(both, before) == {"flagged": 1, "bypassed": 0, "passed": 1, "reason_follow": 1}
    both.check()


def test_inspect_replaces_follow(run, maps):
    both = Both(run, maps)
    handshake(both)
    follow(both, KEY4, 0, 1001, verdict=abi.VERDICT_INSPECT)
    before = run.counters()
    assert both.tc(t4("PA", b"a" * 10, seq=1001)).mark
    assert reasons(both, before)["reason_follow"] == 0
    both.check()


def test_udp_follow_queues_every_datagram_of_the_direction(run, maps):
    both = Both(run, maps)
    q = lambda p, reply=False: frame(IP(src=B4 if reply else A4, dst=A4 if reply else B4)          # noqa: E731
                                     / UDP(sport=53 if reply else 41000, dport=41000 if reply else 53) / Raw(p))
    both.tc(q(b"query-1"))
    both.tc(q(b"answer-1", reply=True))
    key = key_tuple_of_udp()
    follow(both, key, 0, 0, verdict=abi.VERDICT_BYPASS)           # queries followed, answers not
    before = run.counters()
    for i in range(3):
        assert both.tc(q(b"query-%d" % i)).mark
        assert not both.tc(q(b"answer-%d" % i, reply=True)).mark
    assert reasons(both, before) == {"flagged": 3, "bypassed": 3, "passed": 0, "reason_follow": 3}
    run.check_invariant()
    both.check()


def key_tuple_of_udp():
    from hybrid.datapath.maps import flow_key
    return flow_key(A4, B4, 41000, 53, 17)[0]


def test_wrapped_stream_forgets_its_inspected_range(run, maps):
    """The bug of issue 14: a flow with no verdict (no engine, fail-open, a rule's flow = "none")
    moved 4 GiB and its sequence numbers came back into the window before seq_end: each wrap
    queued ~75 GSO packets. After a gigabyte of bytes, seq_end is forgotten."""
    both = Both(run, maps)
    handshake(both)
    for seq in (1001, 1101):
        both.tc(t4("PA", b"a" * 100, seq=seq))                    # first-N: seq_end = 1201
    assert both.tc(t4("PA", b"a" * 100, seq=1101)).mark           # a retransmission: queued again
    fl = maps.get_flow(KEY4)
    fl.bytes[0] += abi.SEQ_FORGET                                 # a gigabyte later
    maps._update(abi.MAP_FLOWS, KEY4, fl)
    both.ref.flows[key_tuple(KEY4)].bytes[0] += abi.SEQ_FORGET
    assert not both.tc(t4("PA", b"w" * 100, seq=1101)).mark       # the stream wrapped: not a retransmission
    assert not maps.get_flow(KEY4).flags & abi.FLOW_SEQ0
    assert not both.tc(t4("PA", b"w" * 100, seq=1151)).mark
    both.check()


def test_one_far_segment_does_not_forget(run, maps):
    """The forgetting runs on bytes carried, not on sequence numbers: one segment 2 GiB ahead
    (which the receiver discards) does not make a dropped segment's retransmission pass."""
    both = Both(run, maps)
    handshake(both)
    for seq in (1001, 1101):
        both.tc(t4("PA", b"a" * 100, seq=seq))
    assert not both.tc(t4("PA", b"z" * 100, seq=1201 + (1 << 31))).mark
    assert not both.tc(t4("PA", b"z" * 100, seq=1201 + (3 << 30))).mark
    assert both.tc(t4("PA", b"a" * 100, seq=1101)).mark
    assert maps.get_flow(KEY4).flags & abi.FLOW_SEQ0
    both.check()


def test_byte_budget_queues_the_first_bytes_of_a_direction(run, maps):
    """A rule's inspect_bytes: every payload packet starting before the budget's end is queued,
    whatever the verdict (BYPASS here), and the message follow-up still applies after it."""
    both = Both(run, maps)
    handshake(both)
    both.maps.write_verdict(KEY4, abi.VERDICT_BYPASS, None, conn_scoped=True, until=(0, 1001 + 3000))
    both.ref.set_verdict(key_tuple(KEY4), abi.VERDICT_BYPASS, 0, both.now, conn_scoped=True)
    both.ref.set_until(key_tuple(KEY4), 0, 1001 + 3000)
    before = run.counters()
    for seq in (1001, 2001, 3001, 3999):
        assert both.tc(t4("PA", b"c" * 1000, seq=seq)).mark          # within the budget
    assert not both.tc(t4("PA", b"c" * 1000, seq=4001)).mark          # past it: bypassed
    assert not both.tc(t4("PA", b"r" * 1000, seq=5001, reply=True)).mark   # the other direction
    assert both.tc(t4("PA", b"c" * 10, seq=2001)).mark                # a retransmission within it
    assert reasons(both, before) == {"flagged": 5, "bypassed": 2, "passed": 0, "reason_follow": 5}
    both.maps.write_verdict(KEY4, None, None, until=(0, None))
    both.ref.set_until(key_tuple(KEY4), 0, None)
    assert not both.tc(t4("PA", b"c" * 10, seq=2001)).mark
    both.check()


def test_a_quic_long_header_on_a_bypassed_udp_443_flow_is_queued(run, maps):
    """A new QUIC connection can start on a bypassed 5-tuple (servers key connections by
    connection ID): the client's long-header packets (Initial, Handshake, 0-RTT) are queued, its
    short-header data and the server's packets are not."""
    both = Both(run, maps)
    q = lambda p, reply=False: frame(IP(src=B4 if reply else A4, dst=A4 if reply else B4)          # noqa: E731
                                     / UDP(sport=443 if reply else 41001, dport=41001 if reply else 443) / Raw(p))
    both.tc(q(b"\xc3\x00\x00\x00\x01initial"))
    from hybrid.datapath.maps import flow_key
    key = flow_key(A4, B4, 41001, 443, 17)[0]
    both.maps.write_verdict(key, abi.VERDICT_BYPASS, None, conn_scoped=True)
    both.ref.set_verdict(key_tuple(key), abi.VERDICT_BYPASS, 0, both.now, conn_scoped=True)
    before = run.counters()
    assert not both.tc(q(b"\x41short-header data")).mark
    assert not both.tc(q(b"\xc3\x00\x00\x00\x01server", reply=True)).mark
    assert both.tc(q(b"\xc3\x00\x00\x00\x01a new initial")).mark
    assert reasons(both, before) == {"flagged": 1, "bypassed": 2, "passed": 0, "reason_follow": 1}
    both.check()
