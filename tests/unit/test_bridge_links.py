"""Which links a bridge attach resolves to, on made-up links: a bridge stands for its ports, a
port brings its bridge into bridge mode, and a bridge with no port or a port that is not
Ethernet is refused in one line before anything changes."""

import pytest
from click.testing import CliRunner

from hybrid.cli.main import main
from hybrid.datapath import attach as att
from hybrid.kernel import netlink

pytestmark = pytest.mark.unit
ETHER = netlink.ARPHRD_ETHER


@pytest.fixture
def links(monkeypatch):
    """br0 with ports p0 and p1; br1 with no port; br2 with a layer-3 port; eth0 on its own."""
    table = {  # name: (index, kind, type, master)
        "br0": (1, "bridge", ETHER, 0), "p0": (2, "veth", ETHER, 1), "p1": (3, "veth", ETHER, 1),
        "br1": (4, "bridge", ETHER, 0), "br2": (5, "bridge", ETHER, 0), "tun0": (6, "tun", 0xFFFE, 5),
        "eth0": (7, None, ETHER, 0),
    }

    def link_info(name):
        if name not in table:
            raise att.NotFoundError(f"interface {name!r} does not exist")
        idx, kind, typ, master = table[name]
        return netlink.LinkInfo(name, idx, kind, typ, None, 0, True, master)

    monkeypatch.setattr(att.netlink, "link_info", link_info)
    monkeypatch.setattr(att.netlink, "ifname", lambda i: next(n for n, v in table.items() if v[0] == i))
    monkeypatch.setattr(att.netlink, "bridge_ports", lambda br: sorted(
        n for n, v in table.items() if v[3] == table[br][0]))
    return table


def test_a_bridge_stands_for_its_ports(links):
    got, bridges = att.resolve_links(["br0"])
    assert list(got) == ["p0", "p1"] and bridges == {"br0": ["p0", "p1"]}


def test_a_port_named_is_bridge_mode_and_a_plain_link_is_not(links):
    got, bridges = att.resolve_links(["p1", "eth0"])
    assert list(got) == ["p1", "eth0"] and bridges == {"br0": ["p1"]}
    assert att.resolve_links(["eth0"])[1] == {}


def test_a_bridge_and_its_port_named_together_attach_each_port_once(links):
    got, bridges = att.resolve_links(["p0", "br0"])
    assert sorted(got) == ["p0", "p1"] and bridges == {"br0": ["p0", "p1"]}


@pytest.mark.parametrize("name, message", [
    ("br1", "br1 is a bridge with no port: hybrid inspects a bridge on its ports; "
            "add them first (ip link set PORT master br1)"),
    ("br2", "bridge br2: tun0 is a layer-3 device (link type none)"),
])
def test_refused_in_one_line_before_anything_changes(links, monkeypatch, name, message):
    def changed(*args, **kw):
        raise AssertionError("attach went past the link check")
    monkeypatch.setattr(att.sysutil, "require_root", lambda what: None)
    for target, fn in ((att.inst, "name"), (att.State, "load"), (att.bpffs, "ensure"),
                       (att.loader, "compile_datapath"), (att.netfilter, "install")):
        monkeypatch.setattr(target, fn, changed)
    res = CliRunner().invoke(main, ["attach", name], catch_exceptions=False)
    assert res.exit_code == 2 and len(res.output.splitlines()) == 1
    assert res.output.startswith("Error: " + message), res.output


def test_the_input_hook_alone_is_refused_on_a_bridge(links, monkeypatch):
    monkeypatch.setattr(att.sysutil, "require_root", lambda what: None)
    res = CliRunner().invoke(main, ["attach", "br0", "--hook", "input"], catch_exceptions=False)
    assert res.exit_code == 2
    assert res.output == ("Error: bridge br0: bridged packets meet iptables in FORWARD (through br_netfilter); "
                          "attach with the forward hook\n")
