# mirrors bpf/hybrid_common.h; change both.
"""The kernel/user contract in Python: constants, map names and ctypes layouts of every map key
and value. tests/bpf/test_abi.py proves the layouts equal what bcc compiled from the C header.

Byte order follows the header: addresses and ports in flow keys are network order (kept as raw
bytes / big-endian integers here), everything else host order.
"""

from __future__ import annotations

import ctypes

# ---- Load-time knob defaults ------------------------------------------------------------------
FLOW_TABLE_SIZE = 131072
PREFIX_TABLE_SIZE = 16384
SOURCE_TABLE_SIZE = 65536
PINNED_TABLE_SIZE = 65536
BAN_TABLE_SIZE = 131072

MAX_IFACES = 64
MAX_VLAN_DEPTH = 2
MAX_IPV6_EXT = 6

# ---- Map and program names --------------------------------------------------------------------
MAP_CONFIG = "hybrid_config"
MAP_FLOWS = "hybrid_flows"
MAP_PREFIXES = "hybrid_prefixes"
MAP_PORTS = "hybrid_ports"
MAP_IFACES = "hybrid_ifaces"
MAP_STATS = "hybrid_stats"
MAP_SOURCES = "hybrid_sources"
MAP_BUDGET = "hybrid_budget"
MAP_PINNED = "hybrid_pinned"
MAP_BANS = "hybrid_bans"
MAP_NAMES_SCRATCH = "hybrid_scratch"
MAP_NAME_CACHE = "hybrid_names"
MAP_NAME_STATE = "hybrid_name_gen"
MAP_NAME_EVENTS = "hybrid_name_ev"
MAP_NAME_PROGS = "hybrid_name_prg"      # a program array (pinned; no typed access: not in MAP_NAMES)
# Every datapath has these.
MAP_NAMES = (MAP_CONFIG, MAP_FLOWS, MAP_PREFIXES, MAP_PORTS, MAP_IFACES, MAP_STATS, MAP_SOURCES, MAP_BUDGET,
             MAP_PINNED, MAP_BANS)
# Only a datapath built with the name cache (-DHYBRID_NAMES, attach option name_cache) has these.
NAME_CACHE_MAPS = (MAP_NAMES_SCRATCH, MAP_NAME_CACHE, MAP_NAME_STATE, MAP_NAME_EVENTS)

PROG_XDP = "hybrid_xdp"
PROG_TC = "hybrid_tc_ingress"
NAME_PROG_DNS_TLS = 0
NAME_PROG_HTTP = 1
NAME_PROGS = 2
# hybrid_name_prg index -> the parser program tc tail-calls there (bpf/namecache.h)
NAME_PROG_FUNCS = {NAME_PROG_DNS_TLS: "hybrid_tc_names", NAME_PROG_HTTP: "hybrid_tc_names_http"}

PORTS_SIZE = 65536  # hybrid_ports: one entry per port

# ---- Verdicts ---------------------------------------------------------------------------------
VERDICT_NONE = 0
VERDICT_INSPECT = 1
VERDICT_BYPASS = 2
VERDICT_BLOCK = 3
VERDICT_NAMES = {
    VERDICT_NONE: "none",
    VERDICT_INSPECT: "inspect",
    VERDICT_BYPASS: "bypass",
    VERDICT_BLOCK: "block",
}

# ---- Pinned verdicts (hybrid_pinned: BLOCKs that survive the flow table's eviction) ----
PIN_ENGINE = 1
PIN_MANUAL = 2
PIN_ORIGIN_NAMES = {PIN_ENGINE: "engine", PIN_MANUAL: "manual"}

# ---- Flag reasons (bits) ----------------------------------------------------------------------
REASON_SYN = 1 << 0
REASON_FIRST_N = 1 << 1
REASON_PORT = 1 << 2
REASON_PREFIX = 1 << 3
REASON_SUSPICIOUS = 1 << 4
REASON_FRAGMENT = 1 << 5
REASON_INSPECT = 1 << 6
REASON_MALFORMED = 1 << 7
REASON_FOLLOW = 1 << 8     # the packet reaches the next message of a direction the engine follows
REASON_COUNT = 9
REASONS_ALL = (1 << REASON_COUNT) - 1
REASON_COUNTED_LOW = 8     # reasons counted at CNT_REASON_BASE + bit index; FOLLOW at CNT_REASON_FOLLOW
# bit -> name, in bit order: the one table of reason names. Counters and JSON keys use the name as
# is (reason_first_n); what people read and write (--flag, the configuration's flag list, status
# text) spells it with dashes (first-n), derived here and nowhere else.
REASON_NAMES = {
    REASON_SYN: "syn",
    REASON_FIRST_N: "first_n",
    REASON_PORT: "port",
    REASON_PREFIX: "prefix",
    REASON_SUSPICIOUS: "suspicious",
    REASON_FRAGMENT: "fragment",
    REASON_INSPECT: "inspect",
    REASON_MALFORMED: "malformed",
    REASON_FOLLOW: "follow",
}

REASON_BITS = {name.replace("_", "-"): bit for bit, name in REASON_NAMES.items()}   # written name -> bit


def reason_written(counter_name: str) -> str:
    """``reason_first_n`` (a counter) or ``first_n`` -> ``first-n``, as people write it."""
    return counter_name.removeprefix("reason_").replace("_", "-")


# ---- IP protocols (IANA numbers): the names rules, FLOW arguments and flow listings use -------
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
PROTO_NAMES = {IPPROTO_ICMP: "icmp", IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMPV6: "icmpv6"}
PROTO_NUMBERS = {name: number for number, name in PROTO_NAMES.items()}
ICMP_PROTOS = (IPPROTO_ICMP, IPPROTO_ICMPV6)

# ---- Config flags, port bits, prefix actions, flow flags, iface flags ---------------------------
CFG_HAVE_PREFIXES = 1 << 0
CFG_HAVE_PORTS = 1 << 1
CFG_OVER_DROP = 1 << 2
CFG_NAMES = 1 << 3          # tc reads the name of first payloads (bpf/names.h)
CFG_HAVE_BANS = 1 << 4      # the ban trie is non-empty (hybrid_bans)

PORT_TCP = 1 << 0
PORT_UDP = 1 << 1

PREFIX_WATCH = 1 << 0
PREFIX_BLOCK = 1 << 1

FLOW_ORIG_HI = 1 << 0
FLOW_MIDSTREAM = 1 << 1
FLOW_SEQ0 = 1 << 2
FLOW_SEQ1 = 1 << 3
FLOW_ISN0 = 1 << 4
FLOW_ISN1 = 1 << 5
FLOW_CONN_VERDICT = 1 << 6   # the engine wrote the verdict for this connection, not the 5-tuple
FLOW_BY_CACHE = 1 << 7      # the verdict came from the name-verdict cache
# The engine's follow-up (struct hybrid_flow, follow): per direction an ON bit and a 2-bit mode.
def FOLLOW_ON(direction: int) -> int:          # noqa: N802 - the C macro's name
    return 0x10 if direction else 0x01


def FOLLOW_MODE_SHIFT(direction: int) -> int:  # noqa: N802
    return 5 if direction else 1


def FOLLOW_UNTIL(direction: int) -> int:      # noqa: N802
    return 0x80 if direction else 0x08


FOLLOW_M_MESSAGE = 0       # an HTTP request head or a DNS message starts at follow_seq
FOLLOW_M_CHUNK = 1         # an HTTP chunk-size line starts there
FOLLOW_M_BODY = 2          # a point inside a body longer than 1 GiB
SEQ_FORGET = 1 << 30       # bytes a direction carries after seq_end moved before seq_end is forgotten
RETRANS_WINDOW = 1 << 22   # a segment starting up to this far before seq_end is a retransmission

IFACE_XDP = 1 << 0

# ---- Counters -----------------------------------------------------------------------------------
CNT_XDP_PACKETS = 0
CNT_XDP_DROP_FLOW = 1
CNT_XDP_DROP_PREFIX = 2
CNT_PACKETS = 3
CNT_NOT_IP = 4
CNT_MALFORMED_L3 = 5
CNT_FLAGGED = 6
CNT_BYPASSED = 7
CNT_PASSED = 8
CNT_DROP_TC_FLOW = 9
CNT_DROP_TC_PREFIX = 10
CNT_FLOW_NEW = 11
CNT_FLOW_FULL = 12
CNT_VERDICT_EXPIRED = 13
CNT_REASON_BASE = 14
CNT_OVER_DROP = 22
CNT_OVER_PASS = 23
CNT_OVER_SOURCE = 24
CNT_OVER_GLOBAL = 25
CNT_XDP_DROP_SOURCE = 26
CNT_EVICTED_DECIDED = 27
CNT_CONN_RESTART = 28
CNT_NAME_DNS = 29
CNT_NAME_SNI = 30
CNT_NAME_HOST = 31
CNT_NAME_NONE = 32
CNT_NAME_TRUNCATED = 33
CNT_NAME_POINTER = 34
CNT_NAME_SEVERAL = 35
CNT_NAME_ODD = 36
CNT_NAME_FORM = 37
CNT_NAME_TOO_LONG = 38
CNT_CACHE_PASSED = 39
CNT_CACHE_DROPPED = 40
CNT_CACHE_MISS = 41
CNT_CACHE_EXPIRED = 42
CNT_CACHE_REFUSED = 43
CNT_CACHE_LOST = 44
CNT_NAMES_NO_PROG = 45
CNT_REASON_FOLLOW = 46
CNT_XDP_DROP_BAN = 47
CNT_DROP_TC_BAN = 48
CNT_MAX = 49

# index -> snake_case name
COUNTER_NAMES: dict[int, str] = {
    CNT_XDP_PACKETS: "xdp_packets",
    CNT_XDP_DROP_FLOW: "xdp_drop_flow",
    CNT_XDP_DROP_PREFIX: "xdp_drop_prefix",
    CNT_PACKETS: "packets",
    CNT_NOT_IP: "not_ip",
    CNT_MALFORMED_L3: "malformed_l3",
    CNT_FLAGGED: "flagged",
    CNT_BYPASSED: "bypassed",
    CNT_PASSED: "passed",
    CNT_DROP_TC_FLOW: "drop_tc_flow",
    CNT_DROP_TC_PREFIX: "drop_tc_prefix",
    CNT_FLOW_NEW: "flow_new",
    CNT_FLOW_FULL: "flow_full",
    CNT_VERDICT_EXPIRED: "verdict_expired",
    **{CNT_REASON_BASE + bit.bit_length() - 1: f"reason_{name}" for bit, name in REASON_NAMES.items()
       if bit < 1 << REASON_COUNTED_LOW},
    CNT_OVER_DROP: "over_drop",
    CNT_OVER_PASS: "over_pass",
    CNT_OVER_SOURCE: "over_source",
    CNT_OVER_GLOBAL: "over_global",
    CNT_XDP_DROP_SOURCE: "xdp_drop_source",
    CNT_EVICTED_DECIDED: "evicted_decided",
    CNT_CONN_RESTART: "conn_restart",
    CNT_NAME_DNS: "name_dns",
    CNT_NAME_SNI: "name_sni",
    CNT_NAME_HOST: "name_host",
    CNT_NAME_NONE: "name_none",
    CNT_NAME_TRUNCATED: "name_truncated",
    CNT_NAME_POINTER: "name_pointer",
    CNT_NAME_SEVERAL: "name_several",
    CNT_NAME_ODD: "name_odd",
    CNT_NAME_FORM: "name_form",
    CNT_NAME_TOO_LONG: "name_too_long",
    CNT_CACHE_PASSED: "cache_passed",
    CNT_CACHE_DROPPED: "cache_dropped",
    CNT_CACHE_MISS: "cache_miss",
    CNT_CACHE_EXPIRED: "cache_expired",
    CNT_CACHE_REFUSED: "cache_refused",
    CNT_CACHE_LOST: "cache_lost",
    CNT_NAMES_NO_PROG: "names_no_prog",
    CNT_REASON_FOLLOW: "reason_follow",
    CNT_XDP_DROP_BAN: "xdp_drop_ban",
    CNT_DROP_TC_BAN: "drop_tc_ban",
}
# The tc counters whose sum equals CNT_PACKETS (the invariant in the header).
TC_OUTCOMES = (CNT_NOT_IP, CNT_MALFORMED_L3, CNT_FLAGGED, CNT_BYPASSED, CNT_PASSED,
               CNT_DROP_TC_FLOW, CNT_DROP_TC_PREFIX, CNT_OVER_DROP, CNT_OVER_PASS, CNT_CACHE_PASSED,
               CNT_CACHE_DROPPED, CNT_DROP_TC_BAN)


def reason_counter(bit: int) -> int:
    """Counter index of a HYBRID_REASON_* bit."""
    if bit == REASON_FOLLOW:
        return CNT_REASON_FOLLOW
    return CNT_REASON_BASE + bit.bit_length() - 1


def reason_names(bits: int) -> list[str]:
    """Names of the reason bits set in ``bits``, in bit order."""
    return [name for bit, name in REASON_NAMES.items() if bits & bit]


# ---- Structs --------------------------------------------------------------------------------------
class Config(ctypes.Structure):
    _fields_ = [
        ("mark_value", ctypes.c_uint32),
        ("mark_mask", ctypes.c_uint32),
        ("reasons", ctypes.c_uint32),
        ("first_n", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("skip_reasons", ctypes.c_uint32),
        ("source_interval_ns", ctypes.c_uint64),
        ("source_tolerance_ns", ctypes.c_uint64),
        ("global_interval_ns", ctypes.c_uint64),
        ("global_tolerance_ns", ctypes.c_uint64),
    ]


class FlowKey(ctypes.Structure):
    _fields_ = [
        ("addr_lo", ctypes.c_uint8 * 16),
        ("addr_hi", ctypes.c_uint8 * 16),
        ("port_lo", ctypes.c_uint16),   # network order
        ("port_hi", ctypes.c_uint16),   # network order
        ("vlan", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8),
    ]


class Flow(ctypes.Structure):
    _fields_ = [
        ("first_seen_ns", ctypes.c_uint64),
        ("last_seen_ns", ctypes.c_uint64),
        ("verdict_expires_ns", ctypes.c_uint64),
        ("packets", ctypes.c_uint64 * 2),
        ("bytes", ctypes.c_uint64 * 2),
        ("payload_packets", ctypes.c_uint32 * 2),
        ("flagged", ctypes.c_uint32),
        ("verdict", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("ttl_max", ctypes.c_uint8 * 2),    # per direction: the highest IPv4 TTL / IPv6 hop limit
        ("seq_end", ctypes.c_uint32 * 2),
        ("isn", ctypes.c_uint32 * 2),       # per direction, with FLOW_ISN0/1: the SYN's, the SYN-ACK's
        ("seq_bytes", ctypes.c_uint32 * 2),  # per direction: bytes[dir] (low 32 bits) when seq_end moved
        ("follow_seq", ctypes.c_uint32 * 2),  # per direction: where the next message starts (FOLLOW_ON)
        ("until_seq", ctypes.c_uint32 * 2),   # per direction: a byte budget's end (FOLLOW_UNTIL)
        ("follow", ctypes.c_uint8),         # FOLLOW_ON(dir) bits and the FOLLOW_M_* modes
        ("_pad0", ctypes.c_uint8 * 7),
    ]


class PrefixKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
    ]


class Prefix(ctypes.Structure):
    _fields_ = [
        ("action", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint32),
    ]


class Ban(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),    # CLOCK_MONOTONIC, the effective expiry; 0 = never
    ]


class Iface(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class AddrKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
    ]


class Bucket(ctypes.Structure):
    _fields_ = [
        ("tat_ns", ctypes.c_uint64),
    ]


class PinnedVerdict(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),
        ("verdict", ctypes.c_uint8),
        ("origin", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8 * 6),
    ]


class Stats(ctypes.Structure):
    _fields_ = [
        ("c", ctypes.c_uint64 * CNT_MAX),
    ]


# ---- Names (bpf/names.h) ----------------------------------------------------------------------
NAME_MAX = 253
NAME_LEN = 256
NAME_SCAN = 2048
NAME_DNS = 1
NAME_SNI = 2
NAME_HOST = 3
NAME_KINDS = {NAME_DNS: "dns", NAME_SNI: "sni", NAME_HOST: "host"}
# The counters of one name attempt: a name read (by kind), or why not.
NAME_READ = {NAME_DNS: CNT_NAME_DNS, NAME_SNI: CNT_NAME_SNI, NAME_HOST: CNT_NAME_HOST}
NAME_COUNTERS = tuple(range(CNT_NAME_DNS, CNT_NAME_TOO_LONG + 1))


class NameKey(ctypes.Structure):
    _fields_ = [
        ("generation", ctypes.c_uint32),
        ("port", ctypes.c_uint16),      # host order
        ("proto", ctypes.c_uint8),
        ("kind", ctypes.c_uint8),
        ("len", ctypes.c_uint16),
        ("_pad0", ctypes.c_uint8 * 6),
        ("name", ctypes.c_uint8 * NAME_LEN),
    ]


class NameScratch(ctypes.Structure):
    _fields_ = [
        ("key", NameKey),
        ("attempts", ctypes.c_uint64),
        ("result", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("st", ctypes.c_uint32),
        ("pos", ctypes.c_uint32),
        ("out", ctypes.c_uint32),
        ("a", ctypes.c_uint32),
        ("b", ctypes.c_uint32),
        ("c", ctypes.c_uint32),
        ("save", ctypes.c_uint8 * 192),
        ("csum", ctypes.c_uint8 * 104),
        ("buf", ctypes.c_uint8 * NAME_SCAN),
    ]


# ---- The name-verdict cache (bpf/namecache.h) -------------------------------------------------
NAME_CACHE_SIZE = 16384
NAME_EVENTS_SIZE = 256 * 1024
NAME_ACT_ACCEPT = 1
NAME_ACT_DROP = 2
NAME_ACTIONS = {NAME_ACT_ACCEPT: "accept", NAME_ACT_DROP: "drop"}


class NameVerdict(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),
        ("flow_ttl_ns", ctypes.c_uint64),
        ("hits", ctypes.c_uint64),
        ("rule", ctypes.c_uint32),
        ("action", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("follow", ctypes.c_uint8),         # 1: a passed packet moves the flow's follow-up
        ("_pad0", ctypes.c_uint8),
    ]


class NameState(ctypes.Structure):
    _fields_ = [
        ("generation", ctypes.c_uint32),
        ("rules_digest", ctypes.c_uint32),
    ]


class NameEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("flow", FlowKey),
        ("ifindex", ctypes.c_uint32),
        ("rule", ctypes.c_uint32),
        ("generation", ctypes.c_uint32),
        ("payload_len", ctypes.c_uint32),
        ("action", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("kind", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("len", ctypes.c_uint16),
        ("name", ctypes.c_uint8 * NAME_LEN),
    ]


# Sizes stated in the header (checked by the unit tests against ctypes, and by the bpf tests
# against bcc).
SIZES = {Config: 56, FlowKey: 40, Flow: 120, PrefixKey: 20, Prefix: 8, Ban: 8, Iface: 8, AddrKey: 16, Bucket: 8,
         PinnedVerdict: 16, Stats: 392, NameKey: 272, NameScratch: 2656, NameVerdict: 32, NameState: 8,
         NameEvent: 328}

# map name -> (key type, value type); value is per CPU for hybrid_stats.
MAP_LAYOUTS: dict[str, tuple[type, type]] = {
    MAP_CONFIG: (ctypes.c_uint32, Config),
    MAP_FLOWS: (FlowKey, Flow),
    MAP_PREFIXES: (PrefixKey, Prefix),
    MAP_PORTS: (ctypes.c_uint32, ctypes.c_uint8),
    MAP_IFACES: (ctypes.c_uint32, Iface),
    MAP_STATS: (ctypes.c_uint32, Stats),
    MAP_SOURCES: (AddrKey, Bucket),
    MAP_BUDGET: (ctypes.c_uint32, Bucket),
    MAP_PINNED: (FlowKey, PinnedVerdict),
    MAP_BANS: (PrefixKey, Ban),
    MAP_NAMES_SCRATCH: (ctypes.c_uint32, NameScratch),
    MAP_NAME_CACHE: (NameKey, NameVerdict),
    MAP_NAME_STATE: (ctypes.c_uint32, NameState),
}
PERCPU_MAPS = frozenset({MAP_STATS, MAP_NAMES_SCRATCH})
