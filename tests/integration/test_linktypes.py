"""attach refuses links whose frames hybrid cannot parse, on real devices in a lab's gateway: a tun
device (layer 3, link type none: packets start at the IP header, as on WireGuard, PPP and GRE,
which this kernel does not offer) and the loopback device are refused with one line and exit 2
before anything changes, also when named next to a good interface; a tap device (Ethernet) is
accepted. The decision itself is unit-tested in tests/unit/test_link_refusal.py."""

from __future__ import annotations

import json
import os

import pytest
from gwlab import hctl

from hybrid.kernel import bpffs

pytestmark = pytest.mark.integration

HINT = "attach to an Ethernet interface (a bridge port, a veth, a NIC)"
TUN_REFUSED = ("Error: tun0 is a layer-3 device (link type none): its packets have no Ethernet header and "
               f"hybrid parses Ethernet frames; {HINT}")
LO_REFUSED = ("Error: lo is the loopback device (link type loopback): it carries this host's traffic to itself, "
              f"not traffic hybrid can gate; {HINT}")


@pytest.fixture
def devices(lab):
    """tun0 (layer 3) and tap0 (Ethernet) in the gateway, removed afterwards."""
    for name, mode in (("tun0", "tun"), ("tap0", "tap")):
        lab.run("gw", ["ip", "tuntap", "add", "dev", name, "mode", mode])
        lab.run("gw", ["ip", "link", "set", name, "up"])
    try:
        yield lab
    finally:
        for name in ("tun0", "tap0"):
            lab.run("gw", ["ip", "link", "del", name], check=False)


def nothing_of_hybrid_left(lab) -> list[str]:
    """Every trace of hybrid in the gateway namespace (on every link) and on the bpffs; [] when clean."""
    left = []
    for link in json.loads(lab.run("gw", ["ip", "-j", "link", "show"]).stdout):
        name = link["ifname"]
        if "xdp" in link:
            left.append(f"xdp on {name}")
        filters = lab.run("gw", ["tc", "filter", "show", "dev", name, "ingress"], check=False).stdout
        if filters.strip():
            left.append(f"tc filter on {name}: {filters.strip()}")
        if "clsact" in lab.run("gw", ["tc", "qdisc", "show", "dev", name]).stdout:
            left.append(f"clsact on {name}")
    for save in ("iptables-save", "ip6tables-save"):
        left += [ln for ln in lab.run("gw", [save]).stdout.splitlines() if "hybrid" in ln.lower()]
    base = bpffs.locate()
    if base and os.path.exists(os.path.join(base, lab.netns("gw"))):
        left.append("pin directory")
    if os.path.exists(f"/run/hybrid/instances/{lab.netns('gw')}"):
        left.append("state directory")
    return left


@pytest.mark.parametrize("ifaces, line", [
    (["tun0"], TUN_REFUSED),
    (["to-client", "tun0"], TUN_REFUSED),      # one good, one bad: the good one is not touched either
    (["tun0", "to-client"], TUN_REFUSED),
    (["lo"], LO_REFUSED),
], ids=["tun0", "to-client+tun0", "tun0+to-client", "lo"])
def test_non_ethernet_link_is_refused_before_anything_changes(devices, ifaces, line):
    lab = devices
    proc = hctl(lab, "attach", *ifaces, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [line]
    assert nothing_of_hybrid_left(lab) == []


def test_tap_is_ethernet_and_accepted(devices):
    lab = devices
    try:
        hctl(lab, "attach", "tap0")
        out = lab.run("gw", ["tc", "filter", "show", "dev", "tap0", "ingress"]).stdout
        assert out.count("hybrid_tc_ingress") == 1
    finally:
        hctl(lab, "detach", "--all")
    assert nothing_of_hybrid_left(lab) == []
