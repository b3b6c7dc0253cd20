"""The names tc reads (bpf/names.h) against the engine's reading of the same bytes
(hybrid/engine/packet.py): a differential test over random and adversarial DNS queries, TLS
ClientHellos and HTTP/1.x request heads (uppercase, trailing dots, embedded NUL, non-ASCII, IDN
punycode, compression pointers, several questions, SNI lists with several names, duplicate
server_name extensions, extra records; duplicate and misspelt Host lines, ports, absolute
targets, odd methods, versions and whitespace, folded lines, bodies, chunked and pipelined
requests; truncation at every offset, ...), each the first payload of a new flow, through
BPF_PROG_TEST_RUN. Whenever the kernel reads a name, the engine reads the same name from the
same bytes with no doubt; every case also equals the reference model (reference.kernel_name).
A corpus of named HTTP shapes pins what tc makes of each.

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

from hybrid.engine.packet import client_hello_problem, decode, http_head_missing, http_unparsed
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


# ---- HTTP/1.x request heads ---------------------------------------------------------------------------
METHODS = (b"GET",) * 8 + (b"POST", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"PROPFIND", b"M-SEARCH", b"GE_T",
                           b"ABCDEFGHIJKLMNOP", b"ABCDEFGHIJKLMNOPQ", b"G")
PATH_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/"
_PATH_T, _QUERY_T, _COOKIE_T = _table(PATH_BYTES), _table(PATH_BYTES + b"%?"), _table(PATH_BYTES + b" ")
ODD_TARGETS = (b"/a/../b", b"/../etc/passwd", b"/a/..", b"/..", b"/a/%2e%2e/b", b"/%zz", b"/a%20b", b"/?q=%20&r=/../..",
               b"//x//y", b"/./a", b"/a/.", b"/a..b", b"/..a", b"/a/...", b"*", b"http://evil.example/x",
               b"HTTP://evil.example/", b"http://u@evil.example/", b"evil.example:443", b"/a b", b"/a\tb",
               b"/\xc3\xa9", b"/a\x00b", b"/a\rb", b"/a\x7f", b"/#frag", b"/?", b"/??%", b"/a?b?c%zz")
HEADERS = (b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0", b"Accept: */*",
           b"Accept-Language: en-US,en;q=0.9", b"Connection: keep-alive", b"Accept-Encoding: gzip, deflate, br",
           b"Upgrade-Insecure-Requests: 1", b"Cache-Control: max-age=0", b"X-Forwarded-Host: evil.example",
           b"X-Host: evil.example", b"Hostname: evil.example", b"Referer: http://a.example/b?c=d", b"X-Empty:",
           b":odd", b"Content-Type: text/plain", b"hosts: evil.example", b"Hos: t")
VERSIONS = (b"HTTP/1.2", b"HTTP/2.0", b"HTTP/1.10", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1.1x", b"HTTP/1.", b"HTTP/0.9",
            b"HTTP/1.01")


def _clean_host(rng: random.Random) -> bytes:
    """A Host value a client sends: a name (punycode labels too) in any case, a final dot, a
    port, spaces around it."""
    labels = []
    for _ in range(rng.choice((1, 2, 2, 3, 3, 4, 5))):
        if rng.random() < 0.1:
            labels.append(b"xn--" + _pick(rng, _PUNY_T, rng.randint(1, 20)))
        else:
            labels.append(_pick(rng, _ALPHA_T, rng.choice((1, 2, 3, 5, 8, 12, 20, 63))))
    name = b".".join(labels)
    if rng.random() < 0.05:
        name = b".".join([b"a" * 63] * 4)[:rng.choice((250, 252, 253))]
    if rng.random() < 0.1:
        name += b"."
    if rng.random() < 0.15:
        name += b":" + str(rng.choice((80, 443, 8080, 65535, 1))).encode()
    if rng.random() < 0.1:
        name = b" " * rng.randint(0, 8) + name + b" " * rng.randint(0, 8)
    return name


def _odd_host(rng: random.Random) -> bytes:
    """A Host value tc gives up on (or reads exactly as the engine does, if it is not odd)."""
    name = _clean_host(rng).strip(b" ")
    return rng.choice((
        b".".join(_name(rng)),                                           # odd bytes in labels, long names
        name + b"..", b"." + name, name.replace(b".", b"..", 1), b"", b":80", b".",
        b"[2001:db8::1]", b"[2001:db8::1]:8080", b"user@" + name, b"a" * 254, b"a" * 253 + b".",
        name + rng.choice((b":", b":x", b":123456", b":80:90", b": 80", b":+80", b":99999", b":0")),
        b" " * 9 + name, name + b" " * 9, b"\t" + name, name + b"\t", name + b" x", b"\x00" + name,
        name + b"\xc3\xa9", b"*", b"evil.example/x", b"evil.example?x", b"evil.example#x", b"a,b",
    ))


def http_request(rng: random.Random) -> bytes:
    """A request head as clients send it (half of the time), or with one of the shapes an
    evader would try: duplicate or misspelt Host lines, absolute targets, odd methods, versions
    and targets, folded lines, bare LF or CR, NUL, bodies that Content-Length covers or not,
    chunked bodies, pipelined requests, too many lines."""
    odd = None if rng.random() < 0.5 else rng.randrange(16)
    method = rng.choice(METHODS if odd == 0 else (b"GET",) * 6 + (b"POST", b"HEAD", b"PUT", b"OPTIONS"))
    r = rng.random()
    path = b"/" + _pick(rng, _PATH_T, rng.choice((0, 1, 5, 12, 30, 80)))
    if r < 0.3:
        path += b"?" + _pick(rng, _QUERY_T, rng.randint(0, 60))
    elif r < 0.35:
        path = b"/" + _pick(rng, _PATH_T, rng.randint(300, 2100))
    if odd == 1:
        path = rng.choice(ODD_TARGETS)
    elif b"/.." in path.partition(b"?")[0]:
        path = path.replace(b".", b"_")
    version = rng.choice(VERSIONS) if odd == 2 else rng.choice((b"HTTP/1.1",) * 5 + (b"HTTP/1.0",))
    sp1, sp2 = rng.choice(((b"  ", b" "), (b" ", b"  "), (b"\t", b" "))) if odd == 3 else (b" ", b" ")
    request_line = method + sp1 + path + sp2 + version if version != b"HTTP/0.9" else method + b" " + path
    lines = rng.sample(HEADERS[:8] + HEADERS[10:13], rng.randint(0, 6))
    if rng.random() < 0.15 and len(path) < 200:
        lines.append(b"Cookie: " + _pick(rng, _COOKIE_T, rng.choice((100, 500, 1000, 1500, 1900))))
    host_name = rng.choice((b"Host",) * 6 + (b"host", b"HOST", b"hOsT"))
    sep = rng.choice((b": ",) * 6 + (b":", b":  "))
    value = _odd_host(rng) if odd == 4 else _clean_host(rng)
    if odd == 5:
        sep = rng.choice((b" :", b"\t:", b" : "))
    if odd != 6:
        lines.insert(rng.randint(0, len(lines)), host_name + sep + value)
    if odd == 7:                                                         # a second Host line
        other = rng.choice((b"Host", b"host", b"HOST", b"Host ", b"X-Host", b"Hosts", b" Host"))
        lines.insert(rng.randint(0, len(lines)), other + b": " + rng.choice((value, b"evil.example")))
    elif odd == 8:
        lines.insert(rng.randint(0, len(lines)), rng.choice((b" folded", b"\tfolded", b" ")))   # obs-fold
    elif odd == 9:
        lines = lines[:3] + [b"X-%d: v" % k for k in range(rng.choice((58, 59, 60, 61, 62, 70)))]
        lines.insert(rng.randint(0, len(lines)), host_name + sep + value)
    elif odd == 10:
        lines.insert(rng.randint(0, len(lines)), rng.choice((b"X-Nul: a\x00b", b"X-Tab: a\tb", b"X-Del: \x7f",
                                                            b"X-8: \xc3\xa9", b"X-CR: a\rb")))
    elif odd == 11:
        lines = rng.sample(HEADERS, rng.randint(1, len(HEADERS))) + [host_name + sep + value]
        rng.shuffle(lines)
    body = b""
    r = rng.random()
    if r < 0.1:                                                          # a body Content-Length covers
        body = rng.randbytes(rng.randint(0, 40))
        lines.append(rng.choice((b"Content-Length: ", b"content-length:", b"CONTENT-LENGTH:  "))
                     + b"%d" % (len(body) + rng.choice((0, 0, 0, 5))) + rng.choice((b"", b"", b" ")))
    if odd == 12:                                                        # a body, and what follows it
        body = rng.randbytes(rng.randint(0, 10))
        lines.append(b"Content-Length: %d" % len(body))
        body += rng.choice((b"x", b"\r\n", b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n"))
    elif odd == 13:
        r = rng.random()
        body = b"hello"
        if r < 0.3:
            lines.append(b"Content-Length: " + rng.choice((b"+5", b" 5 ", b"5 5", b"0x5", b"1234567890", b"", b"-1",
                                                           b"000000005", b"0000000005")))
        elif r < 0.6:
            lines += [b"Content-Length: 5", rng.choice((b"Content-Length: 5", b"content-length: 6"))]
        else:
            lines.append(rng.choice((b"Transfer-Encoding: chunked", b"transfer-encoding: gzip, chunked")))
            if rng.random() < 0.5:
                lines.append(b"Content-Length: 10")
            body = rng.choice((b"", b"5\r\nhello\r\n0\r\n\r\n"))
    elif odd == 14:                                                      # pipelined requests
        body = rng.choice((b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", b"GET /x HTTP/1.1\r\n", b"\r\n",
                           b"junk", b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n"))
    eol = b"\r\n"
    head = request_line + eol + b"".join(line + eol for line in lines) + eol
    if odd == 15:
        r = rng.random()
        if r < 0.4:
            head = head.replace(b"\r\n", b"\n", rng.randint(1, 3))         # bare LF line ends
        elif r < 0.6:
            head = head.replace(b"\r\n", b"\r", 1)
        else:
            head = rng.choice((b"\r\n", b"\n")) + head                   # leading empty lines
    return head + body


def payload_of(rng: random.Random) -> tuple[int, int, bytes]:
    """(proto, dport, payload)."""
    r = rng.random()
    if r < 0.32:
        p = dns_query(rng)
        return 17, 53, p
    if r < 0.40:
        p = dns_query(rng)
        prefix = len(p) + (rng.choice((-2, -1, 1, 5)) if rng.random() < 0.1 else 0)
        return 6, 53, struct.pack("!H", prefix & 0xFFFF) + p
    if r < 0.70:
        return 6, rng.choice((443, 443, 8443)), tls_hello(rng)
    return 6, rng.choice((80, 80, 8080, 3128)), http_request(rng)


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
    if kind == abi.NAME_SNI:
        name = pkt.tls_sni
        return name if client_hello_problem(pkt.payload) is None else None
    http = pkt.http
    if (http is None or http.doubt is not None or http_unparsed(pkt.payload) is not None
            or http_head_missing(pkt.payload)):
        return None
    return http.host


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
    maps.set_config(default_config(flags=abi.CFG_NAMES))
    run = tc_runner(datapath.tc_fd)
    read = {abi.NAME_DNS: 0, abi.NAME_SNI: 0, abi.NAME_HOST: 0}
    results: dict[int, int] = {}
    attempts = maps.name_scratch(one_cpu).attempts
    t0 = time.monotonic()
    for n in range(CASES):
        if n and n % CHUNK == 0:
            reset(maps)
            maps.set_config(default_config(flags=abi.CFG_NAMES))
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
        assert (s.key.generation, s.key.port, s.key.proto) == (0, dport, proto), where
        assert engine_view(frame[14:], proto, dport, s.key.kind) == got, where
        read[s.key.kind] += 1
    took = time.monotonic() - t0
    print(f"\n{CASES} cases in {took:.1f} s; kernel read {read}; results "
          f"{ {abi.COUNTER_NAMES[k]: v for k, v in sorted(results.items())} }")
    # The kernel reads most plain names (the test could not fail if it never read one).
    assert read[abi.NAME_DNS] > CASES // 6 and read[abi.NAME_SNI] > CASES // 15, read
    assert read[abi.NAME_HOST] > CASES // 15, read


_GET = b"GET / HTTP/1.1\r\n"
_POST = b"POST /form HTTP/1.1\r\nHost: a.example\r\n"
_REQ2 = b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n"
HTTP_CORPUS = [  # (what, payload, counter, name)
    ("plain", _GET + b"Host: example.com\r\n\r\n", "name_host", "example.com"),
    ("case, final dot", _GET + b"Host: WWW.Example.COM.\r\n\r\n", "name_host", "www.example.com"),
    ("port", _GET + b"Host: example.com:8080\r\n\r\n", "name_host", "example.com"),
    ("spaces", _GET + b"host:   example.com   \r\n\r\n", "name_host", "example.com"),
    ("no space", _GET + b"HOST:example.com\r\n\r\n", "name_host", "example.com"),
    ("punycode", _GET + b"Host: xn--bcher-kva.example\r\n\r\n", "name_host", "xn--bcher-kva.example"),
    ("HTTP/1.0, % in the query", b"GET /a?b=%2e%2e/../x HTTP/1.0\r\nHost: a.example\r\n\r\n", "name_host", "a.example"),
    ("a body Content-Length covers", _POST + b"Content-Length: 5\r\n\r\nhello", "name_host", "a.example"),
    ("a body continued later", _POST + b"Content-Length: 500\r\n\r\nhello", "name_host", "a.example"),
    ("a request inside the body", _POST + b"Content-Length: 38\r\n\r\n" + _REQ2, "name_host", "a.example"),
    ("a 1,900-byte header line", _GET + b"Cookie: " + b"c=1; " * 380 + b"\r\nHost: a.example\r\n\r\n",
     "name_host", "a.example"),
    ("a 253-character name", _GET + b"Host: " + b".".join([b"a" * 63] * 4)[:253] + b"\r\n\r\n",
     "name_host", ".".join(["a" * 63] * 4)[:253]),
    ("a 254-character name", _GET + b"Host: " + b".".join([b"a" * 63] * 4)[:254] + b"\r\n\r\n", "name_too_long", None),
    ("duplicate Host", _GET + b"Host: a.example\r\nHost: evil.example\r\n\r\n", "name_several", None),
    ("duplicate Host, other case", _GET + b"Host: a.example\r\nhOST: a.example\r\n\r\n", "name_several", None),
    ("Host, space, colon", _GET + b"Host : evil.example\r\nHost: a.example\r\n\r\n", "name_odd", None),
    ("Host after the empty line", _GET + b"X: y\r\n\r\nHost: evil.example\r\n\r\n", "name_none", None),
    ("X-Host only", _GET + b"X-Host: evil.example\r\nHostname: evil.example\r\n\r\n", "name_none", None),
    ("absolute-form", b"GET http://evil.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", "name_form", None),
    ("authority-form", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n", "name_form", None),
    ("asterisk", b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n", "name_form", None),
    ("pipelined", _GET + b"Host: a.example\r\n\r\n" + _REQ2, "name_several", None),
    ("pipelined after a body", _POST + b"Content-Length: 2\r\n\r\nhi" + _REQ2, "name_several", None),
    ("chunked body", _POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "name_several", None),
    ("Content-Length and chunked", _POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
     "name_several", None),
    ("two Content-Length", _POST + b"Content-Length: 5\r\ncontent-length: 6\r\n\r\nhello", "name_several", None),
    ("a signed Content-Length", _POST + b"Content-Length: +5\r\n\r\nhello", "name_form", None),
    ("NUL in a header", _GET + b"Host: a.example\r\nX: a\x00b\r\n\r\n", "name_odd", None),
    ("NUL in the name", _GET + b"Host: a.exa\x00mple\r\n\r\n", "name_odd", None),
    ("bare LF", _GET + b"Host: a.example\nX: y\r\n\r\n", "name_odd", None),
    ("bare LF ends the request line", b"GET / HTTP/1.1\nHost: a.example\n\n", "name_form", None),
    ("bare CR", _GET + b"Host: a.example\rX: y\r\n\r\n", "name_odd", None),
    ("obs-fold", _GET + b"Host: a.example\r\n evil.example\r\n\r\n", "name_odd", None),
    ("tab", _GET + b"Host:\ta.example\r\n\r\n", "name_odd", None),
    ("non-ASCII name", _GET + b"Host: b\xc3\xbccher.example\r\n\r\n", "name_odd", None),
    ("IPv6 literal", _GET + b"Host: [2001:db8::1]:80\r\n\r\n", "name_odd", None),
    ("userinfo", _GET + b"Host: user@evil.example\r\n\r\n", "name_odd", None),
    ("a port that is not one", _GET + b"Host: a.example:80x\r\n\r\n", "name_odd", None),
    ("a 6-digit port", _GET + b"Host: a.example:123456\r\n\r\n", "name_form", None),
    ("empty Host", _GET + b"Host: \r\n\r\n", "name_form", None),
    ("a port alone", _GET + b"Host: :80\r\n\r\n", "name_form", None),
    ("two final dots", _GET + b"Host: a.example..\r\n\r\n", "name_form", None),
    ("a leading dot", _GET + b"Host: .a.example\r\n\r\n", "name_form", None),
    ("leading empty line", b"\r\n" + _GET + b"Host: a.example\r\n\r\n", "name_none", None),
    ("lower-case method", b"get / HTTP/1.1\r\nHost: a.example\r\n\r\n", "name_none", None),
    ("method with '-'", b"M-SEARCH / HTTP/1.1\r\nHost: a.example\r\n\r\n", "name_form", None),
    ("17-letter method", b"ABCDEFGHIJKLMNOPQ / HTTP/1.1\r\nHost: a.example\r\n\r\n", "name_form", None),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a.example\r\n\r\n", "name_form", None),
    ("HTTP/0.9", b"GET /\r\nHost: a.example\r\n\r\n", "name_odd", None),
    ("two spaces", b"GET  / HTTP/1.1\r\nHost: a.example\r\n\r\n", "name_form", None),
    ("space before the line end", b"GET / HTTP/1.1 \r\nHost: a.example\r\n\r\n", "name_form", None),
    ("% in the path", b"GET /a%2e%2e/b HTTP/1.1\r\nHost: a.example\r\n\r\n", "name_form", None),
    ("/.. in the path", b"GET /a/../../b HTTP/1.1\r\nHost: a.example\r\n\r\n", "name_form", None),
    ("too many header lines", _GET + b"".join(b"X-%d: v\r\n" % k for k in range(63)) + b"Host: a\r\n\r\n",
     "name_form", None),
    ("320 iterations of the target", b"GET /" + b"a." * 330 + b" HTTP/1.1\r\nHost: a.example\r\n\r\n",
     "name_too_long", None),
    ("320 iterations of the head", _GET + b"Host: a.example\r\n" + b"a:\r\n" * 330 + b"\r\n", "name_too_long", None),
    ("head cut", _GET + b"Host: a.example\r\n", "name_truncated", None),
    ("head cut in Host", _GET + b"Host: a.exa", "name_truncated", None),
    ("2,048 bytes", _GET + b"Host: a.example\r\nX: " + b"x" * (2048 - 16 - 17 - 5 - 2) + b"\r\n\r\n",
     "name_too_long", None),
    ("more than tc copies", _GET + b"Host: a.example\r\nX: " + b"x" * 2100 + b"\r\n\r\n", "name_too_long", None),
]


def test_http_corpus(datapath, maps, one_cpu):
    """The shapes clients send and those an evader tries, each with what tc makes of it; the
    reference model agrees, and every name tc reads is the engine's, with no doubt."""
    maps.set_config(default_config(flags=abi.CFG_NAMES))
    run = tc_runner(datapath.tc_fd)
    for n, (what, payload, counter, name) in enumerate(HTTP_CORPUS):
        frame = _ip4(6, _tcp(payload, 2000 + n, 80), n)
        run(frame)
        s = maps.name_scratch(one_cpu)
        got = bytes(s.key.name[:s.key.len]).decode("ascii") if s.key.len else None
        assert (abi.COUNTER_NAMES[s.result], got) == (counter, name), what
        p = parse(frame)
        want = kernel_name(p, frame[p.payload_off:p.payload_off + p.payload_len])
        assert (want[0], want[2]) == (s.result, got), what
        if got is not None:
            assert engine_view(frame[14:], 6, 80, abi.NAME_HOST) == got, what


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
