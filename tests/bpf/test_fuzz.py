"""Fuzz the BPF programs: 100,000 random and mutated frames through BPF_PROG_TEST_RUN, each
checked against the Python reference classifier (tests/bpf/reference.py): never a verifier
rejection (the programs loaded), never an error from the kernel, never a different verdict or
mark, and the same counters, flow table (with each entry's facts: TTLs, isn, flags, verdict)
and pinned table per chunk. Between frames, verdicts are written as the engine and the operator
write them (connection-scoped or not) and entries are evicted; the frames include SYNs and
SYN-ACKs whose sequence numbers repeat (retransmissions) or not (new connections), varying
TTLs, and first fragments with and without their ports; the engine's follow-up is written on
random flows and directions (boundaries on both sides of a sequence wrap), and byte counters
jump by a gigabyte or more (a stream that wrapped its sequence numbers: seq_end forgotten). One
chunk in four has bans (hybrid_bans), written and deleted between frames: nested prefixes over
the frames' addresses, IPv4, IPv6 and IPv4-mapped, live forever, live for a while or expired
(an expired longest match shadows a live shorter ban: it must not drop).

The generator is seeded (HYBRID_FUZZ_SEED overrides, HYBRID_FUZZ_FRAMES the count) so a failure
names the seed and frame that reproduce it."""

from __future__ import annotations

import os
import random
import time

import pytest
from bpfkit import A4, B4, IP, TCP, UDP, IPv6, Raw, frame, icmp4_echo, icmp6_echo, reset, tcp4, tcp6, udp4
from reference import PKT_BAD_L3, PKT_NOT_IP, PKT_OK, Reference, canonical_key, flow_key_of, key_tuple, parse
from test_names import dns_query, tls_hello
from scapy.all import (
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)

from hybrid.datapath.maps import parse_cidr
from hybrid.kernel import abi
from hybrid.kernel import abi as R

pytestmark = pytest.mark.bpf
FRAMES = int(os.environ.get("HYBRID_FUZZ_FRAMES", "100000"))
SEED = int(os.environ.get("HYBRID_FUZZ_SEED", "20261122"))
CHUNK = 5000     # maps and reference start over per chunk: the LRU may evict before it is full


def _testable(f: bytes) -> bool:
    """BPF_PROG_TEST_RUN on 6.18 refuses a tc frame typed IPv4/IPv6 shorter than the fixed IP
    header (EINVAL, before the program runs); such frames go to XDP only."""
    t = int.from_bytes(f[12:14], "big") if len(f) >= 14 else 0
    return len(f) >= 14 and not ((t == 0x0800 and len(f) < 34) or (t == 0x86DD and len(f) < 54))


def _bases() -> list[bytes]:
    long_chain = IPv6ExtHdrHopByHop()
    for _ in range(9):                                   # more than the programs walk
        long_chain = long_chain / IPv6ExtHdrDestOpt()
    return [
        tcp4("S"), tcp4("PA", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), tcp4("FPU"), tcp4(""),
        udp4(b"\x12\x34" + b"\x00" * 30), icmp4_echo(), tcp4("S", vlans=(5,)), tcp4("A", vlans=(5, 6)),
        udp4(b"q", vlans=(7,)), tcp6("S"), tcp6("PA", b"hello"), icmp6_echo(),
        tcp6("S", b"", ext=IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["2001:db8::5"])),
        tcp6("A", b"x", ext=IPv6ExtHdrFragment(m=1)), tcp6("S", ext=long_chain),
        tcp4("S", vlans=(1, 2, 3)),
        tcp4("S", dst="198.18.99.7"), udp4(b"z", src="198.18.99.8"),          # the blocked prefix
        tcp6("S", dst="2001:db8:2::9"),                                       # the watched prefix
        # first payloads whose names tc reads (with HYBRID_CFG_NAMES, bpf/names.h)
        *(udp4(dns_query(random.Random(k)), sport=41000 + k) for k in range(3)),
        *(tcp4("PA", tls_hello(random.Random(k)), sport=42000 + k, dport=443) for k in range(3)),
        # QUIC on UDP 443: long headers (queued on a bypassed flow: quic_long_header()) and short
        udp4(b"\xc3\x00\x00\x00\x01" + b"i" * 30, sport=43000, dport=443),
        udp4(b"\x41" + b"d" * 30, sport=43000, dport=443),
        udp4(b"\xc3\x00\x00\x00\x01" + b"s" * 30, src=B4, dst=A4, sport=443, dport=43000),
    ]


def _facts() -> list[bytes]:
    """Frames on the base flows that move the per-connection state: bare SYNs and SYN-ACKs from
    either side with a few sequence numbers (so that some repeat the recorded isn and some do
    not), payload and ACKs at several TTLs, and first fragments (IPv4 TCP and UDP, IPv6 TCP)
    with their ports, with too few bytes for them, and later fragments."""
    a4, b4, a6, b6 = "198.18.1.2", "198.18.2.2", "2001:db8:1::2", "2001:db8:2::2"
    out = []
    for seq in (0, 1, 0xFFFFFFFF):
        for ttl in (1, 64, 255):
            for flags in ("S", "SA", "PA"):
                payload = b"GET / HTTP/1.1\r\n" if flags == "PA" else b""
                out.append(tcp4(flags, payload, seq=seq, ttl=ttl))
                out.append(tcp4(flags, payload, src=b4, dst=a4, sport=80, dport=40000, seq=seq, ttl=ttl))
                l4 = TCP(sport=40000, dport=80, flags=flags, seq=seq)
                out.append(frame(IPv6(src=a6, dst=b6, hlim=ttl) / (l4 / Raw(payload) if payload else l4)))
    head = TCP(sport=40000, dport=80, flags="PA", seq=1) / Raw(b"GET / HTTP/1.1\r\nHost: x\r\n")
    for ttl in (3, 64):
        out += [
            frame(IP(src=a4, dst=b4, flags="MF", ttl=ttl, proto=6) / head),
            frame(IP(src=b4, dst=a4, flags="MF", ttl=ttl, proto=6) / TCP(sport=80, dport=40000) / Raw(b"r" * 16)),
            frame(IP(src=a4, dst=b4, flags="MF", proto=17) / UDP(sport=40000, dport=53) / Raw(b"q" * 24)),
            frame(IP(src=a4, dst=b4, flags="MF", proto=6) / Raw(b"\x9c\x40\x00\x50")),      # the ports alone
            frame(IP(src=a4, dst=b4, flags="MF", proto=6) / Raw(b"\x9c")),                    # not even them
            frame(IP(src=a4, dst=b4, frag=3, proto=6) / Raw(b"y" * 24)),
            frame(IPv6(src=a6, dst=b6, hlim=ttl) / IPv6ExtHdrFragment(m=1, id=1) / head),
            frame(IPv6(src=a6, dst=b6) / IPv6ExtHdrFragment(m=0, id=2) / head),                   # atomic
            frame(IPv6(src=a6, dst=b6) / IPv6ExtHdrFragment(offset=4, m=1, id=1, nh=6) / Raw(b"y" * 16)),
        ]
    return out


def _write_verdict_random(rng: random.Random, maps, ref: Reference, keys: list[tuple], now: int) -> None:
    """A verdict on a flow, as the engine (connection-scoped, ENGINE pins) or the operator (not,
    MANUAL pins) writes it through Maps.write_verdict; never expiring, or far in the future."""
    key = rng.choice(keys + list(ref.flows))
    verdict = rng.choice([R.VERDICT_BLOCK] * 3 + [R.VERDICT_BYPASS] * 2 + [R.VERDICT_INSPECT, R.VERDICT_NONE])
    conn_scoped = rng.random() < 0.7
    origin = R.PIN_ENGINE if conn_scoped or rng.random() < 0.3 else R.PIN_MANUAL
    maps.write_verdict(flow_key_of(key), verdict, rng.choice([None, 10**15]), origin=origin, conn_scoped=conn_scoped)
    expires = maps.get_flow(flow_key_of(key)).verdict_expires_ns
    ref.set_verdict(key, verdict, expires, now, conn_scoped=conn_scoped)
    if verdict == R.VERDICT_BLOCK:
        ref.pin(key, verdict, expires, origin)


def _follow_random(rng: random.Random, maps, ref: Reference) -> None:
    """The engine's follow-up on a flow (Maps.write_verdict(follow=...)): a direction followed
    from a sequence number near the frames' own (0, 1, 2**32 - 1, so that boundaries sit on both
    sides of a wrap) or anywhere, or no longer followed; the verdict kept or written with it."""
    if not ref.flows:
        return
    key = rng.choice(list(ref.flows))
    direction = rng.randrange(2)
    seq = rng.choice([None, 0, 1, 2, 0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, rng.randrange(1 << 32)])
    mode = rng.randrange(3)
    verdict = rng.choice([None, None, R.VERDICT_BYPASS, R.VERDICT_NONE])
    until = None
    if rng.random() < 0.4:                          # a byte budget, in either direction
        until = (rng.randrange(2), rng.choice([None, 0, 1, 2, 0x80000000, 0xFFFFFFFF, rng.randrange(1 << 32)]))
    maps.write_verdict(flow_key_of(key), verdict, None, conn_scoped=True, follow=(direction, seq, mode), until=until)
    if verdict is not None:
        ref.set_verdict(key, verdict, 0, 0, conn_scoped=True)
    ref.set_follow(key, direction, seq, mode)
    if until is not None:
        ref.set_until(key, *until)


def _bytes_jump(rng: random.Random, maps, ref: Reference) -> None:
    """A direction that carried a gigabyte or more since its last inspected payload (a long bulk
    transfer, compressed in time): written into the entry's byte counter, as tc would have
    counted it, so that seq_end is forgotten (or not, below HYBRID_SEQ_FORGET)."""
    if not ref.flows:
        return
    key = rng.choice(list(ref.flows))
    direction = rng.randrange(2)
    jump = rng.choice([R.SEQ_FORGET - 1, R.SEQ_FORGET, 3 * R.SEQ_FORGET, 1 << 32])
    fl = maps.get_flow(flow_key_of(key))
    fl.bytes[direction] += jump
    maps._update(R.MAP_FLOWS, flow_key_of(key), fl)
    ref.flows[key].bytes[direction] += jump


def _flow_state(fl) -> tuple:
    """What the fuzz compares of one flow entry (a kernel abi.Flow or a reference RefFlow)."""
    if isinstance(fl, R.Flow):
        isn = [fl.isn[d] if fl.flags & (R.FLOW_ISN0, R.FLOW_ISN1)[d] else None for d in (0, 1)]
        seq_end = [fl.seq_end[d] if fl.flags & (R.FLOW_SEQ0, R.FLOW_SEQ1)[d] else None for d in (0, 1)]
        return (list(fl.packets), list(fl.payload_packets), fl.flags, fl.verdict, fl.verdict_expires_ns,
                list(fl.ttl_max), isn, seq_end, fl.follow, list(fl.follow_seq), list(fl.until_seq))
    return (fl.packets, fl.payload_packets, fl.flags, fl.verdict, fl.verdict_expires_ns, fl.ttl_max, fl.isn,
            fl.seq_end, fl.follow, fl.follow_seq, fl.until_seq)


def _mutate(rng: random.Random, bases: list[bytes], facts: list[bytes]) -> bytes:
    kind = rng.randrange(10)
    if kind >= 8:                                        # the per-connection state, unmutated
        return rng.choice(facts)
    if kind == 0:                                        # random bytes behind a plausible Ethernet type
        body = rng.randbytes(rng.randrange(0, 120))
        etype = rng.choice([b"\x08\x00", b"\x86\xdd", b"\x81\x00", b"\x88\xa8", b"\x08\x06", rng.randbytes(2)])
        return rng.randbytes(12) + etype + body
    f = bytearray(rng.choice(bases))
    if kind == 1:                                        # truncated anywhere
        return bytes(f[:rng.randrange(0, len(f) + 1)])
    if kind == 2:                                        # a few random bytes flipped
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(len(f))
            f[i] = rng.randrange(256)
        return bytes(f)
    off = 14
    while len(f) >= off + 4 and f[off - 2:off] in (b"\x81\x00", b"\x88\xa8"):
        off += 4
    if kind == 3 and len(f) > off and f[off] >> 4 == 4:  # IPv4: IHL anywhere in 0..15
        f[off] = 0x40 | rng.randrange(16)
        return bytes(f)
    if kind == 4 and len(f) > off + 4:                   # bogus IP length field
        pos = off + (2 if f[off] >> 4 == 4 else 4)
        f[pos:pos + 2] = rng.randrange(65536).to_bytes(2, "big")
        return bytes(f)
    if kind == 5:                                        # extra VLAN tags in front (up to 4 in all)
        tags = b"".join(rng.choice([b"\x81\x00", b"\x88\xa8"]) + rng.randbytes(2) for _ in range(rng.randrange(1, 3)))
        return bytes(f[:12]) + tags + bytes(f[12:])
    if kind == 6 and len(f) > off + 40 and f[off] >> 4 == 6:   # IPv6 next header chain corrupted
        f[off + 6] = rng.choice([0, 43, 44, 51, 60, 59, 6, 17, 58, rng.randrange(256)])
        return bytes(f)
    # kind 7 (and fall-through): truncate a flipped frame
    i = rng.randrange(len(f))
    f[i] ^= 1 << rng.randrange(8)
    return bytes(f[:rng.randrange(max(1, len(f) // 2), len(f) + 1)])


# Bans over the frames' endpoints (A4 198.18.1.2, B4 198.18.2.2, 198.18.99.x, 2001:db8:1::2,
# 2001:db8:2::2), nested in each other, and two covering everything.
BAN_CIDRS = ["198.18.0.0/15", "198.18.1.0/24", "198.18.1.2/32", "198.18.2.0/23", "198.18.2.2/32",
             "198.18.99.0/25", "198.18.99.8/32", "::ffff:198.18.1.0/120", "2001:db8::/32", "2001:db8:1::/48",
             "2001:db8:1::2/128", "2001:db8:2::2/128", "::/0"]


def _ban_random(rng: random.Random, maps, ref: Reference, now: int) -> None:
    """One ban written (never expiring, far in the future, or expired) or deleted, as the bouncer
    writes them through Maps.write_bans; the broad ones rarely."""
    cidr = rng.choice(BAN_CIDRS[1:-1] * 4 + BAN_CIDRS[:1] + BAN_CIDRS[-1:])
    if rng.random() < 0.3:
        maps.write_bans({}, [cidr])
        ref.unban(cidr)
    else:
        expires = rng.choice([0, now + 10**15, 1, 1])
        maps.write_bans({cidr: expires}, [])
        ref.ban(cidr, expires)
    ref.config.flags = maps.get_config().flags          # write_bans keeps HYBRID_CFG_HAVE_BANS


def _ban_shadowed(ref: Reference, p, now: int) -> bool:
    """An endpoint whose longest ban has expired while a shorter one is live (it must pass)."""
    for addr in (p.saddr, p.daddr):
        exp = ref.ban_expiry(addr)
        if exp is None or ref._live(exp, now):
            continue
        value = int.from_bytes(addr, "big")
        for (plen, net), e in ref.bans.items():
            mask = ((1 << plen) - 1) << (128 - plen) if plen else 0
            if value & mask == net & mask and ref._live(e, now):
                return True
    return False


def _pin_random(rng: random.Random, maps, ref: Reference, keys: list[tuple], now: int) -> None:
    """Pinned verdicts (hybrid_pinned) for about half of the base frames' flows, as if an
    earlier BLOCK had been written and its entry evicted: mostly BLOCKs, some of the verdicts
    userspace never pins (the datapath copies whatever it finds), live forever, live for a
    while, or expired; the engine's or the operator's."""
    for key in keys:
        if rng.random() < 0.5:
            continue
        verdict = rng.choice([R.VERDICT_BLOCK] * 4 + [R.VERDICT_BYPASS, R.VERDICT_INSPECT])
        expires = rng.choice([0, now + 10**15, 1])
        origin = rng.choice([R.PIN_ENGINE, R.PIN_MANUAL])
        maps._update(R.MAP_PINNED, flow_key_of(key), R.PinnedVerdict(expires_ns=expires, verdict=verdict,
                                                                      origin=origin))
        ref.pin(key, verdict, expires, origin)


def _evict_random(rng: random.Random, maps, ref: Reference) -> None:
    """What the LRU does under pressure: one entry leaves the table (a pinned flow's, half of
    the time, so that restores happen)."""
    pinned = [k for k in ref.pinned if k in ref.flows]
    candidates = pinned if pinned and rng.random() < 0.5 else list(ref.flows)
    if candidates:
        key = rng.choice(candidates)
        ref.evict(key)
        assert maps.delete_flow(flow_key_of(key)), "the kernel's table lacks an entry the model has"


def test_fuzz_tc_and_xdp_against_reference(run, maps):
    rng = random.Random(SEED)
    bases = _bases()
    facts = _facts()
    maps.watch_port(80)
    maps.add_prefix("198.18.99.0/24", R.PREFIX_BLOCK)
    maps.add_prefix("2001:db8:2::/48", R.PREFIX_WATCH)
    cfg_ports = {80: R.PORT_TCP | R.PORT_UDP}
    cfg_prefixes = {"198.18.99.0/24": R.PREFIX_BLOCK, "2001:db8:2::/48": R.PREFIX_WATCH}
    seen_outcomes: set[int] = set()
    base_keys = sorted({canonical_key(p)[0] for p in map(parse, bases + facts) if p.status == PKT_OK})
    restored = names_read = followed = shadowed = 0
    fragments_dropped = restarts = 0
    tc_runs = xdp_runs = short = xdp_ban_drops = 0
    start = time.monotonic()
    for chunk_start in range(0, FRAMES, CHUNK):
        if chunk_start:
            reset(maps)
            maps.watch_port(80)
            for cidr, action in cfg_prefixes.items():
                maps.add_prefix(cidr, action)
        if (chunk_start // CHUNK) % 2:
            # Every other chunk with a per-source admission budget (small burst, drop policy;
            # 1000 s per token, so the kernel's clock and the model's agree) and the engine's
            # skip of SYNs, and a global budget.
            maps.update_config(source_interval_ns=10**12, source_tolerance_ns=10**12 * 7,
                               global_interval_ns=10**12, global_tolerance_ns=10**12 * 400,
                               flags=maps.get_config().flags | R.CFG_OVER_DROP, skip_reasons=R.REASON_SYN)
        if (chunk_start // CHUNK) % 3 != 2:
            maps.update_config(flags=maps.get_config().flags | R.CFG_NAMES)    # tc reads names
        ref = Reference(maps.get_config(), ports=cfg_ports, prefixes=cfg_prefixes)
        banning = (chunk_start // CHUNK) % 4 == 3
        # The model's clock stands still at the chunk's start; the kernel's runs on. Expiries
        # are chosen far from both (0, 1 or 10^15 ns ahead), and budgets are 1000 s per token.
        now = time.monotonic_ns()
        _pin_random(rng, maps, ref, base_keys, now)
        totals: dict[str, int] = {}
        for i in range(chunk_start, min(FRAMES, chunk_start + CHUNK)):
            f = _mutate(rng, bases, facts)
            where = f"seed {SEED} frame {i}: {f.hex()}"
            if len(f) < 14:      # the kernel refuses test runs below an Ethernet header; no NIC delivers them
                short += 1
                continue
            if rng.random() < 1 / 30:
                _evict_random(rng, maps, ref)
            if rng.random() < 1 / 25:
                _write_verdict_random(rng, maps, ref, base_keys, now)
            if rng.random() < 1 / 20:
                _follow_random(rng, maps, ref)
            if rng.random() < 1 / 40:
                _bytes_jump(rng, maps, ref)
            if banning and rng.random() < 1 / 60:
                _ban_random(rng, maps, ref, now)
            want_x = ref.xdp(f, now_ns=now)
            got_x = run.xdp(f)
            xdp_runs += 1
            assert got_x == want_x.action, where
            xdp_ban_drops += want_x.counter == R.CNT_XDP_DROP_BAN
            for idx in (abi.CNT_XDP_PACKETS, want_x.counter):
                if idx is not None:
                    totals[abi.COUNTER_NAMES[idx]] = totals.get(abi.COUNTER_NAMES[idx], 0) + 1
            if banning and parse(f).status not in (PKT_NOT_IP, PKT_BAD_L3) and _ban_shadowed(ref, parse(f), now):
                shadowed += 1
            if not _testable(f):
                continue
            want = ref.tc(f, now_ns=now, mark=0x4000)
            got = run.tc(f, mark=0x4000)
            tc_runs += 1
            assert (got.action, got.mark) == (want.action, want.mark), where
            seen_outcomes.add(want.outcome)
            fragments_dropped += want.outcome == R.CNT_DROP_TC_FLOW and parse(f).frag_keyed
            for idx, n in want.counters().items():
                totals[abi.COUNTER_NAMES[idx]] = totals.get(abi.COUNTER_NAMES[idx], 0) + n
        assert run.nonzero() == totals, f"counters after chunk at frame {chunk_start} (seed {SEED})"
        kernel = {key_tuple(k): _flow_state(fl) for k, fl in maps.flows()}
        assert kernel == {k: _flow_state(fl) for k, fl in ref.flows.items()}, f"flows, chunk at {chunk_start}"
        pinned = {key_tuple(k): (p.verdict, p.expires_ns, p.origin) for k, p in maps.pinned()}
        assert pinned == ref.pinned, f"pinned verdicts, chunk at {chunk_start}"
        bans = {(parse_cidr(c).prefixlen, int.from_bytes(bytes(parse_cidr(c).addr), "big")): e
                for c, e in maps.bans().items()}
        assert bans == ref.bans, f"bans, chunk at {chunk_start}"
        restored += totals.get("evicted_decided", 0)
        names_read += totals.get("name_dns", 0) + totals.get("name_sni", 0)
        restarts += totals.get("conn_restart", 0)
        followed += totals.get("reason_follow", 0)
        run.check_invariant()
    # The generator reached every kind of outcome, not just the easy ones.
    assert {R.CNT_FLAGGED, R.CNT_PASSED, R.CNT_NOT_IP, R.CNT_MALFORMED_L3, R.CNT_DROP_TC_PREFIX,
            R.CNT_OVER_DROP, R.CNT_DROP_TC_BAN} <= seen_outcomes
    assert xdp_ban_drops > 0, "XDP never dropped a banned packet"
    assert shadowed > 0, "no packet's longest ban was ever expired over a live shorter one"
    assert restored > 0, "no evicted decided flow was ever restored"
    assert restarts > 0, "no new connection ever started a connection-scoped verdict over"
    assert fragments_dropped > 0, "no first fragment of a blocked flow was ever dropped at tc"
    assert names_read > 0, "tc never read a name"
    assert followed > 0, "no packet ever reached a followed direction's next message"
    assert tc_runs >= FRAMES * 0.6 and xdp_runs + short == FRAMES and short < FRAMES * 0.05
    print(f"\nfuzz: {FRAMES} frames ({tc_runs} through tc, {xdp_runs} through XDP, {restored} evicted decided "
          f"flows restored, {restarts} connection restarts, {fragments_dropped} first fragments dropped, "
          f"{xdp_ban_drops} banned at XDP, {shadowed} under an expired ban over a live one) in "
          f"{time.monotonic() - start:.1f} s, seed {SEED}")
