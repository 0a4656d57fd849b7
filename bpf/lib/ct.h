/* Connection tracking: one LRU map for the whole datapath, shared by policy
 * (a flow allowed once is not looked up again, its replies and related
 * ICMP errors pass) and service load balancing (the backend a flow was sent
 * to, the reverse NAT to apply to its replies). The layout is written down
 * in docs/architecture.md. */
#pragma once

#include "common.h"
#include "../include/net.h"
#include "parse.h"

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
	CT_F_AUDITED = 1 << 2,    /* policy would have denied it (audit mode) */
	CT_F_FIN_REPLY = 1 << 3,  /* TCP: the other side sent a FIN */
	CT_F_RST = 1 << 4,        /* TCP: a RST ended it */
};

/* A TCP connection is closed once it was reset or both sides sent a FIN;
 * one FIN is a half-close, and the other side may go on sending. */
#define CT_F_CLOSED_BY_FIN (CT_F_FIN | CT_F_FIN_REPLY)

struct ct_entry {
	__u64 expires;      /* CLOCK_MONOTONIC ns; past it the entry is as if absent */
	__u16 endpoint;     /* the endpoint whose entry it is */
	__u8 flags;         /* enum ct_flag */
	__u8 tcp_flags;     /* every TCP flag seen, both ways */
	__u32 identity;     /* the remote identity when it was created */
	__u16 rule;         /* the policy rule that allowed it, POLICY_NO_RULE if none */
	__u16 rev_nat;      /* service ID whose frontend replies come from; 0: none */
	__u32 backend;      /* service: backend ID (CT_SERVICE and CT_EGRESS entries) */
	__u64 packets;      /* both ways; approximate (see ct_touch) */
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
};

/* The flow a packet belongs to, filled in by the parser. Laid out without
 * holes: it lives on the stack of every program. */
struct flow {
	struct ct_key key;    /* as this packet has it (dir set by the caller) */
	__u8 tcp_flags;       /* of this packet */
	__u8 icmp_error;      /* an ICMP error: related holds the flow it is about */
	__u8 frag;            /* enum frag_kind */
	__u8 hairpin;         /* translated to its own sender: the source is the frontend */
	__u16 l4_port;        /* dport, or ICMP type << 8 | code, host order */
	__u16 l4_off;         /* where the L4 header starts; 0 for a later fragment */
	__u32 frag_id;        /* a fragment's datagram identification */
	__u32 backend;        /* translated to this backend */
	__u16 service;        /* translated for this service (lb_commit records it) */
	__u16 rev_nat;        /* a reply (or an ICMP error about) a translated flow: its service */
	__u16 related_l3_off; /* an ICMP error: where the packet it quotes starts */
	__u16 related_l4_off; /* and that packet's L4 header */
	__u32 lb_counter;     /* the backend's counter index */
	__u8 lb_new;          /* a new service flow: lb_commit records it once let through */
	__u8 lb_remember;     /* and remembers its backend for client affinity */
	__u16 pad;
	struct ct_key related __attribute__((aligned(8))); /* read as 8-byte words */
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

/* ct_touch updates a found entry with this packet, sent the way the flow
 * began or (reply) the other way: flags, counters and, when it changed by
 * more than a second, its expiry. */
static __always_inline void ct_touch(struct ct_entry *e, const struct flow *f, int reply, __u32 len, __u64 now)
{
	__u8 flags = e->flags;
	__u64 expires;

	if (reply)
		flags |= CT_F_SEEN_REPLY;
	if (f->tcp_flags & TCP_FIN)
		flags |= reply ? CT_F_FIN_REPLY : CT_F_FIN;
	if (f->tcp_flags & TCP_RST)
		flags |= CT_F_RST;
	if (flags != e->flags)
		e->flags = flags;
	if ((e->tcp_flags | f->tcp_flags) != e->tcp_flags)
		e->tcp_flags |= f->tcp_flags;
	/* Plain adds: two CPUs counting one flow at once may lose a count,
	 * which an atomic add would prevent at several times the cost. */
	e->packets++;
	e->bytes += len;
	expires = now + ct_lifetime(f->key.proto, e->tcp_flags, flags);
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

static __always_inline int tcp_is_syn(const struct flow *f)
{
	return f->key.proto == IPPROTO_TCP && (f->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
}

/* ct_is_over reports whether the TCP connection of entry e is over for the
 * flow's packet: reset, or closed by both sides and opened again by this
 * SYN. Its entry is then as if absent. */
static __always_inline int ct_is_over(const struct ct_entry *e, const struct flow *f)
{
	if (f->key.proto != IPPROTO_TCP)
		return 0;
	return (e->flags & CT_F_RST) ||
	       ((e->flags & CT_F_CLOSED_BY_FIN) == CT_F_CLOSED_BY_FIN && tcp_is_syn(f));
}

/* ct_lookup finds the flow of a packet endpoint ep sees in direction dir
 * (the key's dir is set by it): the flow itself, its reverse (a reply),
 * or, for an ICMP error, the flow it is about; the entry found is
 * updated. Only the endpoint's own, live entries count (ct_find).
 *
 * TCP: a SYN on a closed connection's tuple starts it over (CT_NEW, so
 * policy decides again); after a RST nothing more passes on its entry; a
 * SYN is never a reply. An ICMP error is related only when it goes to the sender of the
 * packet it quotes, from that packet's destination, or from the node
 * itself (from_node: a router on the way); any other is a new flow that
 * policy decides. */
static __always_inline enum ct_status ct_lookup(struct flow *f, __u8 dir, __u16 ep, int from_node, __u32 len)
{
	__u64 now = bpf_ktime_get_ns();
	struct ct_key k; /* on the stack: older kernels take map keys from nowhere else */
	struct ct_entry *e;

	f->key.dir = dir;
	k = f->key;
	e = ct_find(&k, ep, now);
	if (e && !ct_is_over(e, f)) {
		ct_touch(e, f, 0, len, now);
		/* The tuple may have been tracked for another service (one
		 * deleted and made again, a backend chosen anew): replies go
		 * back to the frontend this packet was sent to. */
		if (dir == CT_EGRESS && e->rev_nat != f->service) {
			e->rev_nat = f->service;
			e->backend = f->backend;
		}
		return CT_ESTABLISHED;
	}
	ct_reverse(&k, &f->key, dir == CT_EGRESS ? CT_INGRESS : CT_EGRESS);
	e = ct_find(&k, ep, now);
	if (e && !tcp_is_syn(f) && !ct_is_over(e, f)) {
		ct_touch(e, f, 1, len, now);
		f->rev_nat = e->rev_nat;
		return CT_REPLY;
	}
	if (f->icmp_error && ipv6_equal(f->related.saddr, f->key.daddr) &&
	    (from_node || ipv6_equal(f->related.daddr, f->key.saddr))) {
		/* The error answers a packet the endpoint sent (its egress
		 * entry) or one delivered to it (its ingress entry). */
		k = f->related;
		k.dir = dir == CT_EGRESS ? CT_INGRESS : CT_EGRESS;
		e = ct_find(&k, ep, now);
		if (e && k.dir == CT_EGRESS)
			f->rev_nat = e->rev_nat; /* about a translated flow it sent */
		if (!e) {
			ct_reverse(&k, &f->related, dir);
			e = ct_find(&k, ep, now);
		}
		if (e)
			return CT_RELATED;
	}
	return CT_NEW;
}

/* ct_create records a new flow that policy let through, under key (its dir
 * set). The sender's entry of a flow translated for a service (and the
 * service entry) names the service and backend, so that its replies are
 * translated back; so does the receiver's entry of a hairpinned flow,
 * whose replies are turned around by the receiver's own program. */
static __always_inline void ct_create(const struct ct_key *key, const struct flow *f, __u16 ep,
				      __u32 identity, __u16 rule, __u8 audited, __u32 len)
{
	struct ct_entry e = {
		.endpoint = ep,
		.identity = identity,
		.rule = rule,
		.tcp_flags = f->tcp_flags,
		.flags = audited ? CT_F_AUDITED : 0,
		.packets = 1,
		.bytes = len,
	};

	if (key->dir != CT_INGRESS || f->hairpin) {
		e.rev_nat = f->service;
		e.backend = f->backend;
	}
	struct ct_key k = *key; /* on the stack, as ct_lookup's */

	e.expires = bpf_ktime_get_ns() + ct_lifetime(key->proto, f->tcp_flags, e.flags);
	bpf_map_update_elem(&conntrack, &k, &e, BPF_ANY);
}
