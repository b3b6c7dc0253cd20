"""Pure logic behind status, top, flows, block/bypass/unblock and the metrics endpoint: the
FLOW/PREFIX syntax, totals and rates, the decision-time buckets, flow records from raw map
entries, the fail-open ways and the doubts from crafted stats files (old and new keys)."""

from __future__ import annotations

import pytest

from hybrid.datapath.maps import flow_info, flow_key
from hybrid.errors import ConfigError
from hybrid.kernel import abi
from hybrid.observe.status import summary_lines
from hybrid.observe.views import (
    FAIL_OPEN_WAYS,
    decision_buckets,
    doubts,
    engine_doubts,
    fail_open,
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


# ---- fail-open and doubts ---------------------------------------------------------------------------
# Stats files as engines write them: before the doubts (per-protocol dicts, the reasons pre-filled
# with 0) and after (one dict by reason, the policy and what it did).
OLD_ENGINE = {"queue": 0, "packets": 50, "errors": 2, "hellos_abandoned": 1, "http_heads_abandoned": 3,
              "pinned_write_errors": 0, "flow_write_errors": 0, "reject_send_errors": 4,
              "hellos_unparsed": {"records-interleaved": 2, "no-sni": 0},
              "http_unparsed": {"host_conflict": 5}, "dns_unparsed": {"forward-pointer": 1, "loop": 0}}
NEW_ENGINE = {"queue": 1, "packets": 70, "errors": 0, "pinned_write_errors": 1,
              "joins_abandoned": {"gap": 2, "timeout": 1, "table-full": 0},
              "hellos_abandoned": 3, "http_heads_abandoned": 0,      # the same joins: not counted twice
              "doubts": {"http:several-hosts": 7, "tcp:bad-checksum": 4, "ip:low-ttl": 0},
              "hellos_unparsed": {"records-interleaved": 100},       # superseded by doubts: ignored
              "doubt_policy": "drop", "doubt_actions": {"inspect": 0, "drop": 11, "reset": 0},
              "scoped": {"responder-side": 3, "block-packet-only": 0}}
KERNEL = [{"over_pass": 5, "flow_full": 0, "evicted_decided": 9, "malformed_l3": 4},
          {"over_pass": 1, "flow_full": 2}, {}]


def _report(passed, *, fail_open=True, bound=(True,)):
    return {"fail_open": fail_open, "passed_overflow": passed,
            "queues": [{"queue": q, "bound": b} for q, b in enumerate(bound)]}


def test_engine_doubts_from_old_and_new_stats_files():
    assert engine_doubts(OLD_ENGINE) == {"tls:records-interleaved": 2, "tls:no-sni": 0, "http:host_conflict": 5,
                                         "dns:forward-pointer": 1, "dns:loop": 0}
    assert engine_doubts(NEW_ENGINE) == {"http:several-hosts": 7, "tcp:bad-checksum": 4, "ip:low-ttl": 0}
    assert engine_doubts({}) == {} and engine_doubts({"doubts": None, "http_unparsed": "junk"}) == {}


def test_fail_open_sums_every_way_over_interfaces_and_engines():
    fo = fail_open(KERNEL, [OLD_ENGINE, NEW_ENGINE], _report(12))
    assert fo["ways"] == {"queue-overflow": 12, "over-budget": 6, "flow-table-full": 2, "decode-error": 2,
                          "join-abandoned": 4 + 3, "flow-write-error": 0, "block-not-pinned": 1}
    assert set(fo["ways"]) == set(FAIL_OPEN_WAYS)
    assert fo["moved"] == ["queue-overflow", "over-budget", "flow-table-full", "decode-error", "join-abandoned",
                           "block-not-pinned"]
    assert fo["join_reasons"] == {"gap": 2, "timeout": 1} and fo["unbound_queues"] == []


def test_fail_open_none_unknown_and_unbound():
    quiet = fail_open([{"evicted_decided": 3, "malformed_l3": 1}], [{"reject_send_errors": 2}], _report(0))
    assert quiet["moved"] == [] and quiet["ways"]["queue-overflow"] == 0   # none of these passed anything
    unbound = fail_open([], [], _report(None, bound=(True, False)))
    assert unbound["ways"]["queue-overflow"] is None and unbound["moved"] == []
    assert unbound["unbound_queues"] == [1]
    # fail-closed: a queue without an engine drops, it does not pass
    assert fail_open([], [], _report(None, fail_open=False, bound=(False,)))["unbound_queues"] == []
    assert fail_open([], [], None)["ways"]["queue-overflow"] is None      # not attached
    # junk and missing keys count as nothing, never raise
    assert fail_open([{"over_pass": "x"}], [{"errors": None, "joins_abandoned": [1]}], {})["moved"] == []


def test_doubts_merge_engines_sorted_with_policy_and_scope():
    d = doubts([OLD_ENGINE, NEW_ENGINE, {"queue": 2, "doubts": {"http:several-hosts": 1}, "doubt_policy": "inspect",
                                         "doubt_actions": {"inspect": 1}}])
    assert d["total"] == 2 + 5 + 1 + 7 + 4 + 1
    assert list(d["reasons"])[:3] == ["http:several-hosts", "http:host_conflict", "tcp:bad-checksum"]
    assert d["reasons"]["http:several-hosts"] == 8
    assert d["policy"] == {"1": "drop", "2": "inspect"}          # the old engine does not say
    assert d["actions"] == {"inspect": 1, "drop": 11, "reset": 0}
    assert d["scoped"] == {"responder-side": 3, "block-packet-only": 0}
    assert doubts([]) == {"total": 0, "reasons": {}, "policy": {}, "actions": {}, "scoped": {}}


def _status(kernel, engines, report):
    return {"engines": engines, "fail_open": fail_open(kernel, engines, report), "doubts": doubts(engines)}


def test_status_lines_say_which_ways_moved():
    lines = summary_lines(_status(KERNEL, [OLD_ENGINE, NEW_ENGINE], _report(1234)))
    assert lines[0] == ("fail-open: 6 ways moved since attach: queue-overflow 1,234, over-budget 6, "
                        "flow-table-full 2, decode-error 2, join-abandoned 7, block-not-pinned 1")
    assert lines[1].split()[:2] == ["queue-overflow", "1,234"] and "full queue" in lines[1]
    assert not any("flow-write-error" in ln for ln in lines)             # did not move: not listed
    assert "  joins abandoned by reason: gap 2, timeout 1" in lines
    doubt = next(ln for ln in lines if ln.startswith("doubts:"))
    assert doubt.startswith("doubts: 19 (policy drop; drop 11): http:several-hosts 7, http:host_conflict 5, ")
    assert doubt.endswith("tls:records-interleaved 2, dns:forward-pointer 1")     # the zeros are not named
    many = {"queue": 0, "doubts": {f"tcp:r{i}": 10 - i for i in range(7)}}
    assert summary_lines(_status([], [many], _report(0)))[1].endswith("tcp:r4 6, and 2 more reasons")
    assert lines[-1] == "flow verdicts scoped to the side that spoke: responder-side 3"
    one = summary_lines(_status([{"over_pass": 1}], [], _report(0)))
    assert one[0] == "fail-open: 1 way moved since attach: over-budget 1"


def test_status_lines_when_nothing_moved():
    assert summary_lines(_status([{}], [{"queue": 0, "doubt_policy": "inspect"}], _report(0))) == \
        ["fail-open: none", "doubts: none (policy inspect)"]
    assert summary_lines(_status([{}], [], _report(0))) == ["fail-open: none"]    # no engine: no doubt line
    lines = summary_lines(_status([{}], [], _report(None, bound=(True, False))))
    assert lines[0] == "fail-open: none counted"
    assert "not counted now: queue-overflow" in lines[1] and lines[2].startswith("  queue 1 has no engine")
    mixed = [{"queue": 0, "doubt_policy": "inspect"}, {"queue": 1, "doubt_policy": "reset"}]
    assert summary_lines(_status([{}], mixed, _report(0)))[1] == \
        "doubts: none (policy inspect (queue 0), reset (queue 1))"
    assert summary_lines({"instance": "x", "attached": False}) == []     # not attached: nothing to say
