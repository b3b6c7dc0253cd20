"""The iptables-restore transactions, computed from a ruleset, without touching the kernel."""

import pytest

from hybrid.errors import ConfigError
from hybrid.kernel import netfilter as nf

pytestmark = pytest.mark.unit

EMPTY = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -s 10.0.0.0/8 -j DROP
COMMIT
"""

INSTALLED = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:HYBRID - [0:0]
-A FORWARD -m comment --comment hybrid -j HYBRID
-A FORWARD -s 10.0.0.0/8 -j DROP
-A INPUT -s 192.0.2.0/24 -j HYBRID
-A HYBRID -m mark --mark 0x100000/0x100000 -m comment --comment "hybrid: flagged by BPF" -j NFQUEUE --queue-num 0 --queue-bypass
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j HYBRID_NOT_OURS
COMMIT
"""


def rule(**kw):
    base = dict(mark_value=0x100000, mark_mask=0x100000)
    base.update(kw)
    return nf.QueueRule(**base)


def test_install_on_empty_ruleset_inserts_one_jump_first():
    text = nf.install_text(rule(), EMPTY)
    assert text.splitlines() == [
        "*filter",
        ":HYBRID - [0:0]",
        ("-A HYBRID -m mark --mark 0x100000/0x100000 "
         "-m conntrack --ctstate INVALID,NEW,RELATED,ESTABLISHED,UNTRACKED "
         '-m comment --comment "hybrid: flagged by BPF" -j NFQUEUE --queue-num 0 --queue-bypass'),
        "-I FORWARD 1 -m comment --comment hybrid -j HYBRID",
        "COMMIT",
    ]


def test_the_queue_rule_pulls_conntrack_in_with_a_match_no_packet_fails():
    """The conntrack match exists to make the namespace reassemble fragments before the queue
    rule; it must not narrow the rule: every state a packet can be in is listed, and it comes
    after the mark match (evaluated for marked packets only)."""
    for r in (rule(), rule(hooks=("input",), families=("ipv6",)), rule(queue_first=1, queue_last=3)):
        queue = next(ln for ln in nf.install_text(r, EMPTY).splitlines() if "NFQUEUE" in ln)
        states = queue.split("--ctstate ", 1)[1].split()[0].split(",")
        assert sorted(states) == sorted(["INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED"])
        assert queue.index("-m mark") < queue.index("-m conntrack") < queue.index("-j NFQUEUE")


def test_status_says_whether_the_queue_rule_reassembles(monkeypatch):
    saves = {"ipv4": INSTALLED.replace("-A HYBRID", "[5:300] -A HYBRID"),
             "ipv6": nf.install_text(rule(), EMPTY).replace(":HYBRID - [0:0]\n-A HYBRID", ":HYBRID - [0:0]\n[7:420] -A HYBRID")}
    monkeypatch.setattr(nf, "_save", lambda family, netns, counters=False: saves[family])
    st = {s.family: s for s in nf.status()}
    assert (st["ipv4"].queued_packets, st["ipv4"].reassembles) == (5, False)   # installed by an older hybrid
    assert (st["ipv6"].queued_packets, st["ipv6"].reassembles) == (7, True)


def test_reinstall_deletes_the_old_jump_in_the_same_transaction():
    lines = nf.install_text(rule(hooks=("forward", "input")), INSTALLED).splitlines()
    assert "-D FORWARD -m comment --comment hybrid -j HYBRID" in lines
    assert lines.count("-I FORWARD 1 -m comment --comment hybrid -j HYBRID") == 1
    assert lines.count("-I INPUT 1 -m comment --comment hybrid -j HYBRID") == 1
    assert lines.index("-D FORWARD -m comment --comment hybrid -j HYBRID") < \
        lines.index("-I FORWARD 1 -m comment --comment hybrid -j HYBRID")


def test_balance_and_fail_closed():
    text = nf.install_text(rule(queue_first=2, queue_last=5, fail_open=False), EMPTY)
    assert "-j NFQUEUE --queue-balance 2:5\n" in text
    assert "--queue-bypass" not in text


def test_cpu_fanout_needs_a_range():
    text = nf.install_text(rule(queue_first=0, queue_last=1, cpu_fanout=True), EMPTY)
    assert "-j NFQUEUE --queue-balance 0:1 --queue-bypass --queue-cpu-fanout\n" in text
    with pytest.raises(ConfigError, match="give --queues A-B too"):
        rule(queue_first=3, queue_last=3, cpu_fanout=True)


def test_remove_touches_only_our_rules():
    text = nf.remove_text(INSTALLED)
    assert text.splitlines() == ["*filter", "-D FORWARD -m comment --comment hybrid -j HYBRID",
                                 "-F HYBRID", "-X HYBRID", "COMMIT"]
    assert nf.remove_text(EMPTY) is None


def test_jump_detection_ignores_foreign_jumps_other_tables_and_similar_chain_names():
    # "-A INPUT -s 192.0.2.0/24 -j HYBRID" has no hybrid comment: someone else's, left alone.
    assert nf.our_jumps(INSTALLED) == ["-A FORWARD -m comment --comment hybrid -j HYBRID"]


@pytest.mark.parametrize("kw, msg", [
    (dict(mark_mask=0), "mask must be non-zero"),
    (dict(mark_value=0x3, mark_mask=0x1), "contain every bit"),
    (dict(queue_first=3, queue_last=1), "first <= last"),
    (dict(hooks=("prerouting",)), "hook 'prerouting'"),
    (dict(families=("ipx",)), "family 'ipx'"),
])
def test_bad_rules_are_one_line_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg) as exc:
        rule(**kw)
    assert "\n" not in str(exc.value)
