"""The flood's frames: checksums and fields verified by scapy (an independent implementation),
source addresses kept inside the lab's range."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from hybrid.errors import ConfigError
from hybrid.lab import flood

pytestmark = pytest.mark.unit
GW_MAC = "02:00:00:00:00:01"
MY_MAC = "02:00:00:00:00:02"


def _spec(**kw) -> flood.FloodSpec:
    args = dict(kind="udp", sources="198.18.1.128/25", dst="198.18.2.2", dport=9, src_mac=MY_MAC, dst_mac=GW_MAC)
    args.update(kw)
    return flood.FloodSpec(**args)


def _recomputed(pkt, layer):
    """scapy's own checksums for ``pkt``: rebuild with the checksum fields deleted."""
    copy = pkt.copy()
    del copy[IP].chksum
    del copy[layer].chksum
    return Ether(bytes(copy))


@pytest.mark.parametrize("kind,layer", [("udp", UDP), ("syn", TCP)])
def test_frames_have_the_checksums_scapy_computes(kind, layer):
    frames = flood.build_frames(_spec(kind=kind, dport=80))
    for raw in frames[:50] + frames[-50:]:
        pkt = Ether(raw)
        good = _recomputed(pkt, layer)
        assert pkt[IP].chksum == good[IP].chksum
        assert pkt[layer].chksum == good[layer].chksum
        assert pkt.dst == GW_MAC and pkt.src == MY_MAC
        assert pkt[IP].dst == "198.18.2.2" and pkt[layer].dport == 80
        assert ipaddress.ip_address(pkt[IP].src) in ipaddress.ip_network("198.18.1.128/25")


def test_syn_frames_are_bare_syns():
    pkt = Ether(flood.build_frames(_spec(kind="syn", dport=80))[0])
    assert pkt[TCP].flags == "S" and pkt[TCP].ack == 0
    assert pkt[IP].len == 20 + 24 and pkt[IP].ttl == 64


def test_udp_frames_are_minimum_size_with_the_default_payload():
    raw = flood.build_frames(_spec())[0]
    assert len(raw) == 60                      # 14 + 20 + 8 + 18: the Ethernet minimum
    assert Ether(raw)[UDP].len == 8 + 18


def test_sources_cycle_through_the_prefix_and_ports_vary():
    frames = flood.build_frames(_spec(sources="198.18.128.0/17"))
    pkts = [Ether(f) for f in frames[:4000]]
    assert len({p[IP].src for p in pkts}) == 4000          # consecutive frames: different sources
    assert len(frames) <= flood.MAX_FRAMES
    assert len({(Ether(f)[IP].src, Ether(f)[UDP].sport) for f in frames[::97]}) == len(frames[::97])


def test_a_single_source_gets_many_ports():
    frames = flood.build_frames(_spec(sources="198.18.1.77/32"))
    assert {Ether(f)[IP].src for f in frames[:100]} == {"198.18.1.77"}
    assert len({Ether(f)[UDP].sport for f in frames[:1000]}) == 1000


@pytest.mark.parametrize("field,value,message", [
    ("sources", "10.0.0.0/8", "must lie inside 198.18.0.0/15"),
    ("sources", "198.16.0.0/13", "must lie inside 198.18.0.0/15"),
    ("sources", "nonsense", "not an IPv4 address or prefix"),
    ("dst", "192.0.2.1", "must lie inside 198.18.0.0/15"),
    ("dst", "198.18.2.0/24", "give one address"),
    ("kind", "icmp", "use one of syn, udp"),
    ("dport", 0, "use 1-65535"),
    ("dst_mac", "02:00", "six hex bytes"),
])
def test_bad_specs_are_refused_with_what_to_fix(field, value, message):
    with pytest.raises(ConfigError, match=message):
        flood.build_frames(_spec(**{field: value}))


def test_checksum_matches_rfc1071_example():
    # RFC 1071's example words 0x0001 0xf203 0xf4f5 0xf6f7 sum to 0xddf2 (one's complement 0x220d)
    assert flood.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
