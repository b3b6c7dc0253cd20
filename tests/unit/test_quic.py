"""hybrid.engine.quic: the server name of QUIC Initials, read as a QUIC server reads the same
bytes, or a named doubt (never a guessed name).

Checked against the RFCs' own packets (RFC 9001 and RFC 9369, Appendix A), against the Initials
aioquic's client builds (one datagram; a ClientHello over two, with its quantum-readiness padding),
against aioquic's server as the oracle of what a server reads from crafted Initials (each name it
parses must be among the names the engine decides on), and against crafted Initials for every
evasion and bound. The engine's own handler is driven at the end (realistic.toml, quic = "block")."""

from __future__ import annotations

import os
import ssl
import struct
import time
from types import SimpleNamespace

import pytest
from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicProtocolVersion, pull_quic_header
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from enginefakes import FlowTableFake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import IP, UDP, IPv6

from hybrid.engine import quic
from hybrid.engine.loop import Engine
from hybrid.engine.packet import decode
from hybrid.engine.quic import QUIC_V1, QUIC_V2, QuicJoiner, Step
from hybrid.kernel import abi

pytestmark = pytest.mark.unit
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "rules")
DCID = bytes.fromhex("8394c8f03e515708")          # RFC 9001 A and RFC 9369 A
VERSIONS = [QUIC_V1, QUIC_V2]

# RFC 9001 A.2 and RFC 9369 A.2: the client's Initial (1200 bytes, packet number 2), and the
# plaintext of its payload before the PADDING: one CRYPTO frame with a ClientHello for example.com.
RFC9001_A2_PACKET = bytes.fromhex(
    "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11"
    "d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399"
    "1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c"
    "8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212"
    "30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5"
    "457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208"
    "4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec"
    "4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3"
    "485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db"
    "059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c"
    "7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8"
    "9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556"
    "be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74"
    "68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a"
    "c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00"
    "f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632"
    "291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964"
    "25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd"
    "14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff"
    "ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198"
    "e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd"
    "c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73"
    "203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f"
    "cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e"
    "fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade"
    "a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047"
    "90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2"
    "162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4"
    "40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0"
    "6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e"
    "8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0"
    "be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400"
    "54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab"
    "760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9"
    "f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4"
    "056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064"
    "7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241"
    "e221af44860018ab0856972e194cd934"
)
RFC9369_A2_PACKET = bytes.fromhex(
    "d76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485"
    "dd04de806071bf03dceebfa162e75d6c96058bdbfb127cdfcbf903388e99ad04"
    "9f9a3dd4425ae4d0992cfff18ecf0fdb5a842d09747052f17ac2053d21f57c5d"
    "250f2c4f0e0202b70785b7946e992e58a59ac52dea6774d4f03b55545243cf1a"
    "12834e3f249a78d395e0d18f4d766004f1a2674802a747eaa901c3f10cda5500"
    "cb9122faa9f1df66c392079a1b40f0de1c6054196a11cbea40afb6ef5253cd68"
    "18f6625efce3b6def6ba7e4b37a40f7732e093daa7d52190935b8da58976ff33"
    "12ae50b187c1433c0f028edcc4c2838b6a9bfc226ca4b4530e7a4ccee1bfa2a3"
    "d396ae5a3fb512384b2fdd851f784a65e03f2c4fbe11a53c7777c023462239dd"
    "6f7521a3f6c7d5dd3ec9b3f233773d4b46d23cc375eb198c63301c21801f6520"
    "bcfb7966fc49b393f0061d974a2706df8c4a9449f11d7f3d2dcbb90c6b877045"
    "636e7c0c0fe4eb0f697545460c806910d2c355f1d253bc9d2452aaa549e27a1f"
    "ac7cf4ed77f322e8fa894b6a83810a34b361901751a6f5eb65a0326e07de7c12"
    "16ccce2d0193f958bb3850a833f7ae432b65bc5a53975c155aa4bcb4f7b2c4e5"
    "4df16efaf6ddea94e2c50b4cd1dfe06017e0e9d02900cffe1935e0491d77ffb4"
    "fdf85290fdd893d577b1131a610ef6a5c32b2ee0293617a37cbb08b847741c3b"
    "8017c25ca9052ca1079d8b78aebd47876d330a30f6a8c6d61dd1ab5589329de7"
    "14d19d61370f8149748c72f132f0fc99f34d766c6938597040d8f9e2bb522ff9"
    "9c63a344d6a2ae8aa8e51b7b90a4a806105fcbca31506c446151adfeceb51b91"
    "abfe43960977c87471cf9ad4074d30e10d6a7f03c63bd5d4317f68ff325ba3bd"
    "80bf4dc8b52a0ba031758022eb025cdd770b44d6d6cf0670f4e990b22347a7db"
    "848265e3e5eb72dfe8299ad7481a408322cac55786e52f633b2fb6b614eaed18"
    "d703dd84045a274ae8bfa73379661388d6991fe39b0d93debb41700b41f90a15"
    "c4d526250235ddcd6776fc77bc97e7a417ebcb31600d01e57f32162a8560cacc"
    "7e27a096d37a1a86952ec71bd89a3e9a30a2a26162984d7740f81193e8238e61"
    "f6b5b984d4d3dfa033c1bb7e4f0037febf406d91c0dccf32acf423cfa1e70710"
    "10d3f270121b493ce85054ef58bada42310138fe081adb04e2bd901f2f13458b"
    "3d6758158197107c14ebb193230cd1157380aa79cae1374a7c1e5bbcb80ee23e"
    "06ebfde206bfb0fcbc0edc4ebec309661bdd908d532eb0c6adc38b7ca7331dce"
    "8dfce39ab71e7c32d318d136b6100671a1ae6a6600e3899f31f0eed19e3417d1"
    "34b90c9058f8632c798d4490da4987307cba922d61c39805d072b589bd52fdf1"
    "e86215c2d54e6670e07383a27bbffb5addf47d66aa85a0c6f9f32e59d85a44dd"
    "5d3b22dc2be80919b490437ae4f36a0ae55edf1d0b5cb4e9a3ecabee93dfc6e3"
    "8d209d0fa6536d27a5d6fbb17641cde27525d61093f1b28072d111b2b4ae5f89"
    "d5974ee12e5cf7d5da4d6a31123041f33e61407e76cffcdcfd7e19ba58cf4b53"
    "6f4c4938ae79324dc402894b44faf8afbab35282ab659d13c93f70412e85cb19"
    "9a37ddec600545473cfb5a05e08d0b209973b2172b4d21fb69745a262ccde96b"
    "a18b2faa745b6fe189cf772a9f84cbfc"
)
RFC_A2_CRYPTO = bytes.fromhex(
    "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868"
    "04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578"
    "616d706c652e636f6dff01000100000a00080006001d00170018001000070005"
    "04616c706e000500050100000000003300260024001d00209370b2c9caa47fba"
    "baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400"
    "0d0010000e0403050306030203080408050806002d00020101001c0002400100"
    "3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000"
    "75300901100f088394c8f03e51570806048000ffff"
)


# -- building datagrams -------------------------------------------------------------------------

def varint(v: int) -> bytes:
    """RFC 9000 16, shortest form."""
    if v < 0x40:
        return bytes([v])
    if v < 0x4000:
        return struct.pack("!H", 0x4000 | v)
    return struct.pack("!I", 0x80000000 | v)


def crypto(off: int, data: bytes) -> bytes:
    return b"\x06" + varint(off) + varint(len(data)) + data


PING = b"\x01"


def ack(largest: int = 0) -> bytes:
    return b"\x02" + varint(largest) + b"\x00\x00\x00"


def initial(payload: bytes, dcid: bytes = DCID, *, pn: int = 0, version: int = QUIC_V1, keys_of: bytes | None = None,
            scid: bytes = b"\x5c" * 8, size: int = 1200, reserved: int = 0, pnl: int = 2, kind: int | None = None) -> bytes:
    """A client Initial protected as RFC 9001 5 says (with the keys of ``keys_of``, by default its
    own DCID's), its payload padded with PADDING to a ``size``-byte packet (0: as it is)."""
    initial_kind = 0 if version == QUIC_V1 else 1
    kind = initial_kind if kind is None else kind
    token = b"\x00" if kind == initial_kind else b""                # only an Initial has a token field

    def header(length: int) -> bytes:
        return (bytes([0xC0 | kind << 4 | reserved << 2 | (pnl - 1)]) + version.to_bytes(4, "big") + bytes([len(dcid)])
                + dcid + bytes([len(scid)]) + scid + token + struct.pack("!H", 0x4000 | length))

    room = size - (len(header(0)) + pnl + 16)
    if size and len(payload) < room:
        payload += bytes(room - len(payload))
    key, iv, hp = quic.initial_keys(keys_of or dcid, version)
    head = header(pnl + len(payload) + 16) + (pn & ((1 << 8 * pnl) - 1)).to_bytes(pnl, "big")
    sealed = AESGCM(key).encrypt((int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big"), payload, head)
    mask = Cipher(algorithms.AES(hp), modes.ECB()).encryptor().update(sealed[4 - pnl:20 - pnl])
    return (bytes([head[0] ^ (mask[0] & 0x0F)]) + head[1:-pnl]
            + bytes(a ^ b for a, b in zip(head[-pnl:], mask[1:1 + pnl])) + sealed)


def dgram(*packets: bytes, sport: int = 40000, dport: int = 443, src: str = "198.18.1.2", dst: str = "198.18.2.2"):
    """The IP packet NFQUEUE would give for a UDP datagram of ``packets``, decoded."""
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return decode(bytes(ip / UDP(sport=sport, dport=dport) / b"".join(packets)))


def client_hello(name: str | None, alpn: int = 0) -> bytes:
    """A real ClientHello handshake message (Python's ssl, no network), without a TLS record:
    what QUIC carries in CRYPTO frames. ``alpn``: that many long ALPN names (a bigger hello)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols([f"p{i:03d}-" + "x" * 60 for i in range(alpn)])
    out = ssl.MemoryBIO()
    conn = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    record = out.read()
    assert record[0] == 22 and len(record) == 5 + int.from_bytes(record[3:5], "big")
    return record[5:]


def add_server_name(hs: bytes, *names: str) -> bytes:
    """``hs`` with one more server_name extension, at the end, listing ``names``."""
    entries = b"".join(b"\x00" + struct.pack("!H", len(n)) + n.encode() for n in names)
    ext = struct.pack("!HHH", 0, len(entries) + 2, len(entries)) + entries
    body = bytearray(hs + ext)
    body[1:4] = (len(body) - 4).to_bytes(3, "big")
    p = 4 + 2 + 32
    p += 1 + body[p]
    p += 2 + struct.unpack_from("!H", body, p)[0]
    p += 1 + body[p]
    struct.pack_into("!H", body, p, struct.unpack_from("!H", body, p)[0] + len(ext))
    return bytes(body)


def counters():
    return SimpleNamespace(quic_initials=0, quic_snis=0, quic_held=0, quic_blocked=0)


def offer(j: QuicJoiner, pkt, **kw):
    """(step, names, doubt) of one offer."""
    r = j.offer(pkt, **kw)
    return r.step, r.names, pkt.doubt


# -- RFC 9001 and RFC 9369, Appendix A ----------------------------------------------------------

def test_rfc_initial_secrets_and_keys():
    # RFC 9001 A.1
    assert quic.client_initial_secret(DCID).hex() == \
        "c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea"
    assert [k.hex() for k in quic.initial_keys(DCID)] == [
        "1f369613dd76d5467730efcbe3b1a22d", "fa044b2f42a3fd3b46fb255c", "9f50449e04a0e810283a1e9933adedd2"]
    # RFC 9369 A.1
    assert quic.client_initial_secret(DCID, QUIC_V2).hex() == \
        "14ec9d6eb9fd7af83bf5a668bc17a7e283766aade7ecd0891f70f9ff7f4bf47b"
    assert [k.hex() for k in quic.initial_keys(DCID, QUIC_V2)] == [
        "8b1a0bc121284290a29e0971b5cd045d", "91f73e2351d8fa91660e909f", "45b95e15235d6f45a6b19cbcb0294ba9"]


@pytest.mark.parametrize("version, packet, sample, mask, header", [
    (QUIC_V1, RFC9001_A2_PACKET, "d1b1c98dd7689fb8ec11d242b123dc9b", "437b9aec36",
     "c300000001088394c8f03e5157080000449e00000002"),
    (QUIC_V2, RFC9369_A2_PACKET, "ffe67b6abcdb4298b485dd04de806071", "94a0c95e80",
     "d36b3343cf088394c8f03e5157080000449e00000002"),
])
def test_rfc_client_initial_header_protection_and_payload(version, packet, sample, mask, header):
    keys = quic._Keys(DCID, version)
    assert keys.hp.update(bytes.fromhex(sample))[:5].hex() == mask
    (h,), bad = quic._packets(packet)
    assert not bad and h.initial and h.dcid == DCID and (h.pn_off, h.end) == (18, 1200)
    plain, pn, b0 = quic._unprotect(keys, packet, h, 0)
    assert (pn, b0) == (2, bytes.fromhex(header)[0])
    assert plain == RFC_A2_CRYPTO + bytes(917)
    # and the test's own builder makes the very same packet from the same plaintext
    assert initial(RFC_A2_CRYPTO + bytes(917), pn=2, pnl=4, scid=b"", size=0, version=version) == packet


@pytest.mark.parametrize("packet", [RFC9001_A2_PACKET, RFC9369_A2_PACKET])
def test_rfc_client_initial_gives_its_name(packet):
    j = QuicJoiner(stats := counters())
    assert offer(j, dgram(packet)) == (Step.DECIDE, ("example.com",), None)
    assert (stats.quic_initials, stats.quic_snis, stats.quic_held) == (1, 1, 0)


# -- what aioquic's client sends ------------------------------------------------------------------

def aioquic_datagrams(name: str, **config) -> list[bytes]:
    """The datagrams aioquic's client sends first for a connection to ``name``."""
    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["hq-interop"],
                                                          server_name=name, **config))
    conn.connect(("198.18.2.2", 443), now=time.monotonic())
    return [d for d, _ in conn.datagrams_to_send(now=time.monotonic())]


AIOQUIC_VERSIONS = {QUIC_V1: QuicProtocolVersion.VERSION_1, QUIC_V2: QuicProtocolVersion.VERSION_2}


@pytest.mark.parametrize("version", VERSIONS)
def test_aioquic_initial(version):
    (d,) = aioquic_datagrams("www.example.org", supported_versions=[AIOQUIC_VERSIONS[version]])
    assert int.from_bytes(d[1:5], "big") == version
    assert offer(QuicJoiner(counters()), dgram(d)) == (Step.DECIDE, ("www.example.org",), None)


@pytest.mark.parametrize("version", VERSIONS)
def test_aioquic_hello_over_two_datagrams(version):
    """aioquic's quantum-readiness test pads its transport parameters by 1200 bytes, as a
    post-quantum key share grows a browser's ClientHello: the hello spans two datagrams. The
    first is held, the second decides; in either order; or both coalesced in one datagram."""
    ds = aioquic_datagrams("pq.example.org", quantum_readiness_test=True, supported_versions=[AIOQUIC_VERSIONS[version]])
    assert len(ds) == 2 and all(len(d) >= 1200 for d in ds)
    for order in (ds, ds[::-1]):
        j = QuicJoiner(stats := counters())
        assert offer(j, dgram(order[0])) == (Step.HOLD, (), None)
        assert j.held > 0
        r = j.offer(pkt := dgram(order[1]))
        assert (r.step, r.names, r.ended, pkt.doubt) == (Step.DECIDE, ("pq.example.org",), True, None)
        assert (stats.quic_initials, stats.quic_held, stats.quic_snis, j.held) == (2, 1, 1, 0)
    r = QuicJoiner(counters()).offer(pkt := dgram(ds[0] + ds[1]))
    assert (r.step, r.names, r.ended, pkt.doubt) == (Step.DECIDE, ("pq.example.org",), False, None)


# -- aioquic's server as the oracle -----------------------------------------------------------------

@pytest.fixture(scope="module")
def server_config():
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cfg = QuicConfiguration(is_client=False, alpn_protocols=["hq-interop"])
    cfg.certificate, cfg.private_key = cert, key
    return cfg


@pytest.fixture
def aioquic_reads(server_config, monkeypatch):
    """A function: the server names aioquic's server parses from ``datagrams`` (its
    ClientHello parser, watched), in order; [] when it parses none."""
    def reads(datagrams):
        seen = []
        real = tls.pull_client_hello

        def watched(buf):
            hello = real(buf)
            seen.append(hello.server_name)
            return hello
        monkeypatch.setattr(tls, "pull_client_hello", watched)
        header = pull_quic_header(Buffer(data=datagrams[0]), host_cid_length=8)
        conn = QuicConnection(configuration=server_config, original_destination_connection_id=header.destination_cid)
        for d in datagrams:
            conn.receive_datagram(d, ("198.18.1.2", 40000), now=time.monotonic())
        monkeypatch.setattr(tls, "pull_client_hello", real)
        return seen
    return reads


def engine_reads(datagrams):
    """(the last result's names, the doubts of all the datagrams) of a fresh joiner."""
    j = QuicJoiner(counters())
    doubts = []
    for d in datagrams:
        r = j.offer(pkt := dgram(d))
        doubts.append(pkt.doubt)
    return r.names, doubts


def split_hello(hs: bytes, name: str, version=QUIC_V1):
    """``hs`` in two Initials (packet numbers 0 and 1), cut in the middle of ``name``."""
    cut = hs.index(name.encode()) + len(name) // 2
    return (initial(crypto(0, hs[:cut]), pn=0, version=version), initial(crypto(cut, hs[cut:]), pn=1, version=version))


def oracle_case(name: str):
    """Crafted Initials for the evasion ``name``: (datagrams, the doubt the engine must give)."""
    hs = client_hello("www.allowed.example")
    blocked = client_hello("www.blocked.example")
    assert len(hs) == len(blocked)
    at = hs.index(b"www.allowed.example")
    if name == "two-server-name-extensions":             # aioquic takes the last one
        return [initial(crypto(0, add_server_name(hs, "www.blocked.example")))], "quic:sni-duplicate"
    if name == "overlap-buffered-last-wins":
        # a hole before the name; then the hole filled and the name sent again, other bytes
        return [initial(crypto(0, hs[:at]) + crypto(at + 4, hs[at + 4:]), pn=0),
                initial(crypto(at, blocked[at:]), pn=1)], "quic:overlap-differs"
    if name == "overlap-delivered-first-wins":
        # the hello was whole: the server has consumed it, later bytes change nothing; the engine
        # decided on it, and so reads it exactly (no doubt)
        return [initial(crypto(0, blocked), pn=0), initial(crypto(at, hs[at:]), pn=1)], None
    if name == "duplicate-packet-number":                # the server discards the second pn 0
        a, b = split_hello(blocked, "www.blocked.example")
        b_dup = initial(crypto(len(hs) // 2, b"x"), pn=0)
        return [a, b_dup, b], "quic:duplicate-packet"
    if name == "forbidden-frame-after-hello":            # read, then the connection is closed
        return [initial(crypto(0, blocked) + b"\x08\x00\x00")], "quic:forbidden-frame"
    if name == "reserved-bits":                          # aioquic closes before reading frames
        return [initial(crypto(0, blocked), reserved=1)], "quic:reserved-bits"
    if name == "small-datagram":                         # servers discard it: so does the engine
        return [initial(crypto(0, blocked), size=600)], "quic:short-datagram"
    raise AssertionError(name)


@pytest.mark.parametrize("case", ["two-server-name-extensions", "overlap-buffered-last-wins",
                                  "overlap-delivered-first-wins", "duplicate-packet-number",
                                  "forbidden-frame-after-hello", "reserved-bits", "small-datagram"])
def test_every_name_the_server_reads_is_decided(aioquic_reads, case):
    datagrams, doubt = oracle_case(case)
    server = aioquic_reads(datagrams)
    names, doubts = engine_reads(datagrams)
    assert set(server) <= set(names), (server, names)
    if doubt is None:
        assert doubts == [None] * len(datagrams) and set(names) == set(server)
    else:
        assert doubt in doubts and doubts[-1] is not None        # never a clean decision at the end
    if case in ("two-server-name-extensions", "overlap-buffered-last-wins", "duplicate-packet-number"):
        assert server == ["www.blocked.example"]                 # the oracle: it read the blocked name
    if case in ("reserved-bits", "small-datagram"):
        assert server == []                                      # it read nothing


def test_the_oracle_reads_the_plain_cases_as_the_engine(aioquic_reads):
    hs = client_hello("www.allowed.example")
    for datagrams in ([initial(crypto(0, hs))], list(split_hello(hs, "www.allowed.example"))):
        assert aioquic_reads(datagrams) == ["www.allowed.example"]
        names, doubts = engine_reads(datagrams)
        assert names == ("www.allowed.example",) and doubts[-1] is None


# -- reassembly ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_crypto_frames_in_any_order_within_a_packet(version):
    """Chrome cuts its ClientHello into CRYPTO frames and shuffles them, with PING and PADDING
    between: read by offset, as the server does; no doubt."""
    hs = client_hello("shuffled.example")
    cuts = [0, 7, 50, 51, 200, len(hs) - 3, len(hs)]
    frames = [crypto(a, hs[a:b]) for a, b in zip(cuts, cuts[1:])]
    payload = PING + b"".join(f + b"\x00\x00" for f in reversed(frames)) + PING
    assert offer(QuicJoiner(counters()), dgram(initial(payload, version=version))) == \
        (Step.DECIDE, ("shuffled.example",), None)


def test_hello_over_three_datagrams_out_of_order_and_retransmitted():
    hs = client_hello("three.example", alpn=40)
    assert len(hs) > 2400
    third = len(hs) // 3
    parts = [initial(crypto(0, hs[:third]), pn=0), initial(crypto(third, hs[third:2 * third]), pn=1),
             initial(crypto(2 * third, hs[2 * third:]), pn=2)]
    j = QuicJoiner(counters())
    assert offer(j, dgram(parts[2])) == (Step.HOLD, (), None)
    assert offer(j, dgram(parts[0])) == (Step.HOLD, (), None)
    assert offer(j, dgram(parts[0])) == (Step.HOLD, (), None)        # the same datagram again
    # its bytes again in a new packet (a retransmission is a new packet number), same bytes
    assert offer(j, dgram(initial(crypto(0, hs[:third + 5]), pn=3))) == (Step.HOLD, (), None)
    r = j.offer(pkt := dgram(parts[1]))
    assert (r.step, r.names, r.ended, pkt.doubt) == (Step.DECIDE, ("three.example",), True, None)


def test_a_hello_without_a_name_is_decided_as_none():
    assert offer(QuicJoiner(counters()), dgram(initial(crypto(0, client_hello(None))))) == (Step.DECIDE, (None,), None)


def test_client_switching_to_the_servers_connection_id_keeps_the_original_keys():
    """RFC 9001 5.2: Initial keys come from the client's first DCID; after the server's first
    packet the client sends to the server's CID with the same keys (a retransmitted piece)."""
    hs = client_hello("switch.example")
    a, _ = split_hello(hs, "switch.example")
    cut = hs.index(b"switch.example") + 7
    b = initial(crypto(cut, hs[cut:]), dcid=b"\x53" * 8, keys_of=DCID, pn=1)
    j = QuicJoiner(counters())
    assert offer(j, dgram(a)) == (Step.HOLD, (), None)
    assert offer(j, dgram(b)) == (Step.DECIDE, ("switch.example",), None)


def test_later_packets_of_a_connection():
    """While a hello is joined, the flow's other packets (0-RTT, 1-RTT) are held too; once decided,
    they are decided on its name; the server's side is never read."""
    hs = client_hello("later.example")
    a, b = split_hello(hs, "later.example")
    j = QuicJoiner(counters())
    assert offer(j, dgram(a)) == (Step.HOLD, (), None)
    short = b"\x43" + b"\x11" * 8 + os.urandom(60)                  # a short-header packet
    assert offer(j, dgram(short)) == (Step.HOLD, (), None)
    server = dgram(initial(PING, dcid=b"\x5c" * 8), src="198.18.2.2", dst="198.18.1.2", sport=443, dport=40000)
    assert offer(j, server) == (Step.PASS, (), None)
    assert offer(j, dgram(b)) == (Step.DECIDE, ("later.example",), None)
    assert offer(j, dgram(short)) == (Step.DECIDE, ("later.example",), None)
    assert offer(j, dgram(initial(ack(1), pn=5))) == (Step.DECIDE, ("later.example",), None)


def test_not_quic_passes_and_leaves_nothing():
    j = QuicJoiner(counters())
    dns = bytes.fromhex("abcd01000001000000000000") + b"\x07example\x03com\x00\x00\x01\x00\x01"
    for pkt in (dgram(dns, dport=53), dgram(b"\x80" + b"\x00" * 40, dport=5004),    # RTP-like
                dgram(b"\xc0\x11\x22\x33\x44" + bytes(1300), dport=8443),           # unknown version, not 443
                dgram(b"\xc0\x00\x00\x00\x00" + bytes(60)),                          # version negotiation
                dgram(b"\x40" + bytes(100)), dgram(b"\xc0\x00")):
        assert offer(j, pkt) == (Step.PASS, (), None)
    assert len(j) == 0 and j.held == 0


# -- doubts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_undecryptable(version):
    good = bytearray(initial(crypto(0, client_hello("x.example")), version=version))
    good[-1] ^= 1                                                   # the AEAD tag
    assert offer(QuicJoiner(counters()), dgram(bytes(good))) == (Step.DECIDE, (), "quic:undecryptable")


def test_unknown_version_on_443_is_doubted():
    d = bytearray(initial(crypto(0, client_hello("x.example"))))
    d[1:5] = b"\xff\x00\x00\x1d"                                    # draft-29
    assert offer(QuicJoiner(counters()), dgram(bytes(d))) == (Step.DECIDE, (), "quic:unknown-version")


def test_reserved_bits_and_forbidden_and_malformed_frames_still_read_what_came_before():
    hs = client_hello("x.example")
    for payload, kw, why in [(crypto(0, hs), {"reserved": 2}, "quic:reserved-bits"),
                             (crypto(0, hs) + b"\x08\x00\x00", {}, "quic:forbidden-frame"),   # STREAM
                             (crypto(0, hs) + b"\x1d\x00\x00\x00", {}, "quic:forbidden-frame"),  # app CLOSE
                             (crypto(0, hs) + b"\x06\x00\x44", {}, "quic:malformed"),          # cut CRYPTO
                             (crypto(0, hs) + b"\x02\x00\x00\x7f\xff", {}, "quic:malformed")]:  # ACK
        assert offer(QuicJoiner(counters()), dgram(initial(payload, **kw))) == (Step.DECIDE, ("x.example",), why)


def test_connection_close_ack_ping_padding_are_allowed():
    hs = client_hello("x.example")
    payload = ack(3) + b"\x03\x00\x00\x00\x00\x01\x02\x03" + PING + crypto(0, hs) + b"\x1c\x0a\x00\x03bye"
    assert offer(QuicJoiner(counters()), dgram(initial(payload))) == (Step.DECIDE, ("x.example",), None)


def test_a_packet_of_padding_alone_starts_a_join():
    """An Initial with no CRYPTO (PADDING only) is held, not decided "no name": else the flow
    would be bypassed and its ClientHello never seen."""
    j = QuicJoiner(counters())
    assert offer(j, dgram(initial(b""))) == (Step.HOLD, (), None)
    assert offer(j, dgram(initial(crypto(0, client_hello("x.example")), pn=1))) == (Step.DECIDE, ("x.example",), None)


def test_not_a_client_hello():
    assert offer(QuicJoiner(counters()), dgram(initial(crypto(0, b"\x02\x00\x00\x04abcd")))) == \
        (Step.DECIDE, (), "quic:not-client-hello")


def test_two_server_names():
    hs = client_hello(None)
    r = offer(QuicJoiner(counters()), dgram(initial(crypto(0, add_server_name(hs, "a.example", "b.example")))))
    assert r == (Step.DECIDE, ("a.example", "b.example"), "quic:sni-malformed")
    hs = add_server_name(client_hello("a.example"), "b.example")
    r = offer(QuicJoiner(counters()), dgram(initial(crypto(0, hs))))
    assert r == (Step.DECIDE, ("a.example", "b.example"), "quic:sni-duplicate")


def test_identical_overlap_is_no_doubt_and_differing_overlap_decides_both_readings():
    hs, other = client_hello("aaaa.example"), client_hello("bbbb.example")
    at = hs.index(b"aaaa.example")
    j = QuicJoiner(counters())
    assert offer(j, dgram(initial(crypto(0, hs[:at + 6]), pn=0))) == (Step.HOLD, (), None)
    assert offer(j, dgram(initial(crypto(at - 10, hs[at - 10:]), pn=1))) == (Step.DECIDE, ("aaaa.example",), None)
    # the name's bytes sent again, other bytes, before the hello is whole: decided in doubt at once
    j = QuicJoiner(counters())
    assert offer(j, dgram(initial(crypto(0, hs[:at + 6]), pn=0))) == (Step.HOLD, (), None)
    assert offer(j, dgram(initial(crypto(at, other[at:at + 6]), pn=1))) == (Step.DECIDE, (), "quic:overlap-differs")
    # and it stays in doubt: the rest completes both readings, both names are decided on
    step, names, doubt = offer(j, dgram(initial(crypto(at + 6, hs[at + 6:]), pn=2)))
    assert (step, set(names), doubt) == (Step.DECIDE, {"aaaa.example", "bbbb.example"}, "quic:overlap-differs")


def test_coalesced_initials():
    hs = client_hello("coal.example")
    a, b = split_hello(hs, "coal.example")
    assert offer(QuicJoiner(counters()), dgram(a, b)) == (Step.DECIDE, ("coal.example",), None)
    # an Initial of another DCID in the same datagram: servers differ (RFC 9000 12.2 vs aioquic)
    other = initial(crypto(0, client_hello("other.example")), dcid=b"\x01" * 8, size=0)
    step, names, doubt = offer(QuicJoiner(counters()), dgram(initial(crypto(0, hs), size=0), other, bytes(600)))
    assert step is Step.DECIDE and doubt == "quic:coalesced" and set(names) == {"coal.example", "other.example"}
    # an Initial behind a 0-RTT packet
    zero_rtt = initial(b"\x01" * 30, kind=1, size=0)
    step, names, doubt = offer(QuicJoiner(counters()), dgram(zero_rtt, initial(crypto(0, hs))))
    assert (step, names, doubt) == (Step.DECIDE, ("coal.example",), "quic:coalesced")


def test_duplicate_packet_numbers():
    hs = client_hello("dup.example")
    a, b = split_hello(hs, "dup.example")
    j = QuicJoiner(counters())
    assert offer(j, dgram(a)) == (Step.HOLD, (), None)
    assert offer(j, dgram(a)) == (Step.HOLD, (), None)              # the same packet again: ignored
    other = initial(crypto(0, b"\x01\x00\x00"), pn=0)                # packet number 0, other bytes
    assert offer(j, dgram(other)) == (Step.DECIDE, (), "quic:duplicate-packet")
    assert offer(j, dgram(b)) == (Step.DECIDE, ("dup.example",), "quic:duplicate-packet")


def test_short_datagram_is_not_read():
    j = QuicJoiner(stats := counters())
    assert offer(j, dgram(initial(crypto(0, client_hello("s.example")), size=800))) == \
        (Step.DECIDE, (), "quic:short-datagram")
    assert stats.quic_initials == 0 and len(j) == 0


def test_transport_doubts_come_first_and_a_bad_checksum_is_not_read():
    hs = client_hello("t.example")
    j = QuicJoiner(stats := counters())
    assert offer(j, dgram(initial(crypto(0, hs))), trusted=lambda: "udp:bad-checksum") == \
        (Step.DECIDE, (), "udp:bad-checksum")
    assert stats.quic_initials == 0 and len(j) == 0
    a, b = split_hello(hs, "t.example")
    assert offer(j, dgram(a), trusted=lambda: None) == (Step.HOLD, (), None)
    assert offer(j, dgram(b), trusted=lambda: "ip:low-ttl") == (Step.DECIDE, (), "ip:low-ttl")
    # a low TTL may or may not reach the server: the connection stays in doubt
    assert offer(j, dgram(b)) == (Step.DECIDE, ("t.example",), "ip:low-ttl")


def test_fragment_is_doubted():
    pkt = decode(bytes(IP(src="198.18.1.2", dst="198.18.2.2", flags="MF") / UDP(sport=40000, dport=443)
                       / initial(crypto(0, client_hello("f.example")))))
    assert pkt.fragment
    assert offer(QuicJoiner(counters()), pkt) == (Step.DECIDE, (), "ip:fragment")


def test_another_connection_unfinished_on_the_same_5_tuple():
    """A connection decided while another one on its 5-tuple is unfinished: a bypass of the 5-tuple
    would let the other one's ClientHello through unseen."""
    a, _ = split_hello(client_hello("first.example"), "first.example")
    j = QuicJoiner(counters())
    assert offer(j, dgram(a)) == (Step.HOLD, (), None)
    second = initial(crypto(0, client_hello("second.example")), dcid=b"\x22" * 8)
    assert offer(j, dgram(second)) == (Step.DECIDE, ("second.example",), "quic:several-connections")


# -- bounds -------------------------------------------------------------------------------------------

def test_crypto_beyond_the_bound_gives_up_the_flow():
    j = QuicJoiner(counters())
    assert offer(j, dgram(initial(crypto(quic.CRYPTO_MAX - 2, b"abcd")))) == (Step.DECIDE, (), "quic:too-big")
    # every later datagram of the flow, in doubt too
    assert offer(j, dgram(initial(crypto(0, client_hello("x.example")), pn=1))) == (Step.DECIDE, (), "quic:too-big")
    assert offer(j, dgram(b"\x40" + bytes(50))) == (Step.DECIDE, (), "quic:too-big")
    # a hello that says it is longer than the bound
    j = QuicJoiner(counters())
    assert offer(j, dgram(initial(crypto(0, b"\x01\x01\x00\x00" + bytes(20))))) == (Step.DECIDE, (), "quic:too-big")


def test_ranges_packets_and_connections_per_flow(monkeypatch):
    j = QuicJoiner(counters())
    holes = b"".join(crypto(2 * i + 10, b"z") for i in range(quic.CONN_MAX_RANGES + 1))
    assert offer(j, dgram(initial(holes))) == (Step.DECIDE, (), "quic:pieces")
    monkeypatch.setattr(quic, "CONN_MAX_PACKETS", 3)
    j = QuicJoiner(counters())
    for pn in range(3):
        assert offer(j, dgram(initial(crypto(10 * pn + 10, b"z"), pn=pn))) == (Step.HOLD, (), None)
    assert offer(j, dgram(initial(crypto(50, b"z"), pn=3))) == (Step.DECIDE, (), "quic:packets")
    j = QuicJoiner(counters())
    for i in range(quic.FLOW_MAX_CONNS):
        assert offer(j, dgram(initial(crypto(10, b"z"), dcid=bytes([i]) * 8))) == (Step.HOLD, (), None)
    assert offer(j, dgram(initial(crypto(10, b"z"), dcid=b"\xff" * 8))) == (Step.DECIDE, (), "quic:connections")


def test_per_source_and_table_bounds(monkeypatch):
    monkeypatch.setattr(quic, "SOURCE_MAX_FLOWS", 2)
    monkeypatch.setattr(quic, "QUIC_MAX_FLOWS", 4)
    j = QuicJoiner(counters())
    piece = initial(crypto(10, b"z"))
    for sport in (1, 2):
        assert offer(j, dgram(piece, sport=sport)) == (Step.HOLD, (), None)
    assert offer(j, dgram(piece, sport=3)) == (Step.DECIDE, (), "quic:source-full")
    for host in ("2", "3"):                                          # one IPv6 source: its /64
        assert offer(j, dgram(piece, src=f"2001:2:0:1::{host}", dst="2001:2:0:2::2")) == (Step.HOLD, (), None)
    assert offer(j, dgram(piece, src="2001:2:0:1::4", dst="2001:2:0:2::2")) == (Step.DECIDE, (), "quic:source-full")
    assert offer(j, dgram(piece, src="198.18.1.9")) == (Step.DECIDE, (), "quic:table-full")
    assert len(j) == 4 and sorted(s.flows for s in j.sources.values()) == [2, 2]


def test_idle_joins_are_evicted_and_remembered(monkeypatch):
    monkeypatch.setattr(quic, "QUIC_MAX_FLOWS", 2)
    monkeypatch.setattr(quic, "HELLO_TIMEOUT", 0.0)
    j = QuicJoiner(counters())
    hs = client_hello("e.example")
    a, b = split_hello(hs, "e.example")
    assert offer(j, dgram(a, sport=1)) == (Step.HOLD, (), None)
    assert offer(j, dgram(initial(crypto(0, hs)), sport=2)) == (Step.DECIDE, ("e.example",), None)
    assert offer(j, dgram(initial(crypto(10, b"z")), sport=3)) == (Step.HOLD, (), None)    # evicts sport 2 (decided)
    assert offer(j, dgram(initial(crypto(10, b"z")), sport=4)) == (Step.HOLD, (), None)    # evicts sport 1 (joining)
    assert offer(j, dgram(b, sport=1)) == (Step.DECIDE, (), "quic:evicted")
    assert len(j.abandoned) == 1


def test_bytes_bounds(monkeypatch):
    hs = client_hello("b.example", alpn=40)
    monkeypatch.setattr(quic, "SOURCE_MAX_BYTES", 1000)
    j = QuicJoiner(counters())
    assert offer(j, dgram(initial(crypto(0, hs[:900])))) == (Step.HOLD, (), None)
    assert offer(j, dgram(initial(crypto(900, hs[900:1100]), pn=1))) == (Step.DECIDE, (), "quic:source-full")
    assert j.held == 0 and not j.sources
    monkeypatch.setattr(quic, "SOURCE_MAX_BYTES", 1 << 20)
    monkeypatch.setattr(quic, "HELD_MAX_BYTES", 1000)
    j = QuicJoiner(counters())
    assert offer(j, dgram(initial(crypto(0, hs[:900])))) == (Step.HOLD, (), None)
    assert offer(j, dgram(initial(crypto(0, hs[:900])), sport=2)) == (Step.DECIDE, (), "quic:bytes-full")


def test_ack_ranges_are_bounded_by_the_bytes():
    """An ACK frame that claims 2**30 ranges is refused at once, not looped over."""
    payload = b"\x02\x00\x00" + varint(1 << 29) + b"\x00" + crypto(0, client_hello("x.example"))
    assert offer(QuicJoiner(counters()), dgram(initial(payload))) == (Step.DECIDE, (), "quic:malformed")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=1, max_size=1400), first=st.sampled_from([0xC0, 0xC3, 0xD0, 0xE0, 0x40, 0x80]),
       version=st.sampled_from([QUIC_V1, QUIC_V2, 0x11223344]))
def test_arbitrary_bytes_never_raise(data, first, version):
    payload = bytes([first]) + version.to_bytes(4, "big") + data
    j = QuicJoiner(counters())
    assert j.offer(dgram(payload)).step in Step
    assert j.offer(dgram(payload + bytes(1200))).step in Step


@settings(max_examples=300, deadline=None)
@given(flip=st.integers(0, 1199), val=st.integers(0, 255))
def test_mutated_initials_are_the_name_or_a_doubt(flip, val):
    d = bytearray(initial(crypto(0, client_hello("m.example"))))
    d[flip] = val
    pkt = dgram(bytes(d))
    r = QuicJoiner(counters()).offer(pkt)
    assert r.step is Step.PASS or r.names in ((), ("m.example",)) or pkt.doubt is not None


# -- the engine -----------------------------------------------------------------------------------------

class FakePacket:
    """NetfilterQueue's packet, recording the verdict."""

    def __init__(self, payload: bytes):
        self.payload, self.mark, self.indev = payload, 0x100000, 1
        self.verdicts: list[str] = []

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return self.mark

    def set_mark(self, m):
        self.mark = m

    def repeat(self):
        self.verdicts.append("accept")

    def drop(self):
        self.verdicts.append("drop")


def engine(tmp_path=None, text: str | None = None, maps=None) -> Engine:
    path = os.path.join(EXAMPLES, "realistic.toml")
    if text is not None:
        path = tmp_path / "rules.toml"
        path.write_text(text)
    e = Engine(0, str(path), maps=maps, mark_mask=0x100000)
    e._send_reject = lambda pkt, how: None
    return e


def raw(*packets: bytes, sport: int = 40000, dport: int = 443) -> bytes:
    return bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=sport, dport=dport) / b"".join(packets))


def verdicts(e: Engine, *datagrams: bytes) -> list[str]:
    out = []
    for d in datagrams:
        p = FakePacket(d)
        e._handle(p)
        out += p.verdicts
    assert e.stats.errors == 0
    return out


def test_realistic_rules_block_a_name_over_quic_and_let_others_through():
    e = engine()
    assert e.rules.reads_quic and e.rules.needs_quic_sni
    assert verdicts(e, raw(initial(crypto(0, client_hello("www.allowed.example"))))) == ["accept"]
    assert verdicts(e, raw(initial(crypto(0, client_hello("x.tracker.example"))), sport=2)) == ["drop"]
    assert e.rules.counters["block-quic-sni"] == 1 and e.rules.counters["block-tls-sni"] == 0
    assert (e.stats.quic_initials, e.stats.quic_snis) == (2, 2)
    snap = e.snapshot()
    assert (snap["quic_initials"], snap["quic_snis"], snap["quic_held"], snap["quic_blocked"]) == (2, 2, 0, 0)


def test_a_hello_over_two_datagrams_is_held_then_decided_and_the_flow_written():
    maps = FlowTableFake()
    e = engine(maps=maps)
    ds = aioquic_datagrams("login.tracker.example", quantum_readiness_test=True)
    first, second = raw(ds[0]), raw(ds[1])
    maps.connection(first)
    assert verdicts(e, first) == ["accept"]
    assert maps.writes == [(abi.VERDICT_INSPECT, int(120 * 1e9))]        # held: the flow stays queued
    assert verdicts(e, second) == ["drop"]
    assert maps.writes[-1][0] == abi.VERDICT_BLOCK and e.stats.quic_held == 1


def test_an_allowed_hello_over_two_datagrams_bypasses_the_flow():
    maps = FlowTableFake()
    e = engine(maps=maps)
    ds = aioquic_datagrams("www.allowed.example", quantum_readiness_test=True)
    maps.connection(raw(ds[0]))
    assert verdicts(e, raw(ds[0]), raw(ds[1])) == ["accept", "accept"]
    assert [w[0] for w in maps.writes] == [abi.VERDICT_INSPECT, abi.VERDICT_BYPASS]


RULE = '[[rule]]\nname = "sni"\n{proto}tls_sni = ".tracker.example"\naction = "drop"\nflow = "block"\n'


@pytest.mark.parametrize("proto, reads", [("", True), ('proto = "udp"\n', True), ('proto = "tcp"\n', False)])
def test_which_tls_sni_rules_read_quic(tmp_path, proto, reads):
    e = engine(tmp_path, 'default = "accept"\n' + RULE.format(proto=proto))
    assert e.rules.reads_quic is reads
    assert verdicts(e, raw(initial(crypto(0, client_hello("a.tracker.example"))))) == (["drop"] if reads else ["accept"])
    assert e.stats.quic_initials == (1 if reads else 0)


def test_two_names_the_strictest_decides(tmp_path):
    e = engine(tmp_path, RULE.format(proto=""))
    hs = add_server_name(client_hello("www.allowed.example"), "a.tracker.example")
    assert verdicts(e, raw(initial(crypto(0, hs)))) == ["drop"]
    assert e.stats.doubts == {}                                  # a block needs no doubt counted


def test_doubts_are_counted_and_get_on_doubt(tmp_path):
    e = engine(tmp_path, 'on_doubt = "drop"\ndefault_flow = "bypass"\n' + RULE.format(proto=""))
    d = bytearray(initial(crypto(0, client_hello("www.allowed.example"))))
    d[-1] ^= 1
    assert verdicts(e, raw(bytes(d))) == ["drop"]
    assert e.stats.doubts == {"quic:undecryptable": 1} and e.stats.doubt_actions["drop"] == 1


def test_quic_block(tmp_path):
    maps = FlowTableFake()
    e = engine(tmp_path, 'quic = "block"\ndefault_flow = "bypass"\n' + RULE.format(proto=""), maps=maps)
    assert e.rules.quic_block is not None and not e.rules.needs_quic_sni
    hello = raw(initial(crypto(0, client_hello("www.allowed.example"))))
    maps.connection(hello)
    assert verdicts(e, hello) == ["drop"]
    assert maps.writes == [(abi.VERDICT_BLOCK, int(300 * 1e9))]
    unknown = bytearray(initial(crypto(0, b"x")))
    unknown[1:5] = b"\xff\x00\x00\x1d"
    assert verdicts(e, raw(bytes(unknown), sport=2), raw(initial(PING, version=QUIC_V2), sport=3, dport=8443)) == \
        ["drop", "drop"]
    assert e.stats.quic_blocked == 3 and e.stats.quic_initials == 0
    # not QUIC, or not an Initial: as before
    assert verdicts(e, raw(bytes(unknown), sport=4, dport=8443), raw(b"\x40" + bytes(40), sport=5)) == ["accept"] * 2


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=1300), first=st.sampled_from([0x00, 0x40, 0xC0, 0xC1, 0xD1]))
def test_the_handler_gives_one_verdict_whatever_the_datagram(data, first):
    e = engine()
    for payload in (bytes([first]) + b"\x00\x00\x00\x01" + data, bytes([first]) + data):
        p = FakePacket(raw(payload))
        e._handle(p)
        assert len(p.verdicts) == 1 and e.stats.errors == 0


def test_a_reading_that_is_no_client_hello_hides_no_name_of_the_other():
    """The first byte sent twice, differently: one reading is no ClientHello, the other one is,
    with a name a last-wins server reads."""
    hs = client_hello("hidden.example")
    j = QuicJoiner(counters())
    assert offer(j, dgram(initial(crypto(0, b"\x02"), pn=0))) == (Step.DECIDE, (), "quic:not-client-hello")
    assert offer(j, dgram(initial(crypto(0, hs), pn=1))) == (Step.DECIDE, ("hidden.example",), "quic:overlap-differs")


def test_a_whole_hello_is_parsed_a_bounded_number_of_times(monkeypatch):
    """The first reading whole, the last kept unfinished by rewriting its length field again and
    again: each piece with differing bytes may parse again, up to CONN_MAX_DIFFERING; then the
    flow is given up (`overlaps`). Work counted, not timed."""
    parses = []
    real = quic.client_hello_sni
    monkeypatch.setattr(quic, "client_hello_sni", lambda h: parses.append(len(h)) or real(h))
    hs = client_hello("parse.example")
    assert offer(QuicJoiner(counters()), dgram(initial(crypto(0, hs)))) == (Step.DECIDE, ("parse.example",), None)
    assert len(parses) == 1                                            # a plain hello: parsed once
    parses.clear()
    j = QuicJoiner(counters())
    assert offer(j, dgram(initial(crypto(0, hs[:-1]), pn=0))) == (Step.HOLD, (), None)
    results = [offer(j, dgram(initial(crypto(0, b"\x01\x00\x80" + bytes([pn % 2])) + crypto(len(hs) - 1, hs[-1:]),
                                      pn=pn))) for pn in range(1, 40)]
    assert results[0] == (Step.DECIDE, ("parse.example",), "quic:overlap-differs")
    assert len(parses) <= 2 * (quic.CONN_MAX_DIFFERING + 1)
    given_up = (Step.DECIDE, ("parse.example",), "quic:overlaps")      # the names seen are kept
    assert results.index(given_up) == quic.CONN_MAX_DIFFERING and results[-1] == given_up
