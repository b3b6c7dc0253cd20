"""hybrid_xdp on crafted frames (BPF_PROG_TEST_RUN): drops on blocked prefixes and live BLOCK
verdicts, never writes the flow table, passes everything else, and counts."""

from __future__ import annotations

import socket
import time

import pytest
from bpfkit import A4, A6, B4, B6, IP, LO, TCP, frame, icmp4_echo, tcp4, tcp6, udp4
from reference import XDP_DROP, XDP_PASS, Reference
from test_tc import ALL_CASES

from hybrid.datapath.maps import flow_key
from hybrid.kernel import abi

pytestmark = pytest.mark.bpf


def test_passes_and_counts(run, maps):
    for f in (tcp4("S"), udp4(), icmp4_echo(), tcp6("S")):
        assert run.xdp(f) == XDP_PASS
    assert run.nonzero() == {"xdp_packets": 4}
    assert maps.flow_count() == 0                                  # XDP never creates flows


@pytest.mark.parametrize("cidr", ["198.18.2.0/24", "198.18.1.2/32"])
def test_block_prefix_either_side(run, maps, cidr):
    maps.add_prefix(cidr, abi.PREFIX_BLOCK)
    assert run.xdp(tcp4("S")) == XDP_DROP
    assert run.xdp(tcp4("S", src=B4, dst=A4)) == XDP_DROP
    assert run.xdp(tcp4("S", src="10.0.0.1", dst="10.0.0.2")) == XDP_PASS
    assert run.nonzero() == {"xdp_packets": 3, "xdp_drop_prefix": 2}


def test_block_prefix_v6_and_fragments(run, maps):
    maps.add_prefix("2001:db8:2::/48", abi.PREFIX_BLOCK)
    assert run.xdp(tcp6("S")) == XDP_DROP
    maps.add_prefix(B4, abi.PREFIX_BLOCK)
    assert run.xdp(frame(IP(src=A4, dst=B4, frag=3, proto=6) / (b"x" * 8))) == XDP_DROP
    assert run.nonzero() == {"xdp_packets": 2, "xdp_drop_prefix": 2}


def test_watch_prefix_does_not_drop(run, maps):
    maps.add_prefix("198.18.0.0/16", abi.PREFIX_WATCH)
    assert run.xdp(tcp4("S")) == XDP_PASS


def test_prefixes_ignored_without_config_flag(run, maps):
    maps.add_prefix(B4, abi.PREFIX_BLOCK)
    cfg = maps.get_config()
    cfg.flags &= ~abi.CFG_HAVE_PREFIXES
    maps.set_config(cfg)
    assert run.xdp(tcp4("S")) == XDP_PASS


def test_block_verdict_both_directions(run, maps):
    key, _ = flow_key(A4, B4, 40000, 80, 6)
    maps.set_verdict(key, abi.VERDICT_BLOCK, None)
    before = maps.get_flow(key)
    assert run.xdp(tcp4("A")) == XDP_DROP
    assert run.xdp(tcp4("A", src=B4, dst=A4, sport=80, dport=40000)) == XDP_DROP
    assert run.xdp(tcp4("A", sport=40001)) == XDP_PASS
    assert run.nonzero() == {"xdp_packets": 3, "xdp_drop_flow": 2}
    assert bytes(maps.get_flow(key)) == bytes(before)             # lookups only
    assert maps.flow_count() == 1


def test_block_verdict_v6_and_vlan(run, maps):
    maps.set_verdict(flow_key(A6, B6, 40000, 80, 6, vlan=7)[0], abi.VERDICT_BLOCK, 60)
    assert run.xdp(tcp6("S", vlans=(7,))) == XDP_DROP
    assert run.xdp(tcp6("S", vlans=(8,))) == XDP_PASS
    assert run.xdp(tcp6("S")) == XDP_PASS


def test_expired_block_passes_and_is_left_for_tc(run, maps):
    key, _ = flow_key(A4, B4, 40000, 80, 6)
    maps.set_verdict(key, abi.VERDICT_BLOCK, 0.001)
    time.sleep(0.005)
    assert run.xdp(tcp4("A")) == XDP_PASS
    assert maps.get_flow(key).verdict == abi.VERDICT_BLOCK         # XDP does not write
    assert run.nonzero() == {"xdp_packets": 1}
    run.tc(tcp4("A"))                                              # tc expires it
    assert maps.get_flow(key).verdict == abi.VERDICT_NONE


@pytest.mark.parametrize("verdict", [abi.VERDICT_BYPASS, abi.VERDICT_INSPECT, abi.VERDICT_NONE])
def test_other_verdicts_pass(run, maps, verdict):
    maps.set_verdict(flow_key(A4, B4, 40000, 80, 6)[0], verdict, None)
    assert run.xdp(tcp4("A")) == XDP_PASS


def test_unregistered_interface_counts_in_slot_zero(run, maps):
    maps.unregister_iface(LO)
    run.xdp(tcp4("S"))
    assert {k: v for k, v in maps.stats()[0].items() if v} == {"xdp_packets": 1}


def test_registered_slots_are_separate(run, maps):
    others = [i for i, _ in socket.if_nameindex() if i != LO]
    if not others:
        pytest.skip("needs a second network device for its ifindex")
    run.xdp(tcp4("S"))
    run.xdp(tcp4("S"), ifindex=others[0])                          # not registered: slot 0
    assert maps.register_iface(others[0]) == 2
    run.xdp(tcp4("S"), ifindex=others[0])
    run.xdp(tcp4("S"), ifindex=others[0])
    stats = maps.stats()
    assert (stats[LO]["xdp_packets"], stats[0]["xdp_packets"], stats[others[0]]["xdp_packets"]) == (1, 1, 2)
    maps.unregister_iface(others[0])
    assert others[0] not in maps.stats()


def test_every_malformed_and_truncated_frame_matches_reference(run, maps):
    """All cuts, including those the skb test-run refuses; blocks in place so drops show."""
    maps.add_prefix("198.18.2.0/24", abi.PREFIX_BLOCK)
    key, _ = flow_key(A6, B6, 40000, 80, 6)
    maps.set_verdict(key, abi.VERDICT_BLOCK, None)
    ref = Reference(maps.get_config(), prefixes={"198.18.2.0/24": abi.PREFIX_BLOCK})
    ref.set_verdict((bytes(key.addr_lo), bytes(key.addr_hi), 40000, 80, 0, 6), abi.VERDICT_BLOCK)
    totals = {"xdp_packets": 0}
    for name, f in ALL_CASES + [("ok6", tcp6("S")), ("ok4", tcp4("S"))]:
        want = ref.xdp(f, now_ns=time.monotonic_ns())
        assert run.xdp(f) == want.action, name
        totals["xdp_packets"] += 1
        if want.counter is not None:
            name_ = abi.COUNTER_NAMES[want.counter]
            totals[name_] = totals.get(name_, 0) + 1
    assert run.nonzero() == totals
    assert totals["xdp_drop_prefix"] and totals["xdp_drop_flow"]


def test_tcp_frame_shorter_than_ethernet_minimum_passes(run, maps):
    assert run.xdp(frame(IP(src=A4, dst=B4) / TCP())[:20]) == XDP_PASS
