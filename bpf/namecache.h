/* SPDX-License-Identifier: GPL-2.0 */
/* namecache.h: the name-verdict cache (hybrid_common.h, "The name-verdict cache"): which parser
 * program a first payload goes to, the lookup of the name it read, the doubts that send the
 * packet to the engine all the same, and the decision carried out and reported. Compiled only
 * with -DHYBRID_NAMES. tests/bpf/reference.py models it (RefDatapath.names_cache); tests/bpf/
 * test_namecache_kernel.py compares the kernel's cached decisions with the engine's. Included by
 * hybrid.bpf.c after names.h.
 *
 * The kernel decides from the cache only what the engine would decide for that packet, and the
 * engine's decision (hybrid/engine/loop.py, Engine._settle) refuses a bypass on any doubt about
 * what the server will read. The cache repeats those refusals, stricter where it cannot tell:
 *   - the transport checksum: trusted when the NIC verified it (CHECKSUM_UNNECESSARY) or the
 *     sending host's stack completes it on the way out (CHECKSUM_PARTIAL: a local container's
 *     packet, whose checksum the server then finds right, as the engine does, which sees it
 *     completed); verified here otherwise (names_csum_verify());
 *   - a TTL below the highest its direction has shown (an insertion that may expire before the
 *     server: "ip:low-ttl");
 *   - TCP: the kernel saw the handshake, and the payload starts the stream (seq == isn + 1, no
 *     SYN on the packet): else "tcp:not-stream-start", or a block earned without a handshake;
 * and names_wanted() already limits it to the first payload of the direction that opened the
 * flow, whole in one packet, read exactly as the engine reads it (names.h).
 */
#ifndef HYBRID_NAMECACHE_H
#define HYBRID_NAMECACHE_H

/* The parser program for a first payload (hybrid_name_prg index), or -1 when the packet
 * names nothing the parsers read (counted as NAME_NONE without a tail call). */
static __always_inline int names_which(struct __sk_buff *skb, const struct hybrid_pkt *p)
{
	__u8 c = 0;

	if (bpf_ntohs(p->dport) == 53)
		return HYBRID_NAME_PROG_DNS_TLS;
	if (p->proto != IPPROTO_TCP)
		return -1;
	if (p->payload_len && bpf_skb_load_bytes(skb, p->payload_off, &c, 1) == 0 && c >= 'A' && c <= 'Z')
		return HYBRID_NAME_PROG_HTTP;
	return HYBRID_NAME_PROG_DNS_TLS;  /* a ClientHello, or what names_read() counts as nothing */
}

/* The packet's transport checksum, verified here as the engine verifies it (hybrid/engine/
 * rewrite.py, transport_checksum_ok): the pseudo-header, the transport header and the payload
 * (which names_read() copied into s->buf) summed with bpf_csum_diff(); a UDP/IPv4 checksum of 0
 * is "none" and right. IPv4 options and IPv6 extension headers (a routing header changes the
 * pseudo-header's destination) are not verified here: such packets go to the engine. */
#define NAMES_CSUM_CHUNK 512        /* bpf_csum_diff() sums at most 512 bytes per call */

static __always_inline int names_csum_verify(struct __sk_buff *skb, const struct hybrid_pkt *p,
					     struct hybrid_name_scratch *s)
{
	__u32 hlen = (__u32)p->payload_off - p->l4_off, plen = p->payload_len, l4len, padded, n, k;
	__u16 field = 0;
	__s64 sum;
	__u32 c;

	if (!p->l3_plain || hlen < 8 || hlen > 60 || (hlen & 3) || plen > HYBRID_NAME_SCAN)
		return 0;
	l4len = hlen + plen;
	if (p->proto == IPPROTO_UDP && !p->ipv6) {
		if (bpf_skb_load_bytes(skb, p->l4_off + 6, &field, 2) < 0)
			return 0;
		if (field == 0)
			return 1;
	}
	if (p->ipv6) {
		__builtin_memcpy(s->csum, p->saddr, 16);
		__builtin_memcpy(s->csum + 16, p->daddr, 16);
		s->csum[32] = l4len >> 24;
		s->csum[33] = l4len >> 16;
		s->csum[34] = l4len >> 8;
		s->csum[35] = l4len;
		s->csum[36] = 0;
		s->csum[37] = 0;
		s->csum[38] = 0;
		s->csum[39] = p->proto;
		sum = bpf_csum_diff(0, 0, (void *)s->csum, 40, 0);
	} else {
		__builtin_memcpy(s->csum, &p->saddr[3], 4);
		__builtin_memcpy(s->csum + 4, &p->daddr[3], 4);
		s->csum[8] = 0;
		s->csum[9] = p->proto;
		s->csum[10] = l4len >> 8;
		s->csum[11] = l4len;
		sum = bpf_csum_diff(0, 0, (void *)s->csum, 12, 0);
	}
	if (sum < 0)
		return 0;
	hlen &= 63;
	if (hlen < 8 || bpf_skb_load_bytes(skb, p->l4_off, s->csum + 40, hlen) < 0)
		return 0;
	sum = bpf_csum_diff(0, 0, (void *)(s->csum + 40), hlen, (__u32)sum);
	if (sum < 0)
		return 0;
	/* The payload, zero-padded to a multiple of 4 (the sum of a zero byte is nothing). */
	padded = (plen + 3) & ~3U;
#pragma unroll
	for (k = 0; k < 3; k++)
		if (plen + k < padded)
			s->buf[(plen + k) & (HYBRID_NAME_SCAN - 1)] = 0;
	/* Whole chunks, then the rest: masks the verifier can follow (off + n < HYBRID_NAME_SCAN). */
#pragma unroll
	for (k = 0; k < HYBRID_NAME_SCAN / NAMES_CSUM_CHUNK; k++) {
		if ((k + 1) * NAMES_CSUM_CHUNK > padded)
			break;
		sum = bpf_csum_diff(0, 0, (void *)(s->buf + k * NAMES_CSUM_CHUNK), NAMES_CSUM_CHUNK, (__u32)sum);
		if (sum < 0)
			return 0;
	}
	n = padded & (NAMES_CSUM_CHUNK - 4);
	if (n) {
		k = padded & (HYBRID_NAME_SCAN - NAMES_CSUM_CHUNK);
		sum = bpf_csum_diff(0, 0, (void *)(s->buf + k), n, (__u32)sum);
		if (sum < 0)
			return 0;
	}
	c = (__u32)sum;
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return c == 0xffff;
}

/* 1 when the server will find the packet's transport checksum right. Trusted without a look:
 * CHECKSUM_UNNECESSARY (the NIC verified it) and CHECKSUM_PARTIAL (a local sender's stack
 * completes it on the way out; the engine, too, sees it completed). Verified here: CHECKSUM_NONE
 * and COMPLETE (as it came). bpf_csum_level() only tells UNNECESSARY apart: raising the level
 * turns NONE into UNNECESSARY (then reset to NONE) and leaves PARTIAL and COMPLETE alone;
 * bpf_csum_update() of 0 (a no-op) fails on all but COMPLETE. */
static __always_inline int names_csum_trusted(struct __sk_buff *skb, const struct hybrid_pkt *p,
					      struct hybrid_name_scratch *s)
{
	if (bpf_csum_level(skb, BPF_CSUM_LEVEL_QUERY) >= 0)
		return 1;                                     /* UNNECESSARY */
	bpf_csum_level(skb, BPF_CSUM_LEVEL_INC);
	if (bpf_csum_level(skb, BPF_CSUM_LEVEL_QUERY) >= 0) {
		bpf_csum_level(skb, BPF_CSUM_LEVEL_RESET);    /* it was NONE: leave it so */
		return names_csum_verify(skb, p, s);
	}
	if ((long)bpf_csum_update(skb, 0) < 0)
		return 1;                                     /* PARTIAL */
	return names_csum_verify(skb, p, s);              /* COMPLETE */
}

/* 1 when the engine would doubt a bypass of this packet, or could not block its flow (above). */
static __always_inline int names_doubt(struct __sk_buff *skb, const struct hybrid_pkt *p,
				       const struct hybrid_flow *flow, __u32 dir,
				       struct hybrid_name_scratch *s)
{
	/* The engine reads a forwarded packet one hop lower and doubts it below max - 1: here,
	 * before the decrement, that is below max. */
	if (p->ttl < flow->ttl_max[dir & 1])
		return 1;
	if (p->proto == IPPROTO_TCP) {
		if ((flow->flags & (HYBRID_FLOW_ISN0 | HYBRID_FLOW_ISN1)) != (HYBRID_FLOW_ISN0 | HYBRID_FLOW_ISN1))
			return 1;
		/* The stream's first byte, or the next message the engine follows (it read the
		 * stream up to there, as the server does). */
		if ((p->tcp_flags & TCPF_SYN) ||
		    (p->seq != flow->isn[dir & 1] + 1 && !names_next_message(flow, p, dir)))
			return 1;
	}
	return !names_csum_trusted(skb, p, s);
}

/* Report a decision taken from the cache (0, or HYBRID_CNT_CACHE_LOST when the ring is full). */
static __always_inline int names_report(struct __sk_buff *skb, const struct tc_packet *t,
					const struct hybrid_name_scratch *s,
					const struct hybrid_name_verdict *v, __u32 generation)
{
	struct hybrid_name_event *ev = name_event_reserve();

	if (!ev)
		return HYBRID_CNT_CACHE_LOST;
	ev->ts_ns = t->now;
	__builtin_memcpy(&ev->flow, &t->key, sizeof(ev->flow));
	ev->ifindex = skb->ifindex;
	ev->rule = v->rule;
	ev->generation = generation;
	ev->payload_len = t->pkt.payload_len;
	ev->action = v->action;
	ev->verdict = v->verdict;
	ev->dir = t->dir;
	ev->kind = s->key.kind;
	ev->port = s->key.port;
	ev->len = s->key.len;
	__builtin_memcpy(ev->name, s->key.name, sizeof(ev->name));
	name_event_submit(ev);
	return 0;
}

/* After a passed message whose name the engine follows (hybrid_name_verdict.follow): the next
 * one starts where this packet ends (names.h reads only a packet that holds exactly one message:
 * a request head and the body a Content-Length covers, or one DNS message), as the engine would
 * write it (hybrid/engine/loop.py, _follow_start); a UDP DNS flow is followed both ways. */
static __always_inline void names_follow_on(struct hybrid_flow *flow, const struct hybrid_pkt *p, __u32 dir)
{
	__u8 f = flow->follow;

	if (p->proto == IPPROTO_TCP) {
		f &= ~(HYBRID_FOLLOW_ON(dir & 1) | (3U << HYBRID_FOLLOW_MODE_SHIFT(dir & 1)));
		f |= HYBRID_FOLLOW_ON(dir & 1) | (HYBRID_FOLLOW_M_MESSAGE << HYBRID_FOLLOW_MODE_SHIFT(dir & 1));
		flow->follow_seq[dir & 1] = p->seq + p->payload_len;
	} else {
		f |= HYBRID_FOLLOW_ON(0) | HYBRID_FOLLOW_ON(1);
	}
	flow->follow = f;
}

/* Look the name up and carry out a live entry's decision: HYBRID_CNT_CACHE_PASSED/_DROPPED, or
 * OUTCOME_NONE (the packet goes on to admission and the engine), with t->cache_cnt saying why
 * (HYBRID_CNT_CACHE_*). s->key holds the name names_read() read, generation 0. */
static __always_inline int names_cache(struct __sk_buff *skb, struct tc_packet *t,
				       struct hybrid_name_scratch *s)
{
	struct hybrid_name_gen *state = name_state_get();
	struct hybrid_flow *flow = t->flow;
	struct hybrid_name_verdict *v;
	__u32 generation;

	if (!state || !flow)
		return OUTCOME_NONE;
	generation = state->generation;
	if (!generation)                                      /* no engine has filled it */
		return OUTCOME_NONE;
	s->key.generation = generation;
	v = name_cache_find(&s->key);
	if (!v) {
		t->cache_cnt = HYBRID_CNT_CACHE_MISS;
		return OUTCOME_NONE;
	}
	if (v->expires_ns <= t->now) {
		name_cache_delete(&s->key);
		t->cache_cnt = HYBRID_CNT_CACHE_EXPIRED;
		return OUTCOME_NONE;
	}
	if (names_doubt(skb, &t->pkt, flow, t->dir, s)) {
		t->cache_cnt = HYBRID_CNT_CACHE_REFUSED;
		return OUTCOME_NONE;
	}
	v->hits++;
	if (v->verdict == HYBRID_VERDICT_BYPASS || v->verdict == HYBRID_VERDICT_BLOCK) {
		flow->verdict = v->verdict;
		flow->verdict_expires_ns = v->flow_ttl_ns ? t->now + v->flow_ttl_ns : 0;
		flow->flags |= HYBRID_FLOW_CONN_VERDICT | HYBRID_FLOW_BY_CACHE;
		if (v->verdict == HYBRID_VERDICT_BLOCK) {
			/* As the engine pins its BLOCKs: a flood that evicts the entry cannot
			 * unblock the flow. */
			struct hybrid_pinned_verdict pin = {
				.expires_ns = flow->verdict_expires_ns,
				.verdict = HYBRID_VERDICT_BLOCK,
				.origin = HYBRID_PIN_ENGINE,
			};
			pinned_put(&t->key, &pin);
		}
	}
	if (v->follow && v->action == HYBRID_NAME_ACT_ACCEPT)
		names_follow_on(flow, &t->pkt, t->dir);
	t->cache_cnt = names_report(skb, t, s, v, generation);
	return v->action == HYBRID_NAME_ACT_DROP ? HYBRID_CNT_CACHE_DROPPED : HYBRID_CNT_CACHE_PASSED;
}

#endif /* HYBRID_NAMECACHE_H */
