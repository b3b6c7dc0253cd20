"""The names tc reads (bpf/names.h) against the engine's reading of the same bytes
(hybrid/engine/packet.py): a differential test over random and adversarial DNS queries and TLS
ClientHellos (uppercase, trailing dots, embedded NUL, non-ASCII, IDN punycode, compression
pointers, several questions, SNI lists with several names, duplicate server_name extensions,
extra records, truncation at every offset, ...), each the first payload of a new flow, through
BPF_PROG_TEST_RUN. Whenever the kernel reads a name, the engine reads the same name from the
same bytes with no doubt; every case also equals the reference model (reference.kernel_name).

HYBRID_NAMES_CASES sets the count (default 100,000), HYBRID_NAMES_SEED the seed; the test prints
how long the cases took."""

from __future__ import annotations

import ctypes
import os
import random
import struct
import time

import pytest
from bpfkit import default_config, reset
from reference import kernel_name, parse

from hybrid.engine.packet import client_hello_problem, decode
from hybrid.kernel import abi, bpfsys

pytestmark = pytest.mark.bpf
CASES = int(os.environ.get("HYBRID_NAMES_CASES", "100000"))
SEED = int(os.environ.get("HYBRID_NAMES_SEED", "20261201"))
CHUNK = 20000        # the flow table starts over per chunk (each case is a new flow)

ETH = bytes.fromhex("020000000002" "020000000001" "0800")
ETH6 = ETH[:12] + b"\x86\xdd"


def _ip4(proto: int, l4: bytes, n: int) -> bytes:
    src = bytes((198, 18, 1 + (n >> 16 & 0x3F), n >> 8 & 0xFF))
    return ETH + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), n & 0xFFFF, 0, 64, proto, 0,
                             src, bytes((198, 18, 200, 1))) + l4


def _ip6(proto: int, l4: bytes, n: int) -> bytes:
    src = bytes.fromhex("20010002000000000000000000000000")[:12] + n.to_bytes(4, "big")
    dst = bytes.fromhex("20010002000000000000000000000001")
    return ETH6 + struct.pack("!IHBB", 0x60000000, len(l4), proto, 64) + src + dst + l4


def _udp(payload: bytes, sport: int, dport: int, ulen_delta: int = 0) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload) - ulen_delta, 0) + payload


def _tcp(payload: bytes, sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x18, 65535, 0, 0) + payload


# ---- names ------------------------------------------------------------------------------------------
ALPHA = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
ODD = b". \x00\t\x7f\xc3\xa9\xff*/:@\\"


def _table(alphabet: bytes) -> bytes:
    return bytes(alphabet[i % len(alphabet)] for i in range(256))


_ALPHA_T, _PUNY_T = _table(ALPHA), _table(b"abcdefghijklmnopqrstuvwxyz0123456789")


def _pick(rng: random.Random, table: bytes, k: int) -> bytes:
    """k bytes of an alphabet (its _table), near enough uniform, from one call to the rng."""
    return rng.randbytes(k).translate(table)


def _label(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.1:
        return b"xn--" + _pick(rng, _PUNY_T, rng.randint(1, 20))
    n = rng.choice((1, 2, 3, 5, 8, 12, 20, 63, 64)) if r < 0.2 else rng.randint(1, 15)
    lab = bytearray(_pick(rng, _ALPHA_T, n))
    if rng.random() < 0.08:
        lab[rng.randrange(len(lab))] = rng.choice(ODD)
    return bytes(lab)


def _name(rng: random.Random) -> list[bytes]:
    k = rng.choice((1, 2, 2, 3, 3, 4, 6)) if rng.random() < 0.95 else rng.randint(20, 70)
    return [_label(rng) for _ in range(k)]


def dns_query(rng: random.Random) -> bytes:
    labels = _name(rng)
    wire = b"".join(bytes((min(len(x), 255) & 0xFF,)) + x for x in labels) + b"\x00"
    flags = 0x0100
    qd = 1
    r = rng.random()
    if r < 0.04:
        wire = wire[:rng.randrange(len(wire))] + b"\xc0\x0c"        # a compression pointer
    elif r < 0.06:
        qd = rng.choice((0, 2, 3))
    elif r < 0.08:
        flags |= 0x8000                                              # a response
    elif r < 0.10:
        wire = bytes((rng.choice((0x40, 0x80)) | 3,)) + b"abc" + wire  # label types
    elif r < 0.12:
        wire = b"\x00"                                               # the root
    msg = struct.pack("!HHHHHH", rng.randrange(65536), flags, qd, 0, 0, 0) + wire + b"\x00\x01\x00\x01"
    if rng.random() < 0.05:
        msg += rng.randbytes(rng.randint(1, 30))                     # trailing records
    return msg


def tls_hello(rng: random.Random) -> bytes:
    def ext(t: int, body: bytes) -> bytes:
        return struct.pack("!HH", t, len(body)) + body

    name = b".".join(_name(rng))
    if rng.random() < 0.05:
        name += b"."
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    r = rng.random()
    if r < 0.04:
        entry += b"\x00" + struct.pack("!H", 3) + b"abc"                  # several names
    elif r < 0.06:
        entry = b"\x01" + entry[1:]                                       # not host_name
    elif r < 0.07:
        entry = b"\x00\x00\x00"                                           # empty name
    lst = struct.pack("!H", len(entry)) + entry
    if rng.random() < 0.03:
        lst = struct.pack("!H", len(entry) + rng.choice((-1, 1))) + entry  # a list length that lies
    exts = [ext(rng.choice((5, 10, 11, 13, 16, 23, 35, 43, 45, 51, 0xFF01, 0x1A1A)),
                rng.randbytes(rng.choice((0, 1, 2, 4, 8, 32, 100))))
            for _ in range(rng.randint(0, 12))]
    if rng.random() > 0.05:
        exts.insert(rng.randint(0, len(exts)), ext(0, lst))
    if rng.random() < 0.03:
        exts.insert(rng.randint(0, len(exts)), ext(0, lst))               # a duplicate server_name
    if rng.random() < 0.01:
        exts = [ext(7, b"")] * 70                                         # more than tc walks
    ext_block = b"".join(exts)
    body = (b"\x03\x03" + rng.randbytes(32) + b"\x20" + bytes(32)
            + b"\x00\x04\x13\x01\x13\x02" + b"\x01\x00")
    if ext_block or rng.random() < 0.9:
        lie = rng.choice((-1, 1)) if rng.random() < 0.02 else 0
        body += struct.pack("!H", (len(ext_block) + lie) & 0xFFFF) + ext_block
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    r = rng.random()
    if r < 0.04:                                                          # split into two records
        cut = rng.randint(1, len(hs) - 1)
        return (b"\x16\x03\x01" + struct.pack("!H", cut) + hs[:cut]
                + b"\x16\x03\x01" + struct.pack("!H", len(hs) - cut) + hs[cut:])
    rec = b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs
    if r < 0.06:
        rec += b"\x17\x03\x03\x00\x01x"                                   # another record after it
    elif r < 0.07:
        rec = rec[:1] + b"\x02" + rec[2:]                                 # not TLS major 3
    return rec


def payload_of(rng: random.Random) -> tuple[int, int, bytes]:
    """(proto, dport, payload)."""
    r = rng.random()
    if r < 0.45:
        p = dns_query(rng)
        return 17, 53, p
    if r < 0.55:
        p = dns_query(rng)
        prefix = len(p) + (rng.choice((-2, -1, 1, 5)) if rng.random() < 0.1 else 0)
        return 6, 53, struct.pack("!H", prefix & 0xFFFF) + p
    return 6, rng.choice((443, 443, 8443)), tls_hello(rng)


def mutate(rng: random.Random, p: bytes) -> bytes:
    r = rng.random()
    if r < 0.15:
        return p[:rng.randrange(len(p) + 1)]                              # truncated
    if r < 0.25 and p:
        b = bytearray(p)
        i = rng.randrange(len(b))
        b[i] = rng.choice((0, 0x2E, 0x41, 0xC0, 0xFF, rng.randrange(256)))
        return bytes(b)
    return p


def engine_view(ip: bytes, proto: int, dport: int, kind: int):
    """The name the engine reads from this IP packet for this kind, or None when it reads none
    or has a doubt about it."""
    pkt = decode(ip)
    if kind == abi.NAME_DNS:
        name = pkt.dns_qname
        return name if pkt.dns_unparsed is None else None
    name = pkt.tls_sni
    return name if client_hello_problem(pkt.payload) is None else None


def tc_runner(fd: int):
    """BPF_PROG_TEST_RUN of the tc program on a frame, as if received on lo, into buffers
    allocated once (bpfsys.prog_test_run allocates a page per run: seconds over 100,000)."""
    ctx = bpfsys.SkBuff(ifindex=1)
    out = ctypes.create_string_buffer(8192)
    opts = bpfsys.BpfTestRunOpts(sz=ctypes.sizeof(bpfsys.BpfTestRunOpts), repeat=1)
    opts.ctx_in = ctypes.cast(ctypes.byref(ctx), ctypes.c_void_p)
    opts.ctx_size_in = ctypes.sizeof(ctx)
    opts.data_out = ctypes.cast(out, ctypes.c_void_p)
    test_run = bpfsys.lib().bpf_prog_test_run_opts

    def run(frame: bytes) -> None:
        opts.data_in = ctypes.cast(ctypes.c_char_p(frame), ctypes.c_void_p)
        opts.data_size_in = len(frame)
        opts.data_size_out = len(out)
        ret = test_run(fd, ctypes.byref(opts))
        assert ret == 0, f"test run: {os.strerror(-ret)}"
    run.buffers = (ctx, out)                         # opts points into them
    return run


@pytest.fixture
def one_cpu():
    cpus = os.sched_getaffinity(0)
    cpu = min(cpus)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, cpus)


def test_names_differential(datapath, maps, one_cpu):
    rng = random.Random(SEED)
    maps.set_config(default_config(flags=abi.CFG_NAMES, name_generation=7))
    run = tc_runner(datapath.tc_fd)
    read = {abi.NAME_DNS: 0, abi.NAME_SNI: 0}
    results: dict[int, int] = {}
    attempts = maps.name_scratch(one_cpu).attempts
    t0 = time.monotonic()
    for n in range(CASES):
        if n and n % CHUNK == 0:
            reset(maps)
            maps.set_config(default_config(flags=abi.CFG_NAMES, name_generation=7))
        proto, dport, payload = payload_of(rng)
        payload = mutate(rng, payload)
        sport = 1024 + n % 60000
        l4 = _udp(payload, sport, dport, 1 if rng.random() < 0.01 else 0) if proto == 17 else _tcp(payload, sport, dport)
        frame = _ip6(proto, l4, n) if n % 5 == 0 else _ip4(proto, l4, n)
        run(frame)
        s = maps.name_scratch(one_cpu)
        where = f"seed {SEED} case {n}: {frame.hex()}"
        p = parse(frame)
        if not p.payload_len:                                # no payload (as tc counts it): not looked at
            assert s.attempts == attempts, where
            continue
        assert s.attempts == attempts + 1, where
        attempts = s.attempts
        got = bytes(s.key.name[:s.key.len]).decode("ascii") if s.key.len else None
        want_cnt, want_kind, want_name = kernel_name(p, frame[p.payload_off:p.payload_off + p.payload_len])
        assert (s.result, s.key.kind, got) == (want_cnt, want_kind, want_name), where
        results[s.result] = results.get(s.result, 0) + 1
        if got is None:
            continue
        assert bytes(s.key.name[s.key.len:]) == bytes(abi.NAME_LEN - s.key.len), where
        assert (s.key.generation, s.key.port, s.key.proto) == (7, dport, proto), where
        assert engine_view(frame[14:], proto, dport, s.key.kind) == got, where
        read[s.key.kind] += 1
    took = time.monotonic() - t0
    print(f"\n{CASES} cases in {took:.1f} s; kernel read {read}; results "
          f"{ {abi.COUNTER_NAMES[k]: v for k, v in sorted(results.items())} }")
    # The kernel reads most plain names (the test could not fail if it never read one).
    assert read[abi.NAME_DNS] > CASES // 5 and read[abi.NAME_SNI] > CASES // 10, read


def test_names_only_on_the_first_payload_of_the_opening_direction(datapath, maps, run):
    """A flow's second payload packet, and the first one of the answering direction, are not
    read; neither is anything with the flag off."""
    from bpfkit import udp4
    q = bytes.fromhex("1234010000010000000000000377777707" + "6578616d706c65" + "0003636f6d0000010001")
    maps.set_config(default_config())
    run.tc(udp4(q, sport=5000))
    assert run.counters()["name_dns"] == 0
    maps.set_config(default_config(flags=abi.CFG_NAMES))
    run.tc(udp4(q, sport=5001))
    run.tc(udp4(q, sport=5001))                                  # second payload: not read
    run.tc(udp4(q, src="198.18.2.2", dst="198.18.1.2", sport=53, dport=5001))   # the answer's way
    c = run.counters()
    assert c["name_dns"] == 1 and sum(c[abi.COUNTER_NAMES[i]] for i in abi.NAME_COUNTERS) == 1, c
    run.check_invariant()


@pytest.mark.parametrize("verdict", [abi.VERDICT_BYPASS, abi.VERDICT_BLOCK, abi.VERDICT_INSPECT])
def test_decided_flows_are_not_read(datapath, maps, run, one_cpu, verdict):
    """Bulk traffic does no extra work: the first payload of a flow in BYPASS (or BLOCK, or
    INSPECT: the engine reads every packet anyway) is not parsed at all."""
    from bpfkit import udp4
    from reference import canonical_key, flow_key_of
    q = bytes.fromhex("1234010000010000000000000377777707" + "6578616d706c65" + "0003636f6d0000010001")
    maps.set_config(default_config(flags=abi.CFG_NAMES))
    f = udp4(q, sport=6000)
    maps.set_verdict(flow_key_of(canonical_key(parse(f))[0]), verdict, None)
    before = maps.name_scratch(one_cpu).attempts
    run.tc(f)
    assert maps.name_scratch(one_cpu).attempts == before
    assert sum(run.counters()[abi.COUNTER_NAMES[i]] for i in abi.NAME_COUNTERS) == 0
    run.tc(udp4(q, sport=6001))                                  # a new flow: read
    assert maps.name_scratch(one_cpu).attempts == before + 1
    assert run.counters()["name_dns"] == 1
