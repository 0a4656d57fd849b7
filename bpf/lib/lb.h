/* Service translation of packets in tc: a packet an endpoint sends to a
 * frontend goes to a backend (DNAT), the flow keeps that backend (its
 * CT_SERVICE entry), and replies come back from the frontend (reverse
 * NAT, on delivery to the client). */
#pragma once

#include "common.h"
#include "reasons.h"
#include "events.h"
#include "ct.h"
#include "nat.h"
#include "parse.h"
#include "policy.h"
#include "service.h"
#include "icmp.h"

/* lb_reject answers the flow's packet, to a frontend with no backend that
 * rejects, with a port unreachable from the frontend, sent straight back
 * into the endpoint it came from. A global function: verified once. */
__noinline int lb_reject(struct __sk_buff *skb, struct flow *f)
{
	int ret;

	if (!f)
		return TC_ACT_SHOT;
	if (f->key.family == 4)
		ret = icmp4_port_unreachable(skb, f, *(__be32 *)f->key.daddr);
	else
		ret = icmp6_port_unreachable(skb, f, f->key.daddr);
	if (ret < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(skb->ifindex, 0);
}

/* lb_translate sends the flow's packet, from endpoint ep, to a backend when
 * its destination is a frontend translated at tc: the flow's backend while
 * it belongs to the service (a new TCP connection on the port of an old one
 * chooses again when that backend takes no new flows), else a new choice.
 * A packet whose backend is its own sender (hairpin) gets the frontend as
 * its source too: the sender would drop a packet from its own address.
 * f is updated to the translated packet. It returns 0, or the verdict on a
 * packet no backend takes: dropped (NO_BACKEND) or answered (lb_reject). */
static __always_inline int lb_translate(struct __sk_buff *skb, struct flow *f, __u16 ep)
{
	struct lb_frontend_key fk = {.port = f->key.dport, .proto = f->key.proto, .family = f->key.family};
	struct lb_backend *b = NULL;
	struct lb_frontend *fe;
	struct ct_entry *e;
	struct ct_key sk;
	int new_flow = 0;
	__u32 id = 0;

	if (!f->l4_off || (f->key.proto != IPPROTO_TCP && f->key.proto != IPPROTO_UDP))
		return 0;
	__builtin_memcpy(fk.addr, f->key.daddr, 16);
	fe = bpf_map_lookup_elem(&lb_frontends, &fk);
	if (!fe || !(fe->flags & LB_F_TC))
		return 0;

	sk = f->key;
	sk.dir = CT_SERVICE;
	e = bpf_map_lookup_elem(&conntrack, &sk);
	if (e) {
		b = lb_backend_of(e->backend, fe->service);
		if (b && b->state != LB_ACTIVE && (f->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
			b = NULL;
		if (b) {
			id = e->backend;
			ct_touch(e, f, 0, skb->len);
		}
	}
	if (!b) {
		struct ct_key rk;

		/* A reply to a flow delivered to this endpoint, whose peer
		 * address and port happen to be a frontend's (a hairpinned
		 * flow's peer is the frontend): not a new service flow. */
		ct_reverse(&rk, &f->key, CT_INGRESS);
		if (bpf_map_lookup_elem(&conntrack, &rk))
			return 0;
		id = lb_select(fe, f->key.saddr, lb_hash(f->key.saddr, f->key.sport, f->key.proto), &b);
		if (!id) {
			/* Counted and reported as dropped, answered or not. */
			int verdict = drop(skb, REASON_NO_BACKEND, DIR_EGRESS, ep);

			return fe->flags & LB_F_REJECT ? lb_reject(skb, f) : verdict;
		}
		new_flow = 1;
	}
	f->service = fe->service;
	f->backend = id;
	if (new_flow)
		ct_create(f, CT_SERVICE, ep, 0, POLICY_NO_RULE, 0, skb->len);
	lb_count(b->counter, skb->len, new_flow);
	if (ipv6_equal(b->addr, f->key.saddr)) {
		f->hairpin = 1;
		if (nat_rewrite(skb, f, 0, fk.addr, f->key.sport) < 0)
			return drop(skb, REASON_MALFORMED, DIR_EGRESS, ep);
	}
	if (nat_rewrite(skb, f, 1, b->addr, b->port) < 0)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, ep);
	f->l4_port = bpf_ntohs(f->key.dport);
	return 0;
}

/* lb_hairpin_reply turns a reply of a hairpinned flow around: it came from
 * the backend port to the frontend address and the client's port, and
 * goes back to the same endpoint from the frontend. It returns -1 when the
 * service is gone or the packet cannot be rewritten. */
static __always_inline int lb_hairpin_reply(struct __sk_buff *skb, struct flow *f)
{
	__u32 id = f->rev_nat;
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
	id = f->rev_nat;
	fk = bpf_map_lookup_elem(&lb_revnat, &id);
	if (!fk)
		return 0;
	if (f->icmp_error)
		return nat_rewrite_quoted(skb, f, fk->addr, fk->port);
	return nat_rewrite(skb, f, 0, fk->addr, fk->port);
}
