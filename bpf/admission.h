/* SPDX-License-Identifier: GPL-2.0 */
/* admission.h: the budgets on flagged packets (hybrid_common.h, "Admission control"): a GCRA
 * bucket per source (hybrid_sources) and one global bucket (hybrid_budget). tc keeps the books;
 * XDP only reads a source's bucket to drop its SYNs early. Included by hybrid.bpf.c after the
 * map accessors and stats.h.
 */
#ifndef HYBRID_ADMISSION_H
#define HYBRID_ADMISSION_H

/* GCRA: would a packet arriving now be admitted by a bucket whose theoretical arrival time is
 * tat? Returns the new tat to store when it is, 0 when it is not. */
static __always_inline __u64 gcra(__u64 tat, __u64 now, __u64 interval, __u64 tolerance)
{
	__u64 t = tat > now ? tat : now;

	if (t - now > tolerance)
		return 0;
	return t + interval;
}

/* XDP's question: a SYN from a source over its admission budget, with the drop policy? tc
 * would drop it anyway; at XDP it costs no skb. Nothing is charged here (the bucket is read,
 * not written): tc alone keeps the books. */
static __always_inline int syn_over_budget(const struct hybrid_config *cfg, const struct hybrid_pkt *p,
					   __u64 now)
{
	struct hybrid_addr_key k;
	struct hybrid_bucket *b;

	if (!(cfg->flags & HYBRID_CFG_OVER_DROP) || !cfg->source_interval_ns || !pkt_is_bare_syn(p))
		return 0;
	__builtin_memcpy(k.addr, p->saddr, 16);
	b = source_find(&k);
	return b && b->tat_ns > now && b->tat_ns - now > cfg->source_tolerance_ns;
}

/* Admission of one flagged packet. Returns 0 when admitted (and charges the buckets), else the
 * events STATS_EVENT(HYBRID_CNT_OVER_SOURCE / _GLOBAL) of the budgets that refused it. Both
 * buckets are checked before either is charged, so a packet refused by one does not spend the
 * other. The updates are plain read-modify-writes: CPUs racing on one source may both be
 * admitted, a slight over-admission under contention, never an under-admission of a quiet
 * source. */
static __always_inline __u32 admit(const struct hybrid_config *cfg, const __u32 *saddr, int first_of_flow,
				   int low_priority, __u64 now)
{
	struct hybrid_addr_key k;
	struct hybrid_bucket *src = NULL, *glob = NULL, fresh = {};
	__u64 src_tat = 0, glob_tat = 0, tol;
	__u32 over = 0;

	if (first_of_flow && cfg->source_interval_ns) {
		__builtin_memcpy(k.addr, saddr, 16);
		src = source_find(&k);
		src_tat = gcra(src ? src->tat_ns : 0, now, cfg->source_interval_ns, cfg->source_tolerance_ns);
		if (!src_tat)
			over |= STATS_EVENT(HYBRID_CNT_OVER_SOURCE);
	}
	if (cfg->global_interval_ns) {
		glob = budget_get();
		if (glob) {
			tol = cfg->global_tolerance_ns;
			if (low_priority)
				tol /= 2;     /* half the burst is held for the first packets of real flows */
			glob_tat = gcra(glob->tat_ns, now, cfg->global_interval_ns, tol);
			if (!glob_tat)
				over |= STATS_EVENT(HYBRID_CNT_OVER_GLOBAL);
		}
	}
	if (over)
		return over;
	if (first_of_flow && cfg->source_interval_ns) {
		if (src) {
			src->tat_ns = src_tat;
		} else {
			fresh.tat_ns = src_tat;
			source_put(&k, &fresh);
		}
	}
	if (glob)
		glob->tat_ns = glob_tat;
	return 0;
}

/* tc's admission step for a packet with flag reasons. Returns its outcome: HYBRID_CNT_FLAGGED
 * when admitted (or no budget is on), else HYBRID_CNT_OVER_DROP or HYBRID_CNT_OVER_PASS, with
 * the refusing budgets' events added to *events. now is 0 when no step has read the clock.
 *
 * First of its flow (charges the per-source budget): no flow key, a flow entry this packet
 * created, or a flow with nothing flagged yet. Low priority (half the global burst): unproven
 * packets (no key, or the entry is theirs: spoofable) and packets flagged only because every
 * packet of their flow is (a watched port or prefix, INSPECT), so that one heavy flow cannot
 * starve the first payloads of all the others. */
static __always_inline int admission_check(const struct hybrid_config *cfg, const struct hybrid_pkt *p,
					   int status, const struct hybrid_flow *flow, __u32 reasons,
					   __u64 now, __u32 *events)
{
	int unproven = status != PKT_OK || (*events & STATS_EVENT(HYBRID_CNT_FLOW_NEW));
	__u32 over;

	if (!cfg->source_interval_ns && !cfg->global_interval_ns)
		return HYBRID_CNT_FLAGGED;
	if (!now)
		now = hybrid_now();
	over = admit(cfg, p->saddr, unproven || (flow && !flow->flagged),
		     unproven || !(reasons & ~(HYBRID_REASON_PORT | HYBRID_REASON_PREFIX | HYBRID_REASON_INSPECT)),
		     now);
	if (!over)
		return HYBRID_CNT_FLAGGED;
	*events |= over;
	/* Payload is never passed uninspected (fragments and unparseable transports count as
	 * payload: what they carry is unknown). */
	if (p->payload_len > 0 || status != PKT_OK || (cfg->flags & HYBRID_CFG_OVER_DROP))
		return HYBRID_CNT_OVER_DROP;
	return HYBRID_CNT_OVER_PASS;
}

#endif /* HYBRID_ADMISSION_H */
