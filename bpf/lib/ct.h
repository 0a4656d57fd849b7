/* Connection tracking: one LRU map for the whole datapath, shared by policy
 * (a flow allowed once is not looked up again, its replies and related
 * ICMP errors pass) and service load balancing (the backend a flow was sent
 * to, the reverse NAT to apply to its replies). Conntrack keeps a flow's
 * life (expiry, TCP state, counters); each user keeps a part of the entry
 * of its own, whose type its header defines and conntrack only stores.
 * Tracking a parsed packet is bpf/lib/track.h. The layout is written down
 * in docs/architecture.md. */
#pragma once

#include "common.h"
#include "../include/net.h"
#include "policy.h"  /* struct ct_policy */
#include "service.h" /* struct ct_service */

#define CT_ENTRIES 262144

/* Lifetimes, as Cilium's defaults. */
#define CT_LIFETIME_SYN (60 * NSEC_PER_SEC)
#define CT_LIFETIME_TCP (6 * 3600 * NSEC_PER_SEC)
#define CT_LIFETIME_CLOSE (10 * NSEC_PER_SEC)
#define CT_LIFETIME_OTHER (60 * NSEC_PER_SEC)

/* Whose entry: the endpoint that sent the flow's first packet (egress) or
 * the one it was delivered to (ingress). A flow between two local
 * endpoints has one of each. A flow to a service frontend has a third,
 * keyed as the client sent it (to the frontend), that holds its backend. */
enum ct_dir {
	CT_EGRESS = 0,
	CT_INGRESS = 1,
	CT_SERVICE = 2,
};

/* The flow as its first packet had it. Addresses are 16 bytes for both
 * families (IPv4 in the first 4). */
struct ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport; /* ICMP echo: the identifier; 0 for other L4 */
	__be16 dport;
	__u8 proto;
	__u8 family; /* 4 or 6 */
	__u8 dir;    /* enum ct_dir */
	__u8 pad;
};

enum ct_flag {
	CT_F_SEEN_REPLY = 1 << 0, /* a packet went the other way */
	CT_F_FIN = 1 << 1,        /* TCP: the side that opened sent a FIN */
	CT_F_FIN_REPLY = 1 << 3,  /* TCP: the other side sent a FIN */
	CT_F_RST = 1 << 4,        /* TCP: a RST ended it */
};

/* A TCP connection is closed once it was reset or both sides sent a FIN;
 * one FIN is a half-close, and the other side may go on sending. */
#define CT_F_CLOSED_BY_FIN (CT_F_FIN | CT_F_FIN_REPLY)

struct ct_entry {
	__u64 expires;             /* CLOCK_MONOTONIC ns; past it the entry is as if absent */
	__u16 endpoint;            /* the endpoint whose entry it is */
	__u8 flags;                /* enum ct_flag */
	__u8 tcp_flags;            /* every TCP flag seen, both ways */
	__u32 pad;
	struct ct_policy policy;   /* policy's: what decided it */
	struct ct_service service; /* load balancing's: where it was sent */
	__u64 packets;             /* both ways; approximate (see ct_touch) */
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_ENTRIES);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

enum ct_status {
	CT_NEW = 0,
	CT_ESTABLISHED = 1, /* a packet of a known flow, the way it started */
	CT_REPLY = 2,       /* a packet of a known flow, the other way */
	CT_RELATED = 3,     /* an ICMP error about a known flow */
	CT_UNRELATED = 4,   /* an ICMP error about no flow of the endpoint's */
};

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

static __always_inline void ct_reverse(struct ct_key *out, const struct ct_key *in, __u8 dir)
{
	__builtin_memcpy(out->saddr, in->daddr, 16);
	__builtin_memcpy(out->daddr, in->saddr, 16);
	out->sport = in->dport;
	out->dport = in->sport;
	out->proto = in->proto;
	out->family = in->family;
	out->dir = dir;
	out->pad = 0;
}

static __always_inline __u64 ct_lifetime(__u8 proto, __u8 seen_flags, __u8 entry_flags)
{
	if (proto != IPPROTO_TCP)
		return CT_LIFETIME_OTHER;
	if ((entry_flags & CT_F_RST) || (entry_flags & CT_F_CLOSED_BY_FIN) == CT_F_CLOSED_BY_FIN)
		return CT_LIFETIME_CLOSE;
	if ((seen_flags & TCP_ACK) && (entry_flags & CT_F_SEEN_REPLY))
		return CT_LIFETIME_TCP;
	return CT_LIFETIME_SYN;
}

/* ct_touch updates a found entry with a packet of protocol proto and TCP
 * flags tcp_flags, sent the way the flow began or (reply) the other way:
 * flags, counters and, when it changed by more than a second, its expiry. */
static __always_inline void ct_touch(struct ct_entry *e, __u8 proto, __u8 tcp_flags, int reply, __u32 len,
				     __u64 now)
{
	__u8 flags = e->flags;
	__u64 expires;

	if (reply)
		flags |= CT_F_SEEN_REPLY;
	if (tcp_flags & TCP_FIN)
		flags |= reply ? CT_F_FIN_REPLY : CT_F_FIN;
	if (tcp_flags & TCP_RST)
		flags |= CT_F_RST;
	if (flags != e->flags)
		e->flags = flags;
	if ((e->tcp_flags | tcp_flags) != e->tcp_flags)
		e->tcp_flags |= tcp_flags;
	/* Plain adds: two CPUs counting one flow at once may lose a count,
	 * which an atomic add would prevent at several times the cost. */
	e->packets++;
	e->bytes += len;
	expires = now + ct_lifetime(proto, e->tcp_flags, flags);
	if (expires > e->expires + NSEC_PER_SEC || expires < e->expires)
		e->expires = expires;
}

/* ct_find returns the entry of key if it belongs to endpoint ep and has
 * not expired: an entry another endpoint left (its addresses reused) or
 * one past its lifetime is as if absent. */
static __always_inline struct ct_entry *ct_find(const struct ct_key *key, __u16 ep, __u64 now)
{
	struct ct_entry *e = bpf_map_lookup_elem(&conntrack, key);

	if (!e || e->endpoint != ep || e->expires < now)
		return NULL;
	return e;
}

/* ct_is_over reports whether the TCP connection of entry e is over for a
 * packet of protocol proto, a SYN (opening) or not: reset, or closed by
 * both sides and opened again by this SYN. Its entry is then as if
 * absent. */
static __always_inline int ct_is_over(const struct ct_entry *e, __u8 proto, int syn)
{
	if (proto != IPPROTO_TCP)
		return 0;
	return (e->flags & CT_F_RST) || ((e->flags & CT_F_CLOSED_BY_FIN) == CT_F_CLOSED_BY_FIN && syn);
}
