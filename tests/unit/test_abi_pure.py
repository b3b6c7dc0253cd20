"""hybrid/abi.py and the pure helpers of hybrid/maps.py, without root or BPF: the header's
constants, the counter-name table, canonical flow-key ordering, CIDR parsing and formatting."""

from __future__ import annotations

import ctypes
import ipaddress
import random
import re
from pathlib import Path

import pytest

from hybrid.datapath.maps import (
    addr16,
    addr_from16,
    canonical_order,
    flow_key,
    flow_key_bytes,
    flow_key_raw,
    flow_info,
    format_flow_key,
    format_prefix,
    key_ports,
    parse_cidr,
    prefix_key_bytes,
)
from hybrid.errors import ConfigError
from hybrid.kernel import abi

pytestmark = pytest.mark.unit

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "hybrid_common.h"


def header_defines() -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^#define\s+HYBRID_(\w+)\s+(.+?)\s*(?:/\*.*)?$", HEADER.read_text(), re.M):
        out[m.group(1)] = m.group(2).strip()
    return out


def c_value(expr: str, defines: dict[str, str]) -> int | str:
    """Evaluate a header #define (integers, shifts, other HYBRID_ names, strings)."""
    if expr.startswith('"'):
        return expr.strip('"')
    expr = re.sub(r"(\d+)U\b", r"\1", expr)
    expr = re.sub(r"HYBRID_(\w+)", lambda m: f"({c_value(defines[m.group(1)], defines)})", expr)
    return eval(expr, {"__builtins__": {}})  # noqa: S307 (our own header)


def test_every_header_constant_is_mirrored():
    defines = header_defines()
    assert len(defines) > 50
    for name, expr in defines.items():
        if name == "COMMON_H":
            continue
        value = c_value(expr, defines)
        assert hasattr(abi, name), f"abi.py lacks HYBRID_{name}"
        assert getattr(abi, name) == value, name


def test_struct_sizes_match_header_comments():
    text = HEADER.read_text()
    stated = dict(re.findall(r"struct hybrid_(\w+) \{.*?\};\s+/\* (\d+) bytes", text, re.S))
    by_c_name = {"config": abi.Config, "flow_key": abi.FlowKey, "flow": abi.Flow, "prefix_key": abi.PrefixKey,
                 "prefix": abi.Prefix, "ban": abi.Ban, "iface": abi.Iface, "addr_key": abi.AddrKey,
                 "bucket": abi.Bucket,
                 "pinned_verdict": abi.PinnedVerdict,
                 "stats": abi.Stats, "name_key": abi.NameKey, "name_scratch": abi.NameScratch,
                 "name_verdict": abi.NameVerdict, "name_gen": abi.NameState, "name_event": abi.NameEvent}
    assert set(stated) == set(by_c_name)
    for cname, size in stated.items():
        assert ctypes.sizeof(by_c_name[cname]) == int(size) == abi.SIZES[by_c_name[cname]], cname


def test_struct_fields_match_header():
    """Field names and order of every struct equal the C declaration."""
    text = HEADER.read_text()
    structs = dict(re.findall(r"struct hybrid_(\w+) \{(.*?)\};", text, re.S))
    by_c_name = {"config": abi.Config, "flow_key": abi.FlowKey, "flow": abi.Flow, "prefix_key": abi.PrefixKey,
                 "prefix": abi.Prefix, "ban": abi.Ban, "iface": abi.Iface, "addr_key": abi.AddrKey,
                 "bucket": abi.Bucket,
                 "pinned_verdict": abi.PinnedVerdict,
                 "stats": abi.Stats, "name_key": abi.NameKey, "name_scratch": abi.NameScratch,
                 "name_verdict": abi.NameVerdict, "name_gen": abi.NameState, "name_event": abi.NameEvent}
    for cname, body in structs.items():
        fields = re.findall(r"(?:__[us]\d+|struct hybrid_\w+)\s+(\w+)", re.sub(r"/\*.*?\*/", "", body, flags=re.S))
        assert fields == [f[0] for f in by_c_name[cname]._fields_], cname


def test_counter_names_table():
    assert sorted(abi.COUNTER_NAMES) == list(range(abi.CNT_MAX))
    names = list(abi.COUNTER_NAMES.values())
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)
    assert abi.COUNTER_NAMES[abi.CNT_XDP_DROP_FLOW] == "xdp_drop_flow"
    assert abi.COUNTER_NAMES[abi.CNT_REASON_BASE] == "reason_syn"
    assert abi.COUNTER_NAMES[abi.CNT_REASON_BASE + abi.REASON_COUNTED_LOW - 1] == "reason_malformed"
    # Every CNT_* constant's name is its table entry.
    for attr in dir(abi):
        if attr.startswith("CNT_") and attr not in ("CNT_MAX", "CNT_REASON_BASE"):
            assert abi.COUNTER_NAMES[getattr(abi, attr)] == attr[4:].lower(), attr
    for bit, name in abi.REASON_NAMES.items():
        assert abi.COUNTER_NAMES[abi.reason_counter(bit)] == f"reason_{name}"
        assert getattr(abi, f"REASON_{name.upper()}") == bit
    assert sum(abi.REASON_NAMES) == abi.REASONS_ALL
    assert abi.reason_names(abi.REASON_SYN | abi.REASON_PORT) == ["syn", "port"]
    assert set(abi.TC_OUTCOMES) | {abi.CNT_PACKETS} == {
        abi.CNT_PACKETS, abi.CNT_NOT_IP, abi.CNT_MALFORMED_L3, abi.CNT_FLAGGED, abi.CNT_BYPASSED,
        abi.CNT_PASSED, abi.CNT_DROP_TC_FLOW, abi.CNT_DROP_TC_PREFIX, abi.CNT_OVER_DROP, abi.CNT_OVER_PASS,
        abi.CNT_CACHE_PASSED, abi.CNT_CACHE_DROPPED, abi.CNT_DROP_TC_BAN}
    # Bans are dropped at XDP (an XDP counter) and at tc (a tc outcome); the config flag is its own bit.
    assert abi.CNT_XDP_DROP_BAN not in abi.TC_OUTCOMES and abi.CNT_DROP_TC_BAN in abi.TC_OUTCOMES
    flags = [abi.CFG_HAVE_PREFIXES, abi.CFG_HAVE_PORTS, abi.CFG_OVER_DROP, abi.CFG_NAMES, abi.CFG_HAVE_BANS]
    assert len(set(flags)) == len(flags) and all(b & (b - 1) == 0 for b in flags)
    assert abi.MAP_BANS in abi.MAP_NAMES and abi.MAP_LAYOUTS[abi.MAP_BANS] == (abi.PrefixKey, abi.Ban)
    assert abi.BAN_TABLE_SIZE >= 100_000        # a blocklist of 100,000 decisions fits (issue 15)


def test_verdict_names():
    assert abi.VERDICT_NAMES == {0: "none", 1: "inspect", 2: "bypass", 3: "block"}


# ---- canonical ordering --------------------------------------------------------------------------
def test_canonical_order_compares_address_then_port():
    a, b = addr16("10.0.0.1"), addr16("10.0.0.2")
    assert canonical_order(a, 9999, b, 1) == 0
    assert canonical_order(b, 1, a, 9999) == 1
    assert canonical_order(a, 80, a, 443) == 0
    assert canonical_order(a, 443, a, 80) == 1
    assert canonical_order(a, 80, a, 80) == 0                       # equal endpoints: lo
    # memcmp order, not integer order of the last byte: 10.0.0.255 < 10.0.1.0
    assert canonical_order(addr16("10.0.1.0"), 1, addr16("10.0.0.255"), 1) == 1
    # IPv4-mapped addresses sort after ::/96-style low IPv6 addresses and before 2001::
    assert canonical_order(addr16("::1"), 1, a, 1) == 0
    assert canonical_order(addr16("2001:db8::1"), 1, a, 1) == 1
    # port compared as a number (host order), not by its network-order bytes
    assert canonical_order(a, 256, a, 2) == 1
    with pytest.raises(ValueError):
        canonical_order(b"\x00" * 4, 1, a, 1)


def test_flow_key_same_for_both_directions():
    k1, d1 = flow_key("198.18.1.2", "198.18.2.2", 40000, 80, 6)
    k2, d2 = flow_key("198.18.2.2", "198.18.1.2", 80, 40000, 6)
    assert bytes(k1) == bytes(k2) and (d1, d2) == (0, 1)
    assert addr_from16(bytes(k1.addr_lo)) == addr_from16(addr16("198.18.1.2"))
    assert key_ports(k1) == (40000, 80)
    assert bytes(k1)[32:34] == (40000).to_bytes(2, "big")             # network order in memory
    assert (k1.vlan, k1.proto, k1._pad0) == (0, 6, 0)


def _key_field_by_field(src: bytes, dst: bytes, sport: int, dport: int, proto: int, vlan: int) -> bytes:
    """struct flow_key filled the slow, obvious way, from canonical_order()."""
    s = addr16(str(ipaddress.ip_address(src)))
    d = addr16(str(ipaddress.ip_address(dst)))
    lo, hi = ((s, sport), (d, dport)) if canonical_order(s, sport, d, dport) == 0 else ((d, dport), (s, sport))
    key = abi.FlowKey()
    key.addr_lo[:] = lo[0]
    key.addr_hi[:] = hi[0]
    key.port_lo = int.from_bytes(lo[1].to_bytes(2, "big"), "little")
    key.port_hi = int.from_bytes(hi[1].to_bytes(2, "big"), "little")
    key.vlan, key.proto = vlan, proto
    return bytes(key)


@pytest.mark.parametrize("src,dst,sport,dport,proto,vlan", [
    ("198.18.1.2", "198.18.2.2", 40000, 80, 6, 0),
    ("198.18.2.2", "198.18.1.2", 80, 40000, 6, 0),        # the reverse direction: the same key
    ("198.18.1.2", "198.18.1.2", 443, 80, 17, 4095),      # same address: the port decides
    ("198.18.1.2", "198.18.1.2", 80, 80, 1, 7),           # equal endpoints
    ("2001:db8::2", "2001:db8::1", 53, 5353, 17, 12),
    ("::1", "198.18.0.1", 0, 65535, 58, 1),               # IPv6 below the IPv4-mapped range
])
def test_flow_key_bytes_is_struct_flow_key(src, dst, sport, dport, proto, vlan):
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed   # 4 or 16 bytes, as decoded
    raw, direction = flow_key_bytes(s, d, sport, dport, proto, vlan)
    assert len(raw) == ctypes.sizeof(abi.FlowKey)
    assert raw == _key_field_by_field(s, d, sport, dport, proto, vlan)
    assert direction == canonical_order(addr16(src), sport, addr16(dst), dport)
    key, direction2 = flow_key_raw(s, d, sport, dport, proto, vlan)
    assert bytes(key) == raw and direction2 == direction


def test_flow_key_validation():
    with pytest.raises(ConfigError, match="not an IPv4 or IPv6 address"):
        flow_key("nope", "1.2.3.4", 1, 2, 6)
    with pytest.raises(ConfigError, match="port 70000"):
        flow_key("1.2.3.4", "1.2.3.5", 70000, 2, 6)
    with pytest.raises(ConfigError, match="VLAN id 4096"):
        flow_key("1.2.3.4", "1.2.3.5", 1, 2, 6, vlan=4096)


def test_format_flow_key():
    k, _ = flow_key("198.18.2.2", "198.18.1.2", 80, 40000, 6)
    assert format_flow_key(k) == "tcp 198.18.1.2:40000 <-> 198.18.2.2:80 vlan 0"
    k, _ = flow_key("2001:db8::2", "2001:db8::1", 53, 5353, 17, vlan=12)
    assert format_flow_key(k) == "udp [2001:db8::1]:5353 <-> [2001:db8::2]:53 vlan 12"
    k, _ = flow_key("10.0.0.1", "10.0.0.2", 77, 77, 1)
    assert format_flow_key(k) == "icmp 10.0.0.1 <-> 10.0.0.2 id 77 vlan 0"
    k, _ = flow_key("10.0.0.1", "10.0.0.2", 0, 0, 47)
    assert format_flow_key(k) == "proto-47 10.0.0.1 <-> 10.0.0.2 vlan 0"


def test_flow_info_facts_oriented_from_the_originator():
    """The kernel keeps ttl_max and isn per direction of the key ([from lo, from hi]); flow_info
    turns them to [from src, from dst] and says which isn the kernel has seen."""
    key, _ = flow_key("198.18.1.2", "198.18.2.2", 40000, 80, 6)
    flow = abi.Flow(flags=abi.FLOW_ORIG_HI | abi.FLOW_ISN1 | abi.FLOW_CONN_VERDICT, verdict=abi.VERDICT_BYPASS)
    flow.ttl_max[:] = [50, 60]
    flow.isn[:] = [123, 456]                     # isn[0] not valid: FLOW_ISN0 is clear
    info = flow_info(key, flow, now_ns=0)
    assert (info["src"], info["ttl_max"], info["isn"], info["handshake"], info["conn_verdict"]) == \
           ("198.18.2.2", [60, 50], [456, None], False, True)
    flow.flags = abi.FLOW_ISN0 | abi.FLOW_ISN1
    info = flow_info(key, flow, now_ns=0)
    assert (info["src"], info["ttl_max"], info["isn"], info["handshake"], info["conn_verdict"]) == \
           ("198.18.1.2", [50, 60], [123, 456], True, False)


def test_flow_flags_fit_the_u8_and_do_not_overlap():
    bits = [abi.FLOW_ORIG_HI, abi.FLOW_MIDSTREAM, abi.FLOW_SEQ0, abi.FLOW_SEQ1, abi.FLOW_ISN0, abi.FLOW_ISN1,
            abi.FLOW_CONN_VERDICT]
    assert sum(bits) < 0x100 and len(set(bits)) == len(bits) and all(b & (b - 1) == 0 for b in bits)
    assert abi.CNT_CONN_RESTART < 32            # an event is a bit of a __u32 (stats.h); the
    assert min(abi.NAME_COUNTERS) > abi.CNT_CONN_RESTART   # name counters are not events


# ---- CIDRs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cidr,plen,canonical", [
    ("198.18.0.0/15", 111, "198.18.0.0/15"),
    ("10.1.2.3/8", 104, "10.0.0.0/8"),                               # host bits cleared
    ("192.0.2.1", 128, "192.0.2.1/32"),
    ("0.0.0.0/0", 96, "0.0.0.0/0"),
    ("2001:db8::/32", 32, "2001:db8::/32"),
    ("::/0", 0, "::/0"),
    (" 2001:db8::1 ", 128, "2001:db8::1/128"),
])
def test_parse_cidr(cidr, plen, canonical):
    key = parse_cidr(cidr)
    assert key.prefixlen == plen
    assert format_prefix(key) == canonical
    if "." in cidr:
        assert bytes(key.addr)[:12] == b"\x00" * 10 + b"\xff\xff"


@pytest.mark.parametrize("bad", ["", "10.0.0.0/33", "2001:db8::/129", "example.com", "1.2.3/8", "10.0.0.0/-1"])
def test_parse_cidr_rejects(bad):
    with pytest.raises(ConfigError, match="is not an IPv4 or IPv6 CIDR"):
        parse_cidr(bad)


def test_ban_drops_are_in_the_drop_totals():
    """status/top/metrics sum the kernel's drops by stage (hybrid/observe/views.py): the ban
    counters sit in the same totals as the prefix counters, and have their own metrics help."""
    from hybrid.observe import metrics, views
    assert {"xdp_drop_prefix", "xdp_drop_ban"} <= set(views._KERNEL_TOTALS["dropped_xdp"])
    assert {"drop_tc_prefix", "drop_tc_ban"} <= set(views._KERNEL_TOTALS["dropped_tc"])
    assert {"xdp_drop_ban", "drop_tc_ban"} <= set(metrics._KERNEL_HELP)
    assert {"xdp_drop_ban", "drop_tc_ban"} <= set(abi.COUNTER_NAMES.values())


# ---- the CIDR fast path Maps.write_bans goes through -------------------------------------------
def test_prefix_key_bytes_equals_parse_cidr():
    rng = random.Random(3)
    cases = ["198.18.5.7/24", "198.18.0.0/15", "198.18.5.7", "0.0.0.0/0", "2001:2::/48", "2001:2::1",
             "::/0", "::ffff:198.18.5.7/120", "::ffff:198.18.5.7", " 198.18.1.1/32 ", "198.18.1.1/032",
             "2001:2:0:0:0:0:0:1/128", "fe80::1%eth0/64"]
    for _ in range(500):
        v4 = rng.random() < 0.5
        addr = ipaddress.IPv4Address(rng.getrandbits(32)) if v4 else ipaddress.IPv6Address(rng.getrandbits(128))
        cases.append(f"{addr}/{rng.randint(0, 32 if v4 else 128)}")
    for cidr in cases:
        try:
            want = bytes(parse_cidr(cidr))
        except ConfigError:
            with pytest.raises(ConfigError):
                prefix_key_bytes(cidr)
            continue
        assert prefix_key_bytes(cidr) == want, cidr


@pytest.mark.parametrize("bad", ["", "198.18.0.0/33", "2001:2::/129", "198.18.0.0/-1", "198.18.0.0/+8",
                                 "198.18.0.0/2_4", "198.18.0.0/ 8", "01.2.3.4/8", "1.2.3/8", "x/8"])
def test_prefix_key_bytes_rejects_what_parse_cidr_rejects(bad):
    with pytest.raises(ConfigError, match="is not an IPv4 or IPv6 CIDR"):
        prefix_key_bytes(bad)
