"""The lab on the real kernel: reachability through the gateway, isolation, clean removal."""

import json
import subprocess

import pytest
from gwlab import HYBRIDCTL
from leakcheck import new_lab_name

from hybrid.lab import topology as labmod
from hybrid.lab.demo import Nginx, iperf3

pytestmark = pytest.mark.integration


def test_client_reaches_server_through_gateway(lab):
    assert lab.ping("client", lab.info.server.ipv4)
    assert lab.ping("client", lab.info.server.ipv6)
    # It really is forwarded: the gateway's FORWARD counters move.
    lab.run("gw", ["iptables", "-I", "FORWARD", "-p", "icmp"])   # a counting rule, no target
    try:
        assert lab.ping("client", lab.info.server.ipv4, count=3)
        out = lab.run("gw", ["iptables-save", "-c", "-t", "filter"]).stdout
    finally:
        lab.run("gw", ["iptables", "-D", "FORWARD", "-p", "icmp"])
    assert "[6:504] -A FORWARD -p icmp" in out  # 3 echo requests + 3 replies of 84 bytes


def test_no_default_route_anywhere(lab):
    for role in labmod.ROLES:
        routes = lab.run(role, ["ip", "route", "show", "default"]).stdout + \
            lab.run(role, ["ip", "-6", "route", "show", "default"]).stdout
        assert routes.strip() == "", f"{role} has a default route: {routes}"
    # An address outside the lab is unreachable (no route), and nothing is sent.
    proc = lab.run("client", ["ping", "-c1", "-W1", "192.0.2.1"], check=False)
    assert proc.returncode != 0 and "unreachable" in (proc.stderr + proc.stdout).lower()


def test_real_tcp_and_http_through_gateway(lab):
    res = iperf3(lab, seconds=1)
    assert res["end"]["sum_received"]["bytes"] > 1_000_000
    with Nginx(lab):
        out = lab.run("client", ["curl", "-s", "-m", "5", f"http://[{lab.info.server.ipv6}]/"]).stdout
    assert out == "hello from the hybrid lab\n"


def test_lab_cli_up_status_down_leaves_nothing():
    name = new_lab_name()
    up = subprocess.run([*HYBRIDCTL, "lab", "up", "--name", name, "--json"], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["server"]["ipv4"] == "198.18.2.2"
    try:
        st = subprocess.run([*HYBRIDCTL, "lab", "status", "--name", name, "--json"], capture_output=True, text=True)
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["client_to_server_ipv6"] is True
        again = subprocess.run([*HYBRIDCTL, "lab", "up", "--name", name], capture_output=True, text=True)
        assert again.returncode == 1
        assert again.stderr.strip().splitlines() == [
            f"Error: lab {name!r} is already up (namespaces {name}-client, {name}-gw, {name}-server): "
            f"run 'hybridctl lab down --name {name}' first"]
    finally:
        down = subprocess.run([*HYBRIDCTL, "lab", "down", "--name", name], capture_output=True, text=True)
    assert down.returncode == 0
    assert not {f"{name}-client", f"{name}-gw", f"{name}-server"} & labmod.existing_netns()
    assert name not in labmod.recorded_labs()


def test_failed_lab_up_removes_what_it_created(monkeypatch):
    name = new_lab_name()
    lb = labmod.Lab(name)
    real_run = labmod.sysutil.run

    def failing_run(argv, **kw):  # fail the second veth: namespaces and the first pair exist by then
        if "to-server" in argv and "veth" in argv:
            raise labmod.HybridError("injected failure")
        return real_run(argv, **kw)

    monkeypatch.setattr(labmod.sysutil, "run", failing_run)
    with pytest.raises(labmod.HybridError, match="injected"):
        lb.up()
    monkeypatch.undo()
    assert not set(lb.namespaces) & labmod.existing_netns()


def test_lab_exec_runs_inside_the_namespace(lab):
    proc = subprocess.run([*HYBRIDCTL, "lab", "exec", "--name", lab.name, "server", "--", "ip", "-br", "-4", "addr"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    assert "198.18.2.2/24" in proc.stdout


def test_bridge_lab_bridges_one_subnet_and_routes_nothing(bridge_lab):
    """The bridge lab: client and server on one subnet, reached through the gateway's bridge
    (its ports carry no address, it forwards nothing at layer 3), and no way out."""
    lab = bridge_lab
    assert lab.info.kind == "bridge" and lab.info.gw_client.ipv4 == ""
    assert lab.ping("client", lab.info.server.ipv4)
    assert lab.ping("client", lab.info.server.ipv6)
    gw = json.loads(lab.run("gw", ["ip", "-j", "addr", "show"]).stdout)
    addressed = {link["ifname"]: [a["local"] for a in link.get("addr_info", [])] for link in gw}
    assert addressed["br0"] == [] and addressed["to-client"] == [] and addressed["to-server"] == []
    assert lab.run("gw", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
    ports = json.loads(lab.run("gw", ["ip", "-j", "link", "show", "master", "br0"]).stdout)
    assert sorted(p["ifname"] for p in ports) == ["to-client", "to-server"]
    for role in labmod.ROLES:
        assert lab.run(role, ["ip", "route", "show", "default"]).stdout.strip() == ""
    res = iperf3(lab, seconds=1)
    assert res["end"]["sum_received"]["bytes"] > 1_000_000
