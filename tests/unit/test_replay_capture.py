"""Reading captures for a replay (hybrid.replay.capture): every link type it claims, pcapng's
interfaces and directions, and every kind of bad input, made on the fly. Bad input is one
CaptureError line or a counted skip, never another exception."""

import struct
from pathlib import Path

import dpkt
import pytest
from click.testing import CliRunner
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from hybrid.cli.main import main
from hybrid.replay import capture as capmod
from hybrid.replay.capture import CaptureError, read_all

pytestmark = pytest.mark.unit

MACS = {"src": "02:00:00:00:01:02", "dst": "02:00:00:00:01:01"}
IP4 = bytes(IP(src="198.18.1.2", dst="198.18.2.2") / TCP(sport=40000, dport=80, flags="S"))
IP6 = bytes(IPv6(src="2001:2::1", dst="2001:2::2") / UDP(sport=5000, dport=53))
ETH = bytes(Ether(**MACS) / IP(src="198.18.1.2", dst="198.18.2.2") / TCP(sport=40000, dport=80, flags="S"))
ETH_VLAN = bytes(Ether(**MACS) / Dot1Q(vlan=7) / IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=1, dport=53))
T0 = 1_700_000_000


def pcap_file(tmp_path, records, linktype=1, nano=False, name="c.pcap") -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, linktype=linktype, nano=nano, snaplen=65535)
        for ts, data in records:
            w.writepkt(data, ts=ts)
    return str(path)


def idb(linktype: int, name: str | None, tsresol: int | None = None) -> bytes:
    opts = []
    if name is not None:
        opts.append(dpkt.pcapng.PcapngOptionLE(code=dpkt.pcapng.PCAPNG_OPT_IF_NAME, data=name.encode()))
    if tsresol is not None:
        opts.append(dpkt.pcapng.PcapngOptionLE(code=dpkt.pcapng.PCAPNG_OPT_IF_TSRESOL, data=bytes([tsresol])))
    opts.append(dpkt.pcapng.PcapngOptionLE(code=dpkt.pcapng.PCAPNG_OPT_ENDOFOPT))
    return bytes(dpkt.pcapng.InterfaceDescriptionBlockLE(linktype=linktype, snaplen=65535, opts=opts))


def epb(iface: int, ts: int, data: bytes, flags: int | None = None, wire_len: int | None = None) -> bytes:
    opts = []
    if flags is not None:
        opts = [dpkt.pcapng.PcapngOptionLE(code=2, data=struct.pack("<I", flags)),
                dpkt.pcapng.PcapngOptionLE(code=dpkt.pcapng.PCAPNG_OPT_ENDOFOPT)]
    b = dpkt.pcapng.EnhancedPacketBlockLE(iface_id=iface, ts_high=ts >> 32, ts_low=ts & 0xFFFFFFFF,
                                          pkt_data=data, opts=opts)
    raw = bytearray(bytes(b))
    if wire_len is not None:                       # what a snap length does: captured < on the wire
        struct.pack_into("<I", raw, 24, wire_len)
    return bytes(raw)


def pcapng_file(tmp_path, blocks, name="c.pcapng") -> str:
    path = tmp_path / name
    path.write_bytes(bytes(dpkt.pcapng.SectionHeaderBlockLE()) + b"".join(blocks))
    return str(path)


# -- what is read -------------------------------------------------------------------------------------

def test_pcap_ethernet_with_timestamps_and_vlan_tags_kept(tmp_path):
    path = pcap_file(tmp_path, [(T0 + 0.25, ETH), (T0 + 1.5, ETH_VLAN)])
    cap, frames = read_all(path)
    assert cap.format == "pcap" and cap.packets == 2 and not cap.skipped and cap.truncated is None
    assert [f.ts_ns for f in frames] == [T0 * 10**9 + 250_000_000, T0 * 10**9 + 1_500_000_000]
    assert frames[0].data == ETH and frames[1].data == ETH_VLAN        # the tag is still there
    assert frames[0].iface is None and frames[0].direction is None and frames[0].number == 1


def test_pcap_nanosecond_timestamps(tmp_path):
    path = pcap_file(tmp_path, [(5.000000123, ETH)], nano=True)
    _, frames = read_all(path)
    assert frames[0].ts_ns % 1_000_000_000 == 123


@pytest.mark.parametrize("linktype,data,etype", [(101, IP4, 0x0800), (101, IP6, 0x86DD), (228, IP4, 0x0800),
                                                 (229, IP6, 0x86DD), (12, IP4, 0x0800)])
def test_raw_ip_gets_an_ethernet_header(tmp_path, linktype, data, etype):
    _, frames = read_all(pcap_file(tmp_path, [(T0, data)], linktype=linktype))
    eth = frames[0].data
    assert struct.unpack(">H", eth[12:14])[0] == etype and eth[14:] == data
    assert eth[:6] == capmod.SYNTH_DST


def test_linux_sll_direction_and_sender_address(tmp_path):
    def sll(pkttype):
        return struct.pack(">HHH8sH", pkttype, 1, 6, bytes.fromhex("020000000aaa") + b"\0\0", 0x0800) + IP4
    _, frames = read_all(pcap_file(tmp_path, [(T0, sll(0)), (T0, sll(4))], linktype=113))
    assert [f.direction for f in frames] == ["in", "out"]
    assert frames[0].data[6:12] == bytes.fromhex("020000000aaa") and frames[0].data[14:] == IP4


def test_linux_sll2_interface_and_direction(tmp_path):
    rec = struct.pack(">HHIHBB8s", 0x86DD, 0, 5, 1, 4, 6, b"\x02" * 6 + b"\0\0") + IP6
    _, frames = read_all(pcap_file(tmp_path, [(T0, rec)], linktype=276))
    assert frames[0].iface == "ifindex 5" and frames[0].direction == "out"
    assert frames[0].data[12:14] == b"\x86\xdd" and frames[0].data[14:] == IP6


def test_pcapng_interfaces_directions_and_resolution(tmp_path):
    path = pcapng_file(tmp_path, [idb(1, "to-client"), idb(1, "to-server", tsresol=9),
                                  epb(0, T0 * 10**6, ETH, flags=1), epb(1, T0 * 10**9 + 7, ETH, flags=2),
                                  epb(0, T0 * 10**6 + 1, ETH)])
    cap, frames = read_all(path)
    assert cap.format == "pcapng" and cap.interfaces == ["to-client", "to-server"]
    assert [(f.iface, f.direction) for f in frames] == [("to-client", "in"), ("to-server", "out"), ("to-client", None)]
    assert [f.ts_ns for f in frames] == [T0 * 10**9, T0 * 10**9 + 7, T0 * 10**9 + 1000]


# -- bad input ------------------------------------------------------------------------------------------

def test_empty_file(tmp_path):
    (tmp_path / "e").write_bytes(b"")
    with pytest.raises(CaptureError, match="empty file"):
        read_all(str(tmp_path / "e"))


def test_not_a_capture(tmp_path):
    (tmp_path / "t").write_text("GET / HTTP/1.1\r\n")
    with pytest.raises(CaptureError, match="not a pcap or pcapng capture"):
        read_all(str(tmp_path / "t"))


def test_missing_file(tmp_path):
    with pytest.raises(CaptureError, match="No such file"):
        read_all(str(tmp_path / "none"))


def test_unknown_link_type_pcap(tmp_path):
    with pytest.raises(CaptureError, match="link type 147 is not one"):
        read_all(pcap_file(tmp_path, [(T0, ETH)], linktype=147))


def test_unknown_link_type_pcapng_interface_is_a_counted_skip(tmp_path):
    cap, frames = read_all(pcapng_file(tmp_path, [idb(147, "usb"), idb(1, "eth"), epb(0, 1, ETH), epb(1, 2, ETH)]))
    assert len(frames) == 1 and frames[0].iface == "eth"
    assert cap.skipped == {capmod.SKIP_LINKTYPE: 1} and cap.packets == 2


@pytest.mark.parametrize("cut", [10, 30, 60])
def test_truncated_pcap(tmp_path, cut):
    path = pcap_file(tmp_path, [(T0, ETH), (T0 + 1, ETH)])
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) - cut])
    cap, frames = read_all(path)
    assert len(frames) == 1 and cap.truncated and "packet record at byte" in cap.truncated


def test_truncated_pcap_header(tmp_path):
    path = pcap_file(tmp_path, [])
    Path(path).write_bytes(Path(path).read_bytes()[:10])
    with pytest.raises(CaptureError, match="truncated pcap file header"):
        read_all(path)


def test_truncated_pcapng(tmp_path):
    path = pcapng_file(tmp_path, [idb(1, "eth"), epb(0, 1, ETH), epb(0, 2, ETH)])
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-20])
    cap, frames = read_all(path)
    assert len(frames) == 1 and "block at byte" in cap.truncated


def test_pcapng_impossible_block_length(tmp_path):
    path = pcapng_file(tmp_path, [idb(1, "eth"), struct.pack("<II", 6, 7) + b"\0" * 8])
    with pytest.raises(CaptureError, match="impossible length 7"):
        read_all(path)


def test_pcapng_packet_on_an_undescribed_interface(tmp_path):
    with pytest.raises(CaptureError, match="interface 3"):
        read_all(pcapng_file(tmp_path, [idb(1, "eth"), epb(3, 1, ETH)]))


def test_snaplen_cut_packet_is_a_counted_skip(tmp_path):
    path = pcapng_file(tmp_path, [idb(1, "eth"), epb(0, 1, ETH[:40], wire_len=len(ETH)), epb(0, 2, ETH)])
    cap, frames = read_all(path)
    assert len(frames) == 1 and cap.skipped == {capmod.SKIP_SNAPLEN: 1}


def test_short_link_header_is_a_counted_skip(tmp_path):
    cap, frames = read_all(pcap_file(tmp_path, [(T0, b"\x00" * 8), (T0, ETH)]))
    assert len(frames) == 1 and cap.skipped == {capmod.SKIP_SHORT: 1}


@pytest.mark.parametrize("content,message", [(b"", "empty file, not a capture"),
                                             (b"hello world", "not a pcap or pcapng capture (it starts with 68656c6c)"),
                                             (b"\xd4\xc3\xb2\xa1\x02\x00", "truncated pcap file header (6 bytes)")])
def test_cli_one_line_before_anything_is_compiled(tmp_path, content, message):
    path = tmp_path / "bad"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["replay", str(path), "--rules", "examples/rules/realistic.toml"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [f"Error: {path}: {message}"]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_unknown_link_type_one_line(tmp_path):
    path = pcap_file(tmp_path, [(T0, ETH)], linktype=147)
    result = CliRunner().invoke(main, ["replay", path, "--rules", "examples/rules/realistic.toml"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "link type 147" in result.output
