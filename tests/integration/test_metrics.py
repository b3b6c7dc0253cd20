"""The Prometheus endpoint, scraped: hybrid attached in the lab's gateway, the real engine
deciding real traffic, serve_metrics() in a process of the gateway namespace. The figures must
be the ones `hybridctl status --json`, the engine's stats file and the kernel's queue counters
give for the same moment."""

from __future__ import annotations

import socket

import pytest
from gwlab import (
    MetricsProcess,
    attached_with_engine,
    engine_stats,
    nfqueue_counters,
    sample,
    status,
)
from traffic import udp_send

from hybrid.errors import ConfigError, HybridError
from hybrid.lab.topology import netns
from hybrid.observe.metrics import serve_metrics

pytestmark = pytest.mark.integration

RULES = """default = "accept"
default_flow = "none"

[[rule]]
name = "drop-10086"
proto = "udp"
dport = 10086
action = "drop"

[[rule]]
name = "bypass-10010"
proto = "udp"
dport = 10010
action = "accept"
flow = "bypass"
ttl = 60
"""


def _between(low: float, value: float, high: float) -> bool:
    return low <= value <= high


def test_scrape_agrees_with_status_engine_and_queue(lab, tmp_path):
    with attached_with_engine(lab, tmp_path, RULES, "--xdp-mode", "generic"), MetricsProcess(lab) as metrics:
        assert udp_send(lab, [b"first"], dport=10010, sport=41000) == 1          # decided: bypass
        assert udp_send(lab, [b"pass"] * 4, dport=10010, sport=41000) == 4       # kept in the kernel
        assert udp_send(lab, [b"drop"] * 3, dport=10086, sport=41001) == 0
        eng = engine_stats(lab, until=lambda st: st["rules"].get("drop-10086") == 3)
        assert eng["rules"]["drop-10086"] == 3

        before, q_before = status(lab), nfqueue_counters(lab)
        m = metrics.scrape()
        after, q_after = status(lab), nfqueue_counters(lab)

        assert sample(m, "hybrid_attached", instance=lab.netns("gw")) == 1
        # kernel counters: every counter of every interface, between two status reads
        for ifname in ("to-client", "to-server"):
            c0, c1 = before["interfaces"][ifname]["counters"], after["interfaces"][ifname]["counters"]
            for name, value in c1.items():
                if name.startswith("reason_"):
                    got = sample(m, "hybrid_kernel_flagged_by_reason_total", interface=ifname,
                                 reason=name[len("reason_"):])
                else:
                    got = sample(m, f"hybrid_kernel_{name}_total", interface=ifname)
                assert _between(c0[name], got, value), (ifname, name, c0[name], got, value)
        client = after["interfaces"]["to-client"]["counters"]
        assert client["xdp_packets"] > 0 and client["flagged"] >= 4 and client["bypassed"] >= 4

        # flows: the total between two reads; the UDP flow to 10010 is in BYPASS
        flows = sum(v for (name, _), v in m.items() if name == "hybrid_flows")
        assert _between(before["flows"], flows, after["flows"])
        assert sample(m, "hybrid_flows", verdict="bypass") == 1

        # the netfilter queue's own counters
        assert sample(m, "hybrid_nfqueue_queued_total", queue="0") == q_before[0][7] == q_after[0][7]
        assert sample(m, "hybrid_nfqueue_queued_total", queue="0") >= 4
        assert sample(m, "hybrid_nfqueue_dropped_total", queue="0") == q_after[0][5]
        assert sample(m, "hybrid_nfqueue_user_dropped_total", queue="0") == q_after[0][6]
        assert sample(m, "hybrid_nfqueue_waiting", queue="0") == 0
        # fail-open overflow, derived as status derives it (nothing overflowed here)
        assert sample(m, "hybrid_nfqueue_passed_overflow_total") == after["queue"]["passed_overflow"] == 0

        # the engine: exactly what it published (it is idle now)
        eng = engine_stats(lab)
        assert sample(m, "hybrid_engine_up", queue="0") == 1
        assert sample(m, "hybrid_engine_packets_total", queue="0") == eng["packets"]
        assert sample(m, "hybrid_engine_actions_total", queue="0", action="drop") == 3
        assert sample(m, "hybrid_engine_actions_total", queue="0", action="accept") == eng["actions"]["accept"] >= 1
        assert sample(m, "hybrid_engine_rule_verdicts_total", queue="0", rule="drop-10086") == 3
        assert sample(m, "hybrid_engine_rule_verdicts_total", queue="0", rule="bypass-10010") == \
            eng["rules"]["bypass-10010"] >= 1
        assert sample(m, "hybrid_engine_flow_verdicts_total", queue="0", verdict="bypass") == \
            eng["flow_verdicts"]["bypass"] >= 1
        # every packet the engine handled is in the decision-time histogram, once
        assert sample(m, "hybrid_engine_decision_seconds_count", queue="0") == eng["packets"]
        assert sample(m, "hybrid_engine_decision_seconds_bucket", queue="0", le="+Inf") == eng["packets"]
        assert 0 < sample(m, "hybrid_engine_decision_seconds_sum", queue="0") == eng["decision_ns_sum"] / 1e9
        buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in m.items()
                         if name == "hybrid_engine_decision_seconds_bucket")
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)      # cumulative
        # a packet handled in Python takes more than half a microsecond and less than a second
        assert buckets[0][1] < eng["packets"] and sample(
            m, "hybrid_engine_decision_seconds_bucket", queue="0", le="1.073741824") == eng["packets"]

        # more traffic moves the counters by what was sent
        m0 = sample(m, "hybrid_kernel_bypassed_total", interface="to-client")
        assert udp_send(lab, [b"more"] * 7, dport=10010, sport=41000) == 7
        m2 = metrics.scrape()
        assert sample(m2, "hybrid_kernel_bypassed_total", interface="to-client") == m0 + 7


def test_endpoint_without_attachment_and_paths(lab):
    with MetricsProcess(lab) as metrics:
        m = metrics.scrape()
        assert sample(m, "hybrid_attached", instance=lab.netns("gw")) == 0
        assert not [k for k in m if k[0].startswith("hybrid_kernel_") and not k[0].endswith("_created")]
        assert metrics.get("/")[0] == 200
        assert metrics.get("/nothing")[0] == 404


def test_bad_address_and_busy_port_are_one_line_errors(lab):
    with netns(lab.netns("gw")):
        with pytest.raises(ConfigError, match=r"^metrics address 'no such host\.invalid' is not"):
            serve_metrics("no such host.invalid", 0)
        with pytest.raises(ConfigError, match="metrics port 70000"):
            serve_metrics("127.0.0.1", 70000)
        busy = socket.socket()
        try:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(HybridError, match=rf"^cannot serve metrics on 127.0.0.1:{port}: Address already in use"):
                serve_metrics("127.0.0.1", port)
        finally:
            busy.close()
        with serve_metrics("::1", 0) as h:       # IPv6 loopback works too
            assert h.port > 0 and h.url == f"http://[::1]:{h.port}/metrics"
