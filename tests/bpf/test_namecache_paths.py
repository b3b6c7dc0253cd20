"""The name-verdict cache's paths one by one (bpf/namecache.h), through BPF_PROG_TEST_RUN: a
hit carries out its entry (pass and bypass, drop and block with a pin, pass alone), an entry of
another generation or past its expiry never decides, and the packets the engine would doubt go
to it. The random differential test (test_namecache_kernel.py) covers the mix; these name each
path so that a regression says which one broke."""

from __future__ import annotations

import time

import pytest
from bpfkit import LO, default_config
from reference import canonical_key, flow_key_of, parse

from hybrid.kernel import abi, bpfsys
from hybrid.lab import craft

pytestmark = pytest.mark.bpf
ETH = bytes.fromhex("020000000002" "020000000001" "0800")
ETH6 = ETH[:12] + b"\x86\xdd"
CLIENT, SERVER = "198.18.1.2", "198.18.2.2"
GEN = 5


def query(name: str) -> bytes:
    return (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
            + b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01")


def dns4(name: str, sport: int, ttl: int = 64, csum: int | None = None) -> bytes:
    l4 = craft.udp(CLIENT, SERVER, sport, 53, query(name))
    if csum is not None:
        l4 = l4[:6] + csum.to_bytes(2, "big") + l4[8:]
    return ETH + craft.ipv4(CLIENT, SERVER, 17, l4, ttl=ttl)


def teach(maps, name: str, action: int, verdict: int, *, gen: int = GEN, expires_in_s: float = 60,
          proto: int = 17, port: int = 53, kind: int = abi.NAME_DNS) -> None:
    now = time.monotonic_ns()
    maps.put_name_verdict(maps.name_key(gen, kind, name, proto, port),
                          abi.NameVerdict(expires_ns=int(now + expires_in_s * 1e9), flow_ttl_ns=int(30e9),
                                          rule=1, action=action, verdict=verdict))


@pytest.fixture
def cache(maps):
    maps.set_config(default_config(flags=abi.CFG_NAMES))
    maps.set_name_state(GEN, 1)
    return maps


def tc(datapath, frame: bytes) -> int:
    return bpfsys.prog_test_run(datapath.tc_fd, frame, bpfsys.SkBuff(ifindex=LO), name=abi.PROG_TC).retval


def flow_of(maps, frame: bytes):
    return maps.get_flow(flow_key_of(canonical_key(parse(frame))[0]))


def test_pass_and_bypass(datapath, cache, run):
    teach(cache, "a.example", abi.NAME_ACT_ACCEPT, abi.VERDICT_BYPASS)
    f = dns4("a.example", 5000)
    assert tc(datapath, f) != 2
    flow = flow_of(cache, f)
    assert flow.verdict == abi.VERDICT_BYPASS and flow.flags & abi.FLOW_BY_CACHE and flow.flags & abi.FLOW_CONN_VERDICT
    c = run.counters()
    assert c["cache_passed"] == 1 and c["flagged"] == 0, c
    run.check_invariant()
    assert [v.hits for k, v in cache.name_verdicts()] == [1]


def test_drop_and_block_is_pinned(datapath, cache, run):
    teach(cache, "x.ads.example", abi.NAME_ACT_DROP, abi.VERDICT_BLOCK)
    f = dns4("x.ads.example", 5001)
    assert tc(datapath, f) == 2
    key = flow_key_of(canonical_key(parse(f))[0])
    assert cache.get_flow(key).verdict == abi.VERDICT_BLOCK
    pins = {bytes(k): v for k, v in cache.pinned()}
    assert pins[bytes(key)].verdict == abi.VERDICT_BLOCK and pins[bytes(key)].origin == abi.PIN_ENGINE
    assert run.counters()["cache_dropped"] == 1
    run.check_invariant()


def test_pass_alone_leaves_the_flow_to_the_engine(datapath, cache, run):
    teach(cache, "a.example", abi.NAME_ACT_ACCEPT, abi.VERDICT_NONE)
    f = dns4("a.example", 5002)
    assert tc(datapath, f) != 2
    assert flow_of(cache, f).verdict == abi.VERDICT_NONE
    assert run.counters()["cache_passed"] == 1


def test_another_generation_never_decides(datapath, cache, run):
    teach(cache, "a.example", abi.NAME_ACT_DROP, abi.VERDICT_BLOCK, gen=GEN - 1)
    f = dns4("a.example", 5003)
    assert tc(datapath, f) != 2
    c = run.counters()
    assert c["cache_miss"] == 1 and c["flagged"] == 1 and c["cache_dropped"] == 0, c


def test_no_engine_yet_no_lookup(datapath, cache, run):
    cache.set_name_state(0, 0)
    teach(cache, "a.example", abi.NAME_ACT_DROP, abi.VERDICT_BLOCK, gen=0)
    assert tc(datapath, dns4("a.example", 5004)) != 2
    c = run.counters()
    assert c["flagged"] == 1 and c["cache_miss"] == 0 and c["cache_dropped"] == 0, c


def test_an_expired_entry_is_deleted_and_the_packet_goes_to_the_engine(datapath, cache, run):
    teach(cache, "a.example", abi.NAME_ACT_DROP, abi.VERDICT_BLOCK, expires_in_s=-1)
    assert tc(datapath, dns4("a.example", 5005)) != 2
    c = run.counters()
    assert c["cache_expired"] == 1 and c["flagged"] == 1, c
    assert list(cache.name_verdicts()) == []


@pytest.mark.parametrize("quirk", ["bad-checksum", "low-ttl"])
def test_what_the_engine_would_doubt_goes_to_it(datapath, cache, run, quirk):
    teach(cache, "a.example", abi.NAME_ACT_ACCEPT, abi.VERDICT_BYPASS)
    if quirk == "bad-checksum":
        f = dns4("a.example", 5006, csum=0x1234)
    else:
        tc(datapath, ETH + craft.ipv4(CLIENT, SERVER, 17, craft.udp(CLIENT, SERVER, 5006, 53, b""), ttl=64))
        f = dns4("a.example", 5006, ttl=60)
    assert tc(datapath, f) != 2
    c = run.counters()
    assert c["cache_refused"] == 1 and c["cache_passed"] == 0 and flow_of(cache, f).verdict == abi.VERDICT_NONE, c


def test_udp4_without_checksum_is_right(datapath, cache, run):
    teach(cache, "a.example", abi.NAME_ACT_ACCEPT, abi.VERDICT_BYPASS)
    tc(datapath, dns4("a.example", 5007, csum=0))
    assert run.counters()["cache_passed"] == 1


def tcp_flow(datapath, payload: bytes, sport: int, *, syn_ack: bool = True, start_off: int = 1,
             v6: bool = False):
    c, s = ("2001:2:0:1::2", "2001:2:0:2::2") if v6 else (CLIENT, SERVER)
    ip = (lambda a, b, l4: ETH6 + craft.ipv6(a, b, 6, l4)) if v6 else (lambda a, b, l4: ETH + craft.ipv4(a, b, 6, l4))
    tc(datapath, ip(c, s, craft.tcp(c, s, sport, 443, 1000, 0, 0x02)))
    if syn_ack:
        tc(datapath, ip(s, c, craft.tcp(s, c, 443, sport, 9000, 1001, 0x12)))
    f = ip(c, s, craft.tcp(c, s, sport, 443, 1000 + start_off, 9001, 0x18, payload))
    return tc(datapath, f), f


@pytest.fixture(scope="module")
def hello():
    import ssl
    ctx = ssl.create_default_context()
    out = ssl.MemoryBIO()
    conn = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname="a.example")
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return out.read()


@pytest.mark.parametrize("v6", [False, True])
def test_tls_after_a_handshake_at_the_stream_start(datapath, cache, run, hello, v6):
    teach(cache, "a.example", abi.NAME_ACT_ACCEPT, abi.VERDICT_BYPASS, proto=6, port=443, kind=abi.NAME_SNI)
    _, f = tcp_flow(datapath, hello, 6000, v6=v6)
    assert run.counters()["cache_passed"] == 1 and flow_of(cache, f).verdict == abi.VERDICT_BYPASS


@pytest.mark.parametrize("how", ["no-handshake", "not-stream-start"])
def test_tls_the_engine_would_doubt(datapath, cache, run, hello, how):
    teach(cache, "a.example", abi.NAME_ACT_ACCEPT, abi.VERDICT_BYPASS, proto=6, port=443, kind=abi.NAME_SNI)
    tcp_flow(datapath, hello, 6001, syn_ack=how != "no-handshake", start_off=1 if how == "no-handshake" else 500)
    c = run.counters()
    assert c["cache_refused"] == 1 and c["cache_passed"] == 0, c


def teach_follow(maps, name: str, action: int, verdict: int, *, proto: int, port: int, kind: int) -> None:
    now = time.monotonic_ns()
    maps.put_name_verdict(maps.name_key(GEN, kind, name, proto, port),
                          abi.NameVerdict(expires_ns=int(now + 60e9), flow_ttl_ns=int(30e9), rule=1,
                                          action=action, verdict=verdict, follow=1))


def get(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def http_conn(datapath, sport: int):
    """A handshake on port 80 and a sender of client segments at an offset into the stream."""
    tc(datapath, ETH + craft.ipv4(CLIENT, SERVER, 6, craft.tcp(CLIENT, SERVER, sport, 80, 1000, 0, 0x02)))
    tc(datapath, ETH + craft.ipv4(SERVER, CLIENT, 6, craft.tcp(SERVER, CLIENT, 80, sport, 9000, 1001, 0x12)))

    def send(off: int, payload: bytes):
        f = ETH + craft.ipv4(CLIENT, SERVER, 6, craft.tcp(CLIENT, SERVER, sport, 80, 1001 + off, 9001, 0x18, payload))
        return tc(datapath, f), f
    return send


def test_kept_alive_requests_are_decided_from_the_cache_at_each_boundary(datapath, cache, run):
    """A first request passed from the cache sets the follow-up where the engine would (the end
    of the packet that held exactly its head), and each next request that starts there is decided
    from the cache too: a known allowed Host passes, a known blocked one drops and blocks."""
    teach_follow(cache, "a.example", abi.NAME_ACT_ACCEPT, abi.VERDICT_BYPASS, proto=6, port=80, kind=abi.NAME_HOST)
    teach(cache, "b.example", abi.NAME_ACT_DROP, abi.VERDICT_BLOCK, proto=6, port=80, kind=abi.NAME_HOST)
    send = http_conn(datapath, 7001)
    r, f = send(0, get("a.example"))
    assert r != 2
    flow = flow_of(cache, f)
    n = len(get("a.example"))
    assert flow.verdict == abi.VERDICT_BYPASS and flow.follow & abi.FOLLOW_ON(0) and flow.follow_seq[0] == 1001 + n
    r, f = send(n, get("a.example"))                     # the next request: decided in the kernel
    assert r != 2 and flow_of(cache, f).follow_seq[0] == 1001 + 2 * n
    c = run.counters()
    assert c["cache_passed"] == 2 and c["flagged"] == 1 and c["reason_syn"] == 1, c     # only the SYN queued
    r, f = send(2 * n, get("b.example"))                 # a known blocked Host: dropped, blocked
    assert r == 2 and flow_of(cache, f).verdict == abi.VERDICT_BLOCK
    run.check_invariant()


def test_an_unknown_next_request_goes_to_the_engine(datapath, cache, run):
    teach_follow(cache, "a.example", abi.NAME_ACT_ACCEPT, abi.VERDICT_BYPASS, proto=6, port=80, kind=abi.NAME_HOST)
    send = http_conn(datapath, 7002)
    n = len(get("a.example"))
    send(0, get("a.example"))
    before = run.counters()
    r, f = send(n, get("c.example"))                     # not in the cache: queued (reason follow)
    c = run.counters()
    assert c["flagged"] - before["flagged"] == 1 and c["reason_follow"] - before["reason_follow"] == 1
    assert c["cache_miss"] - before["cache_miss"] == 1
    r, f = send(n + 5, get("a.example"))                  # not at the boundary: no cache, queued
    assert run.counters()["cache_passed"] == before["cache_passed"]


def test_a_reused_udp_socket_is_decided_from_the_cache(datapath, cache, run):
    teach_follow(cache, "a.example", abi.NAME_ACT_ACCEPT, abi.VERDICT_BYPASS, proto=17, port=53, kind=abi.NAME_DNS)
    teach(cache, "x.ads.example", abi.NAME_ACT_DROP, abi.VERDICT_NONE)
    assert tc(datapath, dns4("a.example", 5100)) != 2
    flow = flow_of(cache, dns4("a.example", 5100))
    assert flow.follow & abi.FOLLOW_ON(0) and flow.follow & abi.FOLLOW_ON(1)
    assert tc(datapath, dns4("x.ads.example", 5100)) == 2     # the same socket: dropped from the cache
    assert tc(datapath, dns4("a.example", 5100)) != 2
    c = run.counters()
    assert c["cache_passed"] == 2 and c["cache_dropped"] == 1 and c["flagged"] == 0, c
