/* SPDX-License-Identifier: GPL-2.0 */
/* hybrid.bpf.c: the datapath. Compiled at run time by bcc (hybrid/loader.py), with -I for this
 * directory and these -D knobs: HYBRID_FLOW_TABLE_SIZE, HYBRID_PREFIX_TABLE_SIZE, HYBRID_PIN_DIR.
 * Runtime knobs live in the hybrid_config map. hybrid_common.h explains the division of labour:
 *   hybrid_xdp         drops blocked prefixes and BLOCK flows; never writes the flow table.
 *   hybrid_tc_ingress  classifies every packet, maintains the flow table, sets the mark.
 * tests/bpf/reference.py is a Python model of hybrid_tc_ingress: change both.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/types.h>

#include "hybrid_common.h"
#include "parsing.h"

/* ---- Maps ------------------------------------------------------------------------------------
 * Accessed with bcc's method syntax (map.lookup(), map.insert()): bcc rewrites those into the
 * helper calls with the map's fd; a plain bpf_map_lookup_elem(&map, ...) is not rewritten.
 * With HYBRID_PIN_DIR, bcc opens the map pinned at that path if one exists (so flows, verdicts,
 * config and counters survive a restart of the tool) and otherwise creates and pins it. The C
 * identifiers are the map names of hybrid_common.h (HYBRID_MAP_*): bcc uses them as table names,
 * kernel map names and pin file names. */
#ifdef HYBRID_PIN_DIR
#define HYBRID_TABLE(type, key, leaf, name, size, flags) \
	BPF_TABLE_PINNED(type, key, leaf, name, size, HYBRID_PIN_DIR "/" #name, flags)
#else
#define HYBRID_TABLE(type, key, leaf, name, size, flags) \
	BPF_F_TABLE(type, key, leaf, name, size, flags)
#endif /* HYBRID_PIN_DIR */

HYBRID_TABLE("array", __u32, struct hybrid_config, hybrid_config, 1, 0);
/* LRU: a full table evicts the least recently used flow instead of failing the insert, so a
 * flood of new flows degrades the oldest state rather than blinding the classifier. */
HYBRID_TABLE("lru_hash", struct hybrid_flow_key, struct hybrid_flow, hybrid_flows,
	     HYBRID_FLOW_TABLE_SIZE, 0);
/* The kernel refuses to create an LPM trie without BPF_F_NO_PREALLOC. */
HYBRID_TABLE("lpm_trie", struct hybrid_prefix_key, struct hybrid_prefix, hybrid_prefixes,
	     HYBRID_PREFIX_TABLE_SIZE, BPF_F_NO_PREALLOC);
HYBRID_TABLE("array", __u32, __u8, hybrid_ports, 65536, 0);
HYBRID_TABLE("hash", __u32, struct hybrid_iface, hybrid_ifaces, HYBRID_MAX_IFACES, 0);
/* Per-CPU: counters are bumped on every packet; one shared cache line would bounce between
 * CPUs. XDP and tc ingress run in softirq context, which is not re-entered on the same CPU, so
 * plain increments are exact. Userspace sums the per-CPU copies. */
HYBRID_TABLE("percpu_array", __u32, struct hybrid_stats, hybrid_stats, HYBRID_MAX_IFACES, 0);
/* Admission control (hybrid_common.h). Per source: LRU, so a spoofed flood recycles the oldest
 * buckets instead of filling the table. Global: one shared bucket, touched by flagged packets
 * only. */
HYBRID_TABLE("lru_hash", struct hybrid_addr_key, struct hybrid_bucket, hybrid_sources,
	     HYBRID_SOURCE_TABLE_SIZE, 0);
HYBRID_TABLE("array", __u32, struct hybrid_bucket, hybrid_budget, 1, 0);

/* ---- Packet summary shared by both programs --------------------------------------------------- */
enum hybrid_pkt_status {
	PKT_OK = 0,        /* IP header and transport header parsed */
	PKT_NOT_IP,        /* not IPv4/IPv6 (or an L2 header we cannot walk) */
	PKT_BAD_L3,        /* truncated or invalid IP header: the stack will drop it */
	PKT_FRAGMENT,      /* IP fragment: addresses known, transport not parsed */
	PKT_BAD_L4,        /* valid IP header, transport header truncated/invalid/unreachable */
};

struct hybrid_pkt {
	__u32 saddr[4];     /* network order; IPv4 as IPv4-mapped IPv6 */
	__u32 daddr[4];     /* network order */
	__u32 l3_len;       /* host order; IP header + payload, from the IP length field(s) */
	__u32 payload_len;  /* host order; transport payload bytes (see parse_packet) */
	__u32 seq;          /* host order; TCP sequence number, 0 for other protocols */
	__u16 sport;        /* network order; ICMP echo: identifier; other ICMP and protocols: 0 */
	__u16 dport;        /* network order */
	__u16 vlan;         /* host order; outer VLAN id, 0 when untagged */
	__u8  proto;        /* IPPROTO_* after IPv6 extension headers */
	__u8  tcp_flags;    /* the 8 flag bits of byte 13 of the TCP header; 0 for non-TCP */
	__u8  beyond_linear;/* a bounds check failed although the packet has more bytes */
};

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_PSH 0x08
#define TCPF_ACK 0x10
#define TCPF_URG 0x20

/* Parse the packet at [data, data_end). pkt_len is the packet's real length from the L2 header
 * on (skb->len at tc, where data_end may stop at the end of the linear area; data_end - data at
 * XDP). Lengths claimed by IP headers are checked against pkt_len: a packet shorter than its IP
 * header says is dropped by the stack (ip_rcv_core, ipv6_rcv), so it is PKT_BAD_L3 here.
 * payload_len, which drives the first-N budget, comes from the IP length fields, not from the
 * frame size: Ethernet pads short frames to 60 bytes and a padded pure ACK must still count as
 * carrying no payload. */
static __always_inline int parse_packet(void *data, void *data_end, __u32 pkt_len,
					struct hybrid_pkt *p)
{
	struct hdr_cursor nh = { .pos = data };
	struct ethhdr *eth;
	struct iphdr *iph;
	struct ipv6hdr *ip6h;
	struct tcphdr *tcph;
	struct udphdr *udph;
	struct icmphdr *icmph;
	struct icmp6hdr *icmp6h;
	void *l3, *l3_end;
	__u32 l3_off, l4_len;
	__u16 frag = 0;
	int eth_type, proto, len;

	p->beyond_linear = (__u32)(data_end - data) < pkt_len;

	eth_type = parse_ethhdr(&nh, data_end, &eth, &p->vlan);
	if (eth_type < 0)
		return PKT_NOT_IP;
	l3 = nh.pos;
	l3_off = l3 - data;

	if (eth_type == bpf_htons(ETH_P_IP)) {
		proto = parse_iphdr(&nh, data_end, &iph, &frag);
		if (proto < 0)
			return PKT_BAD_L3;
		p->l3_len = bpf_ntohs(iph->tot_len);
		if (l3_off + p->l3_len > pkt_len)
			return PKT_BAD_L3;
		p->saddr[0] = 0;
		p->saddr[1] = 0;
		p->saddr[2] = bpf_htonl(0xffff);
		p->saddr[3] = iph->saddr;
		p->daddr[0] = 0;
		p->daddr[1] = 0;
		p->daddr[2] = bpf_htonl(0xffff);
		p->daddr[3] = iph->daddr;
		p->proto = proto;
		if (frag)
			return PKT_FRAGMENT;
	} else if (eth_type == bpf_htons(ETH_P_IPV6)) {
		proto = parse_ip6hdr(&nh, data_end, &ip6h);
		if (proto < 0)
			return PKT_BAD_L3;
		p->l3_len = sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len);
		if (l3_off + p->l3_len > pkt_len)
			return PKT_BAD_L3;
		__builtin_memcpy(p->saddr, &ip6h->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6h->daddr, 16);
		l3_end = l3 + p->l3_len;
		proto = parse_ip6_exthdrs(&nh, data_end, l3_end, proto, &frag);
		if (proto == HYBRID_PARSE_TOO_DEEP) {
			/* A valid packet we cannot see through: flag it (MALFORMED) rather than
			 * let a chain of options hide a flow from the engine. */
			p->proto = 0;
			return PKT_BAD_L4;
		}
		if (proto < 0)
			return PKT_BAD_L3;
		p->proto = proto;
		if (proto == IPPROTO_FRAGMENT)
			return PKT_FRAGMENT;
	} else {
		return PKT_NOT_IP;
	}

	/* l4_len cannot underflow: IPv4 checked tot_len >= IHL*4, IPv6 checked every extension
	 * header against l3_end. */
	l4_len = p->l3_len - (__u32)(nh.pos - l3);
	switch (p->proto) {
	case IPPROTO_TCP:
		len = parse_tcphdr(&nh, data_end, &tcph);
		if (len < 0 || (__u32)len > l4_len)
			return PKT_BAD_L4;
		p->sport = tcph->source;
		p->dport = tcph->dest;
		p->tcp_flags = ((__u8 *)tcph)[13];
		p->seq = bpf_ntohl(tcph->seq);
		p->payload_len = l4_len - len;
		break;
	case IPPROTO_UDP:
		len = parse_udphdr(&nh, data_end, &udph);
		if (len < 0 || (__u32)len > l4_len)
			return PKT_BAD_L4;
		p->sport = udph->source;
		p->dport = udph->dest;
		p->payload_len = len - sizeof(*udph);
		break;
	case IPPROTO_ICMP:
		if (eth_type != bpf_htons(ETH_P_IP) || parse_icmphdr(&nh, data_end, &icmph) < 0 ||
		    l4_len < sizeof(*icmph))
			return PKT_BAD_L4;
		if (icmph->type == ICMP_ECHO || icmph->type == ICMP_ECHOREPLY) {
			p->sport = icmph->un.echo.id;
			p->dport = icmph->un.echo.id;
		}
		p->payload_len = l4_len - sizeof(*icmph);
		break;
	case IPPROTO_ICMPV6:
		if (eth_type != bpf_htons(ETH_P_IPV6) || parse_icmp6hdr(&nh, data_end, &icmp6h) < 0 ||
		    l4_len < sizeof(*icmp6h))
			return PKT_BAD_L4;
		if (icmp6h->icmp6_type == ICMPV6_ECHO_REQUEST ||
		    icmp6h->icmp6_type == ICMPV6_ECHO_REPLY) {
			p->sport = icmp6h->icmp6_identifier;
			p->dport = icmp6h->icmp6_identifier;
		}
		p->payload_len = l4_len - sizeof(*icmp6h);
		break;
	default:
		/* Protocols without ports (GRE, ESP, SCTP is not parsed, ...): the whole L4 part
		 * counts as payload; the flow is keyed by addresses and protocol alone. */
		p->payload_len = l4_len;
		break;
	}
	return PKT_OK;
}

/* memcmp() of two 16-byte network-order addresses, as -1/0/1. Comparing the words after
 * converting them to host order gives the same order as comparing the bytes. */
static __always_inline int addr_cmp(const __u32 *a, const __u32 *b)
{
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		__u32 x = bpf_ntohl(a[i]), y = bpf_ntohl(b[i]);

		if (x != y)
			return x < y ? -1 : 1;
	}
	return 0;
}

/* Canonical, direction-independent key (hybrid_common.h): the lower (address, host-order port)
 * endpoint is "lo". Returns the packet's direction: 0 when it travels from lo, 1 from hi.
 * hybrid/maps.py:canonical_order() is the same function in Python: change both. */
static __always_inline __u32 flow_key_build(struct hybrid_flow_key *key, const struct hybrid_pkt *p)
{
	int cmp = addr_cmp(p->saddr, p->daddr);
	__u32 dir;

	if (cmp == 0) {
		__u16 s = bpf_ntohs(p->sport), d = bpf_ntohs(p->dport);

		cmp = s < d ? -1 : (s > d ? 1 : 0);
	}
	dir = cmp > 0;
	if (!dir) {
		__builtin_memcpy(key->addr_lo, p->saddr, 16);
		__builtin_memcpy(key->addr_hi, p->daddr, 16);
		key->port_lo = p->sport;
		key->port_hi = p->dport;
	} else {
		__builtin_memcpy(key->addr_lo, p->daddr, 16);
		__builtin_memcpy(key->addr_hi, p->saddr, 16);
		key->port_lo = p->dport;
		key->port_hi = p->sport;
	}
	key->vlan = p->vlan;
	key->proto = p->proto;
	key->_pad0 = 0;
	return dir;
}

/* HYBRID_PREFIX_* bits of the longest prefix containing addr (0 when none). */
static __always_inline __u32 prefix_action(const __u32 *addr)
{
	struct hybrid_prefix_key k = { .prefixlen = 128 };
	struct hybrid_prefix *v;

	__builtin_memcpy(k.addr, addr, 16);
	v = hybrid_prefixes.lookup(&k);
	return v ? v->action : 0;
}

/* Both endpoints' prefix actions ORed, or 0 when no prefix is configured (the flag spares
 * two trie walks per packet in the common case). */
static __always_inline __u32 prefixes_match(const struct hybrid_config *cfg, const struct hybrid_pkt *p)
{
	if (!(cfg->flags & HYBRID_CFG_HAVE_PREFIXES))
		return 0;
	return prefix_action(p->saddr) | prefix_action(p->daddr);
}

/* A verdict is in force until its expiry; 0 means no expiry. */
static __always_inline int verdict_live(const struct hybrid_flow *flow, __u64 now)
{
	return flow->verdict_expires_ns == 0 || now < flow->verdict_expires_ns;
}

static __always_inline struct hybrid_stats *stats_slot(__u32 ifindex)
{
	struct hybrid_iface *iface = hybrid_ifaces.lookup(&ifindex);
	__u32 slot = iface ? iface->slot : 0;

	if (slot >= HYBRID_MAX_IFACES)
		slot = 0;
	return hybrid_stats.lookup(&slot);
}

/* Suspicious TCP flag combinations (hybrid_common.h), on the 8 flag bits. */
static __always_inline int tcp_flags_suspicious(__u8 f)
{
	if (f == 0)
		return 1;                                         /* NULL scan */
	if ((f & (TCPF_SYN | TCPF_FIN)) == (TCPF_SYN | TCPF_FIN))
		return 1;
	if ((f & (TCPF_SYN | TCPF_RST)) == (TCPF_SYN | TCPF_RST))
		return 1;
	if ((f & (TCPF_FIN | TCPF_RST)) == (TCPF_FIN | TCPF_RST))
		return 1;
	if ((f & (TCPF_FIN | TCPF_PSH | TCPF_URG)) == (TCPF_FIN | TCPF_PSH | TCPF_URG))
		return 1;                                         /* Xmas */
	if ((f & (TCPF_FIN | TCPF_ACK)) == TCPF_FIN)
		return 1;                                         /* FIN without ACK */
	return 0;
}

/* GCRA: would a packet arriving now be admitted by a bucket whose theoretical arrival time is
 * tat? Returns the new tat to store when it is, 0 when it is not. */
static __always_inline __u64 gcra(__u64 tat, __u64 now, __u64 interval, __u64 tolerance)
{
	__u64 t = tat > now ? tat : now;

	if (t - now > tolerance)
		return 0;
	return t + interval;
}

/* Is the source over its admission budget right now (without charging it)? For XDP. */
static __always_inline int source_throttled(const struct hybrid_config *cfg, const __u32 *saddr, __u64 now)
{
	struct hybrid_addr_key k;
	struct hybrid_bucket *b;

	__builtin_memcpy(k.addr, saddr, 16);
	b = hybrid_sources.lookup(&k);
	return b && b->tat_ns > now && b->tat_ns - now > cfg->source_tolerance_ns;
}

/* Admission of one flagged packet (hybrid_common.h). Returns 0 when admitted (and charges the
 * buckets), else the EV_OVER_* events saying which budget refused it. Both buckets are checked
 * before either is charged, so a packet refused by one does not spend the other. The updates
 * are plain read-modify-writes: CPUs racing on one source may both be admitted, a slight
 * over-admission under contention, never an under-admission of a quiet source. */
#define EV_OVER_SOURCE (1U << 3)
#define EV_OVER_GLOBAL (1U << 4)
static __always_inline __u32 admit(const struct hybrid_config *cfg, const __u32 *saddr, int first_of_flow,
				   int low_priority, __u64 now)
{
	struct hybrid_addr_key k;
	struct hybrid_bucket *src = NULL, *glob = NULL, fresh = {};
	__u64 src_tat = 0, glob_tat = 0, tol;
	__u32 zero = 0, over = 0;

	if (first_of_flow && cfg->source_interval_ns) {
		__builtin_memcpy(k.addr, saddr, 16);
		src = hybrid_sources.lookup(&k);
		src_tat = gcra(src ? src->tat_ns : 0, now, cfg->source_interval_ns, cfg->source_tolerance_ns);
		if (!src_tat)
			over |= EV_OVER_SOURCE;
	}
	if (cfg->global_interval_ns) {
		glob = hybrid_budget.lookup(&zero);
		if (glob) {
			tol = cfg->global_tolerance_ns;
			if (low_priority)
				tol /= 2;     /* half the burst is held for the first packets of real flows */
			glob_tat = gcra(glob->tat_ns, now, cfg->global_interval_ns, tol);
			if (!glob_tat)
				over |= EV_OVER_GLOBAL;
		}
	}
	if (over)
		return over;
	if (first_of_flow && cfg->source_interval_ns) {
		if (src) {
			src->tat_ns = src_tat;
		} else {
			fresh.tat_ns = src_tat;
			hybrid_sources.update(&k, &fresh);
		}
	}
	if (glob)
		glob->tat_ns = glob_tat;
	return 0;
}

/* ---- XDP --------------------------------------------------------------------------------------- */

int hybrid_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hybrid_pkt p = {};
	struct hybrid_flow_key key;
	struct hybrid_config *cfg;
	struct hybrid_flow *flow;
	struct hybrid_stats *st;
	__u32 zero = 0;
	__u64 now;
	int action = XDP_PASS, cnt = -1, rc;

	cfg = hybrid_config.lookup(&zero);
	if (!cfg)
		goto out;
	rc = parse_packet(data, data_end, data_end - data, &p);
	/* Malformed and non-IP packets pass: tc counts them, the stack drops what is invalid. */
	if (rc == PKT_NOT_IP || rc == PKT_BAD_L3)
		goto out;
	if (prefixes_match(cfg, &p) & HYBRID_PREFIX_BLOCK) {
		action = XDP_DROP;
		cnt = HYBRID_CNT_XDP_DROP_PREFIX;
		goto out;
	}
	/* Fragments and unparseable transports have no flow key (tc does not create one either). */
	if (rc != PKT_OK)
		goto out;
	now = bpf_ktime_get_ns();
	/* A SYN from a source over its admission budget, with the drop policy: tc would drop it
	 * anyway; here it costs no skb. Nothing is charged at XDP: tc alone keeps the books. */
	if ((cfg->flags & HYBRID_CFG_OVER_DROP) && cfg->source_interval_ns && p.proto == IPPROTO_TCP &&
	    (p.tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN && source_throttled(cfg, p.saddr, now)) {
		action = XDP_DROP;
		cnt = HYBRID_CNT_XDP_DROP_SOURCE;
		goto out;
	}
	flow_key_build(&key, &p);
	flow = hybrid_flows.lookup(&key);
	if (flow && flow->verdict == HYBRID_VERDICT_BLOCK && verdict_live(flow, now)) {
		action = XDP_DROP;
		cnt = HYBRID_CNT_XDP_DROP_FLOW;
	}
out:
	st = stats_slot(ctx->ingress_ifindex);
	if (st) {
		st->c[HYBRID_CNT_XDP_PACKETS]++;
		if (cnt >= 0 && cnt < HYBRID_CNT_MAX)
			st->c[cnt]++;
	}
	return action;
}

/* ---- tc ingress ---------------------------------------------------------------------------------- */

/* Extra per-packet events counted at the exit label. */
#define EV_FLOW_NEW        (1U << 0)
#define EV_FLOW_FULL       (1U << 1)
#define EV_VERDICT_EXPIRED (1U << 2)

/* Bytes made linear when the headers are not: Ethernet + 2 tags + IPv4 with options + TCP with
 * options is 142 bytes; 512 also covers common IPv6 extension header chains. Deeper chains
 * end as PKT_BAD_L4 (flagged MALFORMED), never as an unflagged packet. */
#define HYBRID_PULL_LEN 512

int hybrid_tc_ingress(struct __sk_buff *skb)
{
	struct hybrid_pkt p = {};
	struct hybrid_flow_key key;
	struct hybrid_flow newflow = {};
	struct hybrid_config *cfg;
	struct hybrid_flow *flow = NULL;
	struct hybrid_stats *st;
	void *data, *data_end;
	__u64 now = 0;
	__u32 zero = 0, dir = 0, events = 0, reasons = 0, pull, pktsize, prev, act, over;
	/* Pass with TC_ACT_UNSPEC, not TC_ACT_OK: with direct-action, TC_ACT_OK ends classification
	 * on this hook, so another tool's filter at a later priority would never see the packet.
	 * UNSPEC lets the next filter run and, when none is left, passes the packet. */
	int action = TC_ACT_UNSPEC, cnt = HYBRID_CNT_PASSED, rc, i;
	__u8 verdict;

	cfg = hybrid_config.lookup(&zero);
	if (!cfg)
		goto out;

	/* At tc ingress the driver has normally made the headers linear already; GRO'd or
	 * paged skbs may not have. Pull once (a bounded amount, not the whole skb) and re-read
	 * data/data_end: the helper may move the packet, so the verifier invalidates every
	 * packet pointer taken before it. */
	pktsize = skb->len;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	rc = parse_packet(data, data_end, pktsize, &p);
	if (rc != PKT_OK && rc != PKT_FRAGMENT && p.beyond_linear) {
		pull = pktsize < HYBRID_PULL_LEN ? pktsize : HYBRID_PULL_LEN;
		if (bpf_skb_pull_data(skb, pull) == 0) {
			data = (void *)(long)skb->data;
			data_end = (void *)(long)skb->data_end;
			__builtin_memset(&p, 0, sizeof(p));
			rc = parse_packet(data, data_end, pktsize, &p);
		}
		/* Still cut short: the IP header is valid as far as we can see, but we cannot
		 * reach the transport. Flag it rather than pass it unseen. */
		if (rc == PKT_BAD_L3 && p.beyond_linear)
			rc = PKT_BAD_L4;
	}
	/* The outer 802.1Q tag is usually taken out of the packet (hardware offload, or
	 * skb_vlan_untag() before tc ingress) into skb->vlan_tci; XDP sees it in the packet.
	 * Both must key the flow by the same outer id. */
	if (skb->vlan_present)
		p.vlan = skb->vlan_tci & 0x0fff;

	if (rc == PKT_NOT_IP) {
		cnt = HYBRID_CNT_NOT_IP;
		goto out;
	}
	if (rc == PKT_BAD_L3) {
		cnt = HYBRID_CNT_MALFORMED_L3;
		goto out;
	}

	act = prefixes_match(cfg, &p);
	if (act & HYBRID_PREFIX_BLOCK) {
		action = TC_ACT_SHOT;
		cnt = HYBRID_CNT_DROP_TC_PREFIX;
		goto out;
	}
	if (act & HYBRID_PREFIX_WATCH)
		reasons |= HYBRID_REASON_PREFIX;

	/* Fragments: non-first fragments carry no ports, so they cannot be keyed or classified
	 * by port. netfilter's conntrack (nf_defrag) reassembles before the iptables rule that
	 * queues marked packets, so every fragment is marked and the engine sees the whole
	 * datagram; the flow table is not touched. */
	if (rc == PKT_FRAGMENT) {
		reasons |= HYBRID_REASON_FRAGMENT;
		goto classify;
	}
	if (rc == PKT_BAD_L4) {
		reasons |= HYBRID_REASON_MALFORMED;
		goto classify;
	}

	now = bpf_ktime_get_ns();
	dir = flow_key_build(&key, &p);
	flow = hybrid_flows.lookup(&key);
	/* A SYN without ACK starts a new connection, even on a 5-tuple the table still holds from an
	 * earlier one: clients recycle ephemeral ports within seconds, and a BYPASS left behind by
	 * the previous connection must not make the new one invisible. The entry starts over as a
	 * new flow, unless it is in a BLOCK that has not expired (the engine blocked this tuple). A
	 * retransmitted SYN starts it over again, which changes nothing. */
	if (flow && p.proto == IPPROTO_TCP && (p.tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN &&
	    !(flow->verdict == HYBRID_VERDICT_BLOCK && verdict_live(flow, now))) {
		newflow.first_seen_ns = now;
		if (dir)
			newflow.flags |= HYBRID_FLOW_ORIG_HI;
		hybrid_flows.update(&key, &newflow);
		events |= EV_FLOW_NEW;
		flow = hybrid_flows.lookup(&key);
	} else if (!flow) {
		newflow.first_seen_ns = now;
		if (dir)
			newflow.flags |= HYBRID_FLOW_ORIG_HI;
		if (p.proto == IPPROTO_TCP && (p.tcp_flags & (TCPF_SYN | TCPF_ACK)) != TCPF_SYN)
			newflow.flags |= HYBRID_FLOW_MIDSTREAM;
		/* NOEXIST: if another CPU created the flow in the meantime, keep its entry. */
		if (hybrid_flows.insert(&key, &newflow) == 0)
			events |= EV_FLOW_NEW;
		flow = hybrid_flows.lookup(&key);
	}

	verdict = HYBRID_VERDICT_NONE;
	/* Without an entry (the insert failed), the packet is classified as the first of a new
	 * flow: its payload, if any, is within the first-N budget. */
	prev = p.payload_len > 0 ? 0 : 0xffffffff;
	if (flow) {
		flow->last_seen_ns = now;
		/* Atomics (BPF_XADD; the result is not used): the same flow is updated from every
		 * CPU that receives its packets. */
		__sync_fetch_and_add(&flow->packets[dir & 1], 1);
		__sync_fetch_and_add(&flow->bytes[dir & 1], p.l3_len);

		verdict = flow->verdict;
		if (verdict != HYBRID_VERDICT_NONE && !verdict_live(flow, now)) {
			/* Racing CPUs may both see the expiry; the write is idempotent, the counter
			 * may count it twice. */
			flow->verdict = HYBRID_VERDICT_NONE;
			flow->verdict_expires_ns = 0;
			events |= EV_VERDICT_EXPIRED;
			verdict = HYBRID_VERDICT_NONE;
		}

		/* The first-N budget is spent only by payload-carrying packets (pure ACKs do not
		 * consume it). bcc's LLVM backend targets a BPF CPU without fetching atomics
		 * (BPF_FETCH: "Invalid usage of the XADD return value"), so the old value is read,
		 * then the add is atomic: two CPUs racing on one direction may both see the same
		 * count and both flag, which errs on the side of inspecting one packet more, never
		 * one fewer. */
		if (p.payload_len > 0) {
			prev = flow->payload_packets[dir & 1];
			__sync_fetch_and_add(&flow->payload_packets[dir & 1], 1);
		}
	} else {
		events |= EV_FLOW_FULL;
	}

	if (verdict == HYBRID_VERDICT_BLOCK) {
		action = TC_ACT_SHOT;
		cnt = HYBRID_CNT_DROP_TC_FLOW;
		goto out;
	}
	if (verdict == HYBRID_VERDICT_BYPASS) {
		cnt = HYBRID_CNT_BYPASSED;
		goto out;
	}
	if (verdict == HYBRID_VERDICT_INSPECT) {
		/* The engine asked for every packet; only the flag reasons that describe the
		 * packet itself are added (prefix/port/first-N describe why a flow is looked at). */
		reasons = HYBRID_REASON_INSPECT;
	} else {
		if (p.proto == IPPROTO_TCP && (p.tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN)
			reasons |= HYBRID_REASON_SYN;
		if (prev < cfg->first_n) {
			reasons |= HYBRID_REASON_FIRST_N;
			if (flow && p.proto == IPPROTO_TCP) {
				__u8 bit = dir ? HYBRID_FLOW_SEQ1 : HYBRID_FLOW_SEQ0;
				__u32 end = p.seq + p.payload_len;

				if (!(flow->flags & bit) || (__s32)(end - flow->seq_end[dir & 1]) > 0)
					flow->seq_end[dir & 1] = end;
				flow->flags |= bit;
			}
		} else if (flow && p.proto == IPPROTO_TCP && p.payload_len > 0 &&
			   (flow->flags & (dir ? HYBRID_FLOW_SEQ1 : HYBRID_FLOW_SEQ0)) &&
			   flow->seq_end[dir & 1] - p.seq - 1 < HYBRID_RETRANS_WINDOW) {
			/* A retransmission of bytes inspected under the budget. */
			reasons |= HYBRID_REASON_FIRST_N;
		}
		if ((cfg->flags & HYBRID_CFG_HAVE_PORTS) &&
		    (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP)) {
			__u8 bit = p.proto == IPPROTO_TCP ? HYBRID_PORT_TCP : HYBRID_PORT_UDP;
			__u32 sp = bpf_ntohs(p.sport), dp = bpf_ntohs(p.dport);
			__u8 *w;

			w = hybrid_ports.lookup(&sp);
			if (w && (*w & bit))
				reasons |= HYBRID_REASON_PORT;
			w = hybrid_ports.lookup(&dp);
			if (w && (*w & bit))
				reasons |= HYBRID_REASON_PORT;
		}
	}
	if (p.proto == IPPROTO_TCP && tcp_flags_suspicious(p.tcp_flags))
		reasons |= HYBRID_REASON_SUSPICIOUS;

classify:
	reasons &= cfg->reasons & ~cfg->skip_reasons;
	if (!reasons) {
		cnt = HYBRID_CNT_PASSED;
		goto out;
	}
	if (cfg->source_interval_ns || cfg->global_interval_ns) {
		if (!now)
			now = bpf_ktime_get_ns();
		/* First of its flow: no flow key, a flow entry this packet created, or a flow with
		 * nothing flagged yet (per-source budget). Low priority (half the global burst):
		 * unproven packets (no key, or the entry is theirs: spoofable) and packets flagged
		 * only because every packet of their flow is (a watched port or prefix, INSPECT),
		 * so that one heavy flow cannot starve the first payloads of all the others. */
		over = admit(cfg, p.saddr, rc != PKT_OK || (events & EV_FLOW_NEW) || (flow && !flow->flagged),
			     rc != PKT_OK || (events & EV_FLOW_NEW) ||
			     !(reasons & ~(HYBRID_REASON_PORT | HYBRID_REASON_PREFIX | HYBRID_REASON_INSPECT)),
			     now);
		if (over) {
			events |= over;
			/* Payload is never passed uninspected (fragments and unparseable transports
			 * count as payload: what they carry is unknown). */
			if (p.payload_len > 0 || rc != PKT_OK || (cfg->flags & HYBRID_CFG_OVER_DROP)) {
				action = TC_ACT_SHOT;
				cnt = HYBRID_CNT_OVER_DROP;
				/* A dropped packet must not spend the flow's first-N budget, or a
				 * flood could use up a flow's inspection and let its later payload
				 * pass unflagged. (Atomic add of -1: the undo of the add above.) */
				if (flow && p.payload_len > 0)
					__sync_fetch_and_add(&flow->payload_packets[dir & 1], (__u32)-1);
			} else {
				cnt = HYBRID_CNT_OVER_PASS;
			}
			goto out;
		}
	}
	cnt = HYBRID_CNT_FLAGGED;
	if (flow)
		__sync_fetch_and_add(&flow->flagged, 1);
	/* Read-modify-write under the mask: the other bits belong to other software (kube-proxy
	 * 0x4000/0x8000, Cilium, ...). */
	skb->mark = (cfg->mark_value & cfg->mark_mask) | (skb->mark & ~cfg->mark_mask);

out:
	st = stats_slot(skb->ifindex);
	if (st) {
		st->c[HYBRID_CNT_PACKETS]++;
		if (cnt >= 0 && cnt < HYBRID_CNT_MAX)
			st->c[cnt]++;
		if (events & EV_FLOW_NEW)
			st->c[HYBRID_CNT_FLOW_NEW]++;
		if (events & EV_FLOW_FULL)
			st->c[HYBRID_CNT_FLOW_FULL]++;
		if (events & EV_VERDICT_EXPIRED)
			st->c[HYBRID_CNT_VERDICT_EXPIRED]++;
		if (events & EV_OVER_SOURCE)
			st->c[HYBRID_CNT_OVER_SOURCE]++;
		if (events & EV_OVER_GLOBAL)
			st->c[HYBRID_CNT_OVER_GLOBAL]++;
		if (cnt == HYBRID_CNT_FLAGGED) {
#pragma unroll
			for (i = 0; i < HYBRID_REASON_COUNT; i++)
				if (reasons & (1U << i))
					st->c[HYBRID_CNT_REASON_BASE + i]++;
		}
	}
	return action;
}
