/* SPDX-License-Identifier: GPL-2.0 */
/* hybrid.bpf.c: the datapath. Compiled at run time by bcc (hybrid/datapath/loader.py), with -I
 * for this directory and these -D knobs: HYBRID_FLOW_TABLE_SIZE, HYBRID_PREFIX_TABLE_SIZE,
 * HYBRID_BAN_TABLE_SIZE, HYBRID_PINNED_TABLE_SIZE, HYBRID_PIN_DIR. Runtime knobs live in the
 * hybrid_config map. hybrid_common.h explains the division of labour:
 *   hybrid_xdp         drops bans, blocked prefixes and BLOCK flows; never writes the flow table.
 *   hybrid_tc_ingress  classifies every packet, maintains the flow table, sets the mark.
 * tests/bpf/reference.py is a Python model of hybrid_tc_ingress: change both.
 *
 * This file holds the maps, their accessors and the two entry points; each concern is a
 * header: packet.h (the packet summary), stats.h (counters, the one exit), flow_table.h,
 * classify.h (flag reasons, the mark), admission.h (budgets), names.h (the name a first
 * payload asks for).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/types.h>

#include "hybrid_common.h"
#include "parsing.h"
#include "packet.h"

/* ---- Maps ------------------------------------------------------------------------------------
 * With HYBRID_PIN_DIR, bcc opens the map pinned at that path if one exists (so flows, verdicts,
 * config and counters survive a restart of the tool) and otherwise creates and pins it. The C
 * identifiers are the map names of hybrid_common.h (HYBRID_MAP_*): bcc uses them as table names,
 * kernel map names and pin file names. */
#ifdef HYBRID_PIN_DIR
#define HYBRID_TABLE(type, key, leaf, name, size, flags) \
	BPF_TABLE_PINNED(type, key, leaf, name, size, HYBRID_PIN_DIR "/" #name, flags)
#else /* !HYBRID_PIN_DIR */
#define HYBRID_TABLE(type, key, leaf, name, size, flags) \
	BPF_F_TABLE(type, key, leaf, name, size, flags)
#endif /* HYBRID_PIN_DIR */

HYBRID_TABLE("array", __u32, struct hybrid_config, hybrid_config, 1, 0);
/* LRU: a full table evicts the least recently used flow instead of failing the insert, so a
 * flood of new flows degrades the oldest state rather than blinding the classifier. */
HYBRID_TABLE("lru_hash", struct hybrid_flow_key, struct hybrid_flow, hybrid_flows,
	     HYBRID_FLOW_TABLE_SIZE, 0);
/* Not LRU: what is pinned stays until userspace removes it or it expires (hybrid_common.h,
 * "Pinned verdicts"). BPF_F_NO_PREALLOC: entries are allocated on insert, so an empty table
 * costs no memory; the datapath only looks up and deletes, userspace inserts. */
HYBRID_TABLE("hash", struct hybrid_flow_key, struct hybrid_pinned_verdict, hybrid_pinned,
	     HYBRID_PINNED_TABLE_SIZE, BPF_F_NO_PREALLOC);
/* The kernel refuses to create an LPM trie without BPF_F_NO_PREALLOC. */
HYBRID_TABLE("lpm_trie", struct hybrid_prefix_key, struct hybrid_prefix, hybrid_prefixes,
	     HYBRID_PREFIX_TABLE_SIZE, BPF_F_NO_PREALLOC);
/* Bans (hybrid_common.h, "Bans"): a trie of its own, written by userspace only. Entries are
 * allocated on insert (BPF_F_NO_PREALLOC, required for a trie), so the 131,072 slots cost
 * nothing until used. */
HYBRID_TABLE("lpm_trie", struct hybrid_prefix_key, struct hybrid_ban, hybrid_bans,
	     HYBRID_BAN_TABLE_SIZE, BPF_F_NO_PREALLOC);
HYBRID_TABLE("array", __u32, __u8, hybrid_ports, 65536, 0);
HYBRID_TABLE("hash", __u32, struct hybrid_iface, hybrid_ifaces, HYBRID_MAX_IFACES, 0);
/* Per-CPU: counters are bumped on every packet; one shared cache line would bounce between
 * CPUs. Userspace sums the per-CPU copies. */
HYBRID_TABLE("percpu_array", __u32, struct hybrid_stats, hybrid_stats, HYBRID_MAX_IFACES, 0);
/* Admission control (hybrid_common.h). Per source: LRU, so a spoofed flood recycles the oldest
 * buckets instead of filling the table. Global: one shared bucket, touched by flagged packets
 * only. */
HYBRID_TABLE("lru_hash", struct hybrid_addr_key, struct hybrid_bucket, hybrid_sources,
	     HYBRID_SOURCE_TABLE_SIZE, 0);
HYBRID_TABLE("array", __u32, struct hybrid_bucket, hybrid_budget, 1, 0);
#ifdef HYBRID_NAMES
/* Per-CPU: the name parsers' buffer and state (names.h), and the packet summary tc passes to
 * the parser programs; tc's alone. */
HYBRID_TABLE("percpu_array", __u32, struct hybrid_name_scratch, hybrid_scratch, 1, 0);
/* The name-verdict cache (namecache.h): only the engine inserts; tc looks up, counts hits and
 * deletes an expired entry. LRU: a full cache forgets the least used names. */
HYBRID_TABLE("lru_hash", struct hybrid_name_key, struct hybrid_name_verdict, hybrid_names,
	     HYBRID_NAME_CACHE_SIZE, 0);
HYBRID_TABLE("array", __u32, struct hybrid_name_gen, hybrid_name_gen, 1, 0);
/* bcc's BPF_RINGBUF_OUTPUT, with a pin path when there is a pin directory: the engine opens the
 * ring by its pin (hybrid/kernel/ringbuf.py). */
struct hybrid_name_ev_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	__u32 max_entries;
};
#ifdef HYBRID_PIN_DIR
__attribute__((section("maps/ringbuf:" HYBRID_PIN_DIR "/hybrid_name_ev")))
#else
__attribute__((section("maps/ringbuf")))
#endif
struct hybrid_name_ev_table_t hybrid_name_ev = { .max_entries = HYBRID_NAME_EVENTS_SIZE };
/* The parser programs, one per index (HYBRID_NAME_PROG_*), filled by the loader. Pinned like
 * the maps: the kernel empties a program array when its last user reference goes (a pin is
 * one; the tc program's is not), which would leave tc with nothing to call once the attaching
 * process exits. Detach removes the pin, and with it the programs. */
HYBRID_TABLE("prog", __u32, __u32, hybrid_name_prg, HYBRID_NAME_PROGS, 0);
#endif /* HYBRID_NAMES */

/* ---- The clock -------------------------------------------------------------------------------
 * Every read of the time goes through hybrid_now(). The live build reads CLOCK_MONOTONIC with
 * bpf_ktime_get_ns(): the macro leaves the programs' instructions exactly what they were before
 * there was a choice (tests/bpf/test_replay_clock.py compares the program tags). A replay build
 * (-DHYBRID_REPLAY_CLOCK, hybrid/replay) reads the one value of hybrid_clock instead, which
 * userspace sets to the capture's time of each packet before it runs the packet, so that verdict
 * TTLs, expiry and admission budgets follow the capture, not the wall clock. The array lookup
 * with a constant key never fails; the verifier still wants the check. Its other arm reads the
 * kernel's clock so that both give an unknown value: with a constant 0 there the verifier would
 * walk the paths after it twice over (measured: 45k more instructions in the name-cache tc).
 * BPF_F_MMAPABLE: userspace writes the time into the mapped page, no system call per packet. */
#ifdef HYBRID_REPLAY_CLOCK
HYBRID_TABLE("array", __u32, __u64, hybrid_clock, 1, BPF_F_MMAPABLE);

static __always_inline __u64 hybrid_now(void)
{
	__u32 zero = 0;
	__u64 *t = hybrid_clock.lookup(&zero);

	return t ? *t : bpf_ktime_get_ns();
}
#else /* !HYBRID_REPLAY_CLOCK */
#define hybrid_now() bpf_ktime_get_ns()
#endif /* HYBRID_REPLAY_CLOCK */

/* ---- Map accessors ---------------------------------------------------------------------------
 * bcc rewrites its method syntax (map.lookup(), map.insert()) into the helper calls with the
 * map's fd, and only in this file: a header's map.lookup() reaches the compiler unrewritten (an
 * indirect call through the table's struct, which the verifier refuses: "unknown opcode 8d"),
 * and a plain bpf_map_lookup_elem(&map, ...) is not rewritten anywhere. So every map operation
 * is one of these, and the headers below, included after them, use nothing else. */
static __always_inline struct hybrid_config *config_get(void)
{
	__u32 zero = 0;

	return hybrid_config.lookup(&zero);
}

static __always_inline struct hybrid_flow *flow_find(struct hybrid_flow_key *key)
{
	return hybrid_flows.lookup(key);
}

/* BPF_ANY: create the entry or overwrite it. */
static __always_inline int flow_replace(struct hybrid_flow_key *key, struct hybrid_flow *flow)
{
	return hybrid_flows.update(key, flow);
}

/* BPF_NOEXIST: 0 when this call created the entry. */
static __always_inline int flow_insert(struct hybrid_flow_key *key, struct hybrid_flow *flow)
{
	return hybrid_flows.insert(key, flow);
}

static __always_inline struct hybrid_pinned_verdict *pinned_find(struct hybrid_flow_key *key)
{
	return hybrid_pinned.lookup(key);
}

static __always_inline void pinned_delete(struct hybrid_flow_key *key)
{
	hybrid_pinned.delete(key);
}

static __always_inline struct hybrid_prefix *prefix_find(struct hybrid_prefix_key *key)
{
	return hybrid_prefixes.lookup(key);
}

static __always_inline struct hybrid_ban *ban_find(struct hybrid_prefix_key *key)
{
	return hybrid_bans.lookup(key);
}

/* HYBRID_PORT_* bits of a port (host order). */
static __always_inline __u8 *port_find(__u32 port)
{
	return hybrid_ports.lookup(&port);
}

static __always_inline struct hybrid_iface *iface_find(__u32 ifindex)
{
	return hybrid_ifaces.lookup(&ifindex);
}

static __always_inline struct hybrid_stats *stats_find(__u32 slot)
{
	return hybrid_stats.lookup(&slot);
}

static __always_inline struct hybrid_bucket *source_find(struct hybrid_addr_key *key)
{
	return hybrid_sources.lookup(key);
}

static __always_inline int source_put(struct hybrid_addr_key *key, struct hybrid_bucket *b)
{
	return hybrid_sources.update(key, b);
}

static __always_inline struct hybrid_bucket *budget_get(void)
{
	__u32 zero = 0;

	return hybrid_budget.lookup(&zero);
}

static __always_inline void pinned_put(struct hybrid_flow_key *key, struct hybrid_pinned_verdict *pin)
{
	hybrid_pinned.update(key, pin);
}

#ifdef HYBRID_NAMES
static __always_inline struct hybrid_name_scratch *names_scratch_get(void)
{
	__u32 zero = 0;

	return hybrid_scratch.lookup(&zero);
}

static __always_inline struct hybrid_name_gen *name_state_get(void)
{
	__u32 zero = 0;

	return hybrid_name_gen.lookup(&zero);
}

static __always_inline struct hybrid_name_verdict *name_cache_find(struct hybrid_name_key *key)
{
	return hybrid_names.lookup(key);
}

static __always_inline void name_cache_delete(struct hybrid_name_key *key)
{
	hybrid_names.delete(key);
}

static __always_inline struct hybrid_name_event *name_event_reserve(void)
{
	return hybrid_name_ev.ringbuf_reserve(sizeof(struct hybrid_name_event));
}

static __always_inline void name_event_submit(struct hybrid_name_event *ev)
{
	hybrid_name_ev.ringbuf_submit(ev, 0);
}

/* Returns only when the program at idx is missing. */
static __always_inline void names_tail_call(struct __sk_buff *skb, int idx)
{
	hybrid_name_prg.call(skb, idx);
}
#endif /* HYBRID_NAMES */

#include "stats.h"
#include "flow_table.h"
#include "classify.h"
#include "admission.h"
#ifdef HYBRID_NAMES
#include "names.h"
#endif

/* ---- XDP --------------------------------------------------------------------------------------- */

int hybrid_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hybrid_pkt p = {};
	struct hybrid_config *cfg;
	int status, outcome = OUTCOME_NONE;
	__u64 now;

	cfg = config_get();
	if (!cfg)
		goto out;
	status = parse_packet(data, data_end, data_end - data, &p);
	/* Malformed and non-IP packets pass: tc counts them, the stack drops what is invalid. */
	if (status == PKT_NOT_IP || status == PKT_BAD_L3)
		goto out;
	if (prefixes_match(cfg, &p) & HYBRID_PREFIX_BLOCK) {
		outcome = HYBRID_CNT_XDP_DROP_PREFIX;
		goto out;
	}
	if (bans_match(cfg, &p)) {
		outcome = HYBRID_CNT_XDP_DROP_BAN;
		goto out;
	}
	/* Unparseable transports and fragments have no flow key (tc does not create one either),
	 * except a first fragment that carries its ports: it drops with its BLOCKed flow. */
	if (status != PKT_OK && !p.frag_keyed)
		goto out;
	now = hybrid_now();
	if (syn_over_budget(cfg, &p, now)) {
		outcome = HYBRID_CNT_XDP_DROP_SOURCE;
		goto out;
	}
	if (flow_blocked_pkt(&p, now))
		outcome = HYBRID_CNT_XDP_DROP_FLOW;
out:
	return stats_record_xdp(ctx->ingress_ifindex, outcome);
}

/* ---- tc ingress ---------------------------------------------------------------------------------- */

/* What hybrid_tc_ingress knows about one packet; each step reads it and adds to it. */
struct tc_packet {
	struct hybrid_pkt pkt;
	struct hybrid_flow_key key;
	struct hybrid_flow *flow;  /* NULL: no flow key (status != PKT_OK) or the insert failed */
	__u64 now;                 /* CLOCK_MONOTONIC; 0 until a step reads the clock */
	__u32 dir;                 /* the packet's direction in its flow (flow_key_build) */
	__u32 events;              /* STATS_EVENT() bits, counted at the exit */
	__u32 reasons;             /* HYBRID_REASON_* found so far */
	int status;                /* PKT_* */
	int name_cnt;              /* HYBRID_CNT_NAME_* when a name was looked for, else 0 */
	int cache_cnt;             /* HYBRID_CNT_CACHE_* / NAMES_NO_PROG when the cache was asked, else 0 */
	__u32 old_mark;            /* skb->mark before mark_for_queue() (a cached decision restores it) */
};

#ifdef HYBRID_NAMES
#include "namecache.h"
#endif

/* Step 1. What the stack would drop, or cannot route as IP, passes unflagged. */
static __always_inline int tc_parse(struct __sk_buff *skb, struct tc_packet *t)
{
	t->status = parse_skb(skb, &t->pkt);
	if (t->status == PKT_NOT_IP)
		return HYBRID_CNT_NOT_IP;
	if (t->status == PKT_BAD_L3)
		return HYBRID_CNT_MALFORMED_L3;
	return OUTCOME_NONE;
}

/* Step 2. Blocked prefixes drop here too (XDP may not be attached, or not on this
 * interface); watched ones flag. */
static __always_inline int tc_check_prefixes(const struct hybrid_config *cfg, struct tc_packet *t)
{
	__u32 action = prefixes_match(cfg, &t->pkt);

	if (action & HYBRID_PREFIX_BLOCK)
		return HYBRID_CNT_DROP_TC_PREFIX;
	if (action & HYBRID_PREFIX_WATCH)
		t->reasons |= HYBRID_REASON_PREFIX;
	return OUTCOME_NONE;
}

/* Step 3. Bans drop here too (XDP may not be attached), before any flow-table work. After the
 * prefixes, not before: built with the name cache, this order adds 0.4% to the instructions the
 * verifier processes, the other 12% (measured on 6.18; docs/design.md, "Bans"). */
static __always_inline int tc_check_bans(const struct hybrid_config *cfg, struct tc_packet *t)
{
	return bans_match(cfg, &t->pkt) ? HYBRID_CNT_DROP_TC_BAN : OUTCOME_NONE;
}

/* Step 4. Find or create the flow, count the packet in it, keep its facts (TTL, isn), enforce
 * its verdict and add the reasons of a packet in a flow. Fragments and unparseable transports
 * have no flow entry: they are flagged for what they are and leave the table alone; a first
 * fragment that carries its ports is keyed only to drop it when its flow is blocked. */
/* A QUIC long-header packet (first byte's top bit set) on a UDP flow with a port 443: the
 * handshake of a connection (its Initial, Handshake and 0-RTT packets; a connection's data uses
 * short headers). QUIC servers tell connections apart by connection ID, not by 5-tuple, so a
 * new connection can start on a bypassed 5-tuple: its Initial must reach the engine, which reads
 * its SNI (hybrid/engine/quic.py). Asked for the direction that opened the flow (the client's);
 * a handful of packets per connection. */
static __always_inline int quic_long_header(struct __sk_buff *skb, const struct hybrid_pkt *p)
{
	__u8 c = 0;

	if (p->proto != IPPROTO_UDP || !p->payload_len ||
	    (p->sport != bpf_htons(443) && p->dport != bpf_htons(443)))
		return 0;
	return bpf_skb_load_bytes(skb, p->payload_off, &c, 1) == 0 && (c & 0x80);
}

static __always_inline int tc_update_flow(struct __sk_buff *skb, const struct hybrid_config *cfg,
					  struct tc_packet *t)
{
	__u32 prev;
	__u8 verdict = HYBRID_VERDICT_NONE;
	int followed;

	if (t->status != PKT_OK && !t->pkt.frag_keyed) {
		t->reasons |= reasons_of_status(t->status);
		return OUTCOME_NONE;
	}
	t->now = hybrid_now();
	t->dir = flow_key_build(&t->key, &t->pkt);
	if (t->status != PKT_OK) {
		if (fragment_blocked(&t->key, t->now))
			return HYBRID_CNT_DROP_TC_FLOW;
		t->reasons |= reasons_of_status(t->status);
		return OUTCOME_NONE;
	}
	t->flow = flow_track(&t->key, &t->pkt, t->dir, t->now, &t->events);
	if (t->flow) {
		verdict = flow_account(t->flow, &t->pkt, t->dir, t->now, &t->events);
		flow_note_facts(t->flow, &t->pkt, t->dir);
	} else
		t->events |= STATS_EVENT(HYBRID_CNT_FLOW_FULL);
	prev = flow_spend_first_n(t->flow, &t->pkt, t->dir);
	if (verdict == HYBRID_VERDICT_BLOCK)
		return HYBRID_CNT_DROP_TC_FLOW;
	followed = verdict != HYBRID_VERDICT_INSPECT && t->flow &&
		   (flow_followed(t->flow, &t->pkt, t->dir) ||
		    ((t->dir & 1) == ((t->flow->flags & HYBRID_FLOW_ORIG_HI) ? 1 : 0) && quic_long_header(skb, &t->pkt)));
	if (verdict == HYBRID_VERDICT_BYPASS) {
		if (!followed)
			return HYBRID_CNT_BYPASSED;
		/* The next message of a bypassed flow: only it is queued (a prefix may watch too). */
		t->reasons |= HYBRID_REASON_FOLLOW;
		return OUTCOME_NONE;
	}
	t->reasons = reasons_of_flow_packet(cfg, &t->pkt, t->flow, t->dir, verdict, prev, t->reasons);
	if (followed)
		t->reasons |= HYBRID_REASON_FOLLOW;
	return OUTCOME_NONE;
}

/* Step 5. Keep the reasons the configuration flags on; a packet with none left passes, one
 * with some must fit the admission budgets. A dropped packet gives back the first-N budget it
 * spent in step 4. */
static __always_inline int tc_admit(const struct hybrid_config *cfg, struct tc_packet *t)
{
	int outcome;

	t->reasons &= cfg->reasons & ~cfg->skip_reasons;
	if (!t->reasons)
		return HYBRID_CNT_PASSED;
	outcome = admission_check(cfg, &t->pkt, t->status, t->flow, t->reasons, t->now, &t->events);
	if (outcome == HYBRID_CNT_OVER_DROP)
		flow_refund_first_n(t->flow, &t->pkt, t->dir);
	return outcome;
}

#ifdef HYBRID_NAMES
/* Step 6. A flagged first payload of the direction that opened the flow goes to its parser
 * program (namecache.h), which reads the name and asks the cache: a decision found there
 * takes the packet back from the queue (its mark undone) and is carried out; otherwise the
 * packet leaves flagged, as it came. Last of the steps, so that the verifier meets one state
 * after it; this returns only when there is nothing to read or no program. Only a packet that
 * would reach the engine asks the cache: it replaces a round trip, nothing else (admission
 * budgets are spent as before). */
static __always_inline void tc_names_dispatch(struct __sk_buff *skb, struct tc_packet *t)
{
	struct hybrid_name_scratch *s;
	struct hybrid_stats *st;
	int which = names_which(skb, &t->pkt);

	if (which >= 0) {
		s = names_scratch_get();
		if (s) {
			__builtin_memcpy(s->save, t, sizeof(*t));
			names_tail_call(skb, which);
		}
	}
	/* Counted here, not through t: the verifier meets one state after this step. */
	st = stats_slot(skb->ifindex);
	if (!st)
		return;
	if (which < 0)
		st->c[HYBRID_CNT_NAME_NONE]++;
	else
		st->c[HYBRID_CNT_NAMES_NO_PROG]++;
}
#endif /* HYBRID_NAMES */

int hybrid_tc_ingress(struct __sk_buff *skb)
{
	struct tc_packet t = {};
	struct hybrid_config *cfg;
	int outcome = HYBRID_CNT_PASSED;

	cfg = config_get();
	if (!cfg)
		goto out;
	outcome = tc_parse(skb, &t);
	if (outcome != OUTCOME_NONE)
		goto out;
	outcome = tc_check_prefixes(cfg, &t);
	if (outcome != OUTCOME_NONE)
		goto out;
	outcome = tc_check_bans(cfg, &t);
	if (outcome != OUTCOME_NONE)
		goto out;
	outcome = tc_update_flow(skb, cfg, &t);
	if (outcome != OUTCOME_NONE)
		goto out;
	outcome = tc_admit(cfg, &t);
	if (outcome == HYBRID_CNT_FLAGGED) {
		t.old_mark = skb->mark;
		mark_for_queue(skb, cfg, t.flow);
#ifdef HYBRID_NAMES
		if (names_wanted(cfg, t.flow, &t.pkt, t.dir, t.reasons))
			tc_names_dispatch(skb, &t);
#endif
	}
out:
	return stats_record_tc(skb->ifindex, outcome, t.events, t.reasons, t.name_cnt, t.cache_cnt);
}

#ifdef HYBRID_NAMES
/* ---- The parser programs (names.h, namecache.h) --------------------------------------------------
 * Tail-called by hybrid_tc_ingress with the packet's summary in the per-CPU scratch; each reads
 * its names, asks the cache, and finishes the packet as hybrid_tc_ingress would have. Each is
 * verified alone: the parsers' states do not add to the main program's. */
static __always_inline int tc_names(struct __sk_buff *skb, const int which)
{
	struct hybrid_name_scratch *s = names_scratch_get();
	struct tc_packet t = {};
	int outcome;

	if (!s)
		return TC_ACT_UNSPEC;               /* cannot happen: the array has its one entry */
	/* What hybrid_tc_ingress knew and did, loaded back from map memory: the verifier knows
	 * its values only as unknown scalars (every index below is bounded where it is used). */
	_Static_assert(sizeof(t) <= sizeof(s->save), "struct tc_packet fits the scratch");
	__builtin_memcpy(&t, s->save, sizeof(t));
	t.dir &= 1;
	t.flow = flow_find(&t.key);
	outcome = HYBRID_CNT_FLAGGED;
	s->result = names_read(skb, &t.pkt, s, which);
	t.name_cnt = ((volatile struct hybrid_name_scratch *)s)->result;
	if (t.name_cnt == HYBRID_CNT_NAME_DNS || t.name_cnt == HYBRID_CNT_NAME_SNI ||
	    t.name_cnt == HYBRID_CNT_NAME_HOST) {
		outcome = names_cache(skb, &t, s);
		if (outcome == OUTCOME_NONE) {
			outcome = HYBRID_CNT_FLAGGED;   /* to the engine, as marked */
		} else {
			/* Decided here: not queued after all. */
			skb->mark = t.old_mark;
			if (t.flow && t.flow->flagged)
				t.flow->flagged--;
		}
	}
	return stats_record_tc(skb->ifindex, outcome, t.events, t.reasons, t.name_cnt, t.cache_cnt);
}

int hybrid_tc_names(struct __sk_buff *skb)
{
	return tc_names(skb, HYBRID_NAME_PROG_DNS_TLS);
}

int hybrid_tc_names_http(struct __sk_buff *skb)
{
	return tc_names(skb, HYBRID_NAME_PROG_HTTP);
}
#endif /* HYBRID_NAMES */
