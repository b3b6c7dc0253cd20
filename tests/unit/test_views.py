"""Pure logic behind top, flows, block/bypass/unblock and the metrics endpoint: the FLOW/PREFIX
syntax, totals and rates, the decision-time buckets, flow records from raw map entries."""

from __future__ import annotations

import pytest

from hybrid.datapath.maps import flow_info, flow_key
from hybrid.errors import ConfigError
from hybrid.kernel import abi
from hybrid.observe.views import (
    decision_buckets,
    merge_decisions,
    parse_target,
    quantile_ns,
    rates,
    totals,
)

pytestmark = pytest.mark.unit


# ---- FLOW and PREFIX ----------------------------------------------------------------------------
def test_flow_in_either_direction_is_one_key():
    a = parse_target(["tcp", "198.18.1.2:40000", "198.18.2.2:80"])
    b = parse_target(["tcp 198.18.2.2:80 <-> 198.18.1.2:40000"])
    assert not a.is_prefix and bytes(a.key()) == bytes(b.key())
    assert bytes(a.key()) == bytes(flow_key("198.18.1.2", "198.18.2.2", 40000, 80, 6)[0])


def test_ipv6_icmp_vlan_and_numeric_protocols():
    t = parse_target(["udp", "[2001:2:0:1::2]:5353", "[2001:2:0:2::2]:53", "vlan", "7"])
    assert (t.proto, t.sport, t.dport, t.vlan, t.src) == (17, 5353, 53, 7, "2001:2:0:1::2")
    t = parse_target(["icmp", "198.18.1.2", "198.18.2.2", "id", "4242"])
    assert (t.proto, t.sport, t.dport) == (1, 4242, 4242)
    assert parse_target(["icmpv6", "2001:2:0:1::2", "2001:2:0:2::2"]).sport == 0
    assert parse_target(["47", "198.18.1.2", "198.18.2.2"]).proto == 47


def test_prefix_and_bare_address():
    assert parse_target(["198.18.1.7/24"]).cidr == "198.18.1.0/24"
    assert parse_target(["2001:2::1"]).cidr == "2001:2::1/128"
    assert parse_target(["198.18.1.2"]).cidr == "198.18.1.2/32"


@pytest.mark.parametrize("words, message", [
    ([], "name a flow or a prefix"),
    (["example.com"], "'example.com' is neither a prefix nor a flow"),
    (["sctp", "198.18.1.2:1", "198.18.2.2:2"], "'sctp' is not a protocol"),
    (["tcp", "198.18.1.2", "198.18.2.2:80"], "'198.18.1.2': expected ADDRESS:PORT"),
    (["tcp", "2001:2::1:80", "198.18.2.2:80"], "expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)"),
    (["tcp", "198.18.1.2:99999", "198.18.2.2:80"], "the port must be a number 0-65535"),
    (["tcp", "198.18.1.2:1", "[2001:2::1]:80"], "both endpoints must be IPv4 or both IPv6"),
    (["udp", "198.18.1.2:1"], "expected PROTO SRC:PORT DST:PORT"),
    (["udp", "198.18.1.2:1", "198.18.2.2:2", "vlan", "5000"], "vlan '5000'"),
    (["tcp", "198.18.1.300:1", "198.18.2.2:2"], "'198.18.1.300' is not an IPv4 or IPv6 address"),
])
def test_bad_targets_say_what_to_write(words, message):
    with pytest.raises(ConfigError) as exc:
        parse_target(words)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# ---- flow records ---------------------------------------------------------------------------------
def test_flow_info_is_oriented_from_the_originator():
    key, direction = flow_key("198.18.2.2", "198.18.1.2", 80, 40000, 6)   # the server is "hi"
    flow = abi.Flow(first_seen_ns=1_000_000_000, last_seen_ns=3_000_000_000,
                    verdict=abi.VERDICT_BLOCK, verdict_expires_ns=12_000_000_000)
    flow.flags = abi.FLOW_ORIG_HI if direction == 0 else 0    # the client (lo or hi) sent first
    client = 1 - direction
    flow.packets[client], flow.packets[direction] = 5, 4
    flow.bytes[client], flow.bytes[direction] = 500, 4000
    flow.flagged = 3
    info = flow_info(key, flow, now_ns=4_000_000_000)
    assert info["flow"] == "tcp 198.18.1.2:40000 198.18.2.2:80"
    assert (info["packets"], info["bytes"]) == ([5, 4], [500, 4000])
    assert (info["verdict"], info["ttl"], info["age"], info["idle"]) == ("block", 8.0, 3.0, 1.0)
    assert parse_target([info["flow"]]).key().__class__ is abi.FlowKey
    expired = flow_info(key, flow, now_ns=13_000_000_000)
    assert (expired["verdict"], expired["expired_verdict"], expired["ttl"]) == ("none", "block", None)


# ---- totals and rates -----------------------------------------------------------------------------
def _snap(seen, flagged, queued, accepted, drop):
    return {"interfaces": {"a": {"packets": seen, "flagged": flagged, "reason_syn": flagged,
                                 "xdp_drop_flow": 2, "xdp_drop_prefix": 1}},
            "unregistered": {"packets": 1},
            "queues": {0: {"queued_total": queued, "dropped": 1, "user_dropped": 2, "waiting": 9}},
            "engines": [{"packets": accepted + drop, "actions": {"accept": accepted, "mark": 0, "drop": drop,
                                                                  "reject": 1}}]}


def test_totals_sum_interfaces_queues_and_engines():
    t = totals(_snap(100, 10, 10, 7, 2))
    assert t["seen"] == 101 and t["flagged"] == 10 and t["reason_syn"] == 10 and t["dropped_xdp"] == 3
    assert (t["queued"], t["queue_overflow"], t["queue_waiting"]) == (10, 3, 9)
    assert (t["accepted"], t["dropped_user"]) == (7, 3)


def test_rates_are_deltas_per_second_and_survive_resets():
    r = rates(totals(_snap(100, 10, 10, 7, 2)), totals(_snap(300, 30, 25, 3, 2)), 2.0)
    assert r["seen"] == 100 and r["flagged"] == 10 and r["queued"] == 7.5
    assert r["accepted"] == 1.5        # went down (the engine restarted): counts from zero
    assert "queue_waiting" not in r    # a level, not a counter
    with pytest.raises(ValueError):
        rates({}, {}, 0)


# ---- the decision-time histogram --------------------------------------------------------------------
def test_buckets_are_cumulative_powers_of_two():
    slots = [0] * 65
    slots[3] = 1       # < 8 ns: below the first bound
    slots[12] = 5      # 2048..4095 ns
    slots[13] = 2      # 4096..8191 ns
    slots[40] = 1      # ~10 minutes: only in +Inf
    b = decision_buckets(slots)
    assert b[0] == (512e-9, 1)
    assert dict(b)[4096e-9] == 6 and dict(b)[8192e-9] == 8
    assert b[-2][1] == 8 and b[-1] == (float("inf"), 9)
    assert [n for _, n in b] == sorted(n for _, n in b)
    assert quantile_ns(slots, 0.5) == 4096 and quantile_ns([0] * 65, 0.5) is None


def test_merge_decisions_of_several_engines():
    slots, total = merge_decisions([{"decision_ns_log2": [0, 1, 2], "decision_ns_sum": 10},
                                    {"decision_ns_log2": [1, 0, 0, 4], "decision_ns_sum": 5}, {}])
    assert slots == [1, 1, 2, 4] and total == 15
