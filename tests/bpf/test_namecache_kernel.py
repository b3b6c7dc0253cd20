"""The kernel's name-verdict cache (bpf/namecache.h) against the engine: random rule sets x
random first payloads (HTTP requests, TLS ClientHellos, DNS queries over UDP and TCP, with odd
names, ports, handshakes or none, stream starts or not, low TTLs, bad checksums), each on a new
flow, through BPF_PROG_TEST_RUN. The engine runs on every packet the kernel sends it (misses),
deciding and teaching the cache through its own code (Engine._handle, KernelNameCache.teach);
whenever the kernel decides a packet from the cache, the flow is put back as it was and the
engine decides the same packet: the action (pass or drop) and the flow verdict must be the
engine's, and the reference model (tests/bpf/reference.py, given the same cache entries) must
say what the kernel did. 0 mismatches over at least 100,000 cases, and enough kernel decisions
that the test means something.

HYBRID_NAMECACHE_CASES sets the count (default 100,000), HYBRID_NAMECACHE_SEED the seed."""

from __future__ import annotations

import ctypes
import os
import random
import time

import pytest
from bpfkit import LO, MARK_MASK, default_config, reset
from namegen import NAMES, PORTS, SERVER, SOURCES, dns_query, hellos, random_ruleset
from reference import Reference, RefNameVerdict, canonical_key, flow_key_of, kernel_name, parse

from hybrid.engine.kernelcache import KernelNameCache, name_key_of
from hybrid.engine.loop import Engine
from hybrid.engine.packet import decode
from hybrid.kernel import abi, bpfsys
from hybrid.lab import craft

pytestmark = pytest.mark.bpf
CASES = int(os.environ.get("HYBRID_NAMECACHE_CASES", "100000"))
SEED = int(os.environ.get("HYBRID_NAMECACHE_SEED", "20261202"))
PER_RULESET = 1000
ETH = bytes.fromhex("020000000002" "020000000001" "0800")
ETH6 = ETH[:12] + b"\x86\xdd"
SOURCES6 = ["2001:2:0:1::2", "2001:2:0:9::2"]
SERVER6 = "2001:2:0:2::2"
TC_ACT_SHOT = 2
ODD_NAMES = ["unknown.example", "A.EXAMPLE", "a.example.", "xn--bcher-kva.example"]


class NfPacket:
    """What Engine._handle uses of a NetfilterQueue packet."""

    def __init__(self, payload: bytes):
        self.payload, self.mark, self.verdict, self.indev = payload, 0, None, LO

    def get_payload(self) -> bytes:
        return self.payload

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def set_payload(self, payload: bytes) -> None:
        self.payload = payload

    def repeat(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


def payload_of(r: random.Random, tls: dict[str, bytes]) -> tuple[int, int, bytes]:
    """(proto, dport, first payload) carrying a name."""
    name = r.choice(NAMES + ODD_NAMES) if r.random() < 0.9 else r.choice(NAMES).upper()
    kind = r.choice(("host", "sni", "dns", "dns", "dns-tcp"))
    if kind == "host":
        host = r.choice([name, name, name + ":8080", name.upper()])
        method, path = r.choice(["GET", "GET", "POST"]), r.choice(["/", "/admin", "/x"])
        return 6, r.choice(PORTS), f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    if kind == "sni":
        return 6, r.choice([443, 443, 8080, 53]), tls.get(name.lower().rstrip("."), tls["A.Example"])
    q = dns_query(name.rstrip("."))
    if kind == "dns":
        return 17, 53 if r.random() < 0.9 else r.choice(PORTS), q
    return 6, 53, len(q).to_bytes(2, "big") + q


class Case:
    """One flow: its frames up to the first payload, built with the case's quirks."""

    def __init__(self, r: random.Random, tls: dict[str, bytes], n: int):
        self.v6 = r.random() < 0.2
        self.src, self.dst = (r.choice(SOURCES6), SERVER6) if self.v6 else (r.choice(SOURCES), SERVER)
        self.sport = 1024 + n % 60000
        self.proto, self.dport, self.payload = payload_of(r, tls)
        self.handshake = self.proto == 6 and r.random() < 0.85
        self.isn = r.randrange(1 << 32)
        self.start = self.isn + 1 if r.random() < 0.9 else self.isn + 1 + r.randint(1, 3000)
        self.ttl_first, self.ttl = 64, 64 if r.random() < 0.9 else 63
        self.bad_csum = r.random() < 0.05

    def frames(self) -> tuple[list[bytes], bytes]:
        """(frames before the payload, the payload's IP packet)."""
        src, dst, sp, dp = self.src, self.dst, self.sport, self.dport
        ip = (lambda s_, d_, proto, l4, ttl=64: craft.ipv6(s_, d_, proto, l4, hop_limit=ttl)) if self.v6 else (
            lambda s_, d_, proto, l4, ttl=64: craft.ipv4(s_, d_, proto, l4, ttl=ttl))
        before = []
        if self.proto == 6:
            if self.handshake:
                before.append(ip(src, dst, 6, craft.tcp(src, dst, sp, dp, self.isn, 0, 0x02), self.ttl_first))
                before.append(ip(dst, src, 6, craft.tcp(dst, src, dp, sp, 7000, self.isn + 1, 0x12)))
            l4 = craft.tcp(src, dst, sp, dp, self.start, 7001, 0x18, self.payload)
        else:
            if self.ttl != self.ttl_first:
                # an empty datagram first (no payload: it spends no first-N), higher
                before.append(ip(src, dst, 17, craft.udp(src, dst, sp, dp, b""), self.ttl_first))
            l4 = craft.udp(src, dst, sp, dp, self.payload)
        if self.bad_csum:
            at = 16 if self.proto == 6 else 6
            l4 = l4[:at] + bytes([l4[at] ^ 0x5A]) + l4[at + 1:]
        return before, ip(src, dst, self.proto, l4, self.ttl)


def _counters(maps, buf) -> tuple[int, int]:
    """(cache_passed, cache_dropped) of lo's stats slot (1: bpfkit.reset registers it there)."""
    maps._lookup(abi.MAP_STATS, ctypes.c_uint32(1), buf)
    return (sum(cpu.c[abi.CNT_CACHE_PASSED] for cpu in buf), sum(cpu.c[abi.CNT_CACHE_DROPPED] for cpu in buf))


def _sync_entry(maps, ref: Reference, p, frame: bytes) -> None:
    """Give the reference the kernel's cache entry (or none) for the name this packet carries:
    the model models tc given the map's contents."""
    if not p.payload_len or p.proto not in (6, 17):
        return
    _, kind, name = kernel_name(p, frame[p.payload_off:p.payload_off + p.payload_len])
    if name is None:
        return
    k = (ref.name_generation, kind, name, p.proto, p.dport)
    value = abi.NameVerdict()
    if ref.name_generation and maps._lookup(abi.MAP_NAME_CACHE, maps.name_key(ref.name_generation, kind, name,
                                                                             p.proto, p.dport), value):
        ref.name_cache[k] = RefNameVerdict(value.expires_ns, value.flow_ttl_ns, value.action, value.verdict,
                                            follow=value.follow)
    else:
        ref.name_cache.pop(k, None)


def _verdict_of(maps, key) -> int:
    flow = maps.get_flow(key)
    return abi.VERDICT_NONE if flow is None else flow.verdict


def test_cached_decisions_are_the_engines(datapath, maps, tmp_path):
    r = random.Random(SEED)
    tls = hellos()
    ctx = bpfsys.SkBuff(ifindex=LO)
    flows_fd = maps.fd(abi.MAP_FLOWS)
    stats_buf = (abi.Stats * maps.ncpu)()
    kernel_decided = engine_runs = mismatches = 0
    by_kind: dict[tuple, int] = {}
    t0 = time.monotonic()
    for n in range(CASES):
        if n == 0:
            reset(maps)
            cfg = default_config(flags=abi.CFG_NAMES, first_n=2)
            maps.set_config(cfg)
            ref = Reference(cfg)
        elif n % 60000 == 0:                # source ports come round again: new flows, not old ones
            for k, _ in list(maps.flows()):
                maps.delete_flow(k)
            for k, _ in list(maps.pinned()):
                maps.unpin_verdict(k)
            ref.flows.clear()
            ref.pinned.clear()
        if n % PER_RULESET == 0:
            # New rules: the engine starts a new generation, and no entry of the last rules may
            # decide under these (the flows are new, the cache is not emptied).
            path = tmp_path / f"r{n}.toml"
            text = random_ruleset(r)
            path.write_text(text)
            engine = Engine(0, str(path), maps=maps, mark_mask=MARK_MASK)
            engine._send_raw = lambda *a: None      # a reject's RST would leave this machine
            engine.names = KernelNameCache(maps, 0)
            engine.names.start(engine.rules)
            ref.name_generation = engine.names.generation
        case = Case(r, tls, n)
        before, ip = case.frames()
        eth = ETH6 if case.v6 else ETH
        for f in before:
            _sync_entry(maps, ref, parse(eth + f), eth + f)
            bpfsys.prog_test_run(datapath.tc_fd, eth + f, ctx, name=abi.PROG_TC)
            ref.tc(eth + f, time.monotonic_ns())
        p = parse(eth + ip)
        ref_key = canonical_key(p)[0]
        key = flow_key_of(ref_key)
        _sync_entry(maps, ref, p, eth + ip)
        snapshot = maps.get_flow(key)
        snap = abi.Flow.from_buffer_copy(snapshot) if snapshot is not None else None
        c0 = _counters(maps, stats_buf)
        run = bpfsys.prog_test_run(datapath.tc_fd, eth + ip, ctx, name=abi.PROG_TC)
        c1 = _counters(maps, stats_buf)
        from_cache = c1 != c0
        modelled = ref.tc(eth + ip, time.monotonic_ns())
        ref_flow = ref.flows[ref_key]
        assert (modelled.outcome in (abi.CNT_CACHE_PASSED, abi.CNT_CACHE_DROPPED), modelled.action,
                ref_flow.verdict) == (from_cache, run.retval, _verdict_of(maps, key)), (
            f"seed {SEED} case {n}: the reference model differs: {modelled}\npacket {ip.hex()}")
        if from_cache:                      # as the kernel's entry is put back below
            ref_flow.verdict, ref_flow.verdict_expires_ns = abi.VERDICT_NONE, 0
            ref_flow.flags &= ~(abi.FLOW_BY_CACHE | abi.FLOW_CONN_VERDICT) & 0xFF
            ref.pinned.pop(ref_key, None)
        if from_cache:
            kernel_decided += 1
            kernel = ("drop" if run.retval == TC_ACT_SHOT else "accept", _verdict_of(maps, key))
            assert (c1[1] > c0[1]) == (kernel[0] == "drop")
            # The entry as tc would have left it had the cache missed (the packet counted, its
            # facts noted, no verdict): the engine decides the same packet on it.
            after = maps.get_flow(key)
            after.verdict = snap.verdict if snap is not None else abi.VERDICT_NONE
            after.verdict_expires_ns = snap.verdict_expires_ns if snap is not None else 0
            after.flags &= ~(abi.FLOW_BY_CACHE | abi.FLOW_CONN_VERDICT) & 0xFF
            if snap is not None:
                after.flags |= snap.flags & abi.FLOW_CONN_VERDICT
            bpfsys.map_update(flows_fd, key, after, name=abi.MAP_FLOWS)
            maps.unpin_verdict(key)
        if not from_cache:
            # The engine decides what the kernel sent it; only a name it has not taught yet
            # can change the cache (the rest would only spend the test's time).
            key_of = name_key_of(decode(ip))
            if key_of is None or key_of in engine.names._taught:
                continue
        nf = NfPacket(ip)
        engine._handle(nf)
        engine_runs += 1
        if from_cache:
            want = (nf.verdict, _verdict_of(maps, key))
            kind = (case.proto, case.dport == 53, case.v6)
            by_kind[kind] = by_kind.get(kind, 0) + 1
            if kernel != want:
                mismatches += 1
                pytest.fail(f"seed {SEED} case {n}: kernel {kernel} engine {want} doubts {engine.stats.doubts} "
                            f"scoped {engine.stats.scoped} joins {engine.stats.joins_abandoned}\nrules:\n{text}\n"
                            f"packet {ip.hex()}")
    took = time.monotonic() - t0
    c = maps.stats()[LO]
    asked = {k: c[k] for k in ("cache_passed", "cache_dropped", "cache_miss", "cache_expired", "cache_refused")}
    print(f"\n{CASES} cases in {took:.1f} s: {kernel_decided} decided by the kernel's cache "
          f"({by_kind}), {engine_runs} by the engine, {mismatches} mismatches; kernel: {asked}")
    assert c["cache_refused"] >= CASES // 50, asked      # the doubts were exercised too
    assert engine.stats.errors == 0
    assert kernel_decided >= CASES // 5, kernel_decided
