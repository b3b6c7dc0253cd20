"""Every attach option reaches the kernel as intended. Each row of the table below is an option
as given to `hybridctl attach` and what it must change in the kernel: the configuration map,
the ports and prefix maps, the flow table's size, the iptables rules, the XDP programs. A row
names every part of the kernel it is about, also when the expected value is the default's.

An attach compiles the programs (about 10 s), so rows about different parts of the kernel share
one: the table is packed into a few attaches, and after each the whole kernel view is compared
with DEFAULTS updated by those rows. A row thus also proves that its option changed nothing
else, and every part no row of an attach is about is checked against its default.

The expectations are written out as numbers, and the bits come from bpf/hybrid_common.h, not
from the Python that computes them: a wrong formula or a wrong bit fails here."""

from __future__ import annotations

import json
import os
import re

import pytest
from gwlab import hctl

from hybrid.datapath.maps import Maps
from hybrid.datapath.options import ATTACH
from hybrid.kernel import abi, bpffs, bpfsys

pytestmark = pytest.mark.integration
IFACES = ["to-client", "to-server"]
HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "hybrid_common.h")


def _header_bits() -> dict[str, int]:
    """HYBRID_<NAME> -> value of every ``#define HYBRID_<NAME> (1U << k)`` of the C header."""
    with open(HEADER) as f:
        return {m.group(1): 1 << int(m.group(2))
                for m in re.finditer(r"^#define HYBRID_(\w+)\s+\(1U << (\d+)\)", f.read(), re.MULTILINE)}


C = _header_bits()
ALL_REASONS = sum(v for k, v in C.items() if k.startswith("REASON_"))
TCP_UDP = C["PORT_TCP"] | C["PORT_UDP"]

# What the kernel holds after `hybridctl attach to-client to-server` and nothing else.
DEFAULTS = {
    "mark": (0x100000, 0x100000),
    "reasons": ALL_REASONS,
    "first_n": 3,
    "flags": 0,                                   # HYBRID_CFG_* bits
    # GCRA: interval = 1e9 / rate ns, tolerance = interval * (burst - 1), burst 0 = rate.
    "source": (0, 0),                             # off
    "global": (25_000, 25_000 * 39_999),          # 40000/s, a second's worth of burst
    "ports": {},
    "prefixes": {},
    "flow_table": 131072,
    "target": {"ipv4": "NFQUEUE --queue-num 0 --queue-bypass", "ipv6": "NFQUEUE --queue-num 0 --queue-bypass"},
    "hooks": {"ipv4": ["FORWARD"], "ipv6": ["FORWARD"]},
    "xdp": {"to-client": None, "to-server": None},   # auto: no XDP on veth
    "name_cache": False,                          # the cache's maps and parser programs
}

# (attach options, the parts of the kernel they are about and what those must hold)
V4_V6 = ("ipv4", "ipv6")
ROWS = [
    (["--mark", "0x200000", "--mark-mask", "0x600000"], {"mark": (0x200000, 0x600000)}),
    (["--mark", "4194304", "--mark-mask", "4194304"], {"mark": (0x400000, 0x400000)}),
    (["--flag", "syn,port"], {"reasons": C["REASON_SYN"] | C["REASON_PORT"]}),
    (["--flag", "first-n,malformed,fragment"],
     {"reasons": C["REASON_FIRST_N"] | C["REASON_MALFORMED"] | C["REASON_FRAGMENT"]}),
    (["--first-n", "7"], {"first_n": 7}),
    (["--first-n", "0"], {"first_n": 0}),
    (["--over-budget", "drop"], {"flags": C["CFG_OVER_DROP"]}),
    (["--over-budget", "pass"], {"flags": 0}),
    (["--source-rate", "100"], {"source": (10_000_000, 990_000_000)}),
    (["--source-rate", "100", "--source-burst", "250"], {"source": (10_000_000, 2_490_000_000)}),
    (["--source-rate", "3", "--source-burst", "1"], {"source": (333_333_333, 0)}),
    (["--source-burst", "250"], {"source": (0, 0)}),                        # no rate: off
    (["--global-rate", "5000", "--global-burst", "20000"], {"global": (200_000, 3_999_800_000)}),
    (["--global-burst", "7"], {"global": (25_000, 150_000)}),
    (["--global-rate", "0"], {"global": (0, 0)}),
    (["--queues", "2"], {"target": dict.fromkeys(V4_V6, "NFQUEUE --queue-num 2 --queue-bypass")}),
    (["--queues", "0-3"], {"target": dict.fromkeys(V4_V6, "NFQUEUE --queue-balance 0:3 --queue-bypass")}),
    (["--fail-closed"], {"target": dict.fromkeys(V4_V6, "NFQUEUE --queue-num 0")}),
    (["--queues", "4-5", "--queue-cpu-fanout", "--fail-closed"],
     {"target": dict.fromkeys(V4_V6, "NFQUEUE --queue-balance 4:5 --queue-cpu-fanout")}),
    (["--hook", "input"], {"hooks": {"ipv4": ["INPUT"], "ipv6": ["INPUT"]}}),
    (["--hook", "forward", "--hook", "input"], {"hooks": {"ipv4": ["FORWARD", "INPUT"], "ipv6": ["FORWARD", "INPUT"]}}),
    (["--family", "ipv4"], {"target": {"ipv4": DEFAULTS["target"]["ipv4"], "ipv6": None},
                            "hooks": {"ipv4": ["FORWARD"], "ipv6": []}}),
    (["--family", "ipv6"], {"target": {"ipv4": None, "ipv6": DEFAULTS["target"]["ipv6"]},
                            "hooks": {"ipv4": [], "ipv6": ["FORWARD"]}}),
    (["--watch-port", "53", "--watch-port", "8080"],
     {"ports": {53: TCP_UDP, 8080: TCP_UDP}, "flags": C["CFG_HAVE_PORTS"]}),
    (["--watch-prefix", "192.0.2.0/24", "--block-prefix", "203.0.113.7/24", "--block-prefix", "2001:db8:bad::/48"],
     {"prefixes": {"192.0.2.0/24": C["PREFIX_WATCH"], "203.0.113.0/24": C["PREFIX_BLOCK"],
                   "2001:db8:bad::/48": C["PREFIX_BLOCK"]}, "flags": C["CFG_HAVE_PREFIXES"]}),
    (["--watch-prefix", "198.51.100.0/24", "--block-prefix", "198.51.100.0/24"],
     {"prefixes": {"198.51.100.0/24": C["PREFIX_WATCH"] | C["PREFIX_BLOCK"]}, "flags": C["CFG_HAVE_PREFIXES"]}),
    (["--flow-table-size", "4096"], {"flow_table": 4096}),
    (["--xdp-mode", "generic"], {"xdp": dict.fromkeys(IFACES, "xdpgeneric")}),
    (["--xdp-mode", "off"], {"xdp": dict.fromkeys(IFACES, None)}),
    (["--name-cache"], {"flags": C["CFG_NAMES"], "name_cache": True}),
]


def _options(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("--")}


def _pack(rows) -> list[list]:
    """Rows in attaches: a row joins the first attach none of whose rows shares an option or a
    part of the kernel with it."""
    batches: list[list] = []
    for row in rows:
        for batch in batches:
            if all(not (_options(row[0]) & _options(r[0]) or row[1].keys() & r[1].keys()) for r in batch):
                batch.append(row)
                break
        else:
            batches.append([row])
    return batches


BATCHES = _pack(ROWS)


def kernel_view(lab) -> dict:
    """What the gateway's kernel holds, in DEFAULTS' terms."""
    with Maps.open_pinned(os.path.join(bpffs.locate(), lab.netns("gw"))) as maps:
        cfg = maps.get_config()
        view = {
            "mark": (cfg.mark_value, cfg.mark_mask),
            "reasons": cfg.reasons,
            "first_n": cfg.first_n,
            "flags": cfg.flags,
            "source": (cfg.source_interval_ns, cfg.source_tolerance_ns),
            "global": (cfg.global_interval_ns, cfg.global_tolerance_ns),
            "ports": dict(maps.watched_ports()),
            "prefixes": dict(maps.prefixes()),
            "flow_table": bpfsys.map_info(maps.fd(abi.MAP_FLOWS)).max_entries,
            "name_cache": maps.has_name_cache,
        }
    view["target"], view["rule_mark"], view["hooks"] = {}, {}, {}
    for family, save in (("ipv4", "iptables-save"), ("ipv6", "ip6tables-save")):
        lines = lab.run("gw", [save]).stdout.splitlines()
        rules = [ln for ln in lines if ln.startswith("-A HYBRID ")]
        assert len(rules) <= 1, rules
        mark = re.search(r" -m mark --mark (0x[0-9a-f]+)/(0x[0-9a-f]+) ", rules[0]) if rules else None
        view["rule_mark"][family] = (int(mark.group(1), 16), int(mark.group(2), 16)) if mark else None
        view["target"][family] = rules[0].split(" -j ", 1)[1] if rules else None
        view["hooks"][family] = sorted(ln.split()[1] for ln in lines
                                       if ln.startswith("-A ") and ln.endswith("-j HYBRID"))
    links = {link["ifname"]: link for link in json.loads(lab.run("gw", ["ip", "-d", "-j", "link", "show"]).stdout)}
    view["xdp"] = {}
    for name in IFACES:
        xdp = links[name].get("xdp")
        view["xdp"][name] = {1: "xdpdrv", 2: "xdpgeneric", 3: "xdpoffload"}.get(xdp["mode"]) if xdp else None
    return view


@pytest.mark.parametrize("rows", BATCHES, ids=[" | ".join(" ".join(r[0]) for r in b) for b in BATCHES])
def test_attach_options_reach_the_kernel(lab, rows):
    argv = [a for r in rows for a in r[0]]
    hctl(lab, "attach", *IFACES, *argv)
    try:
        view = kernel_view(lab)
    finally:
        hctl(lab, "detach", "--all")
    expected = dict(DEFAULTS)
    for _, about in rows:
        expected.update(about)
    expected["rule_mark"] = {f: expected["mark"] if expected["target"][f] else None for f in V4_V6}
    assert view == expected, f"hybridctl attach {' '.join(argv)}"
    for save in ("iptables-save", "ip6tables-save"):
        assert "HYBRID" not in lab.run("gw", [save]).stdout


def test_every_attach_option_has_a_row():
    given = {a for argv, _ in ROWS for a in argv}
    for opt in ATTACH:
        if opt.key != "interfaces":
            assert any(spelling in given for spelling in opt.cli.split("/")), opt.key
