/* Drop and trace events: counted in the metrics map, reported through a ring
 * buffer that user space reads. Reporting has a run-time switch and a per-CPU
 * rate limit (event_config), so a flood of drops cannot melt the node; records
 * that are not reported are counted in event_lost, never silently lost. */
#pragma once

#include "common.h"
#include "reasons.h"
#include "metrics.h"

/* Bytes of the packet head copied into each event: a power of two, so that
 * a mask bounds the copy length for every verifier. */
#define EVENT_CAPTURE_LEN 128

/* Version of struct event; a reader refuses records of another version. */
enum event_version {
	EVENT_VERSION = 2,
};

enum event_type {
	EVENT_DROP = 1,
	EVENT_TRACE = 2,
	EVENT_POLICY = 3, /* a policy verdict on a new flow; code: enum policy_verdict */
};

/* One ring buffer record. */
struct event {
	__u8 version;  /* EVENT_VERSION */
	__u8 type;     /* enum event_type */
	__u8 code;     /* enum drop_reason or enum trace_point */
	__u8 dir;      /* enum direction */
	__u32 ifindex;
	__u32 pkt_len; /* length of the whole packet */
	__u32 endpoint;/* endpoint ID, 0 when none */
	__u64 time_ns; /* CLOCK_MONOTONIC */
	__u32 cap_len; /* valid bytes in packet[] */
	/* Policy verdicts: */
	__u32 identity; /* the remote identity */
	__u16 rule;     /* the rule that decided, 0xffff for none */
	__u16 port;     /* destination port, or ICMP type << 8 | code */
	__u8 proto;
	__u8 pad[7];
	__u8 packet[EVENT_CAPTURE_LEN];
};

/* Bits of event_settings.flags. */
enum event_flag {
	EVENT_FLAG_DROPS = 1 << 0,
	EVENT_FLAG_TRACES = 1 << 1,
	EVENT_FLAG_POLICY = 1 << 2, /* policy verdicts on new flows */
};

struct event_settings {
	__u32 flags;
	__u32 rate;  /* records per second per CPU; 0 means unlimited */
	__u32 burst; /* records allowed at once above the rate */
	__u32 reserved;
};

/* Rate-limiter state: credit accrues with time and each record spends
 * NSEC_PER_SEC / rate of it, capped at burst records' worth. */
struct limiter_state {
	__u64 credit_ns;
	__u64 last_ns;
};

/* event_lost keys */
enum event_lost_cause {
	LOST_RING_FULL = 0,
	LOST_RATE_LIMITED = 1,
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct event_settings);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} event_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct limiter_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} event_limiter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} event_lost SEC(".maps");

static __always_inline void event_count_lost(enum event_lost_cause cause)
{
	__u32 key = cause;
	__u64 *n = bpf_map_lookup_elem(&event_lost, &key);

	if (n)
		(*n)++;
}

/* Whether records of this kind are switched on: checked inline, so that a
 * trace point costs one array lookup while traces are off. */
static __always_inline int event_enabled(__u32 flag)
{
	__u32 zero = 0;
	struct event_settings *cfg = bpf_map_lookup_elem(&event_config, &zero);

	return cfg && (cfg->flags & flag);
}

/* event_begin spends rate-limit credit and reserves a record with its header
 * filled in; NULL (counted as lost) when it may not or cannot be sent. */
static __always_inline struct event *event_begin(__u8 type, __u8 code, __u8 dir, __u32 ifindex,
						 __u32 pkt_len, __u32 endpoint)
{
	__u32 zero = 0;
	struct event_settings *cfg = bpf_map_lookup_elem(&event_config, &zero);
	struct limiter_state *lim;
	struct event *e;
	__u64 now = bpf_ktime_get_ns();

	if (!cfg)
		return NULL;
	if (cfg->rate) {
		__u64 cost = NSEC_PER_SEC / cfg->rate;
		__u64 cap = cost * (cfg->burst ? cfg->burst : 1);
		__u64 credit;

		lim = bpf_map_lookup_elem(&event_limiter, &zero);
		if (!lim)
			return NULL;
		credit = lim->credit_ns + (now - lim->last_ns);
		if (credit > cap)
			credit = cap;
		lim->last_ns = now;
		if (credit < cost) {
			lim->credit_ns = credit;
			event_count_lost(LOST_RATE_LIMITED);
			return NULL;
		}
		lim->credit_ns = credit - cost;
	}

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		event_count_lost(LOST_RING_FULL);
		return NULL;
	}
	e->version = EVENT_VERSION;
	e->type = type;
	e->code = code;
	e->dir = dir;
	e->ifindex = ifindex;
	e->pkt_len = pkt_len;
	e->endpoint = endpoint;
	e->time_ns = now;
	e->cap_len = 0;
	e->identity = 0;
	e->rule = 0;
	e->port = 0;
	e->proto = 0;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	return e;
}

/* capture_len is how many bytes of a packet of len bytes an event copies:
 * 1 to EVENT_CAPTURE_LEN, or 0. The mask after the barrier is what lets
 * verifiers before Linux 6.8, which learn no lower bound from `n > 0`, see
 * that the length is never 0 and never above the buffer. */
static __always_inline __u32 capture_len(__u32 len)
{
	__u32 n = len < EVENT_CAPTURE_LEN ? len : EVENT_CAPTURE_LEN;

	if (n == 0)
		return 0;
	asm volatile("" : "+r"(n)); /* keep the compiler from dropping the mask */
	return ((n - 1) & (EVENT_CAPTURE_LEN - 1)) + 1;
}

/* event_report_skb sends one record with the head of a tc packet. It is a
 * global function, so the verifier checks it once for every call site, and
 * the program holds one copy of it. Its arguments are packed to fit a BPF
 * call: what is type << 24 | code << 16 | dir << 8 | proto; identity,
 * rule << 16 | port and proto are a policy verdict's, 0 for other events. */
__noinline int event_report_skb(struct __sk_buff *skb, __u32 what, __u32 endpoint, __u32 identity,
				__u32 rule_port)
{
	struct event *e = event_begin(what >> 24, (what >> 16) & 0xff, (what >> 8) & 0xff, skb->ifindex,
				      skb->len, endpoint);
	__u32 n;

	if (!e)
		return 0;
	e->identity = identity;
	e->rule = rule_port >> 16;
	e->port = rule_port & 0xffff;
	e->proto = what & 0xff;
	n = capture_len(skb->len);
	if (n && bpf_skb_load_bytes(skb, 0, e->packet, n) == 0)
		e->cap_len = n;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* event_what packs the first argument of event_report_skb. */
static __always_inline __u32 event_what(__u8 type, __u8 code, __u8 dir, __u8 proto)
{
	return (__u32)type << 24 | (__u32)code << 16 | (__u32)dir << 8 | proto;
}

/* event_report_xdp is event_report_skb for XDP programs. */
__noinline int event_report_xdp(struct xdp_md *ctx, __u8 type, __u8 code, __u8 dir, __u32 endpoint)
{
	__u32 len = bpf_xdp_get_buff_len(ctx);
	struct event *e = event_begin(type, code, dir, ctx->ingress_ifindex, len, endpoint);
	__u32 n;

	if (!e)
		return 0;
	n = capture_len(len);
	if (n && bpf_xdp_load_bytes(ctx, 0, e->packet, n) == 0)
		e->cap_len = n;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* drop counts and reports a dropped packet and returns the tc verdict that
 * drops it: `return drop(skb, REASON_MALFORMED, DIR_EGRESS, ep_id);` */
static __always_inline int drop(struct __sk_buff *skb, enum drop_reason reason,
				enum direction dir, __u32 endpoint)
{
	metrics_count(reason, dir, skb->len);
	if (event_enabled(EVENT_FLAG_DROPS))
		event_report_skb(skb, event_what(EVENT_DROP, reason, dir, 0), endpoint, 0, 0);
	return TC_ACT_SHOT;
}

/* trace reports a packet passing an observation point (when traces are on). */
static __always_inline void trace(struct __sk_buff *skb, enum trace_point point,
				  enum direction dir, __u32 endpoint)
{
	if (event_enabled(EVENT_FLAG_TRACES))
		event_report_skb(skb, event_what(EVENT_TRACE, point, dir, 0), endpoint, 0, 0);
}

/* forwarded counts a packet the datapath lets through. */
static __always_inline void forwarded(struct __sk_buff *skb, enum direction dir)
{
	metrics_count(REASON_FORWARDED, dir, skb->len);
}

/* xdp_drop is drop for XDP programs; it returns XDP_DROP. */
static __always_inline int xdp_drop(struct xdp_md *ctx, enum drop_reason reason,
				    enum direction dir, __u32 endpoint)
{
	metrics_count(reason, dir, bpf_xdp_get_buff_len(ctx));
	if (event_enabled(EVENT_FLAG_DROPS))
		event_report_xdp(ctx, EVENT_DROP, reason, dir, endpoint);
	return XDP_DROP;
}

/* xdp_trace is trace for XDP programs. */
static __always_inline void xdp_trace(struct xdp_md *ctx, enum trace_point point,
				      enum direction dir, __u32 endpoint)
{
	if (event_enabled(EVENT_FLAG_TRACES))
		event_report_xdp(ctx, EVENT_TRACE, point, dir, endpoint);
}

/* xdp_forwarded is forwarded for XDP programs. */
static __always_inline void xdp_forwarded(struct xdp_md *ctx, enum direction dir)
{
	metrics_count(REASON_FORWARDED, dir, bpf_xdp_get_buff_len(ctx));
}
