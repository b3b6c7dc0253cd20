"""Traffic for integration tests: sockets opened inside lab namespaces (no subprocesses)."""

from __future__ import annotations

import socket

from hybrid.lab.topology import netns


def udp_send(lab, payloads: list[bytes], dport: int, sport: int = 0, wait: float = 0.5) -> int:
    """Send UDP datagrams client -> server (from ``sport``, 0 = any) and return how many
    arrived; the receiver waits ``wait`` seconds after the last one."""
    with netns(lab.netns("server")):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns(lab.netns("client")):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind((lab.info.server.ipv4, dport))
        rx.settimeout(wait)
        tx.bind((lab.info.client.ipv4, sport))
        for p in payloads:
            tx.sendto(p, (lab.info.server.ipv4, dport))
        got = 0
        while True:
            try:
                rx.recv(65535)
                got += 1
            except TimeoutError:
                return got
    finally:
        rx.close()
        tx.close()
