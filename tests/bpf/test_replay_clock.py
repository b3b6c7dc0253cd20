"""The replay clock (bpf/hybrid.bpf.c, "The clock"): the live build is the same program as before
there was one, and a replay build (-DHYBRID_REPLAY_CLOCK) reads only the time userspace sets, so
verdict TTLs and admission budgets follow a capture's timestamps, not the wall clock.

The capture times used here are far from CLOCK_MONOTONIC (an uptime of seconds to months): a
program that read the kernel's clock instead would see every verdict as unexpired (its expiry is
in ~2023 + uptime) and every budget as refilled, and the tests below would fail."""

import ctypes
import re
import shutil

import pytest
from bpfkit import Runner, default_config, reset, tcp4

from hybrid.datapath import loader, objcache
from hybrid.datapath.maps import flow_key
from hybrid.kernel import abi, bpfsys
from hybrid.replay.run import ReplayTime, capture_clock

pytestmark = pytest.mark.bpf

T0 = 1_700_000_000 * 10**9        # a capture's time: 2023-11-14, in ns since the epoch
S = 10**9
TC_ACT_SHOT, XDP_DROP = 2, 1


def _undo_clock(src_dir, dst):
    """A copy of the sources as they were before the replay clock: every hybrid_now() a
    bpf_ktime_get_ns() and the clock's block gone."""
    shutil.copytree(src_dir, dst)
    for path in dst.iterdir():
        if path.suffix not in (".c", ".h"):
            continue
        text = path.read_text()
        text = re.sub(r"#ifdef HYBRID_REPLAY_CLOCK\n.*?#endif /\* HYBRID_REPLAY_CLOCK \*/\n", "", text, flags=re.S)
        path.write_text(text.replace("hybrid_now()", "bpf_ktime_get_ns()"))
    assert "hybrid_now" not in (dst / "hybrid.bpf.c").read_text()


def test_live_build_has_the_instructions_it_had_before_the_clock(datapath, tmp_path, monkeypatch):
    """Same program tags (the kernel's hash of the instructions, map references blanked) as the
    sources without the clock, for both programs of the session's live build (with the name
    cache: the heaviest)."""
    _undo_clock(loader.bpf_dir(), tmp_path / "bpf")
    monkeypatch.setenv("HYBRID_BPF_DIR", str(tmp_path / "bpf"))
    with loader.compile_datapath(None, names=True) as before:
        assert bpfsys.prog_tag(before.xdp_fd) == bpfsys.prog_tag(datapath.xdp_fd)
        assert bpfsys.prog_tag(before.tc_fd) == bpfsys.prog_tag(datapath.tc_fd)
    assert not datapath.replay_clock
    with pytest.raises(Exception, match="reads the kernel's clock"):
        datapath.clock_fd()


def test_compile_cache_keys_on_the_clock_flag():
    src = str(loader.bpf_dir() / loader.SOURCE_NAME)
    flags = loader.cflags(None)
    assert objcache.key(src, flags) != objcache.key(src, flags + [loader.REPLAY_CLOCK_FLAG])


@pytest.fixture(scope="module")
def replay_dp():
    dp = loader.compile_datapath(None, replay_clock=True)
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture
def rp(replay_dp):
    maps = replay_dp.maps()
    try:
        reset(maps)
        yield replay_dp, maps, Runner(replay_dp, maps)
    finally:
        maps.close()


def set_clock(dp, ns: int) -> None:
    bpfsys.map_update(dp.clock_fd(), ctypes.c_uint32(0), ctypes.c_uint64(ns), name="hybrid_clock")


def test_the_replay_build_stays_within_the_verifier_budget(replay_dp):
    # The name-cache build is the one near the limit (design.md); this one checks the plain
    # build's count is read at all and far below 1M.
    assert 0 < bpfsys.prog_verified_insns(replay_dp.tc_fd) < 1_000_000


def test_a_verdict_ttl_expires_by_capture_time(rp):
    dp, maps, run = rp
    set_clock(dp, T0)
    assert run.tc(tcp4("S")).action != TC_ACT_SHOT               # the flow's entry, at T0
    key, _ = flow_key("198.18.1.2", "198.18.2.2", 40000, 80, 6)
    clock = ReplayTime()
    clock.now_ns = T0
    with capture_clock(clock):                                   # the engine's expiry: T0 + 5 s
        maps.set_verdict(key, abi.VERDICT_BLOCK, 5)
    assert maps.get_flow(key).verdict_expires_ns == T0 + 5 * S
    set_clock(dp, T0 + 5 * S - 1)
    assert run.xdp(tcp4("A")) == XDP_DROP
    assert run.tc(tcp4("A")).action == TC_ACT_SHOT
    set_clock(dp, T0 + 5 * S + 1)                                # a nanosecond past: expired
    assert run.xdp(tcp4("A")) != XDP_DROP
    assert run.tc(tcp4("A")).action != TC_ACT_SHOT
    assert run.counters()["verdict_expired"] == 1
    assert maps.get_flow(key).verdict == abi.VERDICT_NONE


def test_flow_first_seen_is_capture_time(rp):
    dp, maps, run = rp
    set_clock(dp, T0 + 123)
    run.tc(tcp4("S", sport=40001))
    flow = maps.get_flow(flow_key("198.18.1.2", "198.18.2.2", 40001, 80, 6)[0])
    assert flow.first_seen_ns == T0 + 123


def test_a_source_budget_refills_by_capture_time(rp):
    """One new flow per second per source, no burst: a second SYN 0.5 s of capture time later is
    over budget, one 1 s after that is admitted."""
    dp, maps, run = rp
    cfg = default_config()
    cfg.source_interval_ns, cfg.source_tolerance_ns = S, 0
    maps.set_config(cfg)
    set_clock(dp, T0)
    assert run.tc(tcp4("S", sport=41000)).mark & 0x00100000
    set_clock(dp, T0 + S // 2)
    assert not run.tc(tcp4("S", sport=41001)).mark & 0x00100000
    assert run.counters()["over_source"] == 1
    set_clock(dp, T0 + 3 * S // 2)
    assert run.tc(tcp4("S", sport=41002)).mark & 0x00100000
    assert run.counters()["over_source"] == 1
