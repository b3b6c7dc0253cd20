"""DNS evasion, with the server as the oracle: crafted queries (compression pointers, chains,
case, odd labels, several questions, TCP) sent from the client namespace to dnsmasq, first
through hybrid with accept-all rules (what does dnsmasq answer?), then through hybrid blocking
the names. Hybrid must drop exactly the queries for which dnsmasq answered a blocked name, and
let every other one get dnsmasq's own answer, except a few malformed messages it refuses on
purpose (OVERBLOCK): dnsmasq answers none of them with a blocked name either."""

from __future__ import annotations

import json
from collections import Counter
import struct
import sys

import pytest
from gwlab import attachment, clear_flows, engine_running

pytestmark = pytest.mark.integration

BLOCKED = {"x.ads.example": "192.0.2.9", "x.y": "192.0.2.10"}
ALLOWED = {"ok.example": "192.0.2.8"}
ACCEPT_ALL = 'default = "accept"\ndefault_flow = "none"\n'
BLOCK = ('default = "accept"\ndefault_flow = "none"\n'
         '[[rule]]\nname = "block-dns"\ndport = 53\ndns_qname = ["x.ads.example", "x.y"]\naction = "drop"\n')
Q = b"\x00\x01\x00\x01"                                   # QTYPE A, QCLASS IN


def header(qid=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def wire(name: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in name.split(b".")) + b"\0"


# Header ID 0x0178 and flags 0x0179 (RD, and the Z/AD/CD bits with rcode 9 in a query) read as
# the name "x.y" at offset 0: a backward pointer from the question to it is legal wire format.
XY = {"qid": 0x0178, "flags": 0x0179}
A_RR = wire(b"x.ads.example") + Q + b"\0\0\0\x3c\0\x04\xc0\0\x02\x09"

VARIANTS = {
    "plain": header() + wire(b"x.ads.example") + Q,
    "allowed": header() + wire(b"ok.example") + Q,
    "mixed-case": header() + wire(b"X.Ads.EXAMPLE") + Q,
    "pointer-to-header": header(**XY) + b"\xc0\x00" + Q,
    "label-then-pointer": header(**XY) + b"\x01x\xc0\x02" + Q,
    "pointer-chain": header(**XY, ar=0xC000) + b"\xc0\x0a" + Q,
    "forward-pointer-trailing": header() + b"\xc0\x10" + Q + wire(b"x.ads.example"),
    "forward-pointer-additional": header(ar=1) + b"\xc0\x10" + Q + A_RR,
    "label-then-forward-pointer": header() + b"\x01x\xc0\x12" + Q + wire(b"ads.example"),
    "pointer-loop": header() + b"\xc0\x0c" + Q,
    "reserved-label-type": header() + b"\x40\x10" + Q + wire(b"x.ads.example"),
    "two-questions-blocked-first": header(qd=2) + wire(b"x.ads.example") + Q + wire(b"ok.example") + Q,
    "two-questions-blocked-second": header(qd=2) + wire(b"ok.example") + Q + wire(b"x.ads.example") + Q,
    "no-question": header(qd=0) + wire(b"x.ads.example") + Q,
    "dot-in-label": header() + b"\x0dx.ads.example\0" + Q,
    "dot-in-label-trailing": header() + b"\x0ex.ads.example.\0" + Q,
    "nul-in-label": header() + b"\x01x\x03ads\x09example\0z\0" + Q,
    "non-ascii": header() + b"\x01x\x03ads\x07exampl\xc9\0" + Q,
    "answer-count-in-query": header(an=1) + wire(b"x.ads.example") + Q + A_RR,
}
TCP = ("plain", "allowed", "mixed-case", "pointer-to-header", "pointer-chain", "forward-pointer-trailing",
       "two-questions-blocked-first")
# Malformed messages hybrid refuses although dnsmasq answers them with no blocked name (asserted):
# the first question of several, a label holding dots read as the dotted name, and a query with
# answer records (dnsmasq does not read its question at all; hybrid does).
OVERBLOCK = {"two-questions-blocked-first", "dot-in-label", "dot-in-label-trailing", "answer-count-in-query"}

# Sends every message from the client and prints, per message, what came back: "timeout", or
# the rcode and the A addresses in the answer (found by their 4-byte RDATA). The UDP messages go
# all at once, each from a socket of its own (its own flow), so that their timeouts overlap;
# the TCP ones one after the other (dnsmasq --no-daemon serves one TCP connection at a time).
_ASK = r"""
import json, socket, struct, sys, threading, time
srv, msgs, addrs = json.loads(sys.argv[1])
out = {}

def ask(key, chunks):
    chunks = [bytes.fromhex(c) for c in chunks]
    r = b""
    try:
        if key.startswith("tcp"):       # chunks: the stream's bytes, each in its own segment
            with socket.create_connection((srv, 53), timeout=1.5) as s:
                # close with a reset: dnsmasq --no-daemon serves TCP in-process, and would wait
                # for a dropped query's bytes (and a FIN queued behind them) before the next one
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i, c in enumerate(chunks):
                    if i:
                        time.sleep(0.2)
                    s.sendall(c)
                while True:             # every answer, until the server has nothing more to say
                    part = s.recv(4096)
                    if not part:
                        break
                    r += part
                    s.settimeout(0.5)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1.5)
                s.sendto(chunks[0], (srv, 53))
                r = s.recv(4096)
    except OSError:
        pass
    if not r:
        out[key] = "timeout"
        return
    if key.startswith("tcp"):
        r = r[2:]
    got = sorted(a for a in addrs if socket.inet_aton(a) in r[12:])
    out[key] = f"rcode={r[3] & 15} {','.join(got)}"

udp = [threading.Thread(target=ask, args=kv) for kv in msgs.items() if not kv[0].startswith("tcp")]
for t in udp:
    t.start()
for t in udp:
    t.join()
for key, chunks in msgs.items():
    if key.startswith("tcp"):
        ask(key, chunks)
print(json.dumps(out))
"""


def prefixed(msg: bytes) -> bytes:
    return struct.pack("!H", len(msg)) + msg


# TCP streams cut into segments: the length prefix alone first; two pipelined queries in one
# segment, the blocked one second.
STREAMS = {
    "length-prefix-alone": [struct.pack("!H", len(VARIANTS["plain"])), VARIANTS["plain"]],
    "pipelined-blocked-second": [prefixed(VARIANTS["allowed"]) + prefixed(VARIANTS["plain"])],
}


def ask_all(lab) -> dict[str, str]:
    msgs = {f"udp {k}": [v.hex()] for k, v in VARIANTS.items()}
    msgs.update({f"tcp {k}": [prefixed(VARIANTS[k]).hex()] for k in TCP})
    msgs.update({f"tcp {k}": [c.hex() for c in v] for k, v in STREAMS.items()})
    addrs = [*BLOCKED.values(), *ALLOWED.values()]
    arg = json.dumps([lab.info.server.ipv4, msgs, addrs])
    proc = lab.run("client", [sys.executable, "-c", _ASK, arg], timeout=180)
    return json.loads(proc.stdout)


def engine_dns_unparsed(lab) -> dict:
    with open(f"/run/hybrid/instances/{lab.netns('gw')}/engine-0.json") as f:
        return Counter({k[4:]: n for k, n in json.load(f)["doubts"].items() if k.startswith("dns:")})


@pytest.fixture(scope="module")
def answers(lab, tmp_path_factory):
    """(dnsmasq's answers through accept-all hybrid, answers through hybrid blocking the names,
    the blocking engine's doubts about DNS names, by reason)."""
    from hybrid.lab.servers import Dns
    with Dns(lab, records={**BLOCKED, **ALLOWED}), attachment(lab):
        # One attach for both runs (a compile takes 6-10 s on CI), an engine for each; the
        # second starts from an empty flow table, as after a fresh attach.
        with engine_running(lab, tmp_path_factory.mktemp("oracle"), ACCEPT_ALL):
            oracle = ask_all(lab)
        clear_flows(lab)
        with engine_running(lab, tmp_path_factory.mktemp("block"), BLOCK):
            hybrid = ask_all(lab)
            unparsed = engine_dns_unparsed(lab)
    return oracle, hybrid, unparsed


def answered_blocked(answer: str) -> bool:
    return any(a in answer.split(" ", 1)[-1].split(",") for a in BLOCKED.values())


def test_the_oracle_answers_what_the_cases_claim(answers):
    """The variants mean what their names say: dnsmasq follows backward pointers (also into the
    header, also chained) and answers the blocked name; it refuses forward pointers, loops,
    several questions, odd labels."""
    oracle = answers[0]
    assert oracle["udp allowed"] == "rcode=0 " + ALLOWED["ok.example"], oracle
    for key in ("plain", "mixed-case", "pointer-to-header", "label-then-pointer", "pointer-chain"):
        assert answered_blocked(oracle[f"udp {key}"]), (key, oracle)
    for key in ("forward-pointer-trailing", "forward-pointer-additional", "pointer-loop",
                "two-questions-blocked-second", "dot-in-label"):
        assert not answered_blocked(oracle[f"udp {key}"]), (key, oracle)
    assert answered_blocked(oracle["tcp pointer-to-header"]), oracle
    assert answered_blocked(oracle["tcp length-prefix-alone"]), oracle
    pipelined = oracle["tcp pipelined-blocked-second"]
    assert BLOCKED["x.ads.example"] in pipelined and ALLOWED["ok.example"] in pipelined, oracle


# "tcp pipelined-blocked-second" is in TCP: each message of a TCP connection is decided
# (hybrid.engine.follow), the second of two pipelined queries too.
@pytest.mark.parametrize("key", [f"udp {k}" for k in VARIANTS] + [f"tcp {k}" for k in TCP] + [
    "tcp length-prefix-alone",
])
def test_hybrid_blocks_exactly_what_the_server_would_answer_blocked(answers, key):
    oracle, hybrid, _ = answers
    if answered_blocked(oracle[key]) or key.split(" ", 1)[1] in OVERBLOCK:
        assert hybrid[key] == "timeout", (key, oracle[key], hybrid[key])
    else:
        assert hybrid[key] == oracle[key], (key, oracle[key], hybrid[key])


def test_unreadable_names_are_counted_by_reason(answers):
    unparsed = answers[2]
    assert unparsed["forward-pointer"] >= 4 and unparsed["pointer-loop"] >= 1, unparsed
    assert unparsed["several-questions"] >= 3 and unparsed["no-question"] >= 1, unparsed
    assert unparsed["odd-label"] >= 3 and unparsed["label-type"] >= 1, unparsed
    assert unparsed["tcp-no-prefix"] >= 1 and unparsed["several-messages"] >= 1, unparsed
