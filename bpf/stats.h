/* SPDX-License-Identifier: GPL-2.0 */
/* stats.h: the per-CPU counters (struct hybrid_stats, HYBRID_CNT_* of hybrid_common.h) and the
 * one exit of each program that counts them (as xdp-filter's xdp_stats_record_action()).
 *
 * Every packet ends in exactly one outcome, a HYBRID_CNT_* index, and the program's action
 * follows from it (xdp_action(), tc_action()): the counters cannot disagree with what was done.
 * Besides its outcome a tc packet may raise events (a flow created, a budget refused it, ...):
 * an event is the bit of its counter's index, STATS_EVENT(HYBRID_CNT_*), so an event and the
 * counter it bumps are one name. Included by hybrid.bpf.c after the map accessors.
 */
#ifndef HYBRID_STATS_H
#define HYBRID_STATS_H

#define STATS_EVENT(cnt) (1U << (cnt))
_Static_assert(HYBRID_CNT_CONN_RESTART < 32, "an event is a bit of a __u32");

/* No outcome yet: a tc step lets the packet go on to the next one. At XDP's exit: a pass,
 * which has no counter of its own. */
#define OUTCOME_NONE (-1)

/* The slot of the interface the packet arrived on; unregistered interfaces share slot 0. */
static __always_inline struct hybrid_stats *stats_slot(__u32 ifindex)
{
	struct hybrid_iface *iface = iface_find(ifindex);
	__u32 slot = iface ? iface->slot : 0;

	/* Userspace writes the slot: one out of range counts in slot 0 rather than nowhere
	 * (the array lookup would fail). */
	if (slot >= HYBRID_MAX_IFACES)
		slot = 0;
	return stats_find(slot);
}

/* Per-CPU, so plain increments are exact: XDP and tc ingress run in softirq context, which is
 * not re-entered on the same CPU. The bounds check is what lets the verifier accept a variable
 * index into the map value. */
static __always_inline void stats_count(struct hybrid_stats *st, int cnt)
{
	if (cnt >= 0 && cnt < HYBRID_CNT_MAX)
		st->c[cnt]++;
}

static __always_inline void stats_count_event(struct hybrid_stats *st, __u32 events, int cnt)
{
	if (events & STATS_EVENT(cnt))
		st->c[cnt]++;
}

/* The counter of a name attempt (names.h) or of what the cache gave (namecache.h). The value
 * may come back from map memory (unknown to the verifier): one constant index per case, no
 * computed one. */
static __always_inline void stats_count_name(struct hybrid_stats *st, int name_cnt)
{
	switch (name_cnt) {
	case HYBRID_CNT_NAME_DNS: st->c[HYBRID_CNT_NAME_DNS]++; break;
	case HYBRID_CNT_NAME_SNI: st->c[HYBRID_CNT_NAME_SNI]++; break;
	case HYBRID_CNT_NAME_HOST: st->c[HYBRID_CNT_NAME_HOST]++; break;
	case HYBRID_CNT_NAME_NONE: st->c[HYBRID_CNT_NAME_NONE]++; break;
	case HYBRID_CNT_NAME_TRUNCATED: st->c[HYBRID_CNT_NAME_TRUNCATED]++; break;
	case HYBRID_CNT_NAME_POINTER: st->c[HYBRID_CNT_NAME_POINTER]++; break;
	case HYBRID_CNT_NAME_SEVERAL: st->c[HYBRID_CNT_NAME_SEVERAL]++; break;
	case HYBRID_CNT_NAME_ODD: st->c[HYBRID_CNT_NAME_ODD]++; break;
	case HYBRID_CNT_NAME_FORM: st->c[HYBRID_CNT_NAME_FORM]++; break;
	case HYBRID_CNT_NAME_TOO_LONG: st->c[HYBRID_CNT_NAME_TOO_LONG]++; break;
	case HYBRID_CNT_CACHE_MISS: st->c[HYBRID_CNT_CACHE_MISS]++; break;
	case HYBRID_CNT_CACHE_EXPIRED: st->c[HYBRID_CNT_CACHE_EXPIRED]++; break;
	case HYBRID_CNT_CACHE_REFUSED: st->c[HYBRID_CNT_CACHE_REFUSED]++; break;
	case HYBRID_CNT_CACHE_LOST: st->c[HYBRID_CNT_CACHE_LOST]++; break;
	case HYBRID_CNT_NAMES_NO_PROG: st->c[HYBRID_CNT_NAMES_NO_PROG]++; break;
	default: break;                                  /* 0: no name looked for */
	}
}

/* Every XDP outcome is a drop (HYBRID_CNT_XDP_DROP_*); without one the packet goes on to tc. */
static __always_inline int xdp_action(int outcome)
{
	return outcome == OUTCOME_NONE ? XDP_PASS : XDP_DROP;
}

/* Pass with TC_ACT_UNSPEC, not TC_ACT_OK: with direct-action, TC_ACT_OK ends classification on
 * this hook, so another tool's filter at a later priority would never see the packet. UNSPEC
 * lets the next filter run and, when none is left, passes the packet. */
static __always_inline int tc_action(int outcome)
{
	if (outcome == HYBRID_CNT_DROP_TC_PREFIX || outcome == HYBRID_CNT_DROP_TC_FLOW ||
	    outcome == HYBRID_CNT_OVER_DROP || outcome == HYBRID_CNT_CACHE_DROPPED ||
	    outcome == HYBRID_CNT_DROP_TC_BAN)
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}

/* The one exit of hybrid_xdp. */
static __always_inline int stats_record_xdp(__u32 ifindex, int outcome)
{
	struct hybrid_stats *st = stats_slot(ifindex);

	if (st) {
		st->c[HYBRID_CNT_XDP_PACKETS]++;
		stats_count(st, outcome);
	}
	return xdp_action(outcome);
}

/* The one exit of hybrid_tc_ingress and of the parser programs: the packet, its outcome, its
 * events, what reading its name gave (name_cnt, 0: not looked for), what the name cache gave
 * (cache_cnt, 0: not asked) and, when it was flagged, each of its reasons. */
static __always_inline int stats_record_tc(__u32 ifindex, int outcome, __u32 events, __u32 reasons,
					   int name_cnt, int cache_cnt)
{
	struct hybrid_stats *st = stats_slot(ifindex);
	int i;

	if (st) {
		st->c[HYBRID_CNT_PACKETS]++;
		stats_count(st, outcome);
		stats_count_event(st, events, HYBRID_CNT_FLOW_NEW);
		stats_count_event(st, events, HYBRID_CNT_FLOW_FULL);
		stats_count_event(st, events, HYBRID_CNT_VERDICT_EXPIRED);
		stats_count_event(st, events, HYBRID_CNT_OVER_SOURCE);
		stats_count_event(st, events, HYBRID_CNT_OVER_GLOBAL);
		stats_count_event(st, events, HYBRID_CNT_EVICTED_DECIDED);
		stats_count_event(st, events, HYBRID_CNT_CONN_RESTART);
		stats_count_name(st, name_cnt);
		stats_count_name(st, cache_cnt);
		if (outcome == HYBRID_CNT_FLAGGED) {
#pragma unroll
			for (i = 0; i < HYBRID_REASON_COUNTED_LOW; i++)
				if (reasons & (1U << i))
					st->c[HYBRID_CNT_REASON_BASE + i]++;
			if (reasons & HYBRID_REASON_FOLLOW)
				st->c[HYBRID_CNT_REASON_FOLLOW]++;
		}
	}
	return tc_action(outcome);
}

#endif /* HYBRID_STATS_H */
