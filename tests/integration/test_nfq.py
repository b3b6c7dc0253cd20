"""Queue flags on a real NFQUEUE: fail-open and fail-closed decided by the flag we set through
NetfilterQueue's socket, observed by packets arriving or not."""

import struct
import threading

import pytest
from netfilterqueue import NetfilterQueue
from traffic import udp_send

from hybrid.kernel import nfq
from hybrid.lab.topology import netns

pytestmark = pytest.mark.integration
QUEUE = 7
PORT = 9777


@pytest.fixture
def queue_rule(lab):
    # Without --queue-bypass: what happens on overflow is decided by the queue's flag alone.
    spec = ["FORWARD", "-p", "udp", "--dport", str(PORT), "-j", "NFQUEUE", "--queue-num", str(QUEUE)]
    lab.run("gw", ["iptables", "-I", *spec])
    yield
    lab.run("gw", ["iptables", "-D", *spec])


def bound_queue(lab, maxlen):
    """A queue bound in the gateway by a consumer that never reads (a hung engine)."""
    result = {}

    def bind():
        with netns(lab.netns("gw")):
            q = NetfilterQueue()
            q.bind(QUEUE, lambda p: p.accept(), max_len=maxlen)
        result["q"] = q
    t = threading.Thread(target=bind)
    t.start()
    t.join()
    return result["q"]


@pytest.mark.parametrize("fail_open, expect", [(True, 8), (False, 0)])
def test_overflow_follows_the_queue_flag(lab, queue_rule, fail_open, expect):
    q = bound_queue(lab, maxlen=2)
    try:
        setup = nfq.configure(q.get_fd(), QUEUE, fail_open=fail_open, maxlen=2)
        assert setup.flags_confirmed
        assert setup.rcvbuf >= 16 << 20
        # 2 packets wait in the full queue forever (nobody reads); the other 8 overflow.
        assert udp_send(lab, [b"%d" % i for i in range(10)], dport=PORT) == expect
        with netns(lab.netns("gw")):
            c = nfq.counters()[QUEUE]
        assert c.waiting == 2
        assert c.dropped == (0 if fail_open else 8)
    finally:
        q.unbind()


def test_config_for_a_queue_this_socket_does_not_own_is_refused(lab, queue_rule):
    q = bound_queue(lab, maxlen=16)
    try:
        with pytest.raises(nfq.HybridError, match="configuring NFQUEUE 8") as exc:
            nfq.configure(q.get_fd(), 8)
        assert exc.value.errno is not None
    finally:
        q.unbind()


@pytest.mark.unit
def test_config_message_layout():
    msg = nfq.config_message(3, 42, flags=1, mask=1, maxlen=100)
    assert len(msg) == 16 + 4 + 8 * 3
    assert struct.unpack_from("=H", msg, 4)[0] == (3 << 8) | 2      # NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG
    assert msg[18:20] == b"\x00\x03"                           # res_id: queue 3, big-endian
    assert msg.endswith(b"\x00\x00\x00\x01")                  # flags, big-endian
