"""hybridctl flows, block, bypass and unblock in the lab: a live TCP connection through the
gateway is listed, blocked (its data stops, the drops are counted at XDP), unblocked (TCP
retransmits the data through), bypassed (its packets stop reaching the queue); a prefix is
blocked and unblocked; bad input is one line with exit 2."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import pytest
from gwlab import attached_with_engine, clear_flows, hctl, nfqueue_counters, pin_dir, status
from traffic import udp_send

from hybrid.datapath.maps import Maps, flow_key
from hybrid.kernel import bpffs
from hybrid.lab.topology import netns

pytestmark = pytest.mark.integration

RULES = 'default = "accept"\ndefault_flow = "none"\n'
SPORT, DPORT = 42010, 10020
TCP_RTO_MAX_MS = 44      # linux/tcp.h; not in Python's socket module yet


def counters(lab, ifname="to-client") -> dict:
    return status(lab)["interfaces"][ifname]["counters"]


def flows_json(lab, *args) -> dict:
    return json.loads(hctl(lab, "flows", "--json", "--limit", "0", *args).stdout)


def find(lab, spec: str) -> dict:
    return next(f for f in flows_json(lab)["flows"] if f["flow"] == spec)


def queued(lab) -> int:
    return nfqueue_counters(lab)[0][7]


@contextlib.contextmanager
def tcp_connection(lab):
    """(client socket, server-side socket) of one TCP connection client -> server."""
    with netns(lab.netns("server")):
        listener = socket.socket()
    with netns(lab.netns("client")):
        client = socket.socket()
    conn = None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((lab.info.server.ipv4, DPORT))
        listener.listen(1)
        listener.settimeout(10)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Retransmit at least every second (the kernel's floor for TCP_RTO_MAX_MS, Linux 6.15+)
        # instead of backing off to many seconds: the test waits for the retransmissions of
        # data the block dropped. Older kernels refuse it, and the waits below take longer.
        # Without backoff, tcp_retries2 would give up after ~13 s of retransmissions: the user
        # timeout keeps the connection for 5 minutes of them, however slow the machine.
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, 1000)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 300_000)
        client.bind((lab.info.client.ipv4, SPORT))
        client.settimeout(10)
        client.connect((lab.info.server.ipv4, DPORT))
        conn, _ = listener.accept()
        yield client, conn
    finally:
        for s in (conn, client, listener):
            if s is not None:
                s.close()


def recv_exactly(sock, n: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(TimeoutError):
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
    return data


@pytest.fixture(scope="class")
def attached(lab, tmp_path_factory):
    """One attachment (xdp generic) and engine for a class of tests, removed afterwards."""
    with attached_with_engine(lab, tmp_path_factory.mktemp("flows"), RULES, "--xdp-mode", "generic"):
        yield lab


@pytest.fixture
def shared(attached):
    """The class's attachment with the flow state of a fresh one: empty flow table, no pinned
    verdict, no blocked prefix (one a failed test left is lifted the operator's way)."""
    lab = attached
    clear_flows(lab)
    with Maps.open_pinned(pin_dir(lab)) as maps:
        left = list(maps.prefixes())
    for cidr in left:
        hctl(lab, "unblock", cidr)
    return lab


class TestOneAttachment:
    """The tests that need an attachment with nothing special share one (an attach compiles
    the datapath, 6-10 s on CI): each on flows of its own, counting deltas."""

    def test_block_unblock_and_bypass_a_live_tcp_flow(self, shared):
        lab = shared
        spec = f"tcp {lab.info.client.ipv4}:{SPORT} {lab.info.server.ipv4}:{DPORT}"
        with tcp_connection(lab) as (client, server):
            client.sendall(b"hello")
            assert recv_exactly(server, 5, 5) == b"hello"

            f = find(lab, spec)
            assert (f["proto"], f["src"], f["sport"], f["dst"], f["dport"]) == (
                "tcp", lab.info.client.ipv4, SPORT, lab.info.server.ipv4, DPORT)
            assert f["verdict"] == "none" and f["ttl"] is None and not f["midstream"]
            assert f["packets"][0] >= 3 and f["packets"][1] >= 2     # SYN, ACK, data / SYN-ACK, ACK
            assert f["flagged"] >= 1 and f["age"] >= f["idle"] >= 0  # the first payload (the SYN too, unless skipped)
            assert spec in hctl(lab, "flows").stdout

            # block: the data stops at XDP
            before = counters(lab)
            out = hctl(lab, "block", spec, "--ttl", "60").stdout
            assert out == f"blocked {spec} for 60 s\n"
            client.sendall(b"blocked")
            assert recv_exactly(server, 7, 1.5) == b""
            after = counters(lab)
            assert after["xdp_drop_flow"] - before.get("xdp_drop_flow", 0) >= 1
            f = find(lab, spec)
            assert f["verdict"] == "block" and 0 < f["ttl"] <= 60
            assert [x["flow"] for x in flows_json(lab, "--verdict", "block")["flows"]] == [spec]

            # the block is pinned: an eviction from the flow table (deleted here) does not lift it;
            # tc restores the entry and counts it, status shows both
            st = status(lab)
            assert (st["pinned"]["count"], st["pinned"]["manual"], st["pinned"]["engine"]) == (1, 1, 0), st["pinned"]
            assert "pinned blocks: 1 of 65,536 (1 manual, 0 by the engine)" in hctl(lab, "status").stdout
            key = flow_key(lab.info.client.ipv4, lab.info.server.ipv4, SPORT, DPORT, 6)[0]
            with Maps.open_pinned(os.path.join(bpffs.locate(), lab.netns("gw"))) as maps:
                assert maps.delete_flow(key)
            client.sendall(b"!")
            assert recv_exactly(server, 8, 1.5) == b""
            deadline = time.monotonic() + 20              # the client's next retransmission (RTO backoff)
            while not any(f["flow"] == spec for f in flows_json(lab)["flows"]) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert recv_exactly(server, 8, 0.5) == b""
            assert find(lab, spec)["verdict"] == "block" and find(lab, spec)["pinned"] == "manual"
            assert "pinned (manual)" in hctl(lab, "flows").stdout
            assert counters(lab)["evicted_decided"] >= 1

            # unblock: TCP retransmits the data and it arrives
            assert hctl(lab, "unblock", spec).stdout == f"unblocked {spec}\n"
            assert recv_exactly(server, 8, 15) == b"blocked!"
            assert find(lab, spec)["verdict"] == "none" and status(lab)["pinned"]["count"] == 0
            assert hctl(lab, "unblock", spec).stdout == f"{spec} was not blocked (verdict none); nothing changed\n"

            # bypass (endpoints given the other way round: same flow): nothing more is queued
            reverse = f"tcp {lab.info.server.ipv4}:{DPORT} {lab.info.client.ipv4}:{SPORT}"
            assert hctl(lab, "bypass", reverse, "--ttl", "60").stdout == f"bypassed {reverse} for 60 s\n"
            q0, c0 = queued(lab), counters(lab)
            client.sendall(b"more data")
            assert recv_exactly(server, 9, 5) == b"more data"
            server.sendall(b"answer")
            assert recv_exactly(client, 6, 5) == b"answer"
            assert queued(lab) == q0
            assert counters(lab)["bypassed"] - c0.get("bypassed", 0) >= 1
            assert find(lab, spec)["verdict"] == "bypass"

    def test_block_and_unblock_a_prefix(self, shared):
        lab = shared
        assert udp_send(lab, [b"x"] * 2, dport=10011) == 2
        before = counters(lab)
        assert hctl(lab, "block", "198.18.1.0/24").stdout.startswith("blocked 198.18.1.0/24: dropped")
        assert udp_send(lab, [b"x"] * 4, dport=10011) == 0
        assert counters(lab)["xdp_drop_prefix"] - before.get("xdp_drop_prefix", 0) == 4
        assert hctl(lab, "unblock", "198.18.1.7/24").stdout == "unblocked 198.18.1.0/24\n"
        assert udp_send(lab, [b"x"] * 2, dport=10011) == 2
        assert hctl(lab, "unblock", "198.18.1.0/24").stdout == "198.18.1.0/24 was not blocked; nothing changed\n"
        # a narrower unblock under a wider block says the wider one still applies
        hctl(lab, "block", "198.18.0.0/15")
        try:
            proc = hctl(lab, "unblock", "198.18.1.0/24")
            assert proc.stderr == "note: still blocked by 198.18.0.0/15\n"
            assert udp_send(lab, [b"x"], dport=10011) == 0
        finally:
            hctl(lab, "unblock", "198.18.0.0/15")
        assert udp_send(lab, [b"x"], dport=10011) == 1

    def test_bad_input_is_one_line_and_exit_2(self, shared):
        lab = shared
        for args, message in BAD_INPUT:
            proc = hctl(lab, *args, check=False)
            assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, args
            if message.startswith("Error"):
                assert proc.stderr.startswith(message) and len(proc.stderr.strip().splitlines()) == 1
        assert hctl(lab, "unblock", "udp 198.18.1.2:1 198.18.2.2:2").stdout == \
            "udp 198.18.1.2:1 198.18.2.2:2 is not in the flow table; nothing changed\n"


def test_watched_prefix_stays_watched_after_unblock(lab, tmp_path):
    with attached_with_engine(lab, tmp_path, RULES, "--watch-prefix", "198.18.2.0/24"):
        hctl(lab, "block", "198.18.2.0/24")
        assert udp_send(lab, [b"x"], dport=10012) == 0
        hctl(lab, "unblock", "198.18.2.0/24")
        c0 = counters(lab)
        assert udp_send(lab, [b"x"] * 6, dport=10012, sport=42100) == 6
        # every packet is still flagged for the watched prefix (beyond the first-N budget of 3)
        assert counters(lab)["reason_prefix"] - c0.get("reason_prefix", 0) == 6


BAD_INPUT = [
    (["bypass", "198.18.1.0/24"], "Error: bypass takes a FLOW, not a prefix (198.18.1.0/24): "),
    (["block", "198.18.1.0/24", "--ttl", "5"], "Error: --ttl: a prefix block has no expiry in the kernel; "),
    (["block", "tcp", "198.18.1.2", "198.18.2.2:80"], "Error: '198.18.1.2': expected ADDRESS:PORT"),
    (["block", "udp 198.18.1.2:1 198.18.2.2:2", "--ttl", "-3"], "Error: --ttl -3: give seconds > 0"),
    (["unblock", "example.com"], "Error: 'example.com' is neither a prefix nor a flow: "),
    (["flows", "--sort", "name"], "Error: Invalid value for '--sort': 'name' is not one of 'flagged'"),
]


def test_without_attachment_says_what_to_do(lab):
    for args in (["flows"], ["block", "198.18.1.0/24"], ["unblock", "tcp 198.18.1.2:1 198.18.2.2:2"]):
        proc = hctl(lab, *args, check=False)
        assert proc.returncode == 1
        assert proc.stderr == (f"Error: hybrid is not attached in this network namespace ({lab.netns('gw')}): "
                               "run 'hybridctl attach IFACE...' first\n")
