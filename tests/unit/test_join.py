"""hybrid/engine/join.py alone: the steps a split request head or ClientHello goes through, and
the bounds in flows, bytes and time. The engine's use of it: tests/unit/test_engine_handler.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from hybrid.engine import join
from hybrid.engine.join import DECIDE, HeldFlow, SegmentJoiner, Step
from hybrid.engine.loop import EngineStats
from hybrid.engine.packet import decode

pytestmark = pytest.mark.unit

BOTH = SimpleNamespace(needs_sni=True, needs_http=True)
HEAD = b"GET / HTTP/1.1\r\nUser-Agent: split\r\nHost: x.example\r\n\r\n"


def seg(payload: bytes, seq: int, sport: int = 40000, dport: int = 80):
    return decode(bytes(IP(src="198.18.1.2", dst="198.18.2.2") /
                        TCP(sport=sport, dport=dport, flags="PA", seq=seq) / Raw(payload)))


def pieces(data: bytes, size: int, seq0: int = 1000, **kw):
    return [seg(data[i:i + size], seq0 + i, **kw) for i in range(0, len(data), size)]


@pytest.fixture
def joiner() -> SegmentJoiner:
    return SegmentJoiner(EngineStats(0))


def test_most_packets_are_decided_at_once(joiner):
    for payload in (b"\x00binary", b"get / http/1.1\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"):
        assert joiner.offer(seg(payload, 1), BOTH) is DECIDE
    assert len(joiner) == 0


def test_a_head_in_pieces_is_held_then_decided_on_the_joined_bytes(joiner):
    parts = pieces(HEAD, 10)
    host_end = HEAD.index(b"\r\n", HEAD.index(b"Host:")) + 2
    steps = []
    for i, p in enumerate(parts):
        r = joiner.offer(p, BOTH)
        steps.append(r.step)
        if i == 0:
            held = joiner.flows[(p.src_bytes, p.sport, p.dst_bytes, p.dport)]
            assert isinstance(held, HeldFlow) and held.http and held.expect == 1010
            assert joiner.offer(p, BOTH).step is Step.HOLD_AGAIN      # a retransmission
        if r.step is Step.JOINED:
            break
    assert steps == [Step.HOLD] * (len(steps) - 1) + [Step.JOINED]
    assert r.ended and not r.held and r.http and r.data == HEAD[:len(steps) * 10]
    assert len(r.data) >= host_end > len(r.data) - 10
    assert joiner.stats.http_heads_joined == 1 and len(joiner) == 0


@pytest.mark.parametrize("lead", [b"\r\n", b"\n", b"\r\n\r\n"])
def test_a_head_after_empty_lines_is_joined_too(joiner, lead):
    """nginx skips empty lines before the request line: a head that starts with them and is cut
    before its Host line must be held, not decided on its first piece (then bypassed)."""
    head = lead + HEAD
    cut = head.index(b"Host:") + 2
    first, rest = seg(head[:cut], 1000), seg(head[cut:], 1000 + cut)
    assert joiner.offer(first, BOTH).step is Step.HOLD
    r = joiner.offer(rest, BOTH)
    assert r.step is Step.JOINED and r.data == head and r.http


def test_a_gap_ends_the_join_unjoined(joiner):
    parts = pieces(HEAD, 10)
    assert joiner.offer(parts[0], BOTH).step is Step.HOLD
    r = joiner.offer(parts[2], BOTH)
    assert r.step is Step.GAP and r.ended and r.data is None
    assert joiner.stats.http_heads_abandoned == 1 and len(joiner) == 0


def test_only_what_the_rules_read_is_joined(joiner):
    assert joiner.offer(pieces(HEAD, 10)[0], SimpleNamespace(needs_sni=True, needs_http=False)) is DECIDE
    assert len(joiner) == 0


def test_a_head_that_never_shows_a_host_is_decided_at_the_byte_limit(joiner):
    head = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"y" * 1000 + b"\r\n"
    head = head * (join.HTTP_HEAD_MAX_BYTES // len(head) + 2)
    for p in pieces(head, 1400):
        r = joiner.offer(p, BOTH)
        if r.step is not Step.HOLD:
            break
    assert r.step is Step.JOINED and join.HTTP_HEAD_MAX_BYTES <= len(r.data) < join.HTTP_HEAD_MAX_BYTES + 1400


def test_the_table_is_bounded_and_drops_only_idle_joins(joiner, monkeypatch):
    monkeypatch.setattr(join, "HELLO_MAX_FLOWS", 8)
    for sport in range(8):
        assert joiner.offer(seg(b"GE", 1, sport=sport), BOTH).step is Step.HOLD
    assert joiner.offer(seg(b"GE", 1, sport=100), BOTH) is DECIDE     # full, nobody idle: not joined
    assert joiner.stats.http_heads_abandoned == 1 and len(joiner) == 8
    for held in list(joiner.flows.values())[:3]:
        held.evictable_after -= join.HELLO_TIMEOUT                    # three joins went idle
    assert joiner.offer(seg(b"GE", 1, sport=100), BOTH).step is Step.HOLD
    assert joiner.stats.http_heads_abandoned == 4 and len(joiner) == 6
