/* SPDX-License-Identifier: GPL-2.0 */
/* hybrid_common.h: constants, map names and map key/value layouts shared by the BPF programs
 * (bpf/hybrid.bpf.c) and userspace. hybrid/kernel/abi.py mirrors this file: change both, and
 * tests/bpf/test_abi.py proves they agree (sizes and field offsets as compiled by bcc), and
 * tests/unit/test_abi_pure.py checks every #define against the mirror without root.
 *
 * Rules for everything in here: fixed-width types only, explicit padding, no pointers, no
 * bitfields, every struct a multiple of 8 bytes. Byte order is stated on every field.
 *
 * Division of labour (why two programs, and how they talk):
 *   hybrid_xdp         (XDP)           drop checks only: bans, blocked prefixes and flows whose
 *                                      verdict is BLOCK. Lookups, never writes to the flow table.
 *   hybrid_tc_ingress  (tc clsact in)  full classification: flow table update, flag reasons,
 *                                      the mark (an skb exists here; XDP cannot set skb->mark).
 * XDP learns what to drop from the maps (ban and prefix tries, flow table), not from metadata:
 * data_meta is unsupported by several drivers' native XDP, and a packet must never go
 * unclassified because of the NIC it arrived on. tc enforces blocks too, so an interface
 * attached without XDP (or a packet that raced a new BLOCK verdict) still drops at tc.
 */
#ifndef HYBRID_COMMON_H
#define HYBRID_COMMON_H

/* ---- Load-time knobs (bcc -D flags; defaults here) ------------------------------------------ */
#ifndef HYBRID_FLOW_TABLE_SIZE
#define HYBRID_FLOW_TABLE_SIZE 131072   /* LRU: the least recently used flow is evicted when full */
#endif /* HYBRID_FLOW_TABLE_SIZE */
#ifndef HYBRID_PREFIX_TABLE_SIZE
#define HYBRID_PREFIX_TABLE_SIZE 16384
#endif /* HYBRID_PREFIX_TABLE_SIZE */
#ifndef HYBRID_BAN_TABLE_SIZE
#define HYBRID_BAN_TABLE_SIZE 131072    /* LPM trie of bans: a 100,000-decision blocklist fits */
#endif /* HYBRID_BAN_TABLE_SIZE */
#ifndef HYBRID_PINNED_TABLE_SIZE
#define HYBRID_PINNED_TABLE_SIZE 65536  /* hash, not LRU: a full table refuses userspace's insert */
#endif /* HYBRID_PINNED_TABLE_SIZE */
#ifndef HYBRID_SOURCE_TABLE_SIZE
#define HYBRID_SOURCE_TABLE_SIZE 65536  /* LRU: per-source admission buckets */
#endif /* HYBRID_SOURCE_TABLE_SIZE */
/* HYBRID_PIN_DIR: when defined (a string literal, a directory on a bpffs), every map is created
 * pinned there, or reopened if a pin already exists (state survives a restart of the tool). */

#define HYBRID_MAX_IFACES 64            /* stats slots; slot 0 counts unregistered interfaces */
#define HYBRID_MAX_VLAN_DEPTH 2         /* 802.1Q / 802.1ad tags parsed */
#define HYBRID_MAX_IPV6_EXT 6           /* IPv6 extension headers walked before giving up */

/* ---- Map names (bcc table names; also the pin file names) ----------------------------------- */
#define HYBRID_MAP_CONFIG   "hybrid_config"    /* array[1]  of struct hybrid_config */
#define HYBRID_MAP_FLOWS    "hybrid_flows"     /* lru_hash  struct hybrid_flow_key -> struct hybrid_flow */
#define HYBRID_MAP_PREFIXES "hybrid_prefixes"  /* lpm_trie  struct hybrid_prefix_key -> struct hybrid_prefix */
#define HYBRID_MAP_PORTS    "hybrid_ports"     /* array[65536] of __u8 HYBRID_PORT_* bits, index = port (host order) */
#define HYBRID_MAP_IFACES   "hybrid_ifaces"    /* hash      __u32 ifindex -> struct hybrid_iface */
#define HYBRID_MAP_STATS    "hybrid_stats"     /* percpu_array[HYBRID_MAX_IFACES] of struct hybrid_stats */
#define HYBRID_MAP_SOURCES  "hybrid_sources"   /* lru_hash  struct hybrid_addr_key -> struct hybrid_bucket */
#define HYBRID_MAP_BUDGET   "hybrid_budget"    /* array[1]  of struct hybrid_bucket (the global budget) */
#define HYBRID_MAP_PINNED   "hybrid_pinned"    /* hash      struct hybrid_flow_key -> struct hybrid_pinned_verdict */
#define HYBRID_MAP_BANS     "hybrid_bans"      /* lpm_trie  struct hybrid_prefix_key -> struct hybrid_ban */

/* ---- Program names --------------------------------------------------------------------------- */
#define HYBRID_PROG_XDP "hybrid_xdp"
#define HYBRID_PROG_TC  "hybrid_tc_ingress"

/* ---- Flow verdict states (struct hybrid_flow.verdict) ---------------------------------------- */
#define HYBRID_VERDICT_NONE    0  /* classified by the flag policy below */
#define HYBRID_VERDICT_INSPECT 1  /* every packet is flagged (the engine asked to keep looking) */
#define HYBRID_VERDICT_BYPASS  2  /* never flagged: the engine has decided, traffic stays in kernel */
#define HYBRID_VERDICT_BLOCK   3  /* dropped at XDP (or at tc when no XDP is attached) */

/* ---- Pinned verdicts (hybrid_pinned) ---------------------------------------------------
 * The flow table is an LRU: it never refuses an insert, it evicts, so a flood of new 5-tuples
 * would push BLOCK entries out and unblock their flows without a trace. Every BLOCK (the
 * engine's and the operator's) is therefore also written to hybrid_pinned, a plain hash
 * the datapath never inserts into, so nothing but userspace and expiry removes an entry.
 * Userspace writes the flow table entry first and the pinned entry second; so a flow missing
 * from the flow table while its pinned entry exists has been evicted (or deleted by userspace).
 * tc consults the pinned table only when it creates an entry (a miss): a live pinned verdict is
 * copied into the new entry, and HYBRID_CNT_EVICTED_DECIDED counts the restore; an expired one
 * is deleted. XDP does not look: the first packet after an eviction drops at tc, which restores
 * the entry, and the next ones drop at XDP again (flow_blocked_pkt() says why).
 * A full pinned table refuses userspace's insert (E2BIG): counted and reported, never silent.
 * An ENGINE pin is a verdict on one connection (HYBRID_FLOW_CONN_VERDICT): a bare SYN that
 * misses in the flow table is a new connection, so tc deletes the pin instead of restoring it;
 * any other packet restores it with HYBRID_FLOW_CONN_VERDICT set. A MANUAL pin is restored
 * on any packet, SYN or not (the operator blocked the 5-tuple). */
#define HYBRID_PIN_ENGINE 1  /* struct hybrid_pinned_verdict.origin: the verdict engine's BLOCK */
#define HYBRID_PIN_MANUAL 2  /* an operator's verdict (hybridctl block) */

/* ---- Flag reasons: bit masks in hybrid_config.reasons and in the per-reason counters --------- */
#define HYBRID_REASON_SYN        (1U << 0)  /* TCP SYN without ACK: a new connection */
#define HYBRID_REASON_FIRST_N    (1U << 1)  /* one of the first N payload packets of its direction */
#define HYBRID_REASON_PORT       (1U << 2)  /* either port of the flow is watched */
#define HYBRID_REASON_PREFIX     (1U << 3)  /* source or destination in a watched prefix */
#define HYBRID_REASON_SUSPICIOUS (1U << 4)  /* impossible TCP flag combination (see below) */
#define HYBRID_REASON_FRAGMENT   (1U << 5)  /* IP fragment: ports unknown, netfilter reassembles it */
#define HYBRID_REASON_INSPECT    (1U << 6)  /* flow in INSPECT state */
#define HYBRID_REASON_MALFORMED  (1U << 7)  /* valid IP header, unparseable transport header */
#define HYBRID_REASON_FOLLOW     (1U << 8)  /* the engine follows the flow's messages (struct hybrid_flow,
                                             * follow): the packet reaches its direction's next one */
#define HYBRID_REASON_COUNT      9
#define HYBRID_REASONS_ALL       ((1U << HYBRID_REASON_COUNT) - 1)
/* Counters: HYBRID_CNT_REASON_BASE + bit index for the first HYBRID_REASON_COUNTED_LOW reasons;
 * HYBRID_REASON_FOLLOW, added later, has its own index (HYBRID_CNT_REASON_FOLLOW). */
#define HYBRID_REASON_COUNTED_LOW 8

/* Suspicious TCP flags (HYBRID_REASON_SUSPICIOUS), tested on the 8 flag bits:
 *   none set (NULL scan); SYN+FIN; SYN+RST; FIN+RST; FIN+PSH+URG (Xmas); FIN without ACK. */

/* ---- hybrid_config.flags ---------------------------------------------------------------------- */
#define HYBRID_CFG_HAVE_PREFIXES (1U << 0)  /* the prefix trie is non-empty: skip lookups otherwise */
#define HYBRID_CFG_HAVE_PORTS    (1U << 1)  /* some port is watched: skip the array lookup otherwise */
#define HYBRID_CFG_OVER_DROP     (1U << 2)  /* over budget and no payload: drop (else pass unflagged) */
#define HYBRID_CFG_NAMES         (1U << 3)  /* read the name of first payloads (bpf/names.h) */
#define HYBRID_CFG_HAVE_BANS     (1U << 4)  /* the ban trie is non-empty: skip lookups otherwise */

/* ---- Bans (hybrid_bans) ------------------------------------------------------------------------
 * Prefixes banned by the fleet (CrowdSec decisions, hybrid/fleet/bantable.py), each with a TTL:
 * a packet whose source OR destination lies in a live ban is dropped at XDP
 * (HYBRID_CNT_XDP_DROP_BAN) and at tc (HYBRID_CNT_DROP_TC_BAN, for interfaces without XDP),
 * before any flow-table work. A ban is live while expires_ns is 0 or later than now; an
 * expired entry drops nothing and stays until userspace deletes it. The trie answers with the
 * longest match only, so userspace writes every entry with its EFFECTIVE expiry: the latest of
 * every ban on that prefix or on any prefix covering it (a /32 that expires before its /24 must
 * not open a hole in the /24). Same key as hybrid_prefixes (IPv4 mapped); a separate trie
 * because bans come and go by the thousand and carry a TTL, which the operator's prefixes do
 * not. Only userspace writes it. */

/* ---- Admission control ------------------------------------------------------------------------
 * Budgets on flagged packets, so that no traffic can flood the engine (and its queue, whose
 * overflow would pass packets uninspected with fail-open). Both are GCRA token buckets: a bucket
 * holds a theoretical arrival time (tat); a packet is admitted when tat - now <= tolerance, and
 * then tat = max(tat, now) + interval. interval = 1 s / rate; tolerance = interval * (burst - 1).
 *   per source  (hybrid_sources, keyed by source address): charged by the first flagged packet
 *               of each flow (its flow entry has flagged nothing yet, is new or restarted), and
 *               by fragments and unparseable transports: the flows a source sends to the engine;
 *   global      (hybrid_budget, one bucket shared by all CPUs): charged by every flagged packet.
 *               Only flagged packets touch it, so its cache line moves at most at the budget's
 *               rate. Low-priority packets are admitted only while at most half the tolerance
 *               is used: those of flow entries created by this very packet (a SYN, a new UDP
 *               flow: spoofable), and those flagged only because every packet of their flow is
 *               (watched port or prefix, INSPECT). So neither a spoofed flood nor one heavy
 *               flow can starve the first payload packets of the other flows.
 * Over budget: a packet that carries payload is dropped (TCP retransmits it; it is never passed
 * uninspected: a flood must not be a way past the engine); a packet without payload (a SYN, a
 * bare ACK) is dropped with HYBRID_CFG_OVER_DROP, else passed unflagged: the engine still sees
 * the flow's first payload. Neither consumes the flow's first-N budget. An interval of 0 turns a
 * budget off. With OVER_DROP, XDP also drops SYNs of a source whose bucket is over budget. */

/* ---- hybrid_ports values ---------------------------------------------------------------------- */
#define HYBRID_PORT_TCP (1U << 0)
#define HYBRID_PORT_UDP (1U << 1)

/* ---- hybrid_prefix.action bits ---------------------------------------------------------------- */
#define HYBRID_PREFIX_WATCH (1U << 0)  /* flag every packet from or to it (until bypass/block) */
#define HYBRID_PREFIX_BLOCK (1U << 1)  /* drop every packet from or to it at XDP */

/* ---- hybrid_flow.flags ------------------------------------------------------------------------ */
#define HYBRID_FLOW_ORIG_HI   (1U << 0)  /* the first packet seen came from the "hi" endpoint */
#define HYBRID_FLOW_MIDSTREAM (1U << 1)  /* TCP flow first seen on a non-SYN (existed before attach) */
#define HYBRID_FLOW_SEQ0      (1U << 2)  /* seq_end[0] is set (TCP: direction 0 has flagged payload) */
#define HYBRID_FLOW_SEQ1      (1U << 3)  /* seq_end[1] is set */
#define HYBRID_FLOW_ISN0      (1U << 4)  /* isn[0] is set (a bare SYN or a SYN-ACK came from lo) */
#define HYBRID_FLOW_ISN1      (1U << 5)  /* isn[1] is set */
/* The verdict was written by the engine for this connection (Maps.write_verdict(conn_scoped=
 * True)), not for the 5-tuple: a bare SYN whose sequence number is not the recorded isn of its
 * direction is a new connection, and starts the entry over whatever the verdict (a BLOCK too:
 * XDP lets that SYN through to tc), deleting the flow's ENGINE pin. A retransmitted SYN (the
 * same sequence number) changes nothing. Without the flag (an operator's verdict), a bare SYN
 * starts over any entry but one in a live BLOCK, retransmitted or not. */
#define HYBRID_FLOW_CONN_VERDICT (1U << 6)
/* The verdict was taken from the name-verdict cache (namecache.h), not written by the engine
 * (which clears it when it writes one). */
#define HYBRID_FLOW_BY_CACHE (1U << 7)

/* ---- Names (bpf/names.h) ---------------------------------------------------------------------
 * On a flagged first payload packet of a flow in the direction that opened it (built with
 * -DHYBRID_NAMES and HYBRID_CFG_NAMES set), a parser program copies up to HYBRID_NAME_SCAN
 * payload bytes into a per-CPU scratch (hybrid_scratch) and reads the name the engine would read
 * (hybrid/engine/packet.py), or gives up with a HYBRID_CNT_NAME_* reason: UDP to port 53 and TCP
 * to port 53 (2-byte length, exactly one message): the DNS question name; other TCP: a TLS
 * ClientHello alone in one handshake record (server_name), or an HTTP/1.x origin-form request
 * whose head ends in the packet, with nothing after it or a body one Content-Length covers
 * (Host). Names are ASCII [a-z0-9._-] after lower-casing, 1..HYBRID_NAME_MAX long. */
#define HYBRID_MAP_NAMES_SCRATCH "hybrid_scratch"  /* percpu_array[1] of struct hybrid_name_scratch */
#define HYBRID_NAME_MAX   253   /* characters of a name tc reads (DNS: 255 wire bytes = 253 dotted) */
#define HYBRID_NAME_LEN   256   /* bytes of hybrid_name_key.name */
#define HYBRID_NAME_SCAN  2048  /* payload bytes tc copies and reads at most (a power of 2) */
#define HYBRID_NAME_DNS   1     /* hybrid_name_key.kind: a DNS query name */
#define HYBRID_NAME_SNI   2     /* a TLS ClientHello server_name */
#define HYBRID_NAME_HOST  3     /* an HTTP/1.x Host */

/* ---- The name-verdict cache (bpf/namecache.h) -------------------------------------------------
 * Compiled in only with -DHYBRID_NAMES (the attach option name_cache). The names parsers run
 * in their own programs, tail-called from hybrid_tc_ingress on a flow's first payload packet
 * (each program is verified alone: the parsers do not weigh on the main program's budget).
 * After a name is read, its key (hybrid_name_key, under the current generation) is looked up in
 * hybrid_names, which ONLY the engine writes (hybrid/engine/namecache.py works out which
 * decisions a name alone decides; the kernel never caches anything itself). A live entry
 * decides the packet in the kernel, unless the engine would doubt it (the packet's transport
 * checksum unverified, a TTL below its direction's highest, TCP bytes that do not start the
 * stream, no handshake seen): then the packet goes to the engine as before. Every decision
 * taken from the cache is reported to the engine through hybrid_name_ev (a ring buffer; a
 * full ring is counted in HYBRID_CNT_CACHE_LOST). A rules reload bumps the generation in
 * hybrid_name_gen: every older entry stops matching at once. */
#define HYBRID_MAP_NAME_CACHE  "hybrid_names"       /* lru_hash: hybrid_name_key -> hybrid_name_verdict */
#define HYBRID_MAP_NAME_STATE  "hybrid_name_gen"  /* array[1] of struct hybrid_name_gen */
#define HYBRID_MAP_NAME_EVENTS "hybrid_name_ev" /* ringbuf of struct hybrid_name_event */
#define HYBRID_MAP_NAME_PROGS  "hybrid_name_prg"  /* prog_array: the parser programs (pinned) */
#define HYBRID_NAME_CACHE_SIZE 16384  /* entries in hybrid_names (LRU: the least used is evicted) */
#define HYBRID_NAME_EVENTS_SIZE (256 * 1024)  /* bytes of the event ring (a power of 2 of pages) */
#define HYBRID_NAME_PROG_DNS_TLS 0   /* hybrid_name_prg index: DNS and TLS (hybrid_tc_names) */
#define HYBRID_NAME_PROG_HTTP    1   /* HTTP Host (hybrid_tc_names_http) */
#define HYBRID_NAME_PROGS        2
#define HYBRID_NAME_ACT_ACCEPT 1     /* hybrid_name_verdict.action: pass the packet */
#define HYBRID_NAME_ACT_DROP   2     /* drop it */

/* ---- hybrid_iface.flags ----------------------------------------------------------------------- */
#define HYBRID_IFACE_XDP (1U << 0)  /* an XDP program is attached here too (informational) */

/* ---- Counters: index into struct hybrid_stats.c ----------------------------------------------
 * XDP counts XDP_*; tc counts the rest. Invariant at tc, per interface:
 *   PACKETS = NOT_IP + MALFORMED_L3 + FLAGGED + BYPASSED + PASSED + DROP_TC_FLOW + DROP_TC_PREFIX
 *           + OVER_DROP + OVER_PASS + CACHE_PASSED + CACHE_DROPPED + DROP_TC_BAN
 * and FLAGGED <= sum(REASON_*) (a packet may have several reasons; each is counted). */
#define HYBRID_CNT_XDP_PACKETS     0   /* packets seen by hybrid_xdp */
#define HYBRID_CNT_XDP_DROP_FLOW   1   /* dropped at XDP: flow verdict BLOCK */
#define HYBRID_CNT_XDP_DROP_PREFIX 2   /* dropped at XDP: source or destination in a blocked prefix */
#define HYBRID_CNT_PACKETS         3   /* packets seen by hybrid_tc_ingress */
#define HYBRID_CNT_NOT_IP          4   /* passed unclassified: not IPv4/IPv6 (ARP, LLDP, ...) */
#define HYBRID_CNT_MALFORMED_L3    5   /* passed unflagged: truncated/invalid IP header; the stack drops it */
#define HYBRID_CNT_FLAGGED         6   /* marked for the queue, any reason */
#define HYBRID_CNT_BYPASSED        7   /* not flagged because the flow is in BYPASS */
#define HYBRID_CNT_PASSED          8   /* not flagged: no reason applied */
#define HYBRID_CNT_DROP_TC_FLOW    9   /* dropped at tc: flow verdict BLOCK */
#define HYBRID_CNT_DROP_TC_PREFIX  10  /* dropped at tc: blocked prefix */
#define HYBRID_CNT_FLOW_NEW        11  /* flow table entries created */
#define HYBRID_CNT_FLOW_FULL       12  /* flow table insert failed (packet still classified, uncounted) */
#define HYBRID_CNT_VERDICT_EXPIRED 13  /* verdicts that reached their expiry and reverted to NONE */
#define HYBRID_CNT_REASON_BASE     14  /* HYBRID_CNT_REASON_BASE + bit index of HYBRID_REASON_* */
#define HYBRID_CNT_OVER_DROP       22  /* outcome: over an admission budget, dropped at tc */
#define HYBRID_CNT_OVER_PASS       23  /* outcome: over an admission budget, passed unflagged */
#define HYBRID_CNT_OVER_SOURCE     24  /* event: the per-source budget refused a packet */
#define HYBRID_CNT_OVER_GLOBAL     25  /* event: the global budget refused a packet */
#define HYBRID_CNT_XDP_DROP_SOURCE 26  /* dropped at XDP: a SYN from a source over its budget */
#define HYBRID_CNT_EVICTED_DECIDED 27  /* event: a decided entry was evicted from the flow table and
                                        * restored from hybrid_pinned */
#define HYBRID_CNT_CONN_RESTART    28  /* event: a bare SYN with a new sequence number started over an
                                        * entry with a connection-scoped verdict (CONN_VERDICT) */
/* Names (bpf/names.h): one per first payload packet of a flow's opening direction that tc
 * read a name in (DNS, SNI, HOST) or gave up on (the other NAME_* say why; the engine then
 * reads the packet as before). Not events: counted through tc_packet.name_cnt. */
#define HYBRID_CNT_NAME_DNS        29  /* a DNS query name read */
#define HYBRID_CNT_NAME_SNI        30  /* a TLS ClientHello server_name read */
#define HYBRID_CNT_NAME_HOST       31  /* an HTTP/1.x Host read */
#define HYBRID_CNT_NAME_NONE       32  /* no name there: not DNS/TLS/HTTP, or a request without one */
#define HYBRID_CNT_NAME_TRUNCATED  33  /* the packet does not hold the whole message/head/record */
#define HYBRID_CNT_NAME_POINTER    34  /* a DNS name with a compression pointer */
#define HYBRID_CNT_NAME_SEVERAL    35  /* several questions, Host lines, server_names, records or
                                        * bytes after the message/head */
#define HYBRID_CNT_NAME_ODD        36  /* a byte outside the name alphabet, odd whitespace or line
                                        * ends, non-ASCII, NUL */
#define HYBRID_CNT_NAME_FORM       37  /* a shape tc does not read: absolute-form or odd targets,
                                        * leading empty lines, a response, another version,
                                        * label types, too many extensions, a short UDP length */
#define HYBRID_CNT_NAME_TOO_LONG   38  /* more than HYBRID_NAME_MAX characters, or than HYBRID_NAME_SCAN
                                        * payload bytes */
/* The name-verdict cache. Outcomes (one per packet, in the tc invariant): */
#define HYBRID_CNT_CACHE_PASSED    39  /* outcome: passed unflagged on a cached decision */
#define HYBRID_CNT_CACHE_DROPPED   40  /* outcome: dropped on a cached decision */
/* ... and, per name read, what the cache gave (counted through tc_packet.cache_cnt): */
#define HYBRID_CNT_CACHE_MISS      41  /* no entry under the current generation: to the engine */
#define HYBRID_CNT_CACHE_EXPIRED   42  /* an entry past its expiry (deleted): to the engine */
#define HYBRID_CNT_CACHE_REFUSED   43  /* an entry, but a packet the engine would doubt: to the engine */
#define HYBRID_CNT_CACHE_LOST      44  /* a cached decision whose event found the ring full */
#define HYBRID_CNT_NAMES_NO_PROG   45  /* a name wanted, but the parser program was not there */
#define HYBRID_CNT_REASON_FOLLOW   46  /* flagged packets with HYBRID_REASON_FOLLOW */
#define HYBRID_CNT_XDP_DROP_BAN    47  /* dropped at XDP: source or destination in a live ban */
#define HYBRID_CNT_DROP_TC_BAN     48  /* outcome: dropped at tc, source or destination in a live ban */
#define HYBRID_CNT_MAX             49

/* ---- Structs ---------------------------------------------------------------------------------- */

/* The one configuration entry. Written by userspace at attach (and later to change knobs),
 * read by both programs on every packet. */
struct hybrid_config {
	__u32 mark_value;   /* host order; bits ORed into skb->mark of flagged packets (within mask) */
	__u32 mark_mask;    /* host order; the bits hybrid owns: new = (value & mask) | (old & ~mask) */
	__u32 reasons;      /* HYBRID_REASON_* bits that may flag a packet */
	__u32 first_n;      /* payload-carrying packets flagged per direction at a flow's start */
	__u32 flags;        /* HYBRID_CFG_* */
	__u32 skip_reasons; /* reasons the running engine declared it needs no packets for (its
	                     * rules decide nothing on them); flagged = reasons & ~skip_reasons */
	__u64 source_interval_ns;   /* per-source admission: 1 s / rate; 0 = off */
	__u64 source_tolerance_ns;  /* interval * (burst - 1) */
	__u64 global_interval_ns;   /* global admission: 1 s / rate; 0 = off */
	__u64 global_tolerance_ns;  /* interval * (burst - 1) */
};                          /* 56 bytes */

/* Direction-independent flow key. Addresses are IPv6 or IPv4-mapped IPv6 (::ffff:a.b.c.d),
 * network byte order. The (address, port) pair that compares lower (memcmp of the address, then
 * port as a host-order number) is "lo", the other "hi"; a packet from lo travels direction 0. */
struct hybrid_flow_key {
	__u8  addr_lo[16];  /* network order */
	__u8  addr_hi[16];  /* network order */
	__u16 port_lo;      /* network order; ICMP/ICMPv6 echo: the identifier; other ICMP: 0 */
	__u16 port_hi;      /* network order; as port_lo */
	__u16 vlan;         /* host order; outer VLAN id (12 bits), 0 when untagged */
	__u8  proto;        /* IPPROTO_* */
	__u8  _pad0;
};                          /* 40 bytes */

struct hybrid_flow {
	__u64 first_seen_ns;       /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 last_seen_ns;        /* CLOCK_MONOTONIC */
	__u64 verdict_expires_ns;  /* CLOCK_MONOTONIC; verdict reverts to NONE at this time; 0 = never */
	__u64 packets[2];          /* per direction (0: from lo, 1: from hi) */
	__u64 bytes[2];            /* per direction, L3 length */
	__u32 payload_packets[2];  /* per direction: packets with transport payload (first-N budget) */
	__u32 flagged;             /* packets of this flow flagged for the queue */
	__u8  verdict;             /* HYBRID_VERDICT_* */
	__u8  flags;               /* HYBRID_FLOW_* */
	/* Per direction, the highest IPv4 TTL / IPv6 hop limit of the flow's packets as tc received
	 * them (0: none seen). A packet arriving with less than its direction's highest may expire
	 * between the gateway and the server: the insertion of a benign head the server never
	 * sees. Written only when a packet raises it, without atomics (racing CPUs may keep the
	 * lower of two new highs: the fact errs towards "low TTL", i.e. more doubt, never less). */
	__u8  ttl_max[2];
	/* TCP, per direction: the end (seq + payload length, host order) of the furthest payload
	 * flagged under the first-N budget (valid with HYBRID_FLOW_SEQ0/1). A segment starting
	 * before it is a retransmission of inspected bytes and is flagged again without spending
	 * the budget: otherwise a packet the engine dropped would come back, spend the budget
	 * retransmission by retransmission, and pass unflagged once it was spent. */
	__u32 seq_end[2];
	/* TCP, per direction, host order: the initial sequence number, from the bare SYN (the
	 * originator's direction) and the SYN-ACK (the other one), valid with HYBRID_FLOW_ISN0/1;
	 * the stream's first byte is isn + 1. Both set: the handshake was seen. Each is the first
	 * SYN-carrying segment of its direction since the entry (re)started: a bare SYN opening a
	 * new connection starts the entry over first (flow_track(); not on an operator's live
	 * BLOCK), and a later, spoofed SYN-ACK cannot move the server's stream start.
	 * What was seen at the gateway, not what the endpoints agreed on: a sender can forge both. */
	__u32 isn[2];
	/* TCP, per direction: the low 32 bits of bytes[dir] when seq_end[dir] was last moved. Once
	 * the direction has carried HYBRID_SEQ_FORGET bytes more, seq_end is forgotten (its flag
	 * cleared): a retransmission cannot come that late (no TCP window is larger), and a
	 * stream that wraps its sequence numbers would otherwise pass through the window before
	 * seq_end again every 4 GiB. Bytes, not sequence numbers: a sender cannot move this clock
	 * with one far-ahead segment, only by sending that many bytes through the gateway. */
	__u32 seq_bytes[2];
	/* The engine's follow-up (hybrid/engine/follow.py), per direction: with
	 * HYBRID_FOLLOW_ON(dir) in follow, the engine wants the packet that carries the
	 * direction's next message: for TCP, any payload packet that reaches follow_seq[dir] (host
	 * order: where the next HTTP request head or DNS message starts, or a point in a long body
	 * the engine marked), i.e. (s32)(seq + payload_len - follow_seq) > 0; for UDP, every
	 * payload packet (each datagram is a message). Packets before it keep the flow's verdict
	 * (BYPASS: not queued). Applies with the verdicts NONE and BYPASS; only the engine writes
	 * it (tc reads it), within 1 GiB of the bytes it decided, so the signed comparison holds. */
	__u32 follow_seq[2];
	/* TCP, per direction, with HYBRID_FOLLOW_UNTIL(dir) in follow: a rule's byte budget
	 * (inspect_bytes): every payload packet that starts before until_seq[dir] (host order) is
	 * queued, (s32)(seq - until_seq) < 0, whatever the verdict but BLOCK. */
	__u32 until_seq[2];
	__u8  follow;       /* HYBRID_FOLLOW_ON(dir) and HYBRID_FOLLOW_UNTIL(dir) bits, and per direction
	                     * what starts at follow_seq (the mode, for the engine; tc reads the bits) */
	__u8  _pad0[7];
};                                 /* 120 bytes */

#define HYBRID_SEQ_FORGET (1U << 30)
#define HYBRID_FOLLOW_ON(dir) ((dir) ? 0x10U : 0x01U)
#define HYBRID_FOLLOW_MODE_SHIFT(dir) ((dir) ? 5 : 1)  /* 2 bits: HYBRID_FOLLOW_M_* */
#define HYBRID_FOLLOW_UNTIL(dir) ((dir) ? 0x80U : 0x08U)
#define HYBRID_FOLLOW_M_MESSAGE 0  /* an HTTP request head or a DNS message starts at follow_seq */
#define HYBRID_FOLLOW_M_CHUNK   1  /* an HTTP chunk-size line starts there (a chunked body) */
#define HYBRID_FOLLOW_M_BODY    2  /* a point inside a body longer than 1 GiB (the engine knows the rest) */

/* How far before seq_end a segment may start and still count as a retransmission of inspected
 * bytes: the flagged range is at most N GSO packets (3 x 64 KiB by default). Sequence numbers
 * are compared only within this window: a flow that has moved on by more than 2 GiB would
 * otherwise look "before" seq_end again. (Every 4 GiB a segment may fall in the window once and
 * be flagged: one extra packet queued, never one fewer.) */
#define HYBRID_RETRANS_WINDOW (1U << 22)

/* LPM trie key: prefixlen counts bits of addr. IPv4 prefixes are stored IPv4-mapped, so
 * 198.18.0.0/15 is ::ffff:198.18.0.0/111 (96 + 15). */
struct hybrid_prefix_key {
	__u32 prefixlen;    /* host order */
	__u8  addr[16];     /* network order */
};                          /* 20 bytes (the kernel requires exactly this layout: no padding) */

struct hybrid_prefix {
	__u32 action;       /* HYBRID_PREFIX_* */
	__u32 _pad0;
};                          /* 8 bytes */

/* A ban's value (hybrid_bans). */
struct hybrid_ban {
	__u64 expires_ns;   /* CLOCK_MONOTONIC, as bpf_ktime_get_ns(); the effective expiry (see
	                     * "Bans"); 0 = never */
};                          /* 8 bytes */

struct hybrid_iface {
	__u32 slot;         /* index into hybrid_stats, 1..HYBRID_MAX_IFACES-1 */
	__u32 flags;        /* HYBRID_IFACE_* */
};                          /* 8 bytes */

struct hybrid_addr_key {
	__u8  addr[16];     /* network order; IPv4 as IPv4-mapped IPv6 */
};                          /* 16 bytes */

struct hybrid_bucket {
	__u64 tat_ns;       /* CLOCK_MONOTONIC: theoretical arrival time of the next packet (GCRA) */
};                          /* 8 bytes */

/* What survives the eviction of a decided flow (hybrid_pinned, keyed by the flow key). */
struct hybrid_pinned_verdict {
	__u64 expires_ns;   /* CLOCK_MONOTONIC; as hybrid_flow.verdict_expires_ns, 0 = never */
	__u8  verdict;      /* HYBRID_VERDICT_* (userspace pins BLOCK only) */
	__u8  origin;       /* HYBRID_PIN_*: who wrote it (informational) */
	__u8  _pad0[6];
};                          /* 16 bytes */

struct hybrid_stats {
	__u64 c[HYBRID_CNT_MAX];
};                          /* 392 bytes; per CPU: userspace sums over possible CPUs */

/* A name as tc read it: the whole name (no hash: two names never share a key), what it names
 * and where the flow goes. */
struct hybrid_name_key {
	__u32 generation;   /* host order: hybrid_name_gen.generation (0 in the parsers' scratch) */
	__u16 port;         /* host order: the destination port of the packet that carried it */
	__u8  proto;        /* IPPROTO_TCP / IPPROTO_UDP */
	__u8  kind;         /* HYBRID_NAME_* */
	__u16 len;          /* host order: characters in name, 1..HYBRID_NAME_MAX */
	__u8  _pad0[6];
	__u8  name[HYBRID_NAME_LEN]; /* lower-case ASCII, zero bytes after len */
};                          /* 272 bytes */

/* What the engine decided for every packet carrying one name key (bpf/namecache.h). */
struct hybrid_name_verdict {
	__u64 expires_ns;   /* CLOCK_MONOTONIC: the entry is dead from then on (deleted when met) */
	__u64 flow_ttl_ns;  /* the flow verdict's lifetime (0: no expiry), as the rule's ttl */
	__u64 hits;         /* packets decided from this entry (not atomic: a lower bound) */
	__u32 rule;         /* the deciding rule's index + 1 in the engine's rules; 0: the default */
	__u8  action;       /* HYBRID_NAME_ACT_* */
	__u8  verdict;      /* the flow verdict: HYBRID_VERDICT_NONE, _BYPASS or _BLOCK */
	__u8  follow;       /* 1: the engine follows such flows' messages (struct hybrid_flow, follow):
	                     * a passed packet moves the follow-up as the engine would (namecache.h) */
	__u8  _pad0;
};                          /* 32 bytes */

struct hybrid_name_gen {
	__u32 generation;   /* the engine's current rules; entries of another generation never match */
	__u32 rules_digest; /* which rules (hybrid/engine/kernelcache.py): engines loading the same
	                     * rules share the generation; tc does not read it */
};                          /* 8 bytes */

/* One decision the kernel took from the cache, for the engine's log, counters and flow views. */
struct hybrid_name_event {
	__u64 ts_ns;        /* CLOCK_MONOTONIC */
	struct hybrid_flow_key flow;
	__u32 ifindex;
	__u32 rule;         /* as hybrid_name_verdict.rule */
	__u32 generation;
	__u32 payload_len;
	__u8  action;       /* HYBRID_NAME_ACT_* */
	__u8  verdict;      /* HYBRID_VERDICT_* written for the flow */
	__u8  dir;          /* the packet's direction in its flow */
	__u8  kind;         /* HYBRID_NAME_* */
	__u16 port;         /* host order: destination port */
	__u16 len;          /* characters in name */
	__u8  name[HYBRID_NAME_LEN];
};                          /* 328 bytes */

/* The per-CPU scratch of the name parsers (bpf/names.h). The parsers keep their loop state
 * here, in map memory, not in registers: the verifier then sees one state per loop iteration
 * (what it loads back is an unknown scalar, masked before use) instead of one per path. */
struct hybrid_name_scratch {
	struct hybrid_name_key key; /* the last name read (len 0: none) */
	__u64 attempts;     /* packets whose name this CPU looked for */
	__u32 result;       /* HYBRID_CNT_NAME_* of the last attempt */
	__u32 len;          /* payload bytes in buf */
	__u32 st;           /* parser state */
	__u32 pos;          /* parser position */
	__u32 out;          /* characters written to key.name */
	__u32 a;            /* parser scratch values */
	__u32 b;
	__u32 c;
	__u8  save[192];    /* tc's packet summary, passed to the parser programs (hybrid.bpf.c) */
	__u8  csum[104];    /* the pseudo-header (40) and transport header (<= 60) whose checksum
	                     * namecache.h verifies */
	__u8  buf[HYBRID_NAME_SCAN]; /* the payload's first bytes */
};                          /* 2656 bytes */

#endif /* HYBRID_COMMON_H */
