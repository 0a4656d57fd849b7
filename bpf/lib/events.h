/* Drop and trace events: counted in the metrics map, reported through a ring
 * buffer that user space reads. Reporting has a run-time switch and a per-CPU
 * rate limit (event_config), so a flood of drops cannot melt the node; records
 * that are not reported are counted in event_lost, never silently lost. */
#pragma once

#include "common.h"
#include "reasons.h"
#include "metrics.h"

#define NSEC_PER_SEC 1000000000ULL

/* Bytes of the packet head copied into each event. */
#define EVENT_CAPTURE_LEN 128

enum event_type {
	EVENT_DROP = 1,
	EVENT_TRACE = 2,
};

/* One ring buffer record. */
struct event {
	__u8 type;     /* enum event_type */
	__u8 code;     /* enum drop_reason or enum trace_point */
	__u8 dir;      /* enum direction */
	__u8 cap_len;  /* valid bytes in packet[] */
	__u32 ifindex;
	__u32 pkt_len; /* length of the whole packet */
	__u32 endpoint;/* endpoint ID, 0 when none */
	__u64 time_ns; /* CLOCK_MONOTONIC */
	__u8 packet[EVENT_CAPTURE_LEN];
};

/* Bits of event_settings.flags. */
enum event_flag {
	EVENT_FLAG_DROPS = 1 << 0,
	EVENT_FLAG_TRACES = 1 << 1,
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

/* Whether a record of this kind may be sent now; spends rate-limit credit. */
static __always_inline int event_allowed(__u32 flag)
{
	__u32 zero = 0;
	struct event_settings *cfg = bpf_map_lookup_elem(&event_config, &zero);
	struct limiter_state *lim;
	__u64 now, cost, cap, credit;

	if (!cfg || !(cfg->flags & flag))
		return 0;
	if (cfg->rate == 0)
		return 1;
	lim = bpf_map_lookup_elem(&event_limiter, &zero);
	if (!lim)
		return 0;

	now = bpf_ktime_get_ns();
	cost = NSEC_PER_SEC / cfg->rate;
	cap = cost * (cfg->burst ? cfg->burst : 1);
	credit = lim->credit_ns + (now - lim->last_ns);
	if (credit > cap)
		credit = cap;
	lim->last_ns = now;
	if (credit < cost) {
		lim->credit_ns = credit;
		event_count_lost(LOST_RATE_LIMITED);
		return 0;
	}
	lim->credit_ns = credit - cost;
	return 1;
}

/* Sends one record with the head of the packet. is_xdp is a constant at every
 * call site, so only one of the two loads survives inlining. */
static __always_inline void event_send(void *ctx, int is_xdp, __u8 type, __u8 code,
				       enum direction dir, __u32 ifindex, __u32 pkt_len,
				       __u32 endpoint)
{
	struct event *e;
	__u32 n = pkt_len;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		event_count_lost(LOST_RING_FULL);
		return;
	}
	e->type = type;
	e->code = code;
	e->dir = dir;
	e->cap_len = 0;
	e->ifindex = ifindex;
	e->pkt_len = pkt_len;
	e->endpoint = endpoint;
	e->time_ns = bpf_ktime_get_ns();

	if (n > EVENT_CAPTURE_LEN)
		n = EVENT_CAPTURE_LEN;
	if (n > 0) {
		long err = is_xdp ? bpf_xdp_load_bytes(ctx, 0, e->packet, n)
				  : bpf_skb_load_bytes(ctx, 0, e->packet, n);
		if (!err)
			e->cap_len = n;
	}
	bpf_ringbuf_submit(e, 0);
}

/* drop counts and reports a dropped packet and returns the tc verdict that
 * drops it: `return drop(skb, REASON_MALFORMED, DIR_EGRESS, ep_id);` */
static __always_inline int drop(struct __sk_buff *skb, enum drop_reason reason,
				enum direction dir, __u32 endpoint)
{
	metrics_count(reason, dir, skb->len);
	if (event_allowed(EVENT_FLAG_DROPS))
		event_send(skb, 0, EVENT_DROP, reason, dir, skb->ifindex, skb->len, endpoint);
	return TC_ACT_SHOT;
}

/* trace reports a packet passing an observation point (when traces are on). */
static __always_inline void trace(struct __sk_buff *skb, enum trace_point point,
				  enum direction dir, __u32 endpoint)
{
	if (event_allowed(EVENT_FLAG_TRACES))
		event_send(skb, 0, EVENT_TRACE, point, dir, skb->ifindex, skb->len, endpoint);
}

/* forwarded counts a packet the datapath lets through. */
static __always_inline void forwarded(struct __sk_buff *skb, enum direction dir)
{
	metrics_count(REASON_FORWARDED, dir, skb->len);
}

static __always_inline __u32 xdp_len(struct xdp_md *ctx)
{
	return bpf_xdp_get_buff_len(ctx);
}

/* xdp_drop is drop for XDP programs; it returns XDP_DROP. */
static __always_inline int xdp_drop(struct xdp_md *ctx, enum drop_reason reason,
				    enum direction dir, __u32 endpoint)
{
	__u32 len = xdp_len(ctx);

	metrics_count(reason, dir, len);
	if (event_allowed(EVENT_FLAG_DROPS))
		event_send(ctx, 1, EVENT_DROP, reason, dir, ctx->ingress_ifindex, len, endpoint);
	return XDP_DROP;
}

/* xdp_trace is trace for XDP programs. */
static __always_inline void xdp_trace(struct xdp_md *ctx, enum trace_point point,
				      enum direction dir, __u32 endpoint)
{
	if (event_allowed(EVENT_FLAG_TRACES))
		event_send(ctx, 1, EVENT_TRACE, point, dir, ctx->ingress_ifindex, xdp_len(ctx), endpoint);
}

/* xdp_forwarded is forwarded for XDP programs. */
static __always_inline void xdp_forwarded(struct xdp_md *ctx, enum direction dir)
{
	metrics_count(REASON_FORWARDED, dir, xdp_len(ctx));
}
