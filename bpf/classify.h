/* SPDX-License-Identifier: GPL-2.0 */
/* classify.h: the flag reasons (HYBRID_REASON_* of hybrid_common.h) that send a packet to the
 * engine: SYN, first-N payload packets (and their retransmissions), watched ports and prefixes,
 * suspicious TCP flags, fragments, malformed transports, INSPECT flows; bans and blocked prefixes; and
 * the mark a flagged packet leaves tc with. tests/bpf/reference.py models these rules: change
 * both. Included by hybrid.bpf.c after the map accessors and flow_table.h.
 */
#ifndef HYBRID_CLASSIFY_H
#define HYBRID_CLASSIFY_H

/* HYBRID_PREFIX_* bits of the longest prefix containing addr (0 when none). */
static __always_inline __u32 prefix_action(const __u32 *addr)
{
	struct hybrid_prefix_key k = { .prefixlen = 128 };
	struct hybrid_prefix *v;

	__builtin_memcpy(k.addr, addr, 16);
	v = prefix_find(&k);
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

/* The expiry of the longest ban containing addr, for one comparison with the clock: 0 when
 * addr is in no ban, all ones when the ban never expires (its expires_ns is 0). */
static __always_inline __u64 ban_until(const __u32 *addr)
{
	struct hybrid_prefix_key k = { .prefixlen = 128 };
	struct hybrid_ban *b;
	__u64 e;

	__builtin_memcpy(k.addr, addr, 16);
	b = ban_find(&k);
	if (!b)
		return 0;
	e = b->expires_ns;
	return e ? e : ~0ULL;
}

/* Is the source or the destination in a live ban? Skipped while the ban trie is empty (the
 * flag spares two trie walks per packet, as HYBRID_CFG_HAVE_PREFIXES does). Both endpoints are
 * looked up and their expiries compared as one (the later of the two against the clock, read
 * only when a ban matched), not as "source || destination": each branch the verifier meets
 * here multiplies the paths it walks through everything after (the short-circuit form cost
 * hybrid_tc_ingress 30% more processed instructions). An expired ban drops nothing, and does
 * not fall back to a shorter one: userspace writes effective expiries (hybrid_common.h). */
static __always_inline int bans_match(const struct hybrid_config *cfg, const struct hybrid_pkt *p)
{
	__u64 s, d;

	if (!(cfg->flags & HYBRID_CFG_HAVE_BANS))
		return 0;
	s = ban_until(p->saddr);
	d = ban_until(p->daddr);
	if (d > s)
		s = d;
	return s && s > hybrid_now();
}

/* Is either port watched for the packet's protocol (TCP and UDP only)? Skipped, like the
 * prefixes, while no port is watched. */
static __always_inline int ports_watched(const struct hybrid_config *cfg, const struct hybrid_pkt *p)
{
	__u8 bit = p->proto == IPPROTO_TCP ? HYBRID_PORT_TCP : HYBRID_PORT_UDP;
	__u8 *w;

	if (!(cfg->flags & HYBRID_CFG_HAVE_PORTS) ||
	    (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP))
		return 0;
	w = port_find(bpf_ntohs(p->sport));
	if (w && (*w & bit))
		return 1;
	w = port_find(bpf_ntohs(p->dport));
	return w && (*w & bit);
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

/* The reasons of a packet without a flow entry. Fragments: non-first fragments carry no ports,
 * so they cannot be keyed or classified by port; a first fragment's ports serve only to drop it
 * when its flow is blocked (fragment_blocked()). netfilter's conntrack (nf_defrag) reassembles
 * before the iptables rule that queues marked packets, so every fragment is marked and the
 * engine sees the whole datagram; the flow table is not touched. An unparseable transport is
 * flagged rather than passed unseen. */
static __always_inline __u32 reasons_of_status(int status)
{
	if (status == PKT_FRAGMENT)
		return HYBRID_REASON_FRAGMENT;
	if (status == PKT_BAD_L4)
		return HYBRID_REASON_MALFORMED;
	return 0;
}

/* Within the first-N budget (prev: flow_spend_first_n()), or a retransmission of bytes that
 * were inspected under it. A TCP packet within the budget records how far it reaches. */
static __always_inline int first_n_applies(const struct hybrid_config *cfg, const struct hybrid_pkt *p,
					   struct hybrid_flow *flow, __u32 dir, __u32 prev)
{
	if (prev < cfg->first_n) {
		if (flow && p->proto == IPPROTO_TCP)
			flow_note_inspected(flow, p, dir);
		return 1;
	}
	return flow && flow_is_retransmission(flow, p, dir);
}

/* The reasons of a packet with a flow key, whose flow is not in BLOCK or BYPASS; reasons holds
 * those found so far (a watched prefix). */
static __always_inline __u32 reasons_of_flow_packet(const struct hybrid_config *cfg,
						    const struct hybrid_pkt *p, struct hybrid_flow *flow,
						    __u32 dir, __u8 verdict, __u32 prev, __u32 reasons)
{
	if (verdict == HYBRID_VERDICT_INSPECT) {
		/* The engine asked for every packet; only the flag reasons that describe the
		 * packet itself are added (prefix/port/first-N describe why a flow is looked at). */
		reasons = HYBRID_REASON_INSPECT;
	} else {
		if (pkt_is_bare_syn(p))
			reasons |= HYBRID_REASON_SYN;
		if (first_n_applies(cfg, p, flow, dir, prev))
			reasons |= HYBRID_REASON_FIRST_N;
		if (ports_watched(cfg, p))
			reasons |= HYBRID_REASON_PORT;
	}
	if (p->proto == IPPROTO_TCP && tcp_flags_suspicious(p->tcp_flags))
		reasons |= HYBRID_REASON_SUSPICIOUS;
	return reasons;
}

/* Send the packet to the engine: the iptables rule queues packets carrying the mark.
 * Read-modify-write under the mask: the other bits belong to other software (kube-proxy
 * 0x4000/0x8000, Cilium, ...). */
static __always_inline void mark_for_queue(struct __sk_buff *skb, const struct hybrid_config *cfg,
					   struct hybrid_flow *flow)
{
	flow_note_flagged(flow);
	skb->mark = (cfg->mark_value & cfg->mark_mask) | (skb->mark & ~cfg->mark_mask);
}

#endif /* HYBRID_CLASSIFY_H */
