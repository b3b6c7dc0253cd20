"""The engine's per-packet handler without a kernel: a stand-in for NetfilterQueue's packet
object records the verdict. Whatever bytes arrive, exactly one verdict is given and nothing
escapes."""

import errno
import io
import json
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP, IPv6, Raw

from enginefakes import FlowTableFake

from hybrid.engine.join import JOIN_TTL
from hybrid.engine.loop import Engine, RateLimiter, VerdictLog
from hybrid.errors import TableFullError
from hybrid.kernel import abi

pytestmark = pytest.mark.unit
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "rules")
MASK = 0x100000


class FakePacket:
    def __init__(self, payload: bytes, mark: int = MASK):
        self.payload, self.mark, self.indev = payload, mark, 1
        self.verdicts: list[str] = []
        self.new_payload = None
        self.new_mark = None

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return self.mark

    def set_mark(self, m):
        self.new_mark = m

    def set_payload(self, p):
        self.new_payload = p

    def repeat(self):
        self.verdicts.append("repeat")

    def accept(self):
        self.verdicts.append("accept")

    def drop(self):
        self.verdicts.append("drop")


def engine(rules: str) -> Engine:
    e = Engine(0, os.path.join(EXAMPLES, rules), maps=None, mark_mask=MASK)
    e._send_reject = lambda pkt, how: None     # no raw socket in unit tests
    return e


@pytest.mark.parametrize("rules", ["rewrite.toml", "realistic.toml"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_get_exactly_one_verdict(rules, data):
    e = engine(rules)
    p = FakePacket(data)
    e._handle(p)
    assert len(p.verdicts) == 1 and e.stats.errors == 0


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 80), flip=st.integers(0, 79), val=st.integers(0, 255))
def test_mutated_real_packets_get_exactly_one_verdict(cut, flip, val):
    raw = bytearray(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=5000, dport=10010) / Raw(b"x" * 40)))
    if flip < len(raw):
        raw[flip] = val
    p = FakePacket(bytes(raw[:cut] if cut else raw))
    e = engine("rewrite.toml")
    e._handle(p)
    assert len(p.verdicts) == 1


def test_accept_clears_only_our_bit_and_repeats():
    e = engine("realistic.toml")
    p = FakePacket(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / TCP(sport=5000, dport=80, flags="S")),
                   mark=MASK | 0x4000)
    e._handle(p)
    assert p.verdicts == ["repeat"] and p.new_mark == 0x4000       # kube-proxy's bit survives


def test_rewrite_sets_payload_then_repeats():
    e = engine("rewrite.toml")
    p = FakePacket(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=5000, dport=10010) / Raw(b"abc")))
    e._handle(p)
    assert p.verdicts == ["repeat"]
    assert IP(p.new_payload)[Raw].load == b"hh\n"


def test_verdict_log_is_rate_limited_and_says_how_much_it_dropped():
    out = io.StringIO()
    vlog = VerdictLog(out, rate=0.0001, burst=3)      # no refill during the test
    e = engine("rewrite.toml")
    e.vlog = vlog
    pkt = bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=5000, dport=10086) / Raw(b"x"))
    for _ in range(10):
        e._handle(FakePacket(pkt))
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(lines) == 3 and vlog.limit.suppressed == 7
    assert lines[0]["rule"] == "udp-10086-drop" and lines[0]["action"] == "drop"
    assert {"time", "src", "dst", "sport", "dport", "proto", "flow"} <= set(lines[0])
    vlog.limit.tokens = 1                              # one line allowed again
    e._handle(FakePacket(pkt))
    assert json.loads(out.getvalue().splitlines()[-1])["suppressed_before"] == 7


def test_rate_limiter_refills():
    rl = RateLimiter(rate=1000.0, burst=1)
    assert rl.allow() and not rl.allow()
    rl.last -= 0.01                                    # 10 ms later: 10 tokens, capped at the burst
    assert rl.allow() and not rl.allow()


def big_client_hello(name: str) -> bytes:
    """A real ClientHello (Python's ssl, no network) made larger than one TCP segment by a long
    ALPN list, as post-quantum key shares make real ones."""
    import ssl
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols([f"proto-{i:03d}-" + "x" * 40 for i in range(40)])
    out = ssl.MemoryBIO()
    conn = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    hello = out.read()
    assert len(hello) > 1500
    return hello


def segments(data: bytes, size: int = 200, seq0: int = 1000, dport: int = 443):
    """``data`` cut into TCP segments of ``size`` bytes, one flow, consecutive sequence numbers."""
    out, seq = [], seq0
    for i in range(0, len(data), size):
        part = data[i:i + size]
        out.append(bytes(IP(src="198.18.1.2", dst="198.18.2.2") /
                         TCP(sport=40000, dport=dport, flags="PA", seq=seq) / Raw(part)))
        seq += len(part)
    return out


@pytest.mark.parametrize("name, decided", [("a.tracker.example", "drop"), ("www.example.test", "repeat")])
def test_split_client_hello_is_joined_before_the_sni_rule_decides(name, decided):
    """100-byte segments: the first ends before the server_name extension. The engine holds
    segments back (accepting them) until the joined bytes show the SNI, then decides."""
    e = engine("realistic.toml")
    segs = segments(big_client_hello(name), size=100)
    held = 0
    for raw in segs:
        p = FakePacket(raw)
        e._handle(p)
        if e.stats.hellos_joined:
            break
        assert p.verdicts == ["repeat"]
        held += 1
    assert held >= 1                                     # at least one segment had no SNI
    assert e.stats.hellos_joined == 1 and p.verdicts == [decided]
    assert e.rules.counters["block-tls-sni"] == (1 if decided == "drop" else 0)
    assert len(e.joiner) == 0


def test_split_client_hello_retransmission_and_gap():
    e = engine("realistic.toml")
    segs = segments(big_client_hello("a.tracker.example"), size=50)
    for raw in (segs[0], segs[1], segs[1]):          # the second segment twice: a retransmission
        p = FakePacket(raw)
        e._handle(p)
        assert p.verdicts == ["repeat"]
    p = FakePacket(segs[3])                           # segment 3 before 2: held past the hole
    e._handle(p)
    assert p.verdicts == ["repeat"] and e.stats.hellos_abandoned == 0 and len(e.joiner) == 1
    for raw in [segs[2], *segs[4:]]:                  # the hole filled: joined, then decided
        p = FakePacket(raw)
        e._handle(p)
        if e.stats.hellos_joined:
            break
    assert p.verdicts == ["drop"] and e.stats.joins_out_of_order >= 1 and len(e.joiner) == 0


def test_no_joining_when_no_rule_reads_the_sni():
    e = engine("rewrite.toml")
    assert not e.rules.needs_sni
    p = FakePacket(segments(big_client_hello("a.tracker.example"), size=50)[0])
    e._handle(p)
    assert p.verdicts == ["repeat"] and len(e.joiner) == 0


def http_segments(head: bytes, size: int):
    return segments(head, size, seq0=5000, dport=80)


HEAD = b"GET / HTTP/1.1\r\nUser-Agent: split\r\nHost: x.blocked.example\r\nAccept: */*\r\n\r\n"


@pytest.mark.parametrize("size", [1, 7, 20, 40])
@pytest.mark.parametrize("host, decided", [(b"x.blocked.example", "drop"), (b"www.example.test", "repeat")])
def test_split_http_head_is_joined_until_the_host_line_is_whole(size, host, decided):
    """The request head in pieces (one byte at a time, or cutting the Host line): every piece
    before the Host line is complete is held back (accepted), then the Host rule decides on the
    joined head."""
    e = engine("realistic.toml")
    head = HEAD.replace(b"x.blocked.example", host)
    host_end = head.index(b"\r\n", head.index(b"Host:")) + 2
    for raw in http_segments(head, size):
        p = FakePacket(raw)
        e._handle(p)
        if e.stats.http_heads_joined:
            break
        assert p.verdicts == ["repeat"]
    assert e.stats.http_heads_joined == 1 and p.verdicts == [decided]
    assert e.rules.counters["block-http-host"] == (1 if decided == "drop" else 0)
    assert len(e.joiner) == 0
    assert e.stats.packets == -(-host_end // size)       # decided on the piece that ended the Host line


def test_whole_http_head_and_other_protocols_are_decided_at_once():
    e = engine("realistic.toml")
    for sport, payload in enumerate((HEAD, b"EHLO mail.example\r\n", b"SSH-2.0-OpenSSH_9.6\r\n",
                                     b"\x00\x01binary", b"GET / HTTP/1.1\r\n\r\n", b"get / http/1.1\r\n")):
        p = FakePacket(bytes(IP(src="198.18.1.2", dst="198.18.2.2") /
                             TCP(sport=41000 + sport, dport=80, flags="PA", seq=1) / Raw(payload)))
        e._handle(p)
        assert len(p.verdicts) == 1
    # Nothing joined; what starts no message (SMTP, SSH, binary, a lower-case "request") may be a
    # later piece of one whose start comes later: kept a while, decided in doubt (no bypass).
    assert e.stats.http_heads_joined == 0 and len(e.joiner) == 4 and e.stats.joins_doubted == 4


def test_slow_http_pieces_are_joined_however_long_the_pause():
    """Pausing between pieces must not turn into a decision on the partial head: the held entry
    is only evicted under table pressure, and its INSPECT lasts JOIN_TTL from the last piece."""
    e = engine("realistic.toml")
    segs = http_segments(HEAD, 10)
    e._handle(FakePacket(segs[0]))
    for entry in e.joiner.flows.values():
        entry.evictable_after -= 3600                     # an hour "passes"
    for raw in segs[1:]:
        p = FakePacket(raw)
        e._handle(p)
        if e.stats.http_heads_joined:
            break
    assert p.verdicts == ["drop"] and e.stats.http_heads_abandoned == 0


class RecordingMaps:
    """Stands in for hybrid.maps.Maps: records the flow verdicts the engine writes."""

    def __init__(self):
        self.writes: list[tuple[int, int | None]] = []

    def get_flow(self, key):      # the kernel's facts: unknown here
        return None

    def write_verdict(self, key: bytes, verdict: int, ttl_ns: int | None, conn_scoped: bool = False) -> None:
        self.writes.append((verdict, ttl_ns))


@pytest.mark.parametrize("host, last", [(b"x.blocked.example", abi.VERDICT_BLOCK), (b"www.example.test", abi.VERDICT_NONE)])
def test_a_join_keeps_the_flow_in_inspect_and_the_decision_replaces_it(tmp_path, host, last):
    """Each held piece renews the INSPECT (JOIN_TTL); the decision on the joined head then
    writes its own flow verdict, or, when it leaves the flow alone (flow "none"), ends the
    INSPECT, which would otherwise queue every packet of the flow for two minutes."""
    rules = tmp_path / "r.toml"
    rules.write_text('default = "accept"\ndefault_flow = "none"\n[[rule]]\nname = "h"\nproto = "tcp"\n'
                     'http_host = ".blocked.example"\naction = "drop"\nflow = "block"\n')
    e = Engine(0, str(rules), maps=None, mark_mask=MASK)
    e.maps = FlowTableFake()
    pieces = http_segments(HEAD.replace(b"x.blocked.example", host), 10)
    e.maps.connection(pieces[0])
    for raw in pieces:
        e._handle(FakePacket(raw))
    held = sum(1 for v, _ in e.maps.writes if v == abi.VERDICT_INSPECT)
    assert held >= 2 and e.maps.writes[:held] == [(abi.VERDICT_INSPECT, int(JOIN_TTL * 1e9))] * held
    assert e.maps.writes[held][0] == last and len(e.maps.writes) == held + 1
    e.maps.writes.clear()
    e._handle(FakePacket(pieces[-1]))                    # a later packet: nothing left to end
    assert all(v != abi.VERDICT_NONE for v, _ in e.maps.writes)


class FullPinnedMaps(RecordingMaps):
    """A pinned table that is full: the flow table takes the BLOCK, the pin fails."""

    def write_verdict(self, key: bytes, verdict: int, ttl_ns: int | None, conn_scoped: bool = False) -> None:
        super().write_verdict(key, verdict, ttl_ns, conn_scoped)
        if verdict == abi.VERDICT_BLOCK:
            raise TableFullError("hybrid_pinned is full (8 entries): ...", errno.E2BIG)


def test_a_block_that_cannot_be_pinned_is_counted_not_an_error(tmp_path):
    """The BLOCK is in the flow table (it counts as written); the failed pin is counted in
    pinned_write_errors, never silent, and is not a flow write error."""
    rules = tmp_path / "r.toml"
    rules.write_text('default = "accept"\ndefault_flow = "none"\n[[rule]]\nname = "b"\nproto = "udp"\n'
                     'dport = 53\naction = "drop"\nflow = "block"\n')
    e = Engine(0, str(rules), maps=None, mark_mask=MASK)
    e.maps = FullPinnedMaps()
    e._handle(FakePacket(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=1, dport=53) / Raw(b"x"))))
    assert [v for v, _ in e.maps.writes] == [abi.VERDICT_BLOCK]
    assert (e.stats.pinned_write_errors, e.stats.flow_write_errors, e.stats.flow_verdicts["block"]) == (1, 0, 1)
    assert e.snapshot()["pinned_write_errors"] == 1


def test_no_http_joining_when_no_rule_reads_http():
    e = engine("rewrite.toml")
    assert not e.rules.needs_http
    p = FakePacket(http_segments(HEAD, 10)[0])
    e._handle(p)
    assert p.verdicts == ["repeat"] and len(e.joiner) == 0


def test_a_stop_signal_mid_packet_ends_the_loop_and_still_gives_the_verdict():
    """SIGTERM's handler raises _Stop wherever the engine is. Inside the handler it must not be
    counted as a packet error and swallowed (the engine would then wait in recv() for another
    packet before stopping), and the packet in hand must still get its verdict."""
    from hybrid.engine.loop import _Stop
    e = engine("realistic.toml")

    def stop_now(pkt):
        raise _Stop
    e.rules.decide = stop_now
    pkt = FakePacket(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=1, dport=53) / Raw(b"x")))
    with pytest.raises(_Stop):
        e._handle(pkt)
    assert pkt.verdicts == ["repeat"] and pkt.new_mark == 0
    assert e.stats.errors == 0


# -- reject: a reset to each end, and a failure to send one is a counted drop ----------------------

REJECT_RULES = ('default = "accept"\n'
                '[[rule]]\nname = "no-telnet"\nproto = "tcp"\ndport = 23\naction = "reject"\n'
                '[[rule]]\nname = "no-udp-23"\nproto = "udp"\ndport = 23\naction = "reject"\n')


class FakeRawSocket:
    """Stands in for the engine's IPPROTO_RAW sockets (socket.socket in hybrid.engine.loop):
    records what is sent, or fails every send with ``fail``."""

    sent: list[tuple[bytes, tuple]] = []
    fail: OSError | None = None

    def __init__(self, family, kind, proto):
        assert kind == socket.SOCK_RAW and proto == socket.IPPROTO_RAW
        self.family = family

    def sendto(self, data, addr):
        if FakeRawSocket.fail is not None:
            raise FakeRawSocket.fail
        FakeRawSocket.sent.append((data, addr))
        return len(data)

    def close(self):
        pass


@pytest.fixture
def raw_sockets(monkeypatch):
    monkeypatch.setattr(FakeRawSocket, "sent", [])
    monkeypatch.setattr(FakeRawSocket, "fail", None)
    monkeypatch.setattr("hybrid.engine.loop.socket.socket", FakeRawSocket)
    return FakeRawSocket


def reject_engine(tmp_path) -> Engine:
    rules = tmp_path / "reject.toml"
    rules.write_text(REJECT_RULES)
    return Engine(0, str(rules), maps=None, mark_mask=MASK)


@pytest.mark.parametrize("ip, parse", [(IP(src="198.18.1.2", dst="198.18.2.2"), IP),
                                       (IPv6(src="2001:db8:1::2", dst="2001:db8:2::2"), IPv6)], ids=["v4", "v6"])
def test_tcp_reject_resets_both_ends(tmp_path, raw_sockets, ip, parse):
    """The client gets a RST from the server's address, the server one from the client's, each
    sent to its own end (routing picks the interface) with the sequence number it expects."""
    e = reject_engine(tmp_path)
    p = FakePacket(bytes(ip / TCP(sport=40000, dport=23, flags="PA", seq=1000, ack=9000) / Raw(b"root\r\n")))
    e._handle(p)
    assert p.verdicts == ["drop"] and e.stats.actions["reject"] == 1
    assert e.stats.reject_send_errors == 0 and e.stats.errors == 0
    (to_client, addr_c), (to_server, addr_s) = raw_sockets.sent
    c, s = parse(to_client), parse(to_server)
    assert addr_c[0] == c.dst == ip.src and addr_s[0] == s.dst == ip.dst
    assert (c.src, c[TCP].sport, c[TCP].dport, c[TCP].seq, str(c[TCP].flags)) == (ip.dst, 23, 40000, 9000, "R")
    assert (s.src, s[TCP].sport, s[TCP].dport, s[TCP].seq, s[TCP].ack, str(s[TCP].flags)) == \
        (ip.src, 40000, 23, 1000, 9000, "RA")


def test_reject_of_a_syn_resets_the_client_only(tmp_path, raw_sockets):
    """A bare SYN never reaches the server: nothing there to reset."""
    e = reject_engine(tmp_path)
    p = FakePacket(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / TCP(sport=40000, dport=23, flags="S", seq=7)))
    e._handle(p)
    assert p.verdicts == ["drop"] and len(raw_sockets.sent) == 1
    assert IP(raw_sockets.sent[0][0]).dst == "198.18.1.2" and e.stats.reject_send_errors == 0


def test_reject_of_a_rst_sends_nothing(tmp_path, raw_sockets):
    e = reject_engine(tmp_path)
    p = FakePacket(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / TCP(sport=40000, dport=23, flags="RA")))
    e._handle(p)
    assert p.verdicts == ["drop"] and raw_sockets.sent == [] and e.stats.reject_send_errors == 0


def test_udp_reject_is_one_icmp_error_to_the_sender(tmp_path, raw_sockets):
    e = reject_engine(tmp_path)
    p = FakePacket(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=5000, dport=23) / Raw(b"x")))
    e._handle(p)
    assert p.verdicts == ["drop"] and len(raw_sockets.sent) == 1
    icmp = IP(raw_sockets.sent[0][0])
    assert (icmp.dst, icmp.proto, icmp[ICMP].type, icmp[ICMP].code) == ("198.18.1.2", 1, 3, 3)


def test_a_reset_that_cannot_be_sent_is_a_counted_drop(tmp_path, raw_sockets, caplog):
    """sendto fails (no CAP_NET_RAW, no route, ...): the packet is still dropped, never accepted;
    each message not sent is counted, in the snapshot and the metrics, and the first few logged."""
    from hybrid.observe import metrics
    raw_sockets.fail = PermissionError(1, "Operation not permitted")
    e = reject_engine(tmp_path)
    pkt = bytes(IP(src="198.18.1.2", dst="198.18.2.2") / TCP(sport=40000, dport=23, flags="PA", seq=1, ack=2) / Raw(b"x"))
    for _ in range(6):
        p = FakePacket(pkt)
        e._handle(p)
        assert p.verdicts == ["drop"]
    assert e.stats.actions["reject"] == 6 and e.stats.actions["accept"] == 0 and e.stats.errors == 0
    assert e.stats.reject_send_errors == 12                     # both resets of each packet
    logged = [r for r in caplog.records if "not sent" in r.getMessage()]
    assert len(logged) == 10 and "TCP RST to the receiver" in logged[1].getMessage()
    assert "Operation not permitted" in logged[0].getMessage()
    snap = e.snapshot()
    assert snap["reject_send_errors"] == 12
    fams = {f.name: f for f in metrics._engines({"engines": [{**snap, "alive": True}]})}
    assert [s.value for s in fams["hybrid_engine_reject_send_errors"].samples if s.name.endswith("_total")] == [12]


def test_a_reject_message_that_cannot_be_built_is_a_counted_drop(tmp_path, raw_sockets):
    """An ICMP error about an ICMP error is refused (RFC 1122): dropped, counted, nothing sent."""
    rules = tmp_path / "r.toml"
    rules.write_text('default = "accept"\n[[rule]]\nname = "no-icmp"\nproto = "icmp"\naction = "reject"\n')
    e = Engine(0, str(rules), maps=None, mark_mask=MASK)
    p = FakePacket(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / ICMP(type=3, code=1) /
                         IP(src="198.18.2.2", dst="198.18.1.2") / UDP()))
    e._handle(p)
    assert p.verdicts == ["drop"] and raw_sockets.sent == []
    assert e.stats.reject_send_errors == 1 and e.stats.errors == 0
