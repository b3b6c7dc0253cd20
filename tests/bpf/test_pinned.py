"""Flow-table pressure (BPF_PROG_TEST_RUN): BLOCK verdicts pinned in hybrid_pinned survive the
LRU's evictions. A BLOCK written as the engine writes it holds after its entry is deleted (an
eviction): the next packet passes XDP (which asks the flow table only) and tc restores the
entry and drops it; a manual block holds through floods of new 5-tuples on a small flow table, and
``evicted_decided`` counts every restore; an expired pinned verdict is deleted, not applied;
a full pinned table is refused loudly."""

from __future__ import annotations

import time

import pytest
from bpfkit import LO, Runner, reset, tcp4, udp4
from reference import TC_ACT_PASS, TC_ACT_SHOT, XDP_DROP, XDP_PASS

from hybrid.datapath.maps import flow_key, flow_key_bytes
from hybrid.errors import TableFullError
from hybrid.kernel import abi

pytestmark = pytest.mark.bpf

SMALL_FLOWS = 1024
SMALL_PINNED = 8


def _key():
    return flow_key("198.18.1.2", "198.18.2.2", 40000, 80, 6)[0]


def test_engine_block_survives_eviction(run, maps):
    raw, _ = flow_key_bytes(bytes([198, 18, 1, 2]), bytes([198, 18, 2, 2]), 40000, 80, 6)
    maps.write_verdict(raw, abi.VERDICT_BLOCK, 60 * 10**9)            # the engine's call
    before = maps.get_flow(_key())
    pin = maps.get_pinned(_key())
    assert (pin.verdict, pin.origin, pin.expires_ns) == (abi.VERDICT_BLOCK, abi.PIN_ENGINE, before.verdict_expires_ns)
    assert maps.delete_flow(_key())                                  # the LRU evicts it
    assert run.xdp(tcp4("PA", b"data")) == XDP_PASS                   # XDP asks the flow table only:
    assert maps.get_flow(_key()) is None                             # (and never writes it)
    assert run.tc(tcp4("PA", b"data")).action == TC_ACT_SHOT          # tc restores the entry, drops
    after = maps.get_flow(_key())
    assert (after.verdict, after.verdict_expires_ns) == (abi.VERDICT_BLOCK, before.verdict_expires_ns)
    assert run.xdp(tcp4("PA", b"data")) == XDP_DROP                   # and XDP drops again
    assert run.tc(tcp4("A", sport=80, dport=40000, src="198.18.2.2", dst="198.18.1.2")).action == TC_ACT_SHOT
    assert after.flags & abi.FLOW_CONN_VERDICT                       # an engine pin: a new SYN would start over
    assert run.nonzero() == {"xdp_packets": 2, "xdp_drop_flow": 1, "packets": 2, "drop_tc_flow": 2,
                             "flow_new": 1, "evicted_decided": 1}
    run.check_invariant()


def test_expired_pinned_verdict_is_deleted_not_applied(run, maps):
    maps.set_verdict(_key(), abi.VERDICT_BLOCK, 0.001)
    assert maps.get_pinned(_key()) is not None
    maps.delete_flow(_key())
    time.sleep(0.01)
    assert run.xdp(tcp4("PA", b"x")) == XDP_PASS
    assert maps.get_pinned(_key()) is not None                       # XDP only reads
    assert run.tc(tcp4("PA", b"x")).action == TC_ACT_PASS
    assert maps.get_pinned(_key()) is None                           # tc deleted it
    assert maps.get_flow(_key()).verdict == abi.VERDICT_NONE
    assert "evicted_decided" not in run.nonzero()


def test_only_block_is_pinned_and_clear_unpins(run, maps):
    maps.set_verdict(_key(), abi.VERDICT_BLOCK, None, manual=True)
    assert maps.get_pinned(_key()).origin == abi.PIN_MANUAL
    maps.set_verdict(_key(), abi.VERDICT_BYPASS, 30)                 # a bypass replaces the block
    assert maps.get_pinned(_key()) is None
    maps.set_verdict(_key(), abi.VERDICT_BLOCK, 30)
    maps.delete_flow(_key())
    assert maps.clear_verdict(_key())                                # evicted but pinned: unblocked
    assert maps.get_pinned(_key()) is None
    assert run.tc(tcp4("PA", b"x")).action == TC_ACT_PASS
    assert not maps.clear_verdict(flow_key("10.0.0.1", "10.0.0.2", 1, 2, 17)[0])


# ---- a small flow table (and a small pinned table) ---------------------------------------------------
@pytest.fixture(scope="module")
def small(datapath):
    """A second datapath: 1024 flows, 8 pinned verdicts (the module's default one is needed
    first, for its root check)."""
    from hybrid.datapath import loader
    dp = loader.compile_datapath(None, flow_table_size=SMALL_FLOWS,
                                 extra_cflags=[f"-DHYBRID_PINNED_TABLE_SIZE={SMALL_PINNED}"])
    try:
        with dp.maps() as maps:
            yield Runner(dp, maps)
    finally:
        dp.close()


def _flood(run: Runner, first_port: int, count: int) -> None:
    """``count`` new UDP 5-tuples through tc: one frame, its source port rewritten (offset 34:
    Ethernet 14 + IPv4 20; nothing checks the UDP checksum)."""
    f = bytearray(udp4(b"flood", src="198.18.50.1", dst="198.18.60.1", sport=1, dport=53))
    for port in range(first_port, first_port + count):
        f[34:36] = port.to_bytes(2, "big")
        run.tc(bytes(f))


def test_manual_block_survives_floods_on_a_small_table(small):
    run, maps = small, small.maps
    reset(maps)
    maps.set_verdict(_key(), abi.VERDICT_BLOCK, None, manual=True)
    evicted = 0
    for round_ in range(4):
        _flood(run, 1024 + round_ * 3 * SMALL_FLOWS, 3 * SMALL_FLOWS)
        gone = maps.get_flow(_key()) is None
        evicted += gone
        assert run.xdp(tcp4("PA", b"x")) == (XDP_PASS if gone else XDP_DROP), round_
        assert run.tc(tcp4("PA", b"x")).action == TC_ACT_SHOT, round_     # restored when gone
        assert maps.get_flow(_key()).verdict == abi.VERDICT_BLOCK
        assert run.xdp(tcp4("PA", b"x")) == XDP_DROP, round_
    c = run.counters(LO)
    assert evicted >= 1 and c["evicted_decided"] == evicted, (evicted, c)
    assert c["drop_tc_flow"] == 4 and c["xdp_drop_flow"] == 8 - evicted and c["flow_full"] == 0
    run.check_invariant()


def test_full_pinned_table_is_refused_after_pruning(small):
    maps = small.maps
    reset(maps)
    keys = [flow_key("198.18.1.2", "198.18.2.2", 40000 + i, 80, 6)[0] for i in range(SMALL_PINNED + 1)]
    maps.set_verdict(keys[0], abi.VERDICT_BLOCK, 0.001)
    for key in keys[1:SMALL_PINNED]:
        maps.set_verdict(key, abi.VERDICT_BLOCK, None)
    time.sleep(0.01)
    maps.set_verdict(keys[SMALL_PINNED], abi.VERDICT_BLOCK, None)     # full: the expired one is pruned
    assert maps.get_pinned(keys[0]) is None and maps.pinned_count() == SMALL_PINNED
    extra = flow_key("198.18.1.2", "198.18.2.2", 50000, 80, 6)[0]
    assert maps.pinned_capacity() == SMALL_PINNED
    with pytest.raises(TableFullError, match=f"hybrid_pinned is full \\({SMALL_PINNED} entries\\)"):
        maps.set_verdict(extra, abi.VERDICT_BLOCK, None, manual=True)
    assert maps.get_flow(extra).verdict == abi.VERDICT_BLOCK          # in the flow table all the same
