/* Service translation of packets in tc: a packet an endpoint sends to a
 * frontend goes to a backend (DNAT), the flow keeps that backend (its
 * CT_SERVICE entry), and replies come back from the frontend (reverse
 * NAT, on delivery to the client). */
#pragma once

#include "common.h"
#include "parse.h"
#include "service.h"
#include "ct.h"
#include "flow.h"
#include "track.h"
#include "nat.h"

/* What lb_translate returns for a packet it does not let on: the program
 * drops or answers it, so that the event code's stack is not added to
 * lb_translate's. */
enum lb_result {
	LB_OK = 0,
	LB_NO_BACKEND = 1, /* no backend takes new flows: dropped */
	LB_REJECT = 2,     /* no backend, and the frontend rejects: answered */
	LB_MALFORMED = 3,  /* cannot be rewritten */
};

/* lb_translate sends the flow's packet, from endpoint ep, to a backend when
 * its destination is a frontend translated at tc: the flow's backend while
 * it belongs to the service (a new TCP connection on the port of an old one
 * chooses again when that backend takes no new flows, or the old one is
 * over), else a new choice. A packet whose backend is its own sender
 * (hairpin) gets the frontend as its source too: the sender would drop a
 * packet from its own address. f is updated to the translated packet;
 * nothing is recorded or counted until policy let it through (lb_commit).
 * It returns LB_OK, or why the packet goes no further. A global function:
 * its keys stay out of the caller's stack, and it is verified once. */
__noinline int lb_translate(struct __sk_buff *skb, struct flow *f, __u16 ep)
{
	struct lb_frontend_key fk = {};
	struct lb_backend *b = NULL;
	struct lb_frontend *fe;
	struct ct_entry *e;
	struct ct_key k;
	__u32 id = 0;
	__u64 now;

	/* A later fragment has the first one's ports (frag_ports): it follows
	 * the flow's translation, and starts none. */
	if (!f || (!f->l4_off && f->frag != FRAG_LATER) ||
	    (f->key.proto != IPPROTO_TCP && f->key.proto != IPPROTO_UDP))
		return 0;
	fk.port = f->key.dport;
	fk.proto = f->key.proto;
	fk.family = f->key.family;
	__builtin_memcpy(fk.addr, f->key.daddr, 16);
	fe = bpf_map_lookup_elem(&lb_frontends, &fk);
	if (!fe || !(fe->flags & LB_F_TC))
		return 0;

	/* On the stack: older kernels take map keys from nowhere else. */
	k = f->key;
	k.dir = CT_SERVICE; /* keyed as the client sends, to the frontend */
	now = now_ns();
	e = ct_find(&k, ep, now);
	if (e) {
		b = lb_backend_of(e->service.backend, fe->service);
		if (b && tcp_is_syn(f) && (!lb_open(fe, b) || ct_is_over(e, f->key.proto, 1)))
			b = NULL;
		if (b) {
			id = e->service.backend;
			/* The client acknowledges only what came back: its
			 * ACK shows the backend answered. */
			if (f->tcp_flags & TCP_ACK)
				e->flags |= CT_F_SEEN_REPLY;
			ct_touch(e, f->key.proto, f->tcp_flags, 0, skb->len, now);
		}
	}
	if (!b && f->frag == FRAG_LATER)
		return 0;
	if (!b) {
		/* A reply to a flow delivered to this endpoint, whose peer
		 * address and port happen to be a frontend's (a hairpinned
		 * flow's peer is the frontend): not a new service flow. */
		ct_reverse(&k, &f->key, CT_INGRESS);
		if (bpf_map_lookup_elem(&conntrack, &k))
			return 0;
		id = lb_select(fe, f->key.saddr, lb_hash(f->key.saddr, f->key.sport, f->key.proto), &b);
		if (!id)
			return fe->flags & LB_F_REJECT ? LB_REJECT : LB_NO_BACKEND;
		f->lb.flags |= LB_FLOW_NEW;
		if (fe->affinity)
			f->lb.flags |= LB_FLOW_REMEMBER;
	}
	f->service.id = fe->service;
	f->service.backend = id;
	f->lb.counter = b->counter;
	if (ipv6_equal(b->addr, f->key.saddr)) {
		f->lb.flags |= LB_FLOW_HAIRPIN;
		if (nat_rewrite(skb, f, 0, fk.addr, f->key.sport) < 0)
			return LB_MALFORMED;
	}
	if (nat_rewrite(skb, f, 1, b->addr, b->port) < 0)
		return LB_MALFORMED;
	f->l4_port = bpf_ntohs(f->key.dport);
	return LB_OK;
}

/* lb_record records a new service flow that policy let through: its
 * service entry (keyed as the client sent it, to the frontend) and
 * affinity. Before policy decides, nothing of a denied flow may stick: its
 * retries would go to the same backend, and it would count as one of its
 * flows. A global function, so that its key and entry stay out of the
 * caller's stack. */
__noinline int lb_record(struct flow *f, __u16 ep, __u32 len)
{
	struct lb_frontend_key *fk;
	struct ct_key sk = {};
	__u32 id;

	if (!f || !f->service.id)
		return 0;
	id = f->service.id;
	/* The packet is the translated one: the client is its source, or,
	 * hairpinned, its destination (its own backend); the frontend is
	 * the service's. */
	fk = bpf_map_lookup_elem(&lb_revnat, &id);
	if (!fk)
		return 0;
	__builtin_memcpy(sk.saddr, f->lb.flags & LB_FLOW_HAIRPIN ? f->key.daddr : f->key.saddr, 16);
	__builtin_memcpy(sk.daddr, fk->addr, 16);
	sk.sport = f->key.sport;
	sk.dport = fk->port;
	sk.proto = f->key.proto;
	sk.family = f->key.family;
	sk.dir = CT_SERVICE;
	if (f->lb.flags & LB_FLOW_REMEMBER)
		lb_remember(id, sk.saddr, f->service.backend);
	ct_create(&sk, f, ep, NULL, 1, len);
	return 0;
}

/* lb_commit counts a translated packet that policy let through against
 * its backend, and records it when it opens a new flow (lb_record). */
static __always_inline void lb_commit(struct flow *f, __u16 ep, __u32 len)
{
	if (!f->service.id)
		return;
	lb_count(f->lb.counter, len, f->lb.flags & LB_FLOW_NEW);
	if (f->lb.flags & LB_FLOW_NEW)
		lb_record(f, ep, len);
}

/* lb_hairpin_reply turns a reply of a hairpinned flow around: it came from
 * the backend port to the frontend address and the client's port, and
 * goes back to the same endpoint from the frontend. It returns -1 when the
 * service is gone or the packet cannot be rewritten. */
static __always_inline int lb_hairpin_reply(struct __sk_buff *skb, struct flow *f)
{
	__u32 id = f->lb.rev_nat;
	struct lb_frontend_key *fk = bpf_map_lookup_elem(&lb_revnat, &id);
	__be16 client_port = f->key.dport;
	__u8 client[16];

	if (!fk)
		return -1;
	__builtin_memcpy(client, f->key.saddr, 16);
	if (nat_rewrite(skb, f, 0, fk->addr, fk->port) < 0 || nat_rewrite(skb, f, 1, client, client_port) < 0)
		return -1;
	return 0;
}

/* lb_reverse makes a reply of a translated flow come from the frontend the
 * client sent to, and an ICMP error about such a flow quote it as the
 * client sent it. A reply of a service deleted since goes as it is. It
 * returns -1 when the packet cannot be rewritten. A global function, so
 * that the verifier walks it once, not on every path that delivers. */
__noinline int lb_reverse(struct __sk_buff *skb, struct flow *f)
{
	struct lb_frontend_key *fk;
	__u32 id;

	if (!f) /* a global function: verified once, for any pointer */
		return -1;
	id = f->lb.rev_nat;
	fk = bpf_map_lookup_elem(&lb_revnat, &id);
	if (!fk)
		return 0;
	if (f->icmp_error)
		return nat_rewrite_quoted(skb, f, QUOTED_DST, fk->addr, fk->port);
	return nat_rewrite(skb, f, 0, fk->addr, fk->port);
}
