"""Sharing blocks (hybrid/fleet/share.py): the engine's sender and the link's pusher, over a real
socketpair."""

import json

import pytest

from hybrid.fleet.policy import Policy
from hybrid.fleet.share import PENDING_MAX, SharePusher, ShareRequest, ShareSender, socketpair

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def pusher(per_minute=600, **kw):
    clock = Clock()
    return SharePusher(Policy(own=["198.18.0.1"], **kw), per_minute, clock=clock), clock


def req(value, duration=3600, rule="r"):
    return ShareRequest(value, duration, "why", rule, 0.0).to_bytes()


def test_sender_to_pusher_over_the_socket_once_per_address():
    link_end, engine_end = socketpair()
    try:
        s = ShareSender(engine_end)
        for _ in range(5):
            s.offer("203.0.113.7", "scan", 600, "scanner")
        s.offer("203.0.113.8", "scan", 600, "scanner")
        assert s.snapshot() == {"sent": 2, "repeated": 4, "dropped": 0, "unsent": 0}
        p, _ = pusher()
        for _ in range(2):
            p.receive(link_end.recv(2048))
        assert [r.value for r in p.pending] == ["203.0.113.7", "203.0.113.8"]
    finally:
        link_end.close()
        engine_end.close()


def test_sender_without_a_link_counts_unsent():
    s = ShareSender(None)
    s.offer("203.0.113.7", "scan", 600, "scanner")
    assert s.snapshot()["unsent"] == 1


def test_sender_never_blocks_on_a_full_socket():
    link_end, engine_end = socketpair()
    try:
        s = ShareSender(engine_end)
        for i in range(20000):
            s.offer(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "r", 60, "x")
        snap = s.snapshot()
        assert snap["dropped"] > 0 and snap["sent"] + snap["dropped"] == 20000
    finally:
        link_end.close()
        engine_end.close()


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[]", b'{"value": "1.2.3.4"}',
    json.dumps({"value": "1.2.3.4/24", "duration_s": 60, "reason": "x", "rule": "r"}).encode(),
    json.dumps({"value": "1.2.3.4", "duration_s": -1, "reason": "x", "rule": "r"}).encode(),
    json.dumps({"value": "1.2.3.4", "duration_s": True, "reason": "x", "rule": "r"}).encode(),
    json.dumps({"value": "1.2.3.4", "duration_s": 60, "reason": "x" * 300, "rule": "r"}).encode(),
    json.dumps({"value": "1.2.3.4", "duration_s": 60, "reason": "x", "rule": "r", "extra": 1}).encode(),
    b"\xff\xfe",
])
def test_malformed_datagrams_are_counted(data):
    p, _ = pusher()
    p.receive(data)
    assert p.counts["malformed"] == 1 and not p.pending


def test_protected_addresses_are_never_shared():
    p, _ = pusher(never_block=["203.0.113.0/24"])
    for v in ("198.18.0.1", "127.0.0.1", "203.0.113.9", "fe80::1"):
        p.receive(req(v))
    assert p.counts["protected"] == 4 and not p.pending


def test_dedup_lasts_the_ban():
    p, clock = pusher()
    p.receive(req("203.0.113.7", duration=60))
    clock.t += 30
    p.receive(req("203.0.113.7", duration=60))
    assert p.counts["deduplicated"] == 1
    clock.t += 31
    p.receive(req("203.0.113.7", duration=60))
    assert len(p.pending) == 2


def test_rate_limit():
    p, clock = pusher(per_minute=60)          # one a second, a burst of 60
    for i in range(100):
        p.receive(req(f"203.0.113.{i}"))
    assert len(p.pending) == 60 and p.counts["rate_limited"] == 40
    clock.t += 5
    for i in range(100, 110):
        p.receive(req(f"203.0.113.{i}"))
    assert len(p.pending) == 65


def test_flush_keeps_order_on_failure_and_sends_what_is_left_of_the_duration():
    p, clock = pusher()
    for i in range(3):
        p.receive(req(f"203.0.113.{i}", duration=100))
    sent = []

    def fail(batch):
        raise OSError("down")

    with pytest.raises(OSError):
        p.flush(fail)
    assert [r.value for r in p.pending] == ["203.0.113.0", "203.0.113.1", "203.0.113.2"]
    clock.t += 40
    assert p.flush(sent.extend) == 3
    assert [(r.value, left) for r, left in sent] == [(f"203.0.113.{i}", 60) for i in range(3)]
    assert not p.pending and p.counts["pushed"] == 3


def test_expired_while_waiting_is_not_pushed():
    p, clock = pusher()
    p.receive(req("203.0.113.1", duration=10))
    clock.t += 11
    assert p.flush(lambda b: pytest.fail("nothing to push")) == 0
    assert p.counts["expired_unsent"] == 1


def test_pending_is_bounded():
    p, _ = pusher(per_minute=100_000)
    p.burst = p._tokens = float(PENDING_MAX + 10)
    for i in range(PENDING_MAX + 10):
        p.receive(req(f"10.0.{i >> 8}.{i & 255}"))
    assert len(p.pending) == PENDING_MAX and p.counts["lost_while_down"] == 10
