"""The two captures docs/benchmarks.md's "Replay" section measures, made on demand (they are
large and say nothing a generator does not):

- ``bulk``: one HTTP download, the server's 1448-byte segments and the client's ACK every second
  segment, ~1 Gbit/s of capture time;
- ``short``: HTTP connections of 8 packets each (handshake, request, response, both FINs, the
  last ACK), 50,000 source ports per client address.

Checksums are right (scapy computes them once per packet template). Lab addresses only.

    python -m hybrid.replay.benchcaps bulk /tmp/bulk.pcap 200000     # 300,004 packets
    python -m hybrid.replay.benchcaps short /tmp/short.pcap 12500    # 100,000 packets
"""

from __future__ import annotations

import sys

import dpkt

C, S = "198.18.1.2", "198.18.2.2"
MAC_C = {"src": "02:00:00:00:01:02", "dst": "02:00:00:00:01:01"}
MAC_S = {"src": "02:00:00:00:02:02", "dst": "02:00:00:00:02:01"}
T0 = 1_700_000_000.0


def _tcp(mac, src, dst, sport, dport, flags, seq, ack, payload=b"") -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    pkt = Ether(**mac) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
    return bytes(pkt / Raw(payload) if payload else pkt)


def bulk(path: str, segments: int) -> None:
    req = b"GET /big HTTP/1.1\r\nHost: files.example\r\n\r\n"
    t = T0
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, linktype=1, nano=True)
        for p in (_tcp(MAC_C, C, S, 40000, 80, "S", 100, 0), _tcp(MAC_S, S, C, 80, 40000, "SA", 500, 101),
                  _tcp(MAC_C, C, S, 40000, 80, "A", 101, 501), _tcp(MAC_C, C, S, 40000, 80, "PA", 101, 501, req)):
            w.writepkt(p, ts=t)
            t += 1e-5
        data = _tcp(MAC_S, S, C, 80, 40000, "A", 501, 101 + len(req), b"\0" * 1448)
        ack = _tcp(MAC_C, C, S, 40000, 80, "A", 101 + len(req), 501)
        for i in range(segments):
            w.writepkt(data, ts=t)
            t += 1.2e-5
            if i % 2:
                w.writepkt(ack, ts=t)


def short(path: str, connections: int) -> None:
    req = b"GET / HTTP/1.1\r\nHost: ok.example\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    t = T0
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, linktype=1, nano=True)
        for i in range(connections):
            sp, c = 10000 + i % 50000, f"198.18.1.{2 + i // 50000}"
            end = 101 + len(req)
            for p in (_tcp(MAC_C, c, S, sp, 80, "S", 100, 0), _tcp(MAC_S, S, c, 80, sp, "SA", 500, 101),
                      _tcp(MAC_C, c, S, sp, 80, "A", 101, 501), _tcp(MAC_C, c, S, sp, 80, "PA", 101, 501, req),
                      _tcp(MAC_S, S, c, 80, sp, "PA", 501, end, resp), _tcp(MAC_C, c, S, sp, 80, "FA", end, 560),
                      _tcp(MAC_S, S, c, 80, sp, "FA", 560, end + 1), _tcp(MAC_C, c, S, sp, 80, "A", end + 1, 561)):
                w.writepkt(p, ts=t)
                t += 2e-5
            t += 1e-4


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("bulk", "short"):
        sys.exit("usage: python -m hybrid.replay.benchcaps bulk|short FILE COUNT")
    (bulk if sys.argv[1] == "bulk" else short)(sys.argv[2], int(sys.argv[3]))
