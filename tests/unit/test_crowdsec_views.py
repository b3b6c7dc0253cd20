"""How status, top and the metrics show the CrowdSec link's report (hybrid/observe/): every count
the link publishes reaches a line or a metric, a dead supervisor's report says so, a link that is
down says what the kernel does meanwhile."""

from __future__ import annotations

import os
import time

import pytest
from prometheus_client.core import Metric

from hybrid.observe import metrics, views
from hybrid.observe.status import crowdsec_lines

pytestmark = pytest.mark.unit


def report(**over):
    doc = {"url": "http://198.18.200.1:8080", "poll_interval": 1.0, "connected": True, "last_pull": time.time() - 0.4,
           "last_push": None, "last_error": None, "error_kind": None, "down_since": None,
           "errors": {"unreachable": 2}, "push_errors": {}, "own": ["198.18.1.1"], "pid": os.getpid(),
           "updated": time.time(),
           "bouncer": {"synced": True, "decisions": 1204, "kernel_entries": 1204,
                       "applied": {"crowdsec/ip": 1200, "cscli/range": 4}, "filtered": {"unsupported_type": 3},
                       "refused": {"protected": 1, "too_broad": 1}, "unsupported": {"type:captcha": 3},
                       "counts": {"pulls": 10, "snapshots": 2}, "last_snapshot": None},
           "share": {"received": 50, "pushed": 12, "deduplicated": 38, "rate_limited": 0, "protected": 0,
                     "malformed": 0, "lost_while_down": 0, "expired_unsent": 0, "pending": 0}}
    doc.update(over)
    return doc


def test_lines_name_every_count():
    cs = views.crowdsec(report(), [{"xdp_drop_ban": 53870}, {"drop_tc_ban": 11}],
                        [{"share": {"sent": 12, "repeated": 40, "dropped": 0, "unsent": 0}}])
    text = "\n".join(crowdsec_lines(cs))
    assert text.startswith("crowdsec: connected to http://198.18.200.1:8080, last pull 0.")
    assert "bans: 1,204 decisions in the kernel (crowdsec/ip 1,200, cscli/range 4); dropped 53,881 packets " \
           "(XDP 53,870, tc 11)" in text
    assert "refused (would blackhole the gateway): protected 1, too_broad 1" in text
    assert "not enforced: type:captcha 3" in text
    assert "shared blocks: pushed 12, pending 0, deduplicated 78, rate-limited 0, protected 0" in text
    assert "errors since start: pull unreachable 2" in text


def test_down_and_dead():
    down = views.crowdsec(report(connected=False, error_kind="auth", last_error="the key was refused"), [], [])
    assert crowdsec_lines(down)[0] == ("crowdsec: DOWN (auth: the key was refused); the kernel keeps its bans "
                                       "until they expire, retrying")
    dead = views.crowdsec(report(pid=2 ** 22 + 12345), [], [])
    assert "supervisor that is gone" in crowdsec_lines(dead)[0]
    assert views.crowdsec(None, [], []) is None and crowdsec_lines(None) == []


def test_metrics_families():
    cs = views.crowdsec(report(), [{"xdp_drop_ban": 5}], [])
    fams: dict[str, Metric] = {f.name: f for f in metrics._crowdsec(cs)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("hybrid_crowdsec_connected", ())] == 1
    assert samples[("hybrid_crowdsec_decisions", (("origin", "crowdsec"), ("scope", "ip")))] == 1200
    assert samples[("hybrid_crowdsec_refused_total", (("reason", "protected"),))] == 1
    assert samples[("hybrid_crowdsec_not_enforced_total", (("what", "type:captcha"),))] == 3
    assert samples[("hybrid_crowdsec_dropped_packets_total", (("hook", "xdp"),))] == 5
    assert samples[("hybrid_crowdsec_errors_total", (("kind", "unreachable"), ("op", "pull")))] == 2
    assert samples[("hybrid_crowdsec_shared_total", (("what", "pushed"),))] == 12
    assert samples[("hybrid_crowdsec_pulls_total", (("kind", "delta"),))] == 8
