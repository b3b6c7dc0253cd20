"""The tshark name oracle (hybrid/lab/tshark.py) on a capture built here: every kind of name on
the frame that carries it, a DNS response's names left out, QUIC's SNI told apart from TLS's, and
the same names read by hybrid's own decoder (the point of an oracle). Bad input is one line.

Needs Debian's tshark (scripts/setup.sh installs it); skipped with the reason when missing."""

from __future__ import annotations

import shutil
import ssl
import time

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from hybrid.engine.packet import decode
from hybrid.errors import HybridError, ToolMissingError
from hybrid.lab import tshark
from hybrid.lab.tshark import Name

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark missing: run scripts/setup.sh")]

C4, S4 = "198.18.1.2", "198.18.2.2"
C6, S6 = "2001:2:0:1::2", "2001:2:0:2::2"
MAC_C, MAC_S = "02:00:00:00:00:01", "02:00:00:00:00:02"


def client_hello(name: str) -> bytes:
    """A real ClientHello from Python's own TLS stack, through memory BIOs (no network)."""
    ctx = ssl.create_default_context()
    out = ssl.MemoryBIO()
    conn = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return out.read()


def quic_initial(name: str) -> bytes:
    """aioquic's client's first datagram for a connection to ``name`` (no network)."""
    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["hq-interop"],
                                                          server_name=name))
    conn.connect((S4, 443), now=time.monotonic())
    (first, *_), = [[d for d, _ in conn.datagrams_to_send(now=time.monotonic())]]
    return first


def tcp(payload: bytes, dport: int, sport: int = 40000, v6: bool = False):
    ip = IPv6(src=C6, dst=S6) if v6 else IP(src=C4, dst=S4)
    return Ether(src=MAC_C, dst=MAC_S) / ip / TCP(sport=sport, dport=dport, flags="PA", seq=1000, ack=1) / payload


def udp(payload, dport: int, sport: int = 40001, v6: bool = False, reply: bool = False):
    ip = IPv6(src=C6, dst=S6) if v6 else IP(src=C4, dst=S4)
    if reply:
        ip = IPv6(src=S6, dst=C6) if v6 else IP(src=S4, dst=C4)
        sport, dport = dport, sport
    return Ether(src=MAC_C, dst=MAC_S) / ip / UDP(sport=sport, dport=dport) / payload


FRAMES = [
    tcp(b"GET / HTTP/1.1\r\nHost: Www.Example.TEST\r\nUser-Agent: t\r\n\r\n", 80),                   # 1
    tcp(client_hello("tls.example.test"), 443, sport=40002),                                        # 2
    udp(DNS(id=1, rd=1, qd=DNSQR(qname="q.example.test", qtype="A")), 53),                          # 3
    udp(DNS(id=1, qr=1, qd=DNSQR(qname="answer.example.test"),
            an=DNSRR(rrname="answer.example.test", rdata=S4)), 53, reply=True),                     # 4
    udp(quic_initial("quic.example.test"), 443, sport=40003),                                       # 5
    tcp(b"GET /a HTTP/1.1\r\nHost: one.test\r\n\r\nGET /b HTTP/1.1\r\nHost: two.test\r\n\r\n", 80,
        sport=40004, v6=True),                                                                      # 6
    tcp(b"GET / HTTP/1.1\r\nHost: odd-port.test\r\n\r\n", 22, sport=40005),                        # 7
    udp(DNS(id=2, rd=1, qd=DNSQR(qname="v6.example.test", qtype="AAAA")), 53, v6=True),             # 8
]


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("tshark") / "names.pcap"
    wrpcap(str(path), FRAMES)
    return path


def test_every_kind_of_name_on_its_frame(capture):
    assert tshark.names(capture) == [
        Name(1, "http_host", "Www.Example.TEST"),
        Name(2, "tls_sni", "tls.example.test"),
        Name(3, "dns_qname", "q.example.test"),          # frame 4 is a response: its name is not a query's
        Name(5, "quic_sni", "quic.example.test"),
        Name(6, "http_host", "one.test"),
        Name(6, "http_host", "two.test"),
        Name(8, "dns_qname", "v6.example.test"),          # frame 7: SSH to tshark, on port 22
    ]


def test_decode_as_adds_a_port(capture):
    got = tshark.names(capture, decode_as=["tcp.port==22,http"])
    assert Name(7, "http_host", "odd-port.test") in got


def test_hybrids_decoder_reads_the_same_names(capture):
    """The oracle's use: each name tshark reads is the one hybrid's decoder reads on that frame
    (hybrid compares names lower-cased, as nginx, OpenSSL and dnsmasq do)."""
    names = tshark.names(capture)
    assert names
    for n in names:
        pkt = decode(bytes(FRAMES[n.frame - 1].payload))    # hybrid decodes from the IP header
        if n.kind == "http_host":
            assert n.name.lower() in [h.lower() for h in (pkt.http.hosts or (pkt.http.host,))], n
        elif n.kind == "tls_sni":
            assert pkt.tls_sni == n.name, n
        elif n.kind == "dns_qname":
            assert pkt.dns_qname == n.name.lower(), n
        else:                       # QUIC: decrypting the Initial is quic.py's, tested in test_quic.py
            assert n.kind == "quic_sni" and pkt.proto == 17 and pkt.dport == 443


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"this is not a capture file at all, just text\n" * 4, "isn't a capture file"),
    (None, "cut short"),
])
def test_a_file_tshark_cannot_read_is_one_line(tmp_path, capture, content, reason):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(capture.read_bytes()[:-30] if content is None else content)
    with pytest.raises(HybridError) as exc:
        tshark.names(bad)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"tshark cannot read {bad}: ") and reason in msg, msg


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(HybridError, match=r"^/.*/nothing\.pcap: no such capture file$"):
        tshark.names(tmp_path / "nothing.pcap")


def test_without_tshark_one_line_says_how_to_install_it(monkeypatch, capture):
    def missing(tool):
        raise ToolMissingError(f"'{tool}' not found")
    monkeypatch.setattr(tshark.sysutil, "which", missing)
    with pytest.raises(ToolMissingError, match=r"^'tshark' not found: install it \(apt-get install tshark\) "
                                               r"or run scripts/setup.sh$"):
        tshark.names(capture)
