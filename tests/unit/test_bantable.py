"""hybrid.fleet.bantable: the effective expiries the kernel's ban trie must hold, against a
brute-force model (every network's entry recomputed from every decision), and the property that
matters: a longest-prefix lookup in what the table says the kernel holds drops an address at a
time exactly when some decision covering it is live then. Randomized (seeded) over nested,
overlapping and equal networks, IPv4, IPv6 and IPv4-mapped IPv6, removals, replacements and
expiry; plus the figures of a 100,000-decision snapshot and a 10,000-decision delta (printed,
not asserted)."""

from __future__ import annotations

import ipaddress
import random
import time

import pytest

from hybrid.datapath.maps import format_prefix, parse_cidr
from hybrid.errors import ConfigError
from hybrid.fleet.bantable import BanTable

pytestmark = pytest.mark.unit

NET = ipaddress.ip_network
MAPPED = 0xFFFF << 32


def span(cidr: str) -> tuple[int, int]:
    """First and last address of a CIDR in the kernel's 128-bit space (IPv4 mapped)."""
    net = NET(cidr, strict=False)
    base = MAPPED if net.version == 4 else 0
    first = base | int(net.network_address)
    return first, first | (int(net.hostmask))


def brute_view(decisions: dict) -> dict[str, int]:
    """What the kernel must hold, from first principles: one entry per network named by some
    decision, carrying the latest expiry (0 = never) of the decisions on it or on a network
    covering it."""
    rank = {}
    for net, exp in decisions.values():
        r = exp or 1 << 64
        canon = format_prefix(parse_cidr(str(net)))
        rank.setdefault(canon, [])
    for canon in rank:
        lo, hi = span(canon)
        best = 0
        for net, exp in decisions.values():
            a, b = span(str(net))
            if a <= lo and hi <= b:
                best = max(best, exp or 1 << 64)
        rank[canon] = 0 if best == 1 << 64 else best
    return rank


def lpm_drops(view: dict[str, int], addr: int, now: int) -> bool:
    """The kernel's decision for one address: the longest entry containing it, live at now."""
    best, exp = -1, None
    for cidr, e in view.items():
        lo, hi = span(cidr)
        length = parse_cidr(cidr).prefixlen
        if lo <= addr <= hi and length > best:
            best, exp = length, e
    return exp is not None and (exp == 0 or exp > now)


def truly_banned(decisions: dict, addr: int, now: int) -> bool:
    for net, exp in decisions.values():
        lo, hi = span(str(net))
        if lo <= addr <= hi and (exp == 0 or exp > now):
            return True
    return False


def random_network(rng: random.Random):
    """Networks from a small universe, so that nesting, overlap and equality are frequent."""
    kind = rng.random()
    if kind < 0.55:
        length = rng.choice([15, 16, 20, 24, 24, 28, 30, 32, 32, 32])
        addr = (198 << 24 | 18 << 16) + rng.randrange(1 << 17) // 64 * 64 + rng.choice([0, 1, 5, 63])
        return NET((addr, length), strict=False)
    if kind < 0.9:
        length = rng.choice([48, 56, 64, 64, 96, 120, 128, 128])
        addr = int(ipaddress.IPv6Address("2001:2::")) + (rng.randrange(4) << 72) + rng.choice([0, 1, 1 << 64, 7])
        return NET((addr, length), strict=False)
    # IPv4-mapped IPv6: the same kernel entries as IPv4, and networks covering every IPv4 address
    length = rng.choice([96, 100, 112, 127, 128, 95, 80])
    addr = MAPPED | (198 << 24 | 18 << 16) + rng.randrange(1 << 10)
    return NET((addr, length), strict=False)


def test_nested_ban_expiring_first_opens_no_hole():
    table = BanTable()
    table.add("outer", NET("198.18.5.0/24"), 2_000)
    table.add("inner", NET("198.18.5.7/32"), 1_000)
    assert table.kernel_view() == {"198.18.5.0/24": 2_000, "198.18.5.7/32": 2_000}
    table.add("never", NET("198.18.0.0/16"), 0)
    assert table.kernel_view() == {"198.18.0.0/16": 0, "198.18.5.0/24": 0, "198.18.5.7/32": 0}
    assert table.remove("never") and not table.remove("never")
    assert table.kernel_view() == {"198.18.5.0/24": 2_000, "198.18.5.7/32": 2_000}
    assert table.expire(999) == [] and len(table) == 2
    assert table.expire(1_500) == ["inner"] and "inner" not in table and len(table) == 1
    assert table.kernel_view() == {"198.18.5.0/24": 2_000}
    assert table.expire(2_000) == ["outer"] and len(table) == 0 and table.kernel_view() == {}


def test_several_decisions_on_one_network():
    table = BanTable()
    table.add(1, NET("2001:2::/64"), 500)
    table.add(2, NET("2001:2::/64"), 900)
    table.add(3, "2001:2::5/128", 100)               # a CIDR string is accepted too
    assert table.kernel_view() == {"2001:2::/64": 900, "2001:2::5/128": 900}
    table.remove(2)
    assert table.kernel_view() == {"2001:2::/64": 500, "2001:2::5/128": 500}
    table.add(1, NET("2001:2::/64"), 0)              # the same id again: replaced
    assert len(table) == 2 and table.kernel_view() == {"2001:2::/64": 0, "2001:2::5/128": 0}
    assert table.counts() == {"ipv4": 0, "ipv6": 2, "entries": 2}


def test_ipv4_mapped_ipv6_is_the_ipv4_entry():
    """The kernel keys IPv4 as ::ffff:a.b.c.d: an IPv6 network over that range is the same entry
    (and prints as IPv4, as Maps.bans() reads it), and ::/0 covers every IPv4 address."""
    table = BanTable()
    table.add("v6", NET("::ffff:198.18.5.0/120"), 700)
    table.add("v4", NET("198.18.5.0/24"), 300)
    assert table.kernel_view() == {"198.18.5.0/24": 700}
    assert table.counts() == {"ipv4": 2, "ipv6": 0, "entries": 1}
    table.add("all", NET("::/0"), 900)
    assert table.kernel_view() == {"::/0": 900, "198.18.5.0/24": 900}
    for cidr in table.kernel_view():
        assert format_prefix(parse_cidr(cidr)) == cidr


def test_cidr_strings_read_as_ipaddress_reads_them():
    """add() reads plain CIDR strings without ipaddress (the fast path a snapshot takes): the
    same networks, the same refusals."""
    rng = random.Random(9)
    cases = ["198.18.5.7/24", "198.18.5.7", "0.0.0.0/0", "2001:2::/48", "2001:2::1", "::/0",
             "::ffff:198.18.5.7/120", "198.18.1.1/032", " 198.18.1.1/32", "fe80::1%eth0/64"]
    for _ in range(300):
        v4 = rng.random() < 0.5
        addr = ipaddress.IPv4Address(rng.getrandbits(32)) if v4 else ipaddress.IPv6Address(rng.getrandbits(128))
        cases.append(f"{addr}/{rng.randint(0, 32 if v4 else 128)}")
    for i, cidr in enumerate(cases):
        by_string, by_network = BanTable(), BanTable()
        by_string.add(i, cidr, 7)
        by_network.add(i, NET(cidr.strip(), strict=False), 7)
        assert by_string.kernel_view() == by_network.kernel_view(), cidr
    for bad in ["198.18.0.0/33", "2001:2::/129", "198.18.0.0/+8", "01.2.3.4/8", "1.2.3/8", "198.18.0.0/2_4"]:
        with pytest.raises(ConfigError, match="is not an IPv4 or IPv6 CIDR"):
            BanTable().add("x", bad, 1)


def test_changes_and_diff():
    table = BanTable()
    table.add(1, NET("198.18.1.0/24"), 50)
    table.add(2, NET("198.18.1.1/32"), 10)
    assert table.take_changes() == ({"198.18.1.0/24": 50, "198.18.1.1/32": 50}, [])
    assert table.take_changes() == ({}, [])
    table.remove(1)
    assert table.take_changes() == ({"198.18.1.1/32": 10}, ["198.18.1.0/24"])
    # Reconcile with a stale kernel: a ban it should not hold, one with the wrong expiry, one missing.
    table.add(3, NET("2001:2::/48"), 0)
    ups, dels = table.diff({"198.18.9.0/24": 5, "198.18.1.1/32": 11})
    assert ups == {"198.18.1.1/32": 10, "2001:2::/48": 0} and dels == ["198.18.9.0/24"]
    assert table.take_changes() == ({}, [])          # diff counts as taken
    assert table.diff(table.kernel_view()) == ({}, [])


@pytest.mark.parametrize("bad,match", [
    (("x", "not-a-cidr", 1), "is not an IPv4 or IPv6 CIDR"),
    (("x", 42, 1), "is not an IPv4 or IPv6 network"),
    (("x", NET("198.18.0.0/16"), -1), "is not an integer of 0"),
    (("x", NET("198.18.0.0/16"), 1 << 64), "is not an integer of 0"),
    (("x", NET("198.18.0.0/16"), 1.5), "is not an integer of 0"),
])
def test_bad_input_is_one_line(bad, match):
    table = BanTable()
    with pytest.raises(ConfigError, match=match) as exc:
        table.add(*bad)
    assert "\n" not in str(exc.value) and len(table) == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_against_brute_force(seed):
    rng = random.Random(seed)
    table = BanTable()
    model: dict = {}                                 # id -> (network, expiry)
    kernel: dict[str, int] = {}                      # what take_changes() has written so far
    now = 1_000
    for step in range(120):
        for _ in range(rng.choice([1, 1, 3, 15])):
            op = rng.random()
            if op < 0.55 or not model:
                did = rng.randrange(60)              # ids repeat: replacements
                net = random_network(rng)
                exp = rng.choice([0, now - 5, now + rng.randrange(1, 400), now + rng.randrange(1, 400)])
                table.add(did, net, exp)
                model[did] = (net, exp)
            elif op < 0.85:
                did = rng.choice(list(model)) if rng.random() < 0.9 else 999
                assert table.remove(did) == (model.pop(did, None) is not None)
            else:
                now += rng.randrange(0, 150)
                gone = sorted(table.expire(now))
                assert gone == sorted(d for d, (_, e) in model.items() if e and e <= now)
                for d in gone:
                    del model[d]
        want = brute_view(model)
        if step % 3 == 0:
            ups, dels = table.take_changes()
            for c in dels:
                kernel.pop(c)
            kernel.update(ups)
            assert kernel == want, f"seed {seed} step {step}: changes"
        assert table.kernel_view() == want, f"seed {seed} step {step}"
        assert len(table) == len(model)
        v4 = sum(1 for net, _ in model.values() if all(a >> 32 == 0xFFFF for a in span(str(net))))
        assert table.counts() == {"ipv4": v4, "ipv6": len(model) - v4, "entries": len(want)}
        if step % 10 == 0:
            stale = dict(kernel)
            stale.update({"198.18.200.0/24": 3, **({next(iter(want)): 12345} if want else {})})
            ups, dels = table.diff(stale)
            for c in dels:
                stale.pop(c)
            stale.update(ups)
            assert stale == want
            kernel = stale
        # The property: the kernel's lookup drops exactly the addresses some live decision covers.
        for _ in range(40):
            named = [n for n, _ in model.values()]
            net = rng.choice(named) if named and rng.random() < 0.8 else random_network(rng)
            lo, hi = span(str(net))
            addr = rng.choice([lo, hi, rng.randint(lo, hi)])
            t = now + rng.choice([-10, 0, 1, 100, 250, 500])
            assert lpm_drops(want, addr, t) == truly_banned(model, addr, t), (seed, step, addr, t)


def test_snapshot_and_delta_timing():
    """100,000 decisions (98,000 /32s and 2,000 /24s covering some of them) loaded and settled,
    then a delta of 10,000 (5,000 removed, 5,000 added) and an expiry sweep: printed, not
    asserted (the machine is shared)."""
    rng = random.Random(7)
    base = 198 << 24 | 18 << 16
    decisions = {}
    for i in range(2_000):
        decisions[f"r{i}"] = (ipaddress.IPv4Network((base + rng.randrange(1 << 9) * 256, 24)), 10**12 + i)
    hosts = rng.sample(range(1 << 17), 98_000)
    for i, h in enumerate(hosts):
        decisions[f"h{i}"] = (ipaddress.IPv4Network((base + h, 32)), 10**12 + rng.randrange(10**9))
    table = BanTable()
    t0 = time.perf_counter()
    for did, (net, exp) in decisions.items():
        table.add(did, net, exp)
    ups, dels = table.take_changes()
    t1 = time.perf_counter()
    assert len(table) == 100_000 and not dels and len(ups) == table.counts()["entries"]
    for i in range(5_000):
        table.remove(f"h{i}")
        table.add(f"n{i}", ipaddress.IPv4Network((base + rng.randrange(1 << 17), 32)), 10**12 + 5)
    ups, dels = table.take_changes()
    t2 = time.perf_counter()
    gone = table.expire(10**12 + 10**8)
    table.take_changes()
    t3 = time.perf_counter()
    assert gone
    print(f"\nbantable: 100,000-decision snapshot {t1 - t0:.2f} s; 10,000-decision delta {t2 - t1:.3f} s "
          f"({len(ups)} upserts, {len(dels)} deletes); expiring {len(gone)} {t3 - t2:.3f} s")
