"""An independent oracle for the names hybrid decides on: Wireshark's dissectors.

Real lab traffic (curl to nginx with an allowed and a blocked Host, HTTPS with an allowed and a
blocked SNI, dig to dnsmasq over UDP and TCP, IPv4 and IPv6, with a bulk transfer beside them)
is recorded on the gateway's links while hybrid is attached (hybrid/lab/record.py), with rules
that log every decision. The names the live engine decided on, and the names `hybridctl replay`
decided on from the capture, must each be exactly the names tshark reads in it: SNI, Host, and
the question names of DNS queries. A name hybrid never saw, or one it read differently from
Wireshark, fails here."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from gwlab import HYBRIDCTL

from hybrid.lab import tshark
from hybrid.lab.record import DNS_NAMES, LAB_RULES, TLS_NAMES, WEB_HOSTS, record

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("dumpcap") is None, reason="dumpcap missing: run scripts/setup.sh")]

# The recorder's rules, and a last rule that logs every other decision: each line then says
# which name (view, name) the decision read.
RULES = LAB_RULES + '\n[[rule]]\nname = "log-the-rest"\naction = "accept"\nlog = true\n'
VIEWS = {"tls_sni": "tls_sni", "quic_sni": "tls_sni", "http_host": "http_host", "dns_qname": "dns_qname"}


def _canonical(view: str, name: str) -> tuple[str, str]:
    name = name.lower().rstrip(".")
    if view == "http_host" and not name.startswith("[") and name.count(":") == 1:
        name = name.split(":", 1)[0]       # Host: name:port; hybrid and Wireshark may keep the port
    return view, name


def _decided(lines: list[dict]) -> set[tuple[str, str]]:
    return {_canonical(r["view"], r["name"]) for r in lines if r.get("view")}


@pytest.fixture(scope="module")
def recording(lab, tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle")
    rules = out / "log-all.toml"
    rules.write_text(RULES)
    return record(lab, "mixed", out / "rec", rules)


def test_the_names_hybrid_decided_on_are_wiresharks(recording, tmp_path):
    seen = {_canonical(VIEWS[n.kind], n.name) for n in tshark.names(recording.capture)}
    # The oracle saw what the scenario sent (else the comparison below proves nothing).
    expected = {("http_host", h) for h in WEB_HOSTS} | {("tls_sni", n) for n in TLS_NAMES} | \
        {("dns_qname", n) for n in DNS_NAMES}
    assert expected <= seen, sorted(expected - seen)

    live = _decided(recording.verdicts)
    assert live == seen, {"only hybrid (live)": sorted(live - seen), "only wireshark": sorted(seen - live)}

    log = tmp_path / "replay.jsonl"
    proc = subprocess.run([*HYBRIDCTL, "replay", recording.capture, "--rules", recording.rules,
                           "--client-iface", "to-client", "--server-iface", "to-server", "--log", str(log), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    replayed = _decided([json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()])
    assert replayed == seen, {"only hybrid (replay)": sorted(replayed - seen), "only wireshark": sorted(seen - replayed)}
    # And the blocked names were refused in the replay as live.
    report = json.loads(proc.stdout)
    blocked_rules = {f.get("rule") for f in report["flows"] if f.get("verdict") == "dropped"}
    assert {"block-host", "block-sni"} <= blocked_rules, blocked_rules
