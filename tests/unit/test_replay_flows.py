"""The replay's own bookkeeping, without the kernel: a packet's addresses, its side, a flow's
verdict, the capture's clock in the engine's modules, and the engine that never sends."""

import ast
import inspect
import textwrap

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

from hybrid.engine.loop import Engine
from hybrid.replay import run
from hybrid.replay.capture import Frame

pytestmark = pytest.mark.unit
MACS = {"src": "02:00:00:00:01:02", "dst": "02:00:00:00:01:01"}
A4, B4 = bytes([198, 18, 1, 2]), bytes([198, 18, 2, 2])


def test_parse_l3_ipv4_tcp_through_two_vlan_tags():
    eth = bytes(Ether(**MACS) / Dot1AD(vlan=1) / Dot1Q(vlan=2) / IP(src="198.18.1.2", dst="198.18.2.2")
                / TCP(sport=1234, dport=80, flags="S"))
    off, ver, proto, src, dst, sport, dport, flags = run.parse_l3(eth)
    assert (off, ver, proto, src, dst, sport, dport, flags) == (22, 4, 6, A4, B4, 1234, 80, 0x02)


def test_parse_l3_ipv4_later_fragment_has_no_ports():
    eth = bytes(Ether(**MACS) / IP(src="198.18.1.2", dst="198.18.2.2", frag=100) / UDP(sport=1, dport=53))
    assert run.parse_l3(eth)[5:7] == (0, 0)


def test_parse_l3_ipv6_walks_extension_headers():
    eth = bytes(Ether(**MACS) / IPv6(src="2001:2::1", dst="2001:2::2") / IPv6ExtHdrHopByHop()
                / UDP(sport=5353, dport=53))
    assert run.parse_l3(eth)[1:3] == (6, 17) and run.parse_l3(eth)[5:7] == (5353, 53)
    frag = bytes(Ether(**MACS) / IPv6(src="2001:2::1", dst="2001:2::2") / IPv6ExtHdrFragment(offset=10)
                 / UDP(sport=5353, dport=53))
    assert run.parse_l3(frag)[5:7] == (0, 0)


def test_parse_l3_not_ip():
    assert run.parse_l3(bytes(Ether(**MACS, type=0x0806) / (b"\0" * 28))) is None
    assert run.parse_l3(b"\0" * 10) is None


def frame(src_mac="02:00:00:00:01:02", iface=None):
    return Frame(1, 0, bytes.fromhex(src_mac.replace(":", "")) * 2 + b"\x08\x00", iface)


def test_sides_default_is_who_sent_the_first_syn():
    s = run.Sides()
    assert s.side(frame(), B4, syn=False) == "server"     # nothing known yet
    assert s.side(frame(), A4, syn=True) == "client"
    assert s.side(frame(), B4, syn=False) == "server"
    assert s.side(frame(), A4, syn=False) == "client"


def test_sides_by_interface_then_mac_then_net():
    s = run.Sides.parse(client_ifaces=["to-client"], server_ifaces=["to-server"], client_nets=["198.18.1.0/24"])
    assert s.side(frame(iface="to-server"), A4, syn=True) == "server"
    assert s.side(frame(iface="to-client"), B4, syn=False) == "client"
    assert s.side(frame(iface="other"), A4, syn=False) == "client"
    assert s.side(frame(iface="other"), B4, syn=True) == "server"
    m = run.Sides.parse(client_macs=["02:00:00:00:01:02"])
    assert m.side(frame("02:00:00:00:01:02"), B4, False) == "client"
    assert m.side(frame("02:00:00:00:02:02"), A4, True) == "server"


@pytest.mark.parametrize("kw", [{"client_macs": ["02:00"]}, {"client_nets": ["not-a-net"]}])
def test_sides_bad_values_are_config_errors(kw):
    from hybrid.errors import ConfigError
    with pytest.raises(ConfigError):
        run.Sides.parse(**kw)


@pytest.mark.parametrize("outcomes,flow,verdict", [
    ({"passed": 5, "dropped": 0, "rewritten": 0}, None, "passed"),
    ({"passed": 0, "dropped": 3, "rewritten": 0}, None, "dropped"),
    ({"passed": 3, "dropped": 6, "rewritten": 0}, "block", "dropped"),
    ({"passed": 3, "dropped": 1, "rewritten": 0}, None, "mixed"),
    ({"passed": 3, "dropped": 1, "rewritten": 1}, None, "rewritten"),
])
def test_flow_verdict(outcomes, flow, verdict):
    rec = run.FlowRecord(6, "a", "b", 0, outcomes=outcomes, flow_verdict=flow)
    assert rec.verdict == verdict
    assert rec.as_dict()["verdict"] == verdict


def test_capture_clock_reaches_the_engine_and_the_maps_and_is_restored():
    import time

    import hybrid.datapath.maps as maps_mod
    import hybrid.engine.join as join_mod
    import hybrid.engine.loop as loop_mod
    clock = run.ReplayTime()
    clock.now_ns = 1_700_000_000_123_456_789
    with run.capture_clock(clock):
        assert loop_mod.time.time() == pytest.approx(1_700_000_000.123456789)
        assert join_mod.time.monotonic() == pytest.approx(1_700_000_000.123456789)
        assert maps_mod.time.monotonic_ns() == 1_700_000_000_123_456_789
        assert loop_mod.time.sleep is time.sleep                # the rest is the real module's
    assert loop_mod.time is time and maps_mod.time is time


def _methods_that_send(cls) -> set[str]:
    """Methods of ``cls`` whose source opens a socket or sends on one."""
    out = set()
    for name, fn in inspect.getmembers(cls, inspect.isfunction):
        try:
            src = textwrap.dedent(inspect.getsource(fn))
        except (OSError, TypeError):
            continue
        for node in ast.walk(ast.parse(src)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("sendto", "send", "sendmsg", "socket", "connect")):
                out.add(name)
    return out


def test_replay_engine_overrides_every_method_that_sends():
    """The replay must never put a packet on a network: every Engine method that opens or uses a
    socket (today the reject's raw sends) is replaced in ReplayEngine. A new one fails here."""
    replay_engine = run._engine_class()
    senders = _methods_that_send(Engine) - {"bind", "_ifname"}    # bind: replay never binds
    assert senders, "found no sending method: the check itself is broken"
    senders.add("_start_syn_learner")       # opens a packet socket through a helper class (bridges)
    for name in senders:
        assert name in vars(replay_engine), f"Engine.{name} sends and ReplayEngine does not replace it"


def test_replay_engine_counts_a_reject_instead_of_sending(tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('default = "accept"\n[[rule]]\nname = "r"\nproto = "tcp"\ndport = 80\naction = "reject"\n')
    eng = run._engine_class()(0, str(rules), maps=None, mark_mask=0x100000)
    eng.sent = []
    pkt = bytes(IP(src="198.18.1.2", dst="198.18.2.2") / TCP(sport=40000, dport=80, flags="PA") / b"GET /")
    nf = run.NfPacket(pkt, 0x100000, 1)
    eng._handle(nf)
    assert nf.verdict == "drop" and eng.stats.actions["reject"] == 1
    assert len(eng.sent) == 2 and eng._raw4 is None          # RST to the sender and onward, built not sent


def test_parse_l3_icmp_echo_is_keyed_by_its_identifier():
    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6EchoRequest
    eth = bytes(Ether(**MACS) / IP(src="198.18.1.2", dst="198.18.2.2") / ICMP(type=8, id=77))
    assert run.parse_l3(eth)[5:7] == (77, 77)
    eth6 = bytes(Ether(**MACS) / IPv6(src="2001:2::1", dst="2001:2::2") / ICMPv6EchoRequest(id=78))
    assert run.parse_l3(eth6)[5:7] == (78, 78)


def _partial(pkt) -> bytes:
    """``pkt`` as a sender with checksum offload hands it over: the transport checksum field
    holding only the pseudo-header's sum (what Linux writes for CHECKSUM_PARTIAL)."""
    import struct as st
    raw = bytearray(bytes(pkt))
    v4 = raw[0] >> 4 == 4
    l4 = (raw[0] & 15) * 4 if v4 else 40
    proto = raw[9] if v4 else raw[6]
    length = len(raw) - l4
    pseudo = (bytes(raw[12:20]) + st.pack(">BBH", 0, proto, length) if v4
              else bytes(raw[8:40]) + st.pack(">IxxxB", length, proto))
    st.pack_into(">H", raw, l4 + (16 if proto == 6 else 6), run._sum16(pseudo))
    return bytes(raw)


@pytest.mark.parametrize("pkt", [
    IP(src="198.18.1.2", dst="198.18.2.2") / TCP(sport=1, dport=80, flags="PA") / b"GET / HTTP/1.1\r\n\r\n",
    IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=5353, dport=53) / b"\x12\x34query",
    IPv6(src="2001:2::1", dst="2001:2::2") / UDP(sport=5353, dport=53) / b"odd",
    IPv6(src="2001:2::1", dst="2001:2::2") / TCP(sport=1, dport=443, flags="PA") / b"\x16\x03\x01",
])
def test_an_offload_partial_checksum_is_completed_as_nfqueue_does(pkt):
    from hybrid.engine.packet import decode
    from hybrid.engine.rewrite import transport_checksum_ok
    good = bytes(pkt.__class__(bytes(pkt)))            # scapy fills in the right checksum
    partial = _partial(pkt)
    assert partial != good and not transport_checksum_ok(decode(partial))
    assert run.complete_offload_checksum(partial) == good
    assert transport_checksum_ok(decode(run.complete_offload_checksum(partial)))


def test_a_plainly_wrong_checksum_stays_wrong():
    raw = bytearray(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=1, dport=53) / b"x"))
    raw[26] ^= 0xFF                                  # the UDP checksum, neither right nor partial
    assert run.complete_offload_checksum(bytes(raw)) == bytes(raw)


def test_the_in_place_check_agrees_with_the_completion():
    for pkt in (IP(src="198.18.1.2", dst="198.18.2.2") / TCP(sport=1, dport=80, flags="PA") / b"GET /",
                IPv6(src="2001:2::1", dst="2001:2::2") / UDP(sport=5353, dport=53) / b"q",
                IP(src="198.18.1.2", dst="198.18.2.2", frag=3) / UDP(sport=1, dport=53) / b"q"):
        eth = bytes(Ether(**MACS)) + _partial(pkt)
        frag = isinstance(pkt, IP) and pkt.frag
        assert run.has_partial_checksum(eth, 14) == (not frag)
        good = bytes(Ether(**MACS)) + bytes(pkt.__class__(bytes(pkt)))
        assert not run.has_partial_checksum(good, 14)


@pytest.mark.parametrize("src,dst,fwd", [
    ("198.18.1.2", "198.18.2.2", True), ("198.18.1.2", "224.0.0.251", False), ("169.254.1.1", "198.18.2.2", False),
    ("198.18.1.2", "255.255.255.255", False), ("2001:2::1", "2001:2::2", True), ("fe80::1", "ff02::2", False),
    ("2001:2::1", "fe80::2", False), ("2001:2::1", "ff05::1:3", False),
])
def test_what_a_router_forwards(src, dst, fwd):
    l3 = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    assert run.forwarded(run.parse_l3(bytes(Ether(**MACS) / l3 / UDP(sport=1, dport=2)))) is fwd


def test_an_engine_error_on_a_captured_packet_is_one_line(caplog):
    import logging
    log = logging.getLogger("hybrid.engine.loop")
    with run._one_line_engine_errors(), caplog.at_level(logging.ERROR):
        try:
            raise ValueError("bad packet")
        except ValueError:
            log.exception("queue %d: packet handling failed; accepted", 0)
    rec = caplog.records[-1]
    assert rec.exc_info is None and rec.getMessage() == "queue 0: packet handling failed; accepted: ValueError: bad packet"
    assert not log.filters
