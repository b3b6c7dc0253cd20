"""Which links attach accepts: Ethernet only, decided by the link's hardware type (ARPHRD), never
by its name. The integration side (a real tun and tap device) is tests/integration/test_linktypes.py."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hybrid.cli.main import main

from hybrid.datapath import attach as att
from hybrid.kernel import netlink

pytestmark = pytest.mark.unit

HINT = "attach to an Ethernet interface (a bridge port, a veth, a NIC)"


def layer3(ifname: str, name: str) -> str:
    return (f"{ifname} is a layer-3 device (link type {name}): its packets have no Ethernet header "
            f"and hybrid parses Ethernet frames; {HINT}")


@pytest.mark.parametrize("ifname, link_type, refusal", [
    ("eth0", netlink.ARPHRD_ETHER, None),
    ("tun0", 0xFFFE, layer3("tun0", "none")),
    ("wg0", 0xFFFE, layer3("wg0", "none")),
    ("ppp0", 512, layer3("ppp0", "ppp")),
    ("gre1", 778, layer3("gre1", "gre")),
    ("lo", netlink.ARPHRD_LOOPBACK, ("lo is the loopback device (link type loopback): it carries this host's "
                                     f"traffic to itself, not traffic hybrid can gate; {HINT}")),
    ("ib0", 32, f"ib0 is not an Ethernet device (link type infiniband): hybrid parses Ethernet frames; {HINT}"),
    ("odd0", 9999, f"odd0 is not an Ethernet device (link type 9999): hybrid parses Ethernet frames; {HINT}"),
])
def test_link_type_decides(ifname, link_type, refusal):
    assert att.link_type_refusal(ifname, link_type) == refusal


def test_every_layer3_type_is_refused_as_layer3():
    for link_type, name in netlink.ARPHRD_LAYER3.items():
        assert att.link_type_refusal("x0", link_type) == layer3("x0", name)


def test_the_name_does_not_decide():
    assert att.link_type_refusal("tun0", netlink.ARPHRD_ETHER) is None         # a tap named like a tun
    assert att.link_type_refusal("eth0", 0xFFFE) is not None                   # a tun named like a NIC


@pytest.fixture
def fake_links(monkeypatch):
    """attach() against made-up links: eth0 is Ethernet, tun0 layer-3. Everything attach would do
    after looking the links up fails the test, so a refusal proves nothing was changed."""
    types = {"eth0": netlink.ARPHRD_ETHER, "tun0": 0xFFFE}

    def link_info(name):
        return netlink.LinkInfo(name, 10 + len(name), None, types[name], None, 0, True)

    def changed(*args, **kw):
        raise AssertionError("attach went past the link check")

    monkeypatch.setattr(att.sysutil, "require_root", lambda what: None)
    monkeypatch.setattr(att.netlink, "link_info", link_info)
    for target, name in ((att.inst, "name"), (att.State, "load"), (att.bpffs, "ensure"),
                         (att.loader, "compile_datapath"), (att.netfilter, "install")):
        monkeypatch.setattr(target, name, changed)


@pytest.mark.parametrize("ifaces", [["tun0"], ["eth0", "tun0"]])
def test_cli_refuses_before_changing_anything(fake_links, ifaces):
    res = CliRunner().invoke(main, ["attach", *ifaces], catch_exceptions=False)
    assert res.exit_code == 2
    assert res.output.splitlines() == ["Error: " + layer3("tun0", "none")]
