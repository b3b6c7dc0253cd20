"""What the fleet's integration tests share beyond hybrid/lab/fleet.py (`hybridctl run` in a lab
gateway with a [crowdsec] table): traffic probes, and the LAPI's bans as the kernel keys them."""

from __future__ import annotations

import ipaddress
import subprocess


def lapi_networks(lapi, types=("ban",)) -> set[str]:
    """The networks the LAPI bans (as the kernel keys them), from its own view of its decisions."""
    out = set()
    for d in lapi.decisions():
        if d["type"] in types and d["scope"].lower() in ("ip", "range"):
            out.add(str(ipaddress.ip_network(d["value"], strict=False)))
    return out


def probe(netns: str, src: str, dst: str) -> bool:
    """One ping from ``src`` to ``dst`` inside ``netns`` answered within a second."""
    six = ":" in dst
    proc = subprocess.run(["ip", "netns", "exec", netns, "ping", "-6" if six else "-4", "-c", "1", "-W", "1",
                           "-I", src, dst], capture_output=True, timeout=10)
    return proc.returncode == 0
