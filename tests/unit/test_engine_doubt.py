"""The engine's one place that checks a flow verdict against what the server will see
(Engine._settle): doubts refuse a bypass, verdicts are scoped to the side that spoke. The
kernel's facts come from a flow table shaped as tc keeps it (enginefakes.FlowTableFake)."""

import pytest
from enginefakes import FlowTableFake
from scapy.all import IP, TCP, Raw

from hybrid.engine.loop import Engine
from hybrid.kernel import abi

pytestmark = pytest.mark.unit
MASK = 0x100000
RULES = ('default = "accept"\ndefault_flow = "bypass"\n{extra}[[rule]]\nname = "host"\nproto = "tcp"\n'
         'http_host = ".blocked.example"\naction = "drop"\nflow = "block"\n')
ALLOWED = b"GET / HTTP/1.1\r\nHost: www.allowed.example\r\n\r\n"
BLOCKED = b"GET / HTTP/1.1\r\nHost: x.blocked.example\r\n\r\n"


class Nf:
    def __init__(self, payload: bytes):
        self.payload, self.verdicts = payload, []

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return MASK

    def set_mark(self, m):
        pass

    def repeat(self):
        self.verdicts.append("repeat")

    def drop(self):
        self.verdicts.append("drop")


def client(payload: bytes, seq: int = 1000, ttl: int = 64, **tcp) -> bytes:
    return bytes(IP(src="198.18.1.2", dst="198.18.2.2", ttl=ttl) /
                 TCP(sport=40000, dport=80, flags="PA", seq=seq, **tcp) / Raw(payload))


def server(payload: bytes, seq: int = 8) -> bytes:
    return bytes(IP(src="198.18.2.2", dst="198.18.1.2") /
                 TCP(sport=80, dport=40000, flags="PA", seq=seq) / Raw(payload))


def engine(tmp_path, on_doubt: str | None = None) -> Engine:
    rules = tmp_path / "r.toml"
    rules.write_text(RULES.format(extra=f'on_doubt = "{on_doubt}"\n' if on_doubt else ""))
    e = Engine(0, str(rules), maps=None, mark_mask=MASK)
    e.maps = FlowTableFake()
    e._send_reject = lambda pkt, how: None
    return e


def handle(e: Engine, raw: bytes) -> list[str]:
    nf = Nf(raw)
    e._handle(nf)
    assert e.stats.errors == 0
    return nf.verdicts


def test_a_clean_request_at_the_stream_start_bypasses_its_connection(tmp_path):
    e = engine(tmp_path)
    e.maps.connection(client(ALLOWED))
    assert handle(e, client(ALLOWED)) == ["repeat"]
    assert e.maps.writes == [(abi.VERDICT_BYPASS, 300 * 10**9)] and e.maps.conn_scoped == [True]
    assert not e.stats.doubts


@pytest.mark.parametrize("why, raw, facts", [
    ("tcp:bad-checksum", client(ALLOWED, chksum=0x1234), {}),
    ("ip:low-ttl", client(ALLOWED, ttl=3), {"ttl": 64}),
    ("tcp:not-stream-start", client(ALLOWED, seq=5000), {"isn": 999}),
])
def test_a_bypass_the_server_may_not_read_so_is_refused(tmp_path, why, raw, facts):
    """Insertion (a checksum the server rejects, a TTL that may expire before it) and a middle
    piece decided before the stream's start: the packet passes, the flow stays inspected."""
    e = engine(tmp_path)
    e.maps.connection(client(ALLOWED), **facts)
    assert handle(e, raw) == ["repeat"]
    assert e.maps.writes == [(abi.VERDICT_INSPECT, 300 * 10**9)]
    assert e.stats.doubts == {why: 1} and e.stats.doubt_actions["inspect"] == 1


@pytest.mark.parametrize("policy, verdict", [("drop", "drop"), ("reset", "drop")])
def test_on_doubt_drops_or_resets_instead(tmp_path, policy, verdict):
    e = engine(tmp_path, policy)
    e.maps.connection(client(ALLOWED))
    assert handle(e, client(ALLOWED, chksum=0x1234)) == [verdict]
    assert abi.VERDICT_BYPASS not in [v for v, _ in e.maps.writes]
    assert e.stats.doubt_actions[policy] == 1
    assert e.stats.actions["reject" if policy == "reset" else "drop"] == 1


def test_a_bypass_on_the_responders_bytes_is_not_written(tmp_path):
    """A server that speaks first (or a spoofed server packet) cannot get the client's flow
    bypassed before the client's own bytes were decided."""
    e = engine(tmp_path)
    e.maps.connection(client(ALLOWED))
    assert handle(e, server(b"220 smtp.example ready\r\n")) == ["repeat"]
    assert e.maps.writes == [] and e.stats.scoped["responder-side"] == 1
    assert handle(e, client(BLOCKED)) == ["drop"]
    assert e.maps.writes == [(abi.VERDICT_BLOCK, 300 * 10**9)]


@pytest.mark.parametrize("how", ["from the responder", "no handshake"])
def test_a_content_block_without_the_flows_handshake_covers_the_packet_only(tmp_path, how):
    """A spoofed packet carrying a blocked Host must not block someone else's connection."""
    e = engine(tmp_path)
    if how == "from the responder":
        e.maps.connection(client(ALLOWED))
        raw = server(BLOCKED)
    else:
        e.maps.connection(client(BLOCKED), handshake=False)
        raw = client(BLOCKED)
    assert handle(e, raw) == ["drop"]
    assert e.maps.writes == [(abi.VERDICT_INSPECT, 300 * 10**9)]
    assert e.stats.scoped["block-packet-only"] == 1


def test_a_content_block_from_the_client_after_its_handshake_blocks_the_connection(tmp_path):
    e = engine(tmp_path)
    e.maps.connection(client(BLOCKED))
    assert handle(e, client(BLOCKED)) == ["drop"]
    assert e.maps.writes == [(abi.VERDICT_BLOCK, 300 * 10**9)] and e.maps.conn_scoped == [True]


@pytest.mark.parametrize("bad", [{"chksum": 0x1234}, {"ttl": 3}], ids=["bad-checksum", "low-ttl"])
def test_a_piece_the_server_never_reads_does_not_complete_a_join(tmp_path, bad):
    """An insertion held by the joiner: "Host: allowed" in a first piece the server discards (a bad
    checksum, or a TTL that expires before it), then ".example" in a sound second piece. Joined,
    they would read as an allowed host and bypass the flow on the sound piece; the sender then
    sends the real first piece, "Host: blocked" (the same length), into the bypassed flow. A
    piece the server never reads is not held: the second piece alone completes nothing."""
    e = engine(tmp_path)
    first_ok = b"GET / HTTP/1.1\r\nHost: x.allowed"
    first_bad = b"GET / HTTP/1.1\r\nHost: x.blocked"
    rest = b".example\r\n\r\n"
    e.maps.connection(client(first_ok + rest), ttl=64)
    handle(e, client(first_ok, **bad))
    handle(e, client(rest, seq=1000 + len(first_ok)))
    assert abi.VERDICT_BYPASS not in [v for v, _ in e.maps.writes], e.maps.writes
    assert handle(e, client(first_bad)) == ["drop"]            # the real first piece: seen, blocked
