"""The bouncer's policy (hybrid/fleet/policy.py): what it enforces, and every way a decision could
blackhole the gateway refused."""

import ipaddress

import pytest

from hybrid.fleet.policy import APPLY, Intervals, Policy, parse_value

pytestmark = pytest.mark.unit


def policy(**kw):
    kw.setdefault("own", ["198.18.0.1", "2001:2::1"])
    kw.setdefault("lapi_addresses", ["198.18.9.9"])
    return Policy(**kw)


@pytest.mark.parametrize("scope,value,want", [
    ("ip", "203.0.113.7", "203.0.113.7/32"),
    ("ip", "2001:db8::7", "2001:db8::7/128"),
    ("ip", "203.0.113.7/32", "203.0.113.7/32"),
    ("ip", " 203.0.113.7 ", "203.0.113.7/32"),
    ("range", "203.0.113.0/24", "203.0.113.0/24"),
    ("range", "203.0.113.9/24", "203.0.113.0/24"),          # host bits cleared, as ipset does
    ("range", "2001:db8::/48", "2001:db8::/48"),
    ("ip", "::ffff:203.0.113.7", "203.0.113.7/32"),          # IPv4-mapped: the kernel's IPv4 key
    ("range", "::ffff:203.0.113.0/120", "203.0.113.0/24"),
])
def test_values_become_the_kernels_networks(scope, value, want):
    assert str(parse_value(scope, value)) == want


@pytest.mark.parametrize("scope,value", [
    ("ip", "203.0.113.0/24"), ("ip", "not an ip"), ("ip", ""), ("range", "1.2.3.4/33"),
    ("range", "example.com"), ("ip", "1.2.3.4; rm -rf /"), ("range", "2001:db8::/129"),
])
def test_invalid_values(scope, value):
    assert parse_value(scope, value) is None
    assert policy().judge(scope, "ban", "cscli", value) == ("invalid", None)


@pytest.mark.parametrize("value", [
    "0.0.0.0/0", "::/0", "10.0.0.0/8", "0.0.0.0/1", "2001::/16", "::/8",
    "::/32",                    # contains ::ffff:0:0/96: every IPv4 address in the kernel's keys
    "::ffff:0:0/96", "::ffff:0:0/100",                   # IPv4-mapped /0 and /4
])
def test_too_broad(value):
    assert policy().judge("range", "ban", "lists", value)[0] == "too_broad"


@pytest.mark.parametrize("value", [
    "198.18.0.1", "198.18.0.0/24", "198.16.0.0/13",      # the gateway's address, and prefixes holding it
    "2001:2::1", "2001:2::/64",
    "127.0.0.1", "127.5.0.0/16", "::1", "169.254.10.10", "fe80::1",
    "198.18.9.9",                                        # the Local API: banning it cuts the link
    "::ffff:198.18.0.1",                                 # the same address written IPv4-mapped
])
def test_protected(value):
    scope = "range" if "/" in value else "ip"
    assert policy().judge(scope, "ban", "cscli", value)[0] == "protected"


def test_never_block_both_ways():
    p = policy(never_block=["203.0.113.0/24"])
    assert p.judge("ip", "ban", "cscli", "203.0.113.5")[0] == "protected"      # inside
    assert p.judge("range", "ban", "cscli", "203.0.112.0/23")[0] == "protected"  # around
    assert p.judge("range", "ban", "cscli", "203.0.114.0/24")[0] == APPLY        # beside


def test_neighbours_of_protected_addresses_apply():
    p = policy()
    for value in ("198.18.0.2", "198.18.0.0", "198.18.1.0/24", "2001:2::2", "128.0.0.1"):
        verdict, net = p.judge("ip" if "/" not in value else "range", "ban", "crowdsec", value)
        assert verdict == APPLY, value
        assert isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network))


def test_filters_come_before_the_value():
    p = policy(origins=["crowdsec"], types=["ban", "captcha"])
    assert p.judge("Ip", "throttle", "crowdsec", "203.0.113.1")[0] == "unsupported_type"
    assert p.judge("Country", "ban", "crowdsec", "FR")[0] == "unsupported_scope"
    assert p.judge("Ip", "ban", "cscli", "203.0.113.1")[0] == "origin"
    assert p.judge("Ip", "captcha", "crowdsec", "203.0.113.1")[0] == APPLY     # listed: enforced as a drop
    assert p.judge("Range", "ban", "crowdsec", "203.0.113.0/24")[0] == APPLY   # scope names are case-blind


def test_min_prefix_is_configurable():
    p = policy(min_prefix_v4=24, min_prefix_v6=64)
    assert p.judge("range", "ban", "x", "203.0.112.0/23")[0] == "too_broad"
    assert p.judge("range", "ban", "x", "203.0.113.0/24")[0] == APPLY
    assert p.judge("range", "ban", "x", "2001:db8::/63")[0] == "too_broad"


def test_own_addresses_refresh():
    p = policy()
    assert p.judge("ip", "ban", "x", "203.0.113.1")[0] == APPLY
    p.set_own(["203.0.113.1"])
    assert p.judge("ip", "ban", "x", "203.0.113.1")[0] == "protected"
    assert p.judge("ip", "ban", "x", "198.18.0.1")[0] == APPLY                  # no longer ours


def test_intervals_against_brute_force():
    import random
    rnd = random.Random(7)
    nets = [ipaddress.ip_network((rnd.getrandbits(32), rnd.randint(8, 32)), strict=False) for _ in range(60)]
    iv = Intervals(nets)
    for _ in range(3000):
        probe = ipaddress.ip_network((rnd.getrandbits(32), rnd.randint(4, 32)), strict=False)
        assert iv.touches(probe) == any(probe.overlaps(n) for n in nets), probe
