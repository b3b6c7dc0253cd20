"""The TLS ClientHello read as a TLS server reads it: handshake records joined (any number, split
at any byte), the server_name extension parsed as OpenSSL 3.0 parses it, and the bounds; then the
joiner and the engine on ClientHellos re-framed into many records. The server itself is the
oracle in tests/integration/test_evasion_tls.py."""

from __future__ import annotations

import itertools
import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from enginefakes import FlowTableFake
from hybrid.engine.join import SegmentJoiner, Step
from hybrid.engine.loop import Engine, EngineStats
from hybrid.engine.packet import (
    TLS_HELLO_MAX,
    TLS_HELLO_MAX_RECORDS,
    TLS_MAX_EMPTY_RECORDS,
    TLS_RECORD_MAX,
    TLS_UNPARSED,
    _parse_sni,
    _sni_in_hello,
    client_hello_missing,
    client_hello_problem,
    decode,
    tls_client_hello,
)
from hybrid.kernel import abi

pytestmark = pytest.mark.unit
BLOCKED = "x.blocked.example"


def client_hello(name: str | None = BLOCKED) -> bytes:
    """A real first flight (one TLS record) from Python's ssl, no network."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    out = ssl.MemoryBIO()
    conn = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return out.read()


HELLO = client_hello()
HS = HELLO[5:]                                           # the handshake message, type byte first


def record(body: bytes, ctype: int = 22, version: bytes = b"\x03\x01") -> bytes:
    return bytes([ctype]) + version + struct.pack("!H", len(body)) + body


def reframe(hs: bytes, cuts) -> bytes:
    """``hs`` as consecutive handshake records, cut at the offsets ``cuts``."""
    edges = [0, *sorted({c for c in cuts if 0 < c < len(hs)}), len(hs)]
    return b"".join(record(hs[a:b]) for a, b in itertools.pairwise(edges))


def sni_offset(hs: bytes, name: str) -> int:
    return hs.index(name.encode())


def with_extensions(hs: bytes, extra: bytes, *, drop_sni: bool = False) -> bytes:
    """``hs`` with ``extra`` (whole extensions) appended, lengths fixed; the original SNI
    extension removed when ``drop_sni``."""
    body = hs[4:]
    p = 2 + 32
    p += 1 + body[p]
    p += 2 + int.from_bytes(body[p:p + 2], "big")
    p += 1 + body[p]
    el = int.from_bytes(body[p:p + 2], "big")
    exts, q, kept = body[p + 2:p + 2 + el], 0, b""
    while q < len(exts):
        t, ln = struct.unpack_from("!HH", exts, q)
        if not (drop_sni and t == 0):
            kept += exts[q:q + 4 + ln]
        q += 4 + ln
    exts = kept + extra
    body = body[:p] + struct.pack("!H", len(exts)) + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def sni_ext(list_bytes: bytes) -> bytes:
    return struct.pack("!HH", 0, len(list_bytes)) + list_bytes


def name_list(*names: bytes, ntype: int = 0) -> bytes:
    entries = b"".join(bytes([ntype]) + struct.pack("!H", len(n)) + n for n in names)
    return struct.pack("!H", len(entries)) + entries


# -- records joined ---------------------------------------------------------------------------

def test_one_record_as_before():
    hs, missing, problem = tls_client_hello(HELLO)
    assert (hs, missing, problem) == (HS, 0, None)
    assert _parse_sni(HELLO) == BLOCKED and client_hello_problem(HELLO) is None


@pytest.mark.parametrize("where", ["inside-sni", "before-sni", "after-sni", "type-byte", "length"])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_k_records_at_every_offset_class(where, k):
    at = {"inside-sni": sni_offset(HS, BLOCKED) + 3, "before-sni": sni_offset(HS, BLOCKED) - 9,
          "after-sni": sni_offset(HS, BLOCKED) + len(BLOCKED) + 1, "type-byte": 1, "length": 2}[where]
    cuts = [at + i * 11 for i in range(k - 1)]
    data = reframe(HS, cuts)
    assert data.count(b"\x16\x03\x01") >= k
    assert tls_client_hello(data) == (HS, 0, None)
    assert _parse_sni(data) == BLOCKED and client_hello_missing(data) == 0


def test_one_byte_per_record():
    data = reframe(HS, range(len(HS)))
    assert len(data) == 6 * len(HS)
    assert _parse_sni(data) == BLOCKED and client_hello_problem(data) is None


def test_every_prefix_of_a_multi_record_hello_asks_for_more_until_the_sni_is_whole():
    data = reframe(HS, range(0, len(HS), 7))             # 7-byte records
    whole_sni = data.index(BLOCKED[-3:].encode()) + 3
    for n in range(1, len(data) + 1):
        prefix = data[:n]
        missing = client_hello_missing(prefix)
        if n < whole_sni:
            assert missing > 0 and _parse_sni(prefix) is None, n
            assert client_hello_problem(prefix) == "incomplete"
        else:
            assert missing == 0 and _parse_sni(prefix) == BLOCKED, n


def test_the_first_segment_cut_inside_the_record_header_is_held():
    for n in range(1, 6):
        assert client_hello_missing(HELLO[:n]) > 0
    assert client_hello_missing(b"\x16\x04") == 0       # not TLS (major version 4): not ours


def test_empty_records_as_openssl_counts_them():
    ok = record(b"") * TLS_MAX_EMPTY_RECORDS + HELLO
    assert _parse_sni(ok) == BLOCKED
    bad = record(b"") * (TLS_MAX_EMPTY_RECORDS + 1) + HELLO
    assert _parse_sni(bad) is None and client_hello_problem(bad) == "empty_records"
    mid = reframe(HS, [50]).replace(record(HS[50:]), record(b"") * 5 + record(HS[50:]))
    assert _parse_sni(mid) == BLOCKED


def test_record_length_past_the_end_waits_then_is_a_given_up_join():
    data = record(HS[:60]) + b"\x16\x03\x01\x40\x00" + HS[60:]     # 16384 announced, fewer sent
    assert client_hello_missing(data) == 0 and _parse_sni(data) == BLOCKED  # the SNI is readable
    cut = record(HS[:30]) + b"\x16\x03\x01\x40\x00" + HS[30:40]
    assert client_hello_missing(cut) >= 16384 - 10
    assert client_hello_problem(cut) == "incomplete"


def test_a_record_one_byte_over_the_limit_is_fatal():
    big = with_extensions(HS, struct.pack("!HH", 0x7777, 20000) + bytes(20000))
    over = record(big[:TLS_RECORD_MAX + 1]) + record(big[TLS_RECORD_MAX + 1:])
    assert client_hello_problem(over) == "record_overflow" and _parse_sni(over) is None
    fine = reframe(big, [TLS_RECORD_MAX])
    assert _parse_sni(fine) == BLOCKED and client_hello_problem(fine) is None


def test_too_big_and_too_many_records():
    big = b"\x01" + (TLS_HELLO_MAX - 3).to_bytes(3, "big") + HS[4:]     # one byte over
    data = reframe(big, range(0, len(big), 100))
    assert client_hello_problem(data) == "too_big" and _parse_sni(data) is None
    assert client_hello_missing(data) == 0               # no join: decide now, never bypass
    pad = struct.pack("!HH", 0x7777, 20000) + bytes(20000)
    late = with_extensions(HS, pad + sni_ext(name_list(BLOCKED.encode())), drop_sni=True)
    many = reframe(late, range(len(late)))               # 20 000 one-byte records, the SNI last
    assert len(late) > TLS_HELLO_MAX_RECORDS
    assert client_hello_problem(many) == "too_many_records" and _parse_sni(many) is None
    early = reframe(with_extensions(HS, pad), range(len(HS) + 20004))
    assert _parse_sni(early) == BLOCKED                  # read before the limit: decided on it


@pytest.mark.parametrize("ctype", [20, 21, 23, 24])
def test_another_content_type_before_the_hello_is_whole_is_a_violation(ctype):
    body = b"\x01\x5a" if ctype == 21 else b"\x01"
    data = record(HS[:50]) + record(body, ctype) + record(HS[50:])
    assert client_hello_problem(data) == "interleaved" and _parse_sni(data) is None
    assert client_hello_missing(data) == 0               # no join: decide now, never bypass
    after = HELLO + record(body, ctype)                  # after a whole hello: no business of ours
    assert _parse_sni(after) == BLOCKED and client_hello_problem(after) is None


def test_another_handshake_message_is_not_a_client_hello():
    data = record(b"\x02" + HS[1:])
    assert client_hello_problem(data) is None and _parse_sni(data) is None    # the server aborts
    assert client_hello_missing(data) == 0 and client_hello_missing(b"\x16\x03\x01\x00\x01\x02") == 0


# -- the server_name extension ------------------------------------------------------------------

def test_case_and_final_dot_are_kept_for_the_rules():
    assert _sni_in_hello(client_hello("X.Blocked.Example.")[5:]) == ("X.Blocked.Example.", None)
    assert _parse_sni(client_hello("X.Blocked.Example.")) == "x.blocked.example."


def test_no_sni_at_all_is_not_a_problem():
    h = client_hello(None)
    assert _parse_sni(h) is None and client_hello_problem(h) is None


@pytest.mark.parametrize("ext, why", [
    (sni_ext(name_list(b"a.example", b"x.blocked.example")), "sni_malformed"),   # two names
    (sni_ext(name_list(b"x.blocked.example", ntype=1)), "sni_malformed"),        # not host_name
    (sni_ext(name_list(b"")), "sni_malformed"),                                  # empty name
    (sni_ext(name_list(b"x.blocked.example\x00.ok")), "sni_malformed"),          # NUL inside
    (sni_ext(name_list(b"a" * 256)), "sni_malformed"),                           # over 255
    (sni_ext(b"\x00\x00"), "sni_malformed"),                                     # empty list
    (sni_ext(name_list(b"x.blocked.example")[:-1]), "sni_malformed"),            # list past the end
    (sni_ext(b"\x00\x20" + name_list(b"x.blocked.example")[2:]), "sni_malformed"),  # list length off
    (sni_ext(name_list(b"x.blocked.example")) * 2, "sni_duplicate"),
])
def test_ambiguous_or_malformed_server_names(ext, why):
    hs = with_extensions(HS, ext, drop_sni=True)
    data = record(hs)
    assert _parse_sni(data) is None and client_hello_problem(data) == why
    assert client_hello_missing(data) == 0
    assert client_hello_problem(reframe(hs, [sni_offset(hs, "x") - 3 if b"x" in hs else 10])) == why


def test_nested_lengths_inconsistent():
    body = bytearray(HS)
    body[1:4] = (len(HS) - 4 + 40).to_bytes(3, "big")   # the message says 40 bytes more
    data = record(bytes(body)) + record(bytes(40))       # ...which come, inside the extensions
    assert client_hello_problem(data) == "hello_malformed" and _parse_sni(data) is None
    ext_past = with_extensions(HS, struct.pack("!HH", 0x7777, 500) + bytes(10))
    assert client_hello_problem(record(ext_past)) == "hello_malformed"


def test_every_problem_is_a_counted_reason():
    seen = set()
    for data in (record(HS[:50]) + record(b"\x01", 20) + record(HS[50:]), HELLO[:100],
                 record(b"") * 40 + HELLO, record(HS[:20000]) if len(HS) > 20000 else HELLO[:5]):
        seen.add(client_hello_problem(data))
    assert seen <= set(TLS_UNPARSED)


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(HS) - 1), max_size=60),
       empties=st.lists(st.integers(min_value=0, max_value=len(HS)), max_size=5))
def test_reframing_a_valid_hello_never_changes_the_sni(cuts, empties):
    data = reframe(HS, cuts)
    for at in empties:                                   # a few empty records between records
        bounds, pos = [], 0
        while pos < len(data):                           # walk the record headers: a search for
            pos += 5 + int.from_bytes(data[pos + 3:pos + 5], "big")    # 16 03 01 could land in
            bounds.append(pos)                           # a record's random bytes
        pos = bounds[at % len(bounds)]
        data = data[:pos] + record(b"") + data[pos:]
    assert _parse_sni(data) == BLOCKED
    assert client_hello_problem(data) is None and client_hello_missing(data) == 0


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"\x16\x03\x01", b"\x16\x03\x01\x00\x05\x01"]))
def test_arbitrary_bytes_never_raise(data, prefix):
    d = prefix + data
    _, missing, problem = tls_client_hello(d)
    assert missing >= 0 and (problem is None or problem in TLS_UNPARSED)
    assert client_hello_problem(d) in (None, *TLS_UNPARSED)
    _parse_sni(d)
    client_hello_missing(d)


# -- the joiner and the engine --------------------------------------------------------------

def segs(data: bytes, sizes, seq0: int = 1000):
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        part = data[pos:pos + size]
        out.append(bytes(IP(src="198.18.1.2", dst="198.18.2.2") /
                         TCP(sport=40000, dport=443, flags="PA", seq=seq0 + pos) / Raw(part)))
        pos += size
        i += 1
    return out


def test_the_joiner_holds_an_incomplete_multi_record_hello():
    from types import SimpleNamespace
    j = SegmentJoiner(EngineStats(0))
    rules = SimpleNamespace(needs_sni=True, needs_http=False)
    data = reframe(HS, range(0, len(HS), 3))            # 3-byte records: 6x the bytes
    steps = [j.offer(decode(raw), rules) for raw in segs(data, [1, 400])]
    assert steps[0].step is Step.HOLD                    # one byte: a record header begun
    last = next(s for s in steps if s.step is Step.JOINED)
    assert _parse_sni(last.data) == BLOCKED and j.stats.hellos_joined == 1


class FakePacket:
    def __init__(self, payload: bytes):
        self.payload, self.verdicts = payload, []

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return 0

    def set_mark(self, m):
        pass

    def repeat(self):
        self.verdicts.append("repeat")

    def drop(self):
        self.verdicts.append("drop")


class RecordingMaps(FlowTableFake):
    def write_verdict(self, key, verdict, ttl_ns, conn_scoped=False):
        self.writes.append(verdict)


RULES = ('default = "accept"\ndefault_flow = "bypass"\n[[rule]]\nname = "sni"\nproto = "tcp"\n'
         'tls_sni = ".blocked.example"\naction = "drop"\nflow = "block"\n')


def run_engine(tmp_path, data: bytes, sizes) -> tuple[Engine, list[str]]:
    rules = tmp_path / "r.toml"
    rules.write_text(RULES)
    e = Engine(0, str(rules), maps=None, mark_mask=0x100000)
    e.maps = RecordingMaps()
    pieces = segs(data, sizes)
    e.maps.connection(pieces[0])            # tc saw the handshake; the hello starts the stream
    verdicts = []
    for raw in pieces:
        p = FakePacket(raw)
        e._handle(p)
        verdicts += p.verdicts
        if e.maps.writes and e.maps.writes[-1] != abi.VERDICT_INSPECT or e.stats.hellos_joined:
            break                        # decided: the kernel now blocks or bypasses the flow
    assert e.stats.errors == 0
    return e, verdicts


@pytest.mark.parametrize("sizes", [[len(HS) * 6], [1, 5000], [3, 7, 50]])
def test_the_engine_blocks_a_hello_in_one_byte_records_in_one_or_many_segments(tmp_path, sizes):
    e, verdicts = run_engine(tmp_path, reframe(HS, range(len(HS))), sizes)
    assert verdicts[-1] == "drop" and e.rules.counters["sni"] == 1
    assert abi.VERDICT_BLOCK in e.maps.writes and abi.VERDICT_BYPASS not in e.maps.writes


def test_the_engine_bypasses_an_allowed_name_in_many_records(tmp_path):
    hs = client_hello("www.allowed.example")[5:]
    e, verdicts = run_engine(tmp_path, reframe(hs, range(0, len(hs), 5)), [100])
    assert "drop" not in verdicts and e.maps.writes[-1] == abi.VERDICT_BYPASS


@pytest.mark.parametrize("data, why", [
    (record(HS[:50]) + record(b"\x01\x5a", 21) + record(HS[50:]), "interleaved"),
    (record(with_extensions(HS, sni_ext(name_list(b"a.example", b"x.blocked.example")), drop_sni=True)),
     "sni_malformed"),
    (record(b"") * 33 + HELLO, "empty_records"),
])
def test_an_unparsed_hello_is_never_bypassed_and_is_counted(tmp_path, data, why):
    e, _ = run_engine(tmp_path, data, [5000])
    assert e.stats.doubts == {"tls:" + why: 1}
    assert abi.VERDICT_BYPASS not in e.maps.writes and e.maps.writes[-1] == abi.VERDICT_INSPECT


def test_a_hello_without_sni_is_still_bypassed(tmp_path):
    e, _ = run_engine(tmp_path, client_hello(None), [5000])
    assert e.maps.writes[-1] == abi.VERDICT_BYPASS and not e.stats.doubts

