"""hybridctl top with traffic flowing through the lab gateway: its rates are the counter deltas
over its interval, its totals are the kernel's and the engine's, and the flow sending the
traffic heads its flow list."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from gwlab import attached_with_engine, clear_flows, hctl, status

from hybrid.lab.topology import netns

pytestmark = pytest.mark.integration

RULES = 'default = "accept"\ndefault_flow = "none"\n'
PORT = 10030


class UdpStream:
    """client -> server datagrams to a watched port, one every ``gap`` seconds, until stopped."""

    def __init__(self, lab, gap=0.005):
        with netns(lab.netns("server")):
            self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with netns(lab.netns("client")):
            self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.bind((lab.info.server.ipv4, PORT))
        self.tx.bind((lab.info.client.ipv4, 42200))
        self.dst, self.gap = (lab.info.server.ipv4, PORT), gap
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.tx.sendto(b"top test", self.dst)
            self.sent += 1
            time.sleep(self.gap)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.tx.close()
        self.rx.close()


@pytest.fixture(scope="class")
def attached(lab, tmp_path_factory):
    """One attachment and engine for a class of tests (an attach compiles the datapath, 6-10 s
    on CI), removed afterwards."""
    with attached_with_engine(lab, tmp_path_factory.mktemp("top"), RULES, "--watch-port", str(PORT)):
        yield lab


@pytest.fixture
def shared(attached):
    """The class's attachment on an emptied flow table (the flow state of a fresh attach)."""
    clear_flows(attached)
    return attached


class TestOneAttachment:
    """The tests of a running top share the attachment they need."""

    def test_top_json_rates_are_counter_deltas(self, shared):
        lab = shared
        with UdpStream(lab):
            time.sleep(0.3)
            proc = hctl(lab, "top", "--json", "--iterations", "2", "--interval", "1")
            frames = [json.loads(line) for line in proc.stdout.splitlines()]
        after = status(lab)
        assert len(frames) == 2
        first, second = frames
        for name, rate in second["rates"].items():
            delta = second["totals"][name] - first["totals"][name]
            assert abs(rate * second["interval"] - delta) <= 0.1 * second["interval"] + 1, name
        # traffic flowed in both intervals, every packet to the watched port is flagged and queued
        for f in frames:
            r = f["rates"]
            assert r["seen"] > 10 and r["flagged"] > 10 and r["reason_port"] > 10 and r["queued"] > 10
            assert r["accepted"] > 10 and r["dropped_user"] == 0
            assert f["engines"][0]["alive"] is True and f["decision_ns"]["packets"] > 0
            assert f["decision_ns"]["p50"] <= f["decision_ns"]["p99"]
        # totals are the kernel's counters, read before the status that followed
        client = after["interfaces"]["to-client"]["counters"]
        assert second["totals"]["reason_port"] <= client["reason_port"] + after["interfaces"]["to-server"]["counters"]["reason_port"]
        # the stream's flow heads the list of flows by flagged packets
        head = second["top_flows"][0]
        assert head["flow"] == f"udp {lab.info.client.ipv4}:42200 {lab.info.server.ipv4}:{PORT}"
        assert head["flagged"] >= second["totals"]["reason_port"] - first["totals"]["reason_port"]


    def test_top_once_prints_a_screen_and_live_mode_ends(self, shared):
        lab = shared
        with UdpStream(lab):
            out = hctl(lab, "top", "--once", "--interval", "0.5").stdout
            live = hctl(lab, "top", "--iterations", "2", "--interval", "0.3")
        assert "seen by tc" in out and "queued to the engine" in out and "top flows by flagged packets" in out
        assert f"udp {lab.info.client.ipv4}:42200 {lab.info.server.ipv4}:{PORT}" in out
        assert live.returncode == 0 and "seen by tc" in live.stdout


def test_top_without_attachment_is_one_line(lab):
    proc = hctl(lab, "top", "--once", check=False)
    assert proc.returncode == 1
    assert proc.stderr == (f"Error: hybrid is not attached in this network namespace ({lab.netns('gw')}): "
                           "run 'hybridctl attach IFACE...' first\n")
