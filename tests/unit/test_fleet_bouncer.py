"""The bouncer's bookkeeping (hybrid/fleet/bouncer.py) on scripted answers of the decision stream,
written the way LAPI 1.4.6 answers (hybrid/lab/crowdsec.py's notes): deltas that repeat deletes,
a re-ban after a delete, deletes of decisions never held, a snapshot after a failure, a burst's
snapshot, and a trie that must always end equal to what the decisions say. The kernel side is a
dict with the two calls the bouncer makes (Maps.bans, Maps.write_bans); the end-to-end path
against a real LAPI and the real trie is tests/integration/test_crowdsec_gateway.py."""

from __future__ import annotations

import ipaddress

import pytest

from hybrid.fleet.bouncer import Bouncer
from hybrid.fleet.lapi import Decision, Stream
from hybrid.fleet.policy import Policy

pytestmark = pytest.mark.unit
S = 1_000_000_000


def dec(id_, value, *, type_="ban", origin="cscli", seconds=3600.0):
    net = ipaddress.ip_network(value, strict=False)
    return Decision(id_, origin, type_, "Range" if "/" in value else "Ip", value, seconds, "s",
                    packed=net.network_address.packed, prefixlen=net.prefixlen)


class Trie:
    def __init__(self):
        self.held: dict[str, int] = {}

    def bans(self):
        return dict(self.held)

    def write_bans(self, upserts, deletes):
        for c in deletes:
            self.held.pop(c, None)
        self.held.update(upserts)


class Script:
    def __init__(self):
        self.answers: list = []
        self.startups: list[bool] = []

    def stream(self, startup, **_):
        self.startups.append(startup)
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a


@pytest.fixture
def b():
    clock = [1000 * S]
    script, trie = Script(), Trie()
    bouncer = Bouncer(script, trie, Policy(own=["198.18.0.1"]), clock=lambda: clock[0])
    bouncer.script, bouncer.trie, bouncer.now = script, trie, clock
    return bouncer


def pull(b, new=(), deleted=()):
    b.script.answers.append(Stream(list(new), list(deleted)))
    return b.pull()


def test_snapshot_then_deltas(b):
    pull(b, [dec(1, "203.0.113.1"), dec(2, "203.0.113.0/24", seconds=60)])
    assert b.script.startups == [True]
    assert set(b.trie.held) == {"203.0.113.1/32", "203.0.113.0/24"}
    # the /24 expires first; the /32 inside it keeps its own, later expiry
    assert b.trie.held["203.0.113.1/32"] == 1000 * S + 3600 * S
    pull(b, deleted=[dec(2, "203.0.113.0/24")])
    assert set(b.trie.held) == {"203.0.113.1/32"} and b.script.startups == [True, False]


def test_a_repeated_delete_does_not_end_a_later_ban(b):
    pull(b, [dec(1, "203.0.113.1")])
    pull(b, deleted=[dec(1, "203.0.113.1")])
    assert not b.trie.held
    pull(b, [dec(7, "203.0.113.1")])                      # banned again
    pull(b, deleted=[dec(1, "203.0.113.1")])              # the LAPI serves the old delete again
    assert set(b.trie.held) == {"203.0.113.1/32"}
    pull(b, deleted=[dec(7, "203.0.113.1")])
    assert not b.trie.held


def test_deletes_of_decisions_never_held_or_of_other_types_change_nothing(b):
    pull(b, [dec(1, "203.0.113.1")])
    pull(b, deleted=[dec(3, "203.0.113.9"), dec(4, "203.0.113.1", type_="captcha"), dec(5, "203.0.113.1")])
    assert set(b.trie.held) == {"203.0.113.1/32"}        # 5 is not the decision held (1)


def test_a_new_entry_replaces_the_held_one(b):
    pull(b, [dec(1, "203.0.113.1", seconds=60)])
    pull(b, [dec(9, "203.0.113.1", seconds=7200)])
    assert b.trie.held == {"203.0.113.1/32": 1000 * S + 7200 * S}
    assert b.snapshot()["applied"] == {"cscli/ip": 1}


def test_expiry_and_a_failure_keep_the_kernel_until_a_snapshot(b):
    from hybrid.fleet.lapi import LapiError
    pull(b, [dec(1, "203.0.113.1", seconds=10), dec(2, "203.0.113.2")])
    b.script.answers.append(LapiError("unreachable", "down"))
    with pytest.raises(LapiError):
        b.pull()
    b.failed()
    b.now[0] += 11 * S
    assert b.tick() == 1 and set(b.trie.held) == {"203.0.113.2/32"}
    b.trie.held["198.51.100.7/32"] = 0                    # changed behind the bouncer's back
    pull(b, [dec(3, "203.0.113.3")])                      # the next pull is a snapshot
    assert b.script.startups[-1] is True
    assert set(b.trie.held) == {"203.0.113.3/32"}


def test_a_burst_is_followed_by_a_snapshot(b):
    pull(b, [])
    t = b._snapshot_at
    b._snapshot_at = t - 60                               # long enough ago
    pull(b, [dec(1, "203.0.113.1")])
    assert b.script.startups[-1] is False
    b._activity_at -= 5                                    # the burst settled
    pull(b, [dec(1, "203.0.113.1"), dec(2, "203.0.113.2")])
    assert b.script.startups[-1] is True and set(b.trie.held) == {"203.0.113.1/32", "203.0.113.2/32"}


def test_refused_and_filtered_are_counted(b):
    pull(b, [dec(1, "198.18.0.1"), dec(2, "0.0.0.0/0"), dec(3, "203.0.113.5", type_="captcha"),
             dec(4, "203.0.113.6")])
    snap = b.snapshot()
    assert snap["refused"] == {"protected": 1, "too_broad": 1}
    assert snap["unsupported"] == {"type:captcha": 1}
    assert set(b.trie.held) == {"203.0.113.6/32"}
