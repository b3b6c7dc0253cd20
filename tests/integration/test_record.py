"""The lab recorder (hybrid/lab/record.py) with real traffic: a web scenario recorded in a router
lab holds each link's ingress once, the blocked request is in the live verdict log and was
refused, the names Wireshark reads in the capture are the scenario's, and nothing of the
recording is left in the lab; a DNS scenario recorded in a bridge lab holds both ports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from gwlab import status

from hybrid.kernel import netfilter as nf
from hybrid.lab import record as rec_mod
from hybrid.lab import tshark
from hybrid.lab.record import DNS_NAMES, WEB_HOSTS, record

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("dumpcap") is None, reason="dumpcap missing: run scripts/setup.sh")]


def frames(capture) -> list[tuple[int, str, str, str]]:
    """(frame, interface name, source address, destination address) of every IP frame."""
    out = subprocess.run(["tshark", "-n", "-r", str(capture), "-Y", "ip or ipv6", "-T", "fields",
                          "-e", "frame.number", "-e", "frame.interface_name", "-e", "ip.src", "-e", "ipv6.src",
                          "-e", "ip.dst", "-e", "ipv6.dst"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        n, ifname, s4, s6, d4, d6 = line.split("\t")
        rows.append((int(n), ifname, s4 or s6, d4 or d6))
    return rows


def left_behind(lab) -> dict:
    """What a recording could leave in the lab: processes in its namespaces (dumpcap, nginx,
    dnsmasq, the engine), hybrid's attachment, its netfilter rules."""
    pids = {role: subprocess.run(["ip", "netns", "pids", lab.netns(role)], capture_output=True, text=True,
                                 check=True).stdout.split()
            for role in ("client", "gw", "server")}
    return {"pids": {r: p for r, p in pids.items() if p}, "attached": status(lab).get("attached", False),
            "netfilter": nf.leftovers(lab.netns("gw"))}


def test_a_recorded_web_scenario(lab, tmp_path):
    rec = record(lab, "web", tmp_path / "web")
    # Both links' ingress, each frame once: the client's frames on to-client, the server's on
    # to-server (ingress only: a forwarded copy would be the other side's address on the other link).
    rows = frames(rec.capture)
    client, server = lab.info.client, lab.info.server
    # Link-local sources (a host's router or neighbour solicitations, sent when the kernel
    # pleases) are not forwarded, so they say nothing about ingress: left out (seen in CI).
    on = {ifname: {src for _, i, src, _ in rows if i == ifname and not src.startswith("fe80:")}
          for ifname in rec_mod.IFACES}
    assert on["to-client"] == {client.ipv4, client.ipv6}, on
    assert on["to-server"] == {server.ipv4, server.ipv6}, on
    assert rec.capture_dropped == {"to-client": 0, "to-server": 0}
    assert rec.captured["to-client"] + rec.captured["to-server"] == len(rows) + _not_ip(rec.capture)

    # What the clients saw live: the allowed Host served, the blocked one refused (reset).
    allowed, blocked = WEB_HOSTS
    for family in ("ipv4", "ipv6"):
        assert rec.outcomes[f"http {allowed} {family}"] == 200, rec.outcomes
        assert rec.outcomes[f"http {blocked} {family}"] == 0, rec.outcomes
    # The live verdict log has the blocked request, once per address family, and no other.
    blocks = [v for v in rec.verdicts if v["rule"] == "block-host"]
    assert sorted(v["src"] for v in blocks) == sorted([client.ipv4, client.ipv6]), rec.verdicts
    assert all(v["action"] == "reject" and v["flow"] == "block" and v["dport"] == 80 for v in blocks)
    # ... and the capture holds that request, on the client's link, from the logged port.
    hosts = tshark.names(rec.capture)
    assert [(n.kind, n.name) for n in hosts] == [("http_host", h) for h in (allowed, blocked) * 2], hosts
    by_frame = {n: (ifname, src) for n, ifname, src, _ in rows}
    for v in blocks:
        assert any(n.name == blocked and by_frame[n.frame] == ("to-client", v["src"]) for n in hosts), (v, hosts)

    # The live counters: the engine was queued packets, the kernel counted the recording's frames.
    assert rec.queued_packets() > 0
    assert rec.kernel_counters()["packets"] >= len(rows)
    on_disk = json.loads((tmp_path / "web" / "record.json").read_text())
    assert on_disk["scenario"] == "web" and on_disk["queued_packets"] == rec.queued_packets()
    assert [json.loads(ln) for ln in (tmp_path / "web" / "verdicts.jsonl").read_text().splitlines()] == rec.verdicts

    assert left_behind(lab) == {"pids": {}, "attached": False, "netfilter": []}


def test_a_recorded_dns_scenario_in_a_bridge_lab(bridge_lab, tmp_path):
    rec = record(bridge_lab, "dns", tmp_path / "dns")
    rows = frames(rec.capture)
    assert {i for _, i, _, _ in rows} == set(rec_mod.IFACES)
    assert rec.capture_dropped == {"to-client": 0, "to-server": 0}
    queries = {n.name for n in tshark.names(rec.capture) if n.kind == "dns_qname"}
    assert queries == set(DNS_NAMES)
    # Live, through the bridge: the allowed name answered over UDP (both families) and TCP, the
    # blocked one refused, each refusal in the verdict log.
    allowed, blocked = DNS_NAMES
    for how in ("udp ipv4", "udp ipv6", "tcp ipv4"):
        assert rec.outcomes[f"dns {allowed} {how}"] == [bridge_lab.info.server.ipv4], rec.outcomes
        assert rec.outcomes[f"dns {blocked} {how}"] == [], rec.outcomes
    refused = sorted((v["proto"], v["src"]) for v in rec.verdicts if v["rule"] == "block-dns")
    client = bridge_lab.info.client
    assert refused == sorted([(6, client.ipv4), (17, client.ipv4), (17, client.ipv6)]), rec.verdicts
    assert left_behind(bridge_lab) == {"pids": {}, "attached": False, "netfilter": []}


def test_bad_input_is_one_line(lab, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]]\nname = \"x\"\naction = \"explode\"\n")
    proc = subprocess.run([sys.executable, "-m", "hybrid.lab.record", "--scenario", "web",
                           "--lab", lab.name, "--rules", str(bad), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("record: error: ") and "action 'explode'" in proc.stderr
    assert left_behind(lab) == {"pids": {}, "attached": False, "netfilter": []}


def _not_ip(capture) -> int:
    """Frames that are not IP (ARP): dumpcap counted them, the IP listing does not."""
    out = subprocess.run(["tshark", "-n", "-r", str(capture), "-Y", "not (ip or ipv6)", "-T", "fields",
                          "-e", "frame.number"], capture_output=True, text=True, check=True).stdout
    return len(out.split())
