"""The ban trie (hybrid_bans, bpf/hybrid_common.h "Bans") through BPF_PROG_TEST_RUN: a packet
whose source or destination lies in a live ban drops at XDP and at tc, before any flow-table
work; an expired ban drops nothing (and does not fall back to a shorter one: what
hybrid.fleet.bantable's effective expiries are for); the lookups are skipped while the trie is
empty; Maps.write_bans loads 100,000 bans and keeps HYBRID_CFG_HAVE_BANS."""

from __future__ import annotations

import ipaddress
import os
import random
import time

import pytest
from bpfkit import IP, LO, frame, icmp6_echo, tcp4, tcp6, udp4
from reference import TC_ACT_PASS, TC_ACT_SHOT, XDP_DROP, XDP_PASS, Reference

from hybrid.datapath import loader
from hybrid.datapath.maps import format_prefix, parse_cidr
from hybrid.errors import ConfigError, TableFullError
from hybrid.fleet.bantable import BanTable
from hybrid.kernel import abi

pytestmark = pytest.mark.bpf

A4, B4 = "198.18.1.2", "198.18.2.2"          # bpfkit's defaults: tcp4() goes A4 -> B4
A6, B6 = "2001:2::1:2", "2001:2::2:2"
LATER = 10**15                               # ns: far beyond any test run on CLOCK_MONOTONIC


def live() -> int:
    return time.monotonic_ns() + LATER


def expired() -> int:
    return time.monotonic_ns() - 1


# ---- dropped: source or destination, IPv4 and IPv6, XDP and tc ------------------------------------
@pytest.mark.parametrize("cidr", ["198.18.1.2/32", "198.18.1.0/24", "198.18.0.0/15", "::ffff:198.18.1.0/120"])
def test_banned_source_drops_at_xdp_and_tc(run, maps, cidr):
    maps.write_bans({cidr: live()}, [])
    assert run.xdp(tcp4("S")) == XDP_DROP
    assert run.tc(tcp4("S")).action == TC_ACT_SHOT
    assert run.nonzero() == {"xdp_packets": 1, "xdp_drop_ban": 1, "packets": 1, "drop_tc_ban": 1}
    assert maps.flow_count() == 0                     # before any flow-table work
    run.check_invariant()


def test_banned_destination_drops_and_others_pass(run, maps):
    maps.write_bans({"198.18.2.0/24": 0}, [])         # never expires
    assert run.xdp(tcp4("S")) == XDP_DROP                                      # to B4
    assert run.xdp(tcp4("SA", src=B4, dst=A4, sport=80, dport=40000)) == XDP_DROP   # from B4
    assert run.xdp(tcp4("S", dst="198.18.3.2")) == XDP_PASS
    assert run.tc(udp4(dst="198.18.2.200")).action == TC_ACT_SHOT
    r = run.tc(tcp4("S", dst="198.18.3.2"))
    assert r.action == TC_ACT_PASS and r.mark                                 # classified as before
    assert run.nonzero() == {"xdp_packets": 3, "xdp_drop_ban": 2, "packets": 2, "drop_tc_ban": 1,
                             "flagged": 1, "flow_new": 1, "reason_syn": 1}
    run.check_invariant()


@pytest.mark.parametrize("side", ["src", "dst"])
def test_ipv6_ban_either_side(run, maps, side):
    maps.write_bans({"2001:2::1:0/112": live()}, [])
    f = tcp6("S", src=A6, dst=B6) if side == "src" else tcp6("S", src=B6, dst=A6)
    assert run.xdp(f) == XDP_DROP and run.tc(f).action == TC_ACT_SHOT
    other = icmp6_echo(src="2001:2::3:3", dst=B6)
    assert run.xdp(other) == XDP_PASS and run.tc(other).action == TC_ACT_PASS
    c = run.counters()
    assert (c["xdp_drop_ban"], c["drop_tc_ban"]) == (1, 1)


def test_fragments_and_malformed_transports_drop_too(run, maps):
    """A ban is on addresses: a packet with no flow key (a later fragment, an unparseable
    transport) drops like any other."""
    maps.write_bans({A4 + "/32": 0}, [])
    later_fragment = frame(IP(src=A4, dst=B4, frag=3, proto=6) / (b"x" * 8))
    bad_tcp = frame(IP(src=A4, dst=B4, proto=6) / b"\x00\x01")
    for f in (later_fragment, bad_tcp):
        assert run.xdp(f) == XDP_DROP and run.tc(f).action == TC_ACT_SHOT
    assert run.counters()["drop_tc_ban"] == 2


def test_blocked_prefix_is_counted_first_and_a_watched_one_still_drops(run, maps):
    """tc checks the operator's prefixes, then the bans (hybrid.bpf.c, steps 2 and 3)."""
    maps.write_bans({"198.18.0.0/15": 0}, [])
    maps.add_prefix(B4, abi.PREFIX_BLOCK)
    maps.add_prefix("198.18.3.0/24", abi.PREFIX_WATCH)
    assert run.tc(tcp4("S")).action == TC_ACT_SHOT                       # blocked prefix
    assert run.tc(tcp4("S", dst="198.18.3.3")).action == TC_ACT_SHOT      # watched, but banned
    assert run.xdp(tcp4("S")) == XDP_DROP
    c = run.counters()
    assert (c["drop_tc_prefix"], c["drop_tc_ban"], c["xdp_drop_prefix"], c["flagged"]) == (1, 1, 1, 0)


# ---- expiry ---------------------------------------------------------------------------------------
def test_expired_ban_does_not_drop_and_stays_for_userspace(run, maps):
    maps.write_bans({"198.18.1.0/24": expired(), "2001:2::/48": expired()}, [])
    assert run.xdp(tcp4("S")) == XDP_PASS and run.tc(tcp4("S")).action == TC_ACT_PASS
    assert run.xdp(tcp6("S", src=A6, dst=B6)) == XDP_PASS
    assert len(maps.bans()) == 2                      # the datapath never deletes a ban
    assert not run.counters()["xdp_drop_ban"] and not run.counters()["drop_tc_ban"]
    maps.write_bans({"198.18.1.0/24": live()}, [])    # the same prefix banned again
    assert run.xdp(tcp4("S")) == XDP_DROP


def test_ban_expires_on_the_kernel_clock(run, maps):
    """bpf_ktime_get_ns() is CLOCK_MONOTONIC: a ban written with time.monotonic_ns() + 200 ms
    drops until then and not after (the first check only counts if it ran before the expiry:
    no assumption on how fast a shared machine runs)."""
    until = time.monotonic_ns() + 200_000_000
    maps.write_bans({"198.18.1.0/24": until}, [])
    action = run.xdp(tcp4("S"))
    if time.monotonic_ns() < until:
        assert action == XDP_DROP
    while time.monotonic_ns() <= until:
        time.sleep(0.05)
    assert run.xdp(tcp4("S")) == XDP_PASS and run.tc(tcp4("S")).action == TC_ACT_PASS


def test_nested_prefixes_longest_match_only(run, maps):
    """The trie returns the longest match: an expired /32 inside a live /24 passes (the kernel
    does not fall back to the /24). That is why userspace writes effective expiries: with the
    /32 written as BanTable says, the /24's ban holds for it too."""
    maps.write_bans({"198.18.1.0/24": live(), "198.18.1.2/32": expired(), "198.18.1.128/25": 0}, [])
    assert run.xdp(tcp4("S", src="198.18.1.3")) == XDP_DROP        # in the /24 only
    assert run.xdp(tcp4("S", src="198.18.1.200")) == XDP_DROP      # in the /25 (never expires)
    assert run.xdp(tcp4("S")) == XDP_PASS                          # A4: its /32 has expired
    table = BanTable()
    table.add("outer", ipaddress.ip_network("198.18.1.0/24"), live())
    table.add("inner", ipaddress.ip_network("198.18.1.2/32"), expired())
    table.add("half", ipaddress.ip_network("198.18.1.128/25"), 0)
    maps.write_bans(*table.diff(maps.bans()))
    assert maps.bans() == table.kernel_view()
    assert run.xdp(tcp4("S")) == XDP_DROP and run.tc(tcp4("S")).action == TC_ACT_SHOT
    assert maps.bans()["198.18.1.2/32"] == maps.bans()["198.18.1.0/24"]


# ---- the flag: no lookup while the trie is empty --------------------------------------------------
def test_flag_follows_the_trie_and_gates_the_lookups(run, maps):
    assert not maps.get_config().flags & abi.CFG_HAVE_BANS
    maps.write_bans({"198.18.1.0/24": 0, "2001:2::/48": 0}, [])
    assert maps.get_config().flags & abi.CFG_HAVE_BANS
    cfg = maps.get_config()
    cfg.flags &= ~abi.CFG_HAVE_BANS                   # the flag lost (a racing config write)
    maps.set_config(cfg)
    assert run.xdp(tcp4("S")) == XDP_PASS             # lookups skipped: the flag gates them
    assert run.tc(tcp4("S")).action == TC_ACT_PASS
    maps.write_bans({}, [])                           # any write puts it back
    assert maps.get_config().flags & abi.CFG_HAVE_BANS and run.xdp(tcp4("S")) == XDP_DROP
    maps.write_bans({}, ["198.18.1.0/24"])
    assert maps.get_config().flags & abi.CFG_HAVE_BANS
    maps.write_bans({}, ["2001:2::/48", "198.18.9.0/24"])   # an absent ban is skipped
    assert maps.bans() == {} and not maps.get_config().flags & abi.CFG_HAVE_BANS
    assert run.xdp(tcp4("S")) == XDP_PASS
    c = run.counters()
    assert c["xdp_drop_ban"] == 1 and c["drop_tc_ban"] == 0


def test_write_bans_checks_everything_before_writing(run, maps):
    maps.write_bans({"198.18.1.0/24": 5}, [])
    for ups, dels in (({"198.18.2.0/24": 1, "not-a-cidr": 1}, []), ({"198.18.2.0/24": -1}, []),
                      ({"198.18.2.0/24": 1 << 64}, []), ({"198.18.2.0/24": 1}, ["198.18.300.0/24"]),
                      ({"198.18.2.0/24": "soon"}, [])):
        with pytest.raises(ConfigError) as exc:
            maps.write_bans(ups, dels)
        assert "\n" not in str(exc.value)
    assert maps.bans() == {"198.18.1.0/24": 5}
    maps.write_bans({"198.18.1.9/24": 7, "198.18.5.5": 0}, ["198.18.1.0/24"])    # upserts win
    assert maps.bans() == {"198.18.1.0/24": 7, "198.18.5.5/32": 0}


# ---- against the reference model ----------------------------------------------------------------
def test_random_bans_match_the_reference(run, maps):
    """Random nested bans over a few addresses, live, expired or never expiring, and frames
    between them: XDP and tc agree with reference.py (which reads the bans as "source or
    destination, longest match live"; the C compares the later of the two expiries with the
    clock once)."""
    rng = random.Random(11)
    addrs4 = ["198.18.1.2", "198.18.1.3", "198.18.2.2", "198.18.200.1"]
    addrs6 = ["2001:2::1:2", "2001:2::1:3", "2001:2::2:2", "2001:2:0:1::9"]
    cidrs = ["198.18.0.0/15", "198.18.1.0/24", "198.18.1.2/32", "198.18.1.2/31", "198.18.2.2/32",
             "2001:2::/48", "2001:2::1:0/112", "2001:2::1:2/128", "2001:2::2:2/127", "::ffff:198.18.0.0/112"]
    for round_ in range(60):
        now = time.monotonic_ns()
        bans = {c: rng.choice([0, now + LATER, 1, now - 1]) for c in rng.sample(cidrs, rng.randrange(1, 6))}
        maps.write_bans(bans, list(maps.bans()))
        ref = Reference(maps.get_config(), bans={format_prefix(parse_cidr(c)): e for c, e in bans.items()})
        for _ in range(10):
            fam = rng.choice([addrs4, addrs6])
            src, dst = rng.choice(fam), rng.choice(fam)
            f = tcp4("S", src=src, dst=dst) if fam is addrs4 else tcp6("S", src=src, dst=dst)
            assert run.xdp(f) == ref.xdp(f, now_ns=now).action, (round_, bans, src, dst)
            assert run.tc(f).action == ref.tc(f, now_ns=now).action, (round_, bans, src, dst)


# ---- capacity -----------------------------------------------------------------------------------
def _memlock(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("memlock:"))


def test_100000_bans_load_and_drop(run, maps):
    """A 100,000-decision blocklist (issue 15): written in one call, read back, enforced, and
    emptied again. Time and the trie's memory are printed, not asserted."""
    rng = random.Random(5)
    base4 = int(ipaddress.IPv4Address("198.18.0.0"))
    hosts = rng.sample(range(1 << 17), 90_000)                        # all of 198.18.0.0/15
    bans = {f"{ipaddress.IPv4Address(base4 + h)}/32": live() for h in hosts}
    base6 = int(ipaddress.IPv6Address("2001:2::"))
    bans.update({f"{ipaddress.IPv6Address(base6 + (i << 64))}/64": 0 for i in range(10_000)})
    fd = maps.fd(abi.MAP_BANS)
    before = _memlock(fd)
    t0 = time.perf_counter()
    maps.write_bans(bans, [])
    t1 = time.perf_counter()
    held = maps.bans()
    t2 = time.perf_counter()
    assert held == bans
    after = _memlock(fd)
    for h in hosts[:50]:
        assert run.xdp(tcp4("S", src=str(ipaddress.IPv4Address(base4 + h)))) == XDP_DROP
    banned = set(hosts)
    a, b = [str(ipaddress.IPv4Address(base4 + h)) for h in range(1 << 17) if h not in banned][:2]
    assert run.xdp(tcp4("S", src=a, dst=b)) == XDP_PASS                 # between two hosts not banned
    assert run.xdp(tcp6("S", src=str(ipaddress.IPv6Address(base6 + (7 << 64) + 5)), dst="2001:2:ffff::1")) == XDP_DROP
    t3 = time.perf_counter()
    maps.write_bans({}, list(held))
    t4 = time.perf_counter()
    assert maps.bans() == {} and not maps.get_config().flags & abi.CFG_HAVE_BANS
    print(f"\nbans: 100,000 written in {t1 - t0:.2f} s ({100_000 / (t1 - t0):,.0f}/s), read back in {t2 - t1:.2f} s, "
          f"deleted in {t4 - t3:.2f} s; trie memlock {before:,} -> {after:,} bytes "
          f"({(after - before) / 100_000:.0f} bytes/ban, pid {os.getpid()})")


def test_full_trie_is_reported():
    """A trie of 64 entries refuses the 65th: TableFullError, what fitted is written, the flag
    is set (its own compile, with a small HYBRID_BAN_TABLE_SIZE)."""
    dp = loader.compile_datapath(None, ban_table_size=64)
    try:
        with dp.maps() as m:
            m.set_config(abi.Config())
            m.register_iface(LO)
            bans = {f"198.18.0.{i}/32": 0 for i in range(70)}
            with pytest.raises(TableFullError, match=r"hybrid_bans is full \(64 entries\): 6 of 70 bans not written"):
                m.write_bans(bans, [])
            assert len(m.bans()) == 64 and m.get_config().flags & abi.CFG_HAVE_BANS
            m.write_bans({}, list(m.bans()))
            assert m.bans() == {} and not m.get_config().flags & abi.CFG_HAVE_BANS
    finally:
        dp.close()


def test_without_batch_operations_one_at_a_time(run, maps, monkeypatch):
    """A kernel whose trie has no BPF_MAP_*_BATCH (EINVAL before the first element): write_bans
    falls back to one bpf() call per ban, with the same result."""
    from hybrid.kernel import bpfsys
    monkeypatch.setattr(bpfsys, "map_update_batch", lambda *a, **k: (0, 22))
    monkeypatch.setattr(bpfsys, "map_delete_batch", lambda *a, **k: (0, 22))
    maps.write_bans({"198.18.1.0/24": 0, "2001:2::/48": live(), "198.18.2.2": 9}, ["198.18.7.0/24"])
    assert maps.bans() == {"198.18.1.0/24": 0, "2001:2::/48": maps.bans()["2001:2::/48"], "198.18.2.2/32": 9}
    assert run.xdp(tcp4("S")) == XDP_DROP
    maps.write_bans({}, ["198.18.1.0/24", "2001:2::/48", "198.18.2.2/32", "198.18.9.9/32"])
    assert maps.bans() == {} and not maps.get_config().flags & abi.CFG_HAVE_BANS
