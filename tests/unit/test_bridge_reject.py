"""reject on a bridge, without a kernel: a bridged packet (netfilter reports a physical in-port)
is answered with Ethernet frames out of the bridge ports, to MAC addresses the engine saw, never
to a guessed or broadcast one; a routed packet still goes through the raw IP sockets."""

import logging
import os

import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, Raw

from hybrid.engine.loop import Engine

pytestmark = pytest.mark.unit
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "rules")
MASK = 0x100000
IN_PORT, OUT_PORT = 3, 4
CLIENT_MAC, SERVER_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
PORT_MACS = {IN_PORT: bytes.fromhex("0200000000a3"), OUT_PORT: bytes.fromhex("0200000000a4")}
C4, S4, C6, S6 = "198.18.1.2", "198.18.2.2", "2001:2:0:1::2", "2001:2:0:2::2"


class BridgedPacket:
    """NetfilterQueue's packet as it looks for a bridged packet in FORWARD."""

    def __init__(self, payload: bytes, hw: bytes | None = CLIENT_MAC, physin=IN_PORT, physout=OUT_PORT):
        self.payload, self.mark, self.indev = payload, MASK, 2
        self.physindev, self.physoutdev = physin, physout
        self.hw = hw + b"\0\0" if hw is not None else None
        self.verdicts: list[str] = []

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return self.mark

    def get_hw(self):
        return self.hw

    def set_mark(self, m):
        self.mark = m

    def repeat(self):
        self.verdicts.append("repeat")

    def drop(self):
        self.verdicts.append("drop")


class PacketSocket:
    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    def sendto(self, frame, addr):
        self.sent.append((addr[0], frame))

    def close(self):
        pass


def engine() -> Engine:
    e = Engine(0, os.path.join(EXAMPLES, "realistic.toml"), maps=None, mark_mask=MASK)
    e._packet_sock = PacketSocket()
    e._syn_learner = False                       # no AF_PACKET socket in unit tests
    e._ifnames.update({IN_PORT: "p-client", OUT_PORT: "p-server"})
    e._port_macs.update(PORT_MACS)
    e._send_routed = lambda out, version: pytest.fail("a bridged packet was routed")
    return e


def request(v6: bool) -> bytes:
    ip = IPv6(src=C6, dst=S6) if v6 else IP(src=C4, dst=S4)
    return bytes(ip / TCP(sport=40000, dport=80, flags="PA", seq=1000, ack=2000)
                 / Raw(b"GET / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n"))


def from_server(v6: bool) -> BridgedPacket:
    ip = IPv6(src=S6, dst=C6) if v6 else IP(src=S4, dst=C4)
    return BridgedPacket(bytes(ip / TCP(sport=80, dport=40000, flags="SA")), hw=SERVER_MAC,
                         physin=OUT_PORT, physout=IN_PORT)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_both_rsts_leave_by_the_ports_to_the_macs_seen(v6):
    e = engine()
    e._handle(from_server(v6))                  # a queued packet of the server's: its MAC on its port
    p = BridgedPacket(request(v6))
    e._handle(p)
    assert p.verdicts == ["drop"] and e.stats.actions["reject"] == 1
    (port1, back), (port2, onward) = e._packet_sock.sent
    assert port1 == "p-client" and back[:6] == CLIENT_MAC and back[6:12] == SERVER_MAC
    assert port2 == "p-server" and onward[:6] == SERVER_MAC and onward[6:12] == CLIENT_MAC
    client, server = (C6, S6) if v6 else (C4, S4)
    for frame, src, dst in ((back, server, client), (onward, client, server)):
        f = Ether(frame)
        layer = f[IPv6] if v6 else f[IP]
        assert (layer.src, layer.dst) == (src, dst) and f[TCP].flags.R
    assert e.stats.reject_no_mac == 0 and e.stats.reject_send_errors == 0


def test_an_unknown_receiver_is_counted_and_logged_once_never_guessed(caplog):
    e = engine()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            e._handle(BridgedPacket(request(False)))
    assert [port for port, _ in e._packet_sock.sent] == ["p-client"] * 3      # only the sender's RSTs
    assert e.stats.reject_no_mac == 3 and e.stats.reject_send_errors == 0
    assert sum("reject_no_mac" in r.getMessage() for r in caplog.records) == 1


def test_an_address_claimed_on_the_wrong_port_does_not_redirect_the_onward_rst():
    e = engine()
    spoof = BridgedPacket(bytes(IP(src=S4, dst=C4) / UDP(sport=80, dport=53) / Raw(b"x")),
                          hw=bytes.fromhex("02000000beef"))          # the server's address, from the client side
    e._handle(spoof)
    e._handle(BridgedPacket(request(False)))
    assert [port for port, _ in e._packet_sock.sent] == ["p-client"] and e.stats.reject_no_mac == 1


def test_a_packet_for_this_host_gets_its_onward_rst_routed():
    e = engine()
    routed = []
    e._send_routed = lambda out, version: routed.append(version)
    e._handle(BridgedPacket(request(False), physout=0))      # the INPUT hook: no out-port
    assert [port for port, _ in e._packet_sock.sent] == ["p-client"] and routed == [4]


def test_a_routed_packet_never_uses_the_packet_socket():
    e = engine()
    routed = []
    e._send_routed = lambda out, version: routed.append(version)
    e._handle(BridgedPacket(request(False), physin=0, physout=0))
    assert routed == [4, 4] and e._packet_sock.sent == []


def test_no_source_mac_is_a_send_error_not_a_guess():
    e = engine()
    p = BridgedPacket(request(False), hw=None)
    e._handle(p)
    assert p.verdicts == ["drop"] and e._packet_sock.sent == [] and e.stats.reject_send_errors >= 1


def test_the_learnt_table_is_bounded(monkeypatch):
    e = engine()
    monkeypatch.setattr(Engine, "_MACS_MAX", 4)
    for i in range(10):
        e._learn_mac(IN_PORT, bytes([198, 18, 1, i]), CLIENT_MAC)
    assert len(e._macs) == 4 and (IN_PORT, bytes([198, 18, 1, 9])) in e._macs


def test_iif_reads_the_bridge_port(tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\nname = "by-port"\niif = "p-client"\naction = "drop"\n')
    e = Engine(0, str(rules), maps=None, mark_mask=MASK)
    e._syn_learner = False
    e._ifnames.update({IN_PORT: "p-client", OUT_PORT: "p-server", 2: "br0"})
    p = BridgedPacket(bytes(IP(src=C4, dst=S4) / UDP(sport=1, dport=2)))
    e._handle(p)
    assert p.verdicts == ["drop"]
    p = BridgedPacket(bytes(IP(src=S4, dst=C4) / UDP(sport=2, dport=1)), physin=OUT_PORT, physout=IN_PORT)
    e._handle(p)
    assert p.verdicts == ["repeat"]
