"""Random rule sets and name-carrying packets for the name-cache tests (tests/unit/
test_namecache.py proves cached_decision() against RuleSet.decide; tests/bpf/
test_namecache_kernel.py proves the kernel's cached decisions against the engine's)."""

from __future__ import annotations

import random
import ssl

HEAD = 'default = "accept"\ndefault_flow = "bypass"\n'


def rule(name: str, action: str = "drop", flow: str = "block", **match) -> str:
    keys = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in match.items())
    return f'[[rule]]\nname = "{name}"\n{keys}action = "{action}"\nflow = "{flow}"\n'


NAMES = ["a.example", "b.example", "x.b.example", "c.test", "x.ads.example", "ads.example"]
PATTERNS = ["a.example", ".b.example", "*.b.example", "c.test", ".ads.example", ".example"]
PORTS = [53, 80, 443, 8080]
SOURCES = ["198.18.1.2", "198.18.9.2"]
SERVER = "198.18.2.2"


def random_rule(r: random.Random, i: int) -> str:
    match: dict = {}
    proto = r.choice(["tcp", "udp", None])
    if proto:
        match["proto"] = proto
    for key, values in (("dport", PORTS), ("sport", [40000, 53]), ("port", PORTS)):
        if r.random() < 0.25:
            match[key] = r.choice(values)
    if r.random() < 0.15:
        match["src"] = "198.18.9.0/24"
    if r.random() < 0.1:
        match["payload_len"] = r.choice(["1-100", "101-2000", "0", "0"])
    if r.random() < 0.1:
        match["payload_contains"] = "evil"
    tcp_ok = proto in ("tcp", None)
    if tcp_ok and r.random() < 0.3:
        match["http_host"] = r.choice(PATTERNS)
    elif tcp_ok and r.random() < 0.3:
        match["tls_sni"] = r.choice(PATTERNS)
    elif r.random() < 0.3:
        match["dns_qname"] = r.choice(PATTERNS)
    if tcp_ok and "tls_sni" not in match and r.random() < 0.1:
        match[r.choice(["http_path", "http_method"])] = r.choice(["/admin", "POST"])
    if "http_host" in match or "tls_sni" in match or "http_path" in match or "http_method" in match:
        if proto is None:
            match["proto"] = "tcp"
        elif proto == "udp":
            del match["proto"]
            match["proto"] = "tcp"
    action = r.choice(["accept", "drop", "reject", "accept"])
    flow = r.choice(["none", "bypass", "block", "inspect"])
    return rule(f"r{i}", action, flow, **match)


def hellos() -> dict[str, bytes]:
    out = {}
    for name in NAMES + ["A.Example"]:
        ctx = ssl.create_default_context()
        o = ssl.MemoryBIO()
        conn = ctx.wrap_bio(ssl.MemoryBIO(), o, server_hostname=name)
        try:
            conn.do_handshake()
        except ssl.SSLWantReadError:
            pass
        out[name] = o.read()
    return out


def dns_query(name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01"




def random_ruleset(r: random.Random) -> str:
    """A rules file: a default and 1 to 6 random rules."""
    return HEAD.replace('"bypass"', f'"{r.choice(["bypass", "none"])}"') + "".join(
        random_rule(r, i) for i in range(r.randint(1, 6)))
