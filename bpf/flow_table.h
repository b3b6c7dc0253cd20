/* SPDX-License-Identifier: GPL-2.0 */
/* flow_table.h: the flow table (hybrid_flows, struct hybrid_flow of hybrid_common.h). The
 * canonical key, finding, creating and restarting an entry, per-direction accounting, the
 * verdict and its expiry, the first-N payload budget and the retransmission window.
 * hybrid_tc_ingress alone writes the table; hybrid_xdp only asks whether a flow is blocked.
 * Included by hybrid.bpf.c after the map accessors.
 */
#ifndef HYBRID_FLOW_TABLE_H
#define HYBRID_FLOW_TABLE_H

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
 * hybrid/datapath/maps.py:canonical_order() is the same function in Python: change both. */
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

/* A verdict is in force until its expiry; 0 means no expiry. */
static __always_inline int verdict_live(const struct hybrid_flow *flow, __u64 now)
{
	return flow->verdict_expires_ns == 0 || now < flow->verdict_expires_ns;
}

static __always_inline int flow_blocked(const struct hybrid_flow *flow, __u64 now)
{
	return flow->verdict == HYBRID_VERDICT_BLOCK && verdict_live(flow, now);
}

/* A pinned verdict is in force until its expiry; 0 means no expiry. */
static __always_inline int pinned_live(const struct hybrid_pinned_verdict *pin, __u64 now)
{
	return pin->expires_ns == 0 || now < pin->expires_ns;
}

/* HYBRID_FLOW_ISN0/1: the flag saying isn[dir] is set. */
static __always_inline __u8 flow_isn_bit(__u32 dir)
{
	return dir ? HYBRID_FLOW_ISN1 : HYBRID_FLOW_ISN0;
}

/* Is the packet a bare SYN that opens a new connection on an entry whose verdict was written for
 * a connection (HYBRID_FLOW_CONN_VERDICT, hybrid_common.h)? It is unless its sequence number is
 * the isn recorded for its direction: a retransmitted SYN of the very connection the verdict
 * was written for. A new connection must be inspected afresh: with a BYPASS, an attacker would
 * make one connection benign and send the blocked request on the next from the same port; with
 * a BLOCK, spoofed packets that earned it would cut the victim's next connections off. */
static __always_inline int flow_new_connection(const struct hybrid_flow *flow, const struct hybrid_pkt *p,
					       __u32 dir)
{
	return pkt_is_bare_syn(p) && (flow->flags & HYBRID_FLOW_CONN_VERDICT) &&
	       !((flow->flags & flow_isn_bit(dir)) && flow->isn[dir & 1] == p->seq);
}

/* XDP's question: is the packet's flow in a BLOCK that has not expired? Only the flow table
 * answers. A blocked flow evicted from it is not in the table, and the pinned table is not
 * asked here: the packet goes on to tc, which restores the entry from the pinned table, counts
 * the restore (HYBRID_CNT_EVICTED_DECIDED) and drops the packet; its next packets drop here
 * again. Asking here instead would cost a lookup for every packet of a flood of new flows (all
 * misses) and, with every packet of the flow dropped at XDP, tc would never restore the entry
 * nor count the eviction. The SYN of a new connection on a connection-scoped BLOCK goes on to
 * tc too, which starts the entry over (flow_track()). Also asked for first fragments that
 * carry their ports (p->frag_keyed). */
static __always_inline int flow_blocked_pkt(const struct hybrid_pkt *p, __u64 now)
{
	struct hybrid_flow_key key;
	struct hybrid_flow *flow;
	__u32 dir;

	dir = flow_key_build(&key, p);
	flow = flow_find(&key);
	return flow && flow_blocked(flow, now) && !flow_new_connection(flow, p, dir);
}

/* tc's question for a first fragment that carries its ports: is its flow blocked? Asked of the
 * flow table and, when the flow is not there (evicted), of the pinned table; nothing is
 * written: fragments neither create entries nor restore them. A blocked flow's datagrams then
 * never reassemble: the first fragment drops here (or at XDP), and the others, which carry no
 * ports, wait in the reassembly queue until it times out. */
static __always_inline int fragment_blocked(struct hybrid_flow_key *key, __u64 now)
{
	struct hybrid_flow *flow = flow_find(key);
	struct hybrid_pinned_verdict *pin;

	if (flow)
		return flow_blocked(flow, now);
	pin = pinned_find(key);
	return pin && pin->verdict == HYBRID_VERDICT_BLOCK && pinned_live(pin, now);
}

/* A new entry, for a flow the table does not hold or for a new connection on a 5-tuple whose
 * entry had a connection-scoped verdict: does a pinned verdict survive for it? A live one is
 * copied into *fresh and 1 returned (the entry was evicted and is being restored), with
 * HYBRID_FLOW_CONN_VERDICT when the engine wrote it; an expired one is deleted (its verdict is
 * over) and 0 returned, as when there is none. So is an ENGINE pin met by a bare SYN: the
 * engine blocked a connection, and the SYN opens another one (hybrid_common.h, "Pinned
 * verdicts"). A MANUAL pin holds whatever the packet.
 * A hash map has no compare-and-delete: should userspace pin a new BLOCK for this very key
 * between the lookup and the delete, the delete removes it (the flow table still holds the new
 * BLOCK, unprotected until it is written again). The window is a few instructions long, on a
 * flow whose block had expired or whose connection is being replaced. */
static __always_inline int flow_restore_pinned(struct hybrid_flow_key *key, struct hybrid_flow *fresh,
					       const struct hybrid_pkt *p, __u64 now)
{
	struct hybrid_pinned_verdict *pin = pinned_find(key);

	if (!pin)
		return 0;
	if (!pinned_live(pin, now) || (pin->origin == HYBRID_PIN_ENGINE && pkt_is_bare_syn(p))) {
		pinned_delete(key);
		return 0;
	}
	fresh->verdict = pin->verdict;
	fresh->verdict_expires_ns = pin->expires_ns;
	if (pin->origin == HYBRID_PIN_ENGINE)
		fresh->flags |= HYBRID_FLOW_CONN_VERDICT;
	return 1;
}

/* Find the packet's flow entry, creating it when there is none. Returns NULL when the table
 * refused the insert; adds STATS_EVENT(HYBRID_CNT_FLOW_NEW) to *events when this packet
 * created (or restarted) the entry. A created entry starts with the flow's pinned verdict, if
 * a live one survives its eviction (flow_restore_pinned(), HYBRID_CNT_EVICTED_DECIDED).
 *
 * A SYN without ACK starts a new connection, even on a 5-tuple the table still holds from an
 * earlier one: clients recycle ephemeral ports within seconds, and a BYPASS left behind by the
 * previous connection must not make the new one invisible. The entry starts over as a new
 * flow:
 *  - with a connection-scoped verdict (HYBRID_FLOW_CONN_VERDICT), when the SYN's sequence
 *    number is not the recorded isn of its direction (flow_new_connection()), whatever the
 *    verdict, BLOCK included; counted (HYBRID_CNT_CONN_RESTART). The flow's ENGINE pin is
 *    deleted (it blocked the old connection) and a live MANUAL pin is copied into the new entry
 *    (flow_restore_pinned()). A retransmitted SYN changes nothing;
 *  - otherwise (an operator's verdict, or none), unless it is in a BLOCK that has not expired
 *    (the 5-tuple is blocked). This restart does not look at the pinned table: the entry is not
 *    blocked, and only BLOCK is pinned. A retransmitted SYN starts it over again, which changes
 *    nothing. */
static __always_inline struct hybrid_flow *flow_track(struct hybrid_flow_key *key,
						      const struct hybrid_pkt *p, __u32 dir,
						      __u64 now, __u32 *events)
{
	struct hybrid_flow fresh = {};
	struct hybrid_flow *flow = flow_find(key);
	int conn = 0, restored = 0;

	if (flow) {
		if (!pkt_is_bare_syn(p))
			return flow;
		conn = flow->flags & HYBRID_FLOW_CONN_VERDICT;
		if (conn ? !flow_new_connection(flow, p, dir) : flow_blocked(flow, now))
			return flow;
	}
	fresh.first_seen_ns = now;
	if (dir)
		fresh.flags |= HYBRID_FLOW_ORIG_HI;
	if (!flow || conn)
		restored = flow_restore_pinned(key, &fresh, p, now);
	if (flow) {
		if (conn)
			*events |= STATS_EVENT(HYBRID_CNT_CONN_RESTART);
		flow_replace(key, &fresh);
		*events |= STATS_EVENT(HYBRID_CNT_FLOW_NEW);
	} else {
		if (p->proto == IPPROTO_TCP && !pkt_is_bare_syn(p))
			fresh.flags |= HYBRID_FLOW_MIDSTREAM;
		/* NOEXIST: if another CPU created the flow in the meantime, keep its entry (and
		 * count the restore once, by the CPU whose insert won). */
		if (flow_insert(key, &fresh) == 0) {
			*events |= STATS_EVENT(HYBRID_CNT_FLOW_NEW);
			if (restored)
				*events |= STATS_EVENT(HYBRID_CNT_EVICTED_DECIDED);
		}
	}
	return flow_find(key);
}

/* Count the packet in its direction and return the verdict in force, after reverting an
 * expired one to NONE. Atomics (BPF_XADD; the result is not used): the same flow is updated
 * from every CPU that receives its packets. */
static __always_inline __u8 flow_account(struct hybrid_flow *flow, const struct hybrid_pkt *p,
					 __u32 dir, __u64 now, __u32 *events)
{
	__u8 verdict;

	flow->last_seen_ns = now;
	__sync_fetch_and_add(&flow->packets[dir & 1], 1);
	__sync_fetch_and_add(&flow->bytes[dir & 1], p->l3_len);

	verdict = flow->verdict;
	if (verdict != HYBRID_VERDICT_NONE && !verdict_live(flow, now)) {
		/* Racing CPUs may both see the expiry; the write is idempotent, the counter may
		 * count it twice. */
		flow->verdict = HYBRID_VERDICT_NONE;
		flow->verdict_expires_ns = 0;
		*events |= STATS_EVENT(HYBRID_CNT_VERDICT_EXPIRED);
		verdict = HYBRID_VERDICT_NONE;
	}
	return verdict;
}

/* Keep the facts the engine reads when it writes a flow verdict (struct hybrid_flow): the
 * direction's highest TTL, and the isn of a direction's first SYN-carrying segment since the
 * entry (re)started: its bare SYN, or the SYN-ACK answering it (a later SYN-ACK does not move
 * it). Both writes are rare (a TTL rises once or twice per flow, a SYN once per direction), so
 * the common packet only reads. */
static __always_inline void flow_note_facts(struct hybrid_flow *flow, const struct hybrid_pkt *p, __u32 dir)
{
	__u8 bit = flow_isn_bit(dir);

	if (p->ttl > flow->ttl_max[dir & 1])
		flow->ttl_max[dir & 1] = p->ttl;
	if ((p->tcp_flags & TCPF_SYN) && p->proto == IPPROTO_TCP && !(flow->flags & bit)) {
		flow->isn[dir & 1] = p->seq;
		flow->flags |= bit;
	}
}

/* Spend one packet of the direction's first-N budget when the packet carries payload (pure
 * ACKs do not consume it). Returns how many payload packets the direction had before this one:
 * the packet is within the budget when that is below first_n. Without an entry (the insert
 * failed) the packet counts as the first of a new flow: its payload, if any, is within it.
 * 0xffffffff: no payload, never within the budget.
 *
 * bcc's LLVM backend targets a BPF CPU without fetching atomics (BPF_FETCH: "Invalid usage of
 * the XADD return value"), so the old value is read, then the add is atomic: two CPUs racing
 * on one direction may both see the same count and both flag, which errs on the side of
 * inspecting one packet more, never one fewer. */
static __always_inline __u32 flow_spend_first_n(struct hybrid_flow *flow, const struct hybrid_pkt *p,
						__u32 dir)
{
	__u32 prev;

	if (p->payload_len == 0)
		return 0xffffffff;
	if (!flow)
		return 0;
	prev = flow->payload_packets[dir & 1];
	__sync_fetch_and_add(&flow->payload_packets[dir & 1], 1);
	return prev;
}

/* Undo flow_spend_first_n() for a packet that is dropped: a dropped packet must not spend the
 * flow's first-N budget, or a flood could use up a flow's inspection and let its later payload
 * pass unflagged. (An atomic add of -1: the undo of the add in flow_spend_first_n().) */
static __always_inline void flow_refund_first_n(struct hybrid_flow *flow, const struct hybrid_pkt *p,
						__u32 dir)
{
	if (flow && p->payload_len > 0)
		__sync_fetch_and_add(&flow->payload_packets[dir & 1], (__u32)-1);
}

/* HYBRID_FLOW_SEQ0/1: the flag saying seq_end[dir] is set. */
static __always_inline __u8 flow_seq_bit(__u32 dir)
{
	return dir ? HYBRID_FLOW_SEQ1 : HYBRID_FLOW_SEQ0;
}

/* A TCP payload packet flagged under the first-N budget: move the direction's seq_end to the
 * end of its payload when that is further (hybrid_common.h, struct hybrid_flow). */
static __always_inline void flow_note_inspected(struct hybrid_flow *flow, const struct hybrid_pkt *p,
						__u32 dir)
{
	__u8 bit = flow_seq_bit(dir);
	__u32 end = p->seq + p->payload_len;

	if (!(flow->flags & bit) || (__s32)(end - flow->seq_end[dir & 1]) > 0) {
		flow->seq_end[dir & 1] = end;
		flow->seq_bytes[dir & 1] = (__u32)flow->bytes[dir & 1];
	}
	flow->flags |= bit;
}

/* Does a TCP payload packet past the budget start within HYBRID_RETRANS_WINDOW before the
 * direction's seq_end, i.e. retransmit bytes that were inspected under the budget? Once the
 * direction has carried HYBRID_SEQ_FORGET bytes since seq_end moved, seq_end is forgotten
 * (struct hybrid_flow, seq_bytes): the flag is cleared once, by the first packet to see it. */
static __always_inline int flow_is_retransmission(struct hybrid_flow *flow, const struct hybrid_pkt *p,
						  __u32 dir)
{
	__u8 bit = flow_seq_bit(dir);

	if (p->proto != IPPROTO_TCP || p->payload_len == 0 || !(flow->flags & bit))
		return 0;
	if ((__u32)flow->bytes[dir & 1] - flow->seq_bytes[dir & 1] >= HYBRID_SEQ_FORGET) {
		flow->flags &= ~bit;
		return 0;
	}
	return flow->seq_end[dir & 1] - p->seq - 1 < HYBRID_RETRANS_WINDOW;
}

/* Does the engine want this payload packet (struct hybrid_flow, follow): it starts within the
 * direction's byte budget, or it reaches the direction's next message? */
static __always_inline int flow_followed(const struct hybrid_flow *flow, const struct hybrid_pkt *p, __u32 dir)
{
	if (p->payload_len == 0)
		return 0;
	if ((flow->follow & HYBRID_FOLLOW_UNTIL(dir & 1)) && p->proto == IPPROTO_TCP &&
	    (__s32)(p->seq - flow->until_seq[dir & 1]) < 0)
		return 1;
	if (!(flow->follow & HYBRID_FOLLOW_ON(dir & 1)))
		return 0;
	if (p->proto != IPPROTO_TCP)
		return 1;
	return (__s32)(p->seq + p->payload_len - flow->follow_seq[dir & 1]) > 0;
}

/* The packet was admitted to the queue: the flow has flagged one more (the per-source budget
 * charges a flow only until it has flagged something). */
static __always_inline void flow_note_flagged(struct hybrid_flow *flow)
{
	if (flow)
		__sync_fetch_and_add(&flow->flagged, 1);
}

#endif /* HYBRID_FLOW_TABLE_H */
