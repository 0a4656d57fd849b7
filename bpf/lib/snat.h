/* Masquerading: what a local pod sends outside the cluster's pod ranges
 * leaves with the node's address and a port the node picks, and the
 * replies are turned back to the pod. Each translated flow has two
 * entries in one map: the pod's side (SNAT_OUT, as the pod sends) and the
 * world's (SNAT_IN, as the reply comes), each naming the other's address
 * and port. */
#pragma once

#include "common.h"
#include "reasons.h"
#include "events.h"
#include "flow.h"
#include "ct.h"
#include "nat.h"
#include "node.h"

#define SNAT_ENTRIES 131072

/* The ports the node picks, outside Linux's default ephemeral range
 * (32768-60999), so that they are not ports of the node's own
 * connections. ICMP echo identifiers come from the same range. */
#define SNAT_PORT_MIN 61000
#define SNAT_PORT_MAX 65535
#define SNAT_TRIES 32

enum snat_dir {
	SNAT_OUT = 1,
	SNAT_IN = 2,
};

struct snat_key {
	__u8 family;
	__u8 proto;
	__u8 dir; /* enum snat_dir */
	__u8 pad;
	__be16 sport;
	__be16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct snat_entry {
	__u8 addr[16]; /* OUT: the node's address; IN: the pod's */
	__be16 port;   /* OUT: the node's port; IN: the pod's */
	__u16 pad;
	__u32 pad2;
	__u64 expires; /* CLOCK_MONOTONIC ns (now_ns) */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_ENTRIES);
	__type(key, struct snat_key);
	__type(value, struct snat_entry);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} snat SEC(".maps");

/* snat_lifetime is how long a translation lives after its last packet. */
static __always_inline __u64 snat_lifetime(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return 3600 * NSEC_PER_SEC;
	if (proto == IPPROTO_UDP)
		return 120 * NSEC_PER_SEC;
	return 30 * NSEC_PER_SEC;
}

/* snat_live returns e when it has not expired, and moves its expiry on
 * (at most once a second, to spare the writes). */
static __always_inline struct snat_entry *snat_live(struct snat_entry *e, __u8 proto, __u64 now)
{
	__u64 life = snat_lifetime(proto);

	if (!e || e->expires < now)
		return NULL;
	if (e->expires + NSEC_PER_SEC < now + life)
		e->expires = now + life;
	return e;
}

/* snat_is_reply reports whether the flow's packet answers one its pod
 * let in from outside (the pod's ingress entry in conntrack): the sender
 * knows the pod by its own address, and must see that. */
static __always_inline int snat_is_reply(const struct flow *f)
{
	struct ct_key k; /* on the stack, as ct_lookup's */
	struct ct_entry *e;

	ct_reverse(&k, &f->key, CT_INGRESS);
	e = bpf_map_lookup_elem(&conntrack, &k);
	return e && e->expires >= now_ns();
}

/* snat_applies reports whether the flow's packet is one to masquerade: a
 * local pod's (a source in a local pod CIDR) to outside the cluster, of a
 * protocol with ports or an ICMP echo request. Outside is neither the
 * cluster's pod ranges nor another node's address (that node routes to
 * the pod, or answers over the overlay). */
static __always_inline int snat_applies(const struct flow *f)
{
	struct node_route *src, *dst;

	if (!f->l4_off)
		return 0; /* a later fragment: ports unknown */
	if (f->key.proto == IPPROTO_ICMP || f->key.proto == IPPROTO_ICMPV6) {
		__u8 type = f->l4_port >> 8;

		if (type != ICMP_ECHO && type != ICMPV6_ECHO_REQUEST)
			return 0;
	} else if (f->key.proto != IPPROTO_TCP && f->key.proto != IPPROTO_UDP) {
		return 0;
	}
	src = node_route_of(f->key.family, f->key.saddr);
	if (!src || src->node != NODE_LOCAL)
		return 0;
	dst = node_route_of(f->key.family, f->key.daddr);
	return !dst && !node_of_addr(f->key.family, f->key.daddr);
}

/* snat_allocate picks the node's port for a new flow out (key, as the
 * pod sends it) and records both sides. It returns 0, or the drop reason. */
static __always_inline int snat_allocate(const struct snat_key *out, const __u8 *node_addr, __u64 now,
					 struct snat_entry *picked)
{
	struct snat_entry back = {.port = out->sport, .expires = now + snat_lifetime(out->proto)};
	struct snat_key in = {.family = out->family, .proto = out->proto, .dir = SNAT_IN, .sport = out->dport};
	__u32 start = bpf_get_prandom_u32();
	/* An int: before Linux 6.5 a map update called from a program
	 * returns its error in the low 32 bits only (not sign-extended), so
	 * a 64-bit comparison would take -EEXIST for success. */
	int ret;

	__builtin_memcpy(back.addr, out->saddr, 16);
	__builtin_memcpy(in.saddr, out->daddr, 16);
	__builtin_memcpy(in.daddr, node_addr, 16);
	for (int i = 0; i < SNAT_TRIES; i++) {
		__be16 port = bpf_htons(SNAT_PORT_MIN + (start + i) % (SNAT_PORT_MAX - SNAT_PORT_MIN + 1));
		struct snat_entry *taken;

		in.dport = port;
		ret = bpf_map_update_elem(&snat, &in, &back, BPF_NOEXIST);
		if (ret == -EEXIST) {
			/* A port whose translation expired is free again. */
			taken = bpf_map_lookup_elem(&snat, &in);
			if (!taken || taken->expires >= now)
				continue;
			ret = bpf_map_update_elem(&snat, &in, &back, BPF_EXIST);
		}
		if (ret < 0)
			return REASON_SNAT_MAP_FULL;
		*picked = (struct snat_entry){.port = port, .expires = back.expires};
		__builtin_memcpy(picked->addr, node_addr, 16);
		ret = bpf_map_update_elem(&snat, out, picked, BPF_ANY);
		if (ret < 0) {
			bpf_map_delete_elem(&snat, &in);
			return REASON_SNAT_MAP_FULL;
		}
		return 0;
	}
	return REASON_SNAT_NO_PORT;
}

/* snat_key_of is the key of the flow's packet in direction dir. */
static __always_inline void snat_key_of(struct snat_key *k, const struct flow *f, __u8 dir)
{
	k->family = f->key.family;
	k->proto = f->key.proto;
	k->dir = dir;
	k->sport = f->key.sport;
	k->dport = f->key.dport;
	__builtin_memcpy(k->saddr, f->key.saddr, 16);
	__builtin_memcpy(k->daddr, f->key.daddr, 16);
}

/* snat_out masquerades the flow's packet, leaving the node for the
 * world, as its translation says, making one when it is new. It returns
 * 0 (translated, or not to be), or the drop verdict. A global function:
 * verified once. */
__noinline int snat_out(struct __sk_buff *skb, struct flow *f)
{
	struct node_settings *cfg = node_config_get();
	struct snat_entry picked, *e;
	struct snat_key k = {};
	__u64 now = now_ns();
	const __u8 *node_addr;
	int reason;

	if (!f || !cfg || !(cfg->flags & NODE_CONFIG_MASQUERADE) || !snat_applies(f))
		return 0;
	if (f->key.family == 4 ? !(cfg->flags & NODE_CONFIG_IPV4) : !(cfg->flags & NODE_CONFIG_IPV6))
		return 0; /* no address of the node to masquerade with */
	node_addr = f->key.family == 4 ? cfg->ipv4 : cfg->ipv6;
	snat_key_of(&k, f, SNAT_OUT);
	e = snat_live(bpf_map_lookup_elem(&snat, &k), f->key.proto, now);
	if (!e) {
		/* A reply to what came from outside is not masqueraded: asked
		 * of flows without a translation only. */
		if (snat_is_reply(f))
			return 0;
		reason = snat_allocate(&k, node_addr, now, &picked);
		if (reason)
			return drop(skb, reason, DIR_EGRESS, 0);
		e = &picked;
	}
	if (nat_rewrite(skb, f, 0, e->addr, e->port) < 0)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, 0);
	return 0;
}

/* snat_in turns a reply to a masqueraded flow, arriving at the node's
 * address, back to its pod, and an ICMP error about one to the pod with
 * the packet it quotes as the pod sent it. It returns 1 when it did (f
 * now holds the pod's side), 0 for a packet of no translation, or -1 when
 * the packet could not be rewritten. A global function: verified once. */
__noinline int snat_in(struct __sk_buff *skb, struct flow *f)
{
	struct node_settings *cfg = node_config_get();
	struct snat_key k = {};
	struct snat_entry *e;

	if (!f || !cfg || !f->l4_off)
		return 0;
	/* Only what comes to the node's address, and to a port it picks, can
	 * be a reply: the rest (the overlay's UDP, the node's own traffic)
	 * costs no lookup. */
	if (!node_config_addr(cfg, f->key.family, f->key.daddr))
		return 0;
	if ((f->key.proto == IPPROTO_TCP || f->key.proto == IPPROTO_UDP) && bpf_ntohs(f->key.dport) < SNAT_PORT_MIN)
		return 0;
	if (f->icmp_error) {
		/* An error about a packet the node sent for a pod: the
		 * quoted packet turned around is the translation's reply. */
		k = (struct snat_key){.family = f->related.family, .proto = f->related.proto, .dir = SNAT_IN,
				      .sport = f->related.dport, .dport = f->related.sport};
		__builtin_memcpy(k.saddr, f->related.daddr, 16);
		__builtin_memcpy(k.daddr, f->related.saddr, 16);
	} else {
		snat_key_of(&k, f, SNAT_IN);
	}
	e = snat_live(bpf_map_lookup_elem(&snat, &k), k.proto, now_ns());
	if (!e)
		return 0;
	if (f->icmp_error)
		return nat_rewrite_quoted(skb, f, QUOTED_SRC, e->addr, e->port) < 0 ? -1 : 1;
	if (nat_rewrite(skb, f, 1, e->addr, e->port) < 0)
		return -1;
	return 1;
}
