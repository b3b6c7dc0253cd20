"""The bouncer's policy (hybrid/fleet/policy.py): what it enforces, and every way a decision could
blackhole the gateway refused."""

import ipaddress

import pytest

from hybrid.fleet.policy import APPLY, Intervals, Policy

pytestmark = pytest.mark.unit


def policy(**kw):
    kw.setdefault("own", ["198.18.0.1", "2001:2::1"])
    kw.setdefault("lapi_addresses", ["198.18.9.9"])
    return Policy(**kw)


def judge(p: Policy, scope: str, value: str, type_: str = "ban", origin: str = "cscli") -> str:
    """The policy's word for a decision whose value the LAPI client read as ``value``'s network
    (its own parsing is tested in test_lapi_parse.py)."""
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        net = None
    return p.judge(scope, type_, origin, net)


def test_a_value_that_is_no_network_is_invalid():
    assert judge(policy(), "ip", "not an ip") == "invalid"


@pytest.mark.parametrize("value", [
    "0.0.0.0/0", "::/0", "10.0.0.0/8", "0.0.0.0/1", "2001::/16", "::/8",
    "::/32",                    # contains ::ffff:0:0/96: every IPv4 address in the kernel's keys
    "::ffff:0:0/96", "::ffff:0:0/100",                   # IPv4-mapped /0 and /4
])
def test_too_broad(value):
    assert judge(policy(), "range", value, origin="lists") == "too_broad"


@pytest.mark.parametrize("value", [
    "198.18.0.1", "198.18.0.0/24", "198.16.0.0/13",      # the gateway's address, and prefixes holding it
    "2001:2::1", "2001:2::/64",
    "127.0.0.1", "127.5.0.0/16", "::1", "169.254.10.10", "fe80::1",
    "198.18.9.9",                                        # the Local API: banning it cuts the link
    "::ffff:198.18.0.1",                                 # the same address written IPv4-mapped
])
def test_protected(value):
    assert judge(policy(), "range" if "/" in value else "ip", value) == "protected"


def test_never_block_both_ways():
    p = policy(never_block=["203.0.113.0/24"])
    assert judge(p, "ip", "203.0.113.5") == "protected"          # inside
    assert judge(p, "range", "203.0.112.0/23") == "protected"    # around
    assert judge(p, "range", "203.0.114.0/24") == APPLY          # beside


def test_neighbours_of_protected_addresses_apply():
    p = policy()
    for value in ("198.18.0.2", "198.18.0.0", "198.18.1.0/24", "2001:2::2", "128.0.0.1"):
        assert judge(p, "ip" if "/" not in value else "range", value) == APPLY, value


def test_filters_come_before_the_value():
    p = policy(origins=["crowdsec"], types=["ban", "captcha"])
    assert judge(p, "Ip", "203.0.113.1", "throttle", "crowdsec") == "unsupported_type"
    assert judge(p, "Country", "FR", "ban", "crowdsec") == "unsupported_scope"
    assert judge(p, "Ip", "203.0.113.1", "ban", "cscli") == "origin"
    assert judge(p, "Ip", "203.0.113.1", "captcha", "crowdsec") == APPLY     # listed: enforced as a drop
    assert judge(p, "Range", "203.0.113.0/24", "ban", "crowdsec") == APPLY   # scope names are case-blind


def test_min_prefix_is_configurable():
    p = policy(min_prefix_v4=24, min_prefix_v6=64)
    assert judge(p, "range", "203.0.112.0/23") == "too_broad"
    assert judge(p, "range", "203.0.113.0/24") == APPLY
    assert judge(p, "range", "2001:db8::/63") == "too_broad"


def test_own_addresses_refresh():
    p = policy()
    assert judge(p, "ip", "203.0.113.1") == APPLY
    p.set_own(["203.0.113.1"])
    assert judge(p, "ip", "203.0.113.1") == "protected"
    assert judge(p, "ip", "198.18.0.1") == APPLY                  # no longer ours


def test_lapi_addresses_refresh_apart_from_own():
    p = policy()
    assert judge(p, "ip", "198.18.9.9") == "protected"
    p.set_lapi(["::ffff:203.0.113.7"])                             # the LAPI's name now resolves elsewhere
    assert judge(p, "ip", "203.0.113.7") == "protected"            # mapped or not, the same address
    assert judge(p, "ip", "198.18.9.9") == APPLY
    p.set_own(["192.0.2.5"])                                       # refreshing one keeps the other
    assert judge(p, "ip", "203.0.113.7") == "protected" and p.lapi == ("203.0.113.7/32",)


def test_intervals_against_brute_force():
    import random
    rnd = random.Random(7)
    nets = [ipaddress.ip_network((rnd.getrandbits(32), rnd.randint(8, 32)), strict=False) for _ in range(60)]
    iv = Intervals(nets)
    for _ in range(3000):
        probe = ipaddress.ip_network((rnd.getrandbits(32), rnd.randint(4, 32)), strict=False)
        assert iv.touches(probe) == any(probe.overlaps(n) for n in nets), probe
