/* Tracking a parsed packet (struct flow) in conntrack: finding the flow it
 * belongs to, and recording a new one. */
#pragma once

#include "common.h"
#include "parse.h"
#include "ct.h"
#include "flow.h"

/* ct_lookup finds the flow of a packet endpoint ep sees in direction dir
 * (the key's dir is set by it): the flow itself, its reverse (a reply),
 * or, for an ICMP error, the flow it is about; the entry found is
 * updated. Only the endpoint's own, live entries count (ct_find). A reply
 * or related error gets, in *svc, the service part of the entry it
 * matched (what to translate back); an egress entry takes the service
 * part of the packet that finds it (a tuple tracked for a service since
 * deleted, or a backend chosen anew).
 *
 * TCP: a SYN on a closed connection's tuple starts it over (CT_NEW, so
 * policy decides again); after a RST nothing more passes on its entry; a
 * SYN is never a reply. An ICMP error is about a flow of the endpoint's
 * when it goes to the sender of the packet it quotes and conntrack knows
 * that packet's flow; any other is CT_UNRELATED. One about a known flow is
 * related only when it comes from that packet's destination or from the
 * node itself (from_node: a router on the way); from anyone else (another
 * router, or a forger who learnt the flow) it is a new flow that policy
 * decides. */
static __always_inline enum ct_status ct_lookup(struct flow *f, __u8 dir, __u16 ep, int from_node, __u32 len,
						struct ct_service *svc)
{
	__u64 now = now_ns();
	struct ct_key k; /* on the stack: older kernels take map keys from nowhere else */
	struct ct_service about = {};
	struct ct_entry *e;
	int syn = tcp_is_syn(f);

	f->key.dir = dir;
	k = f->key;
	e = ct_find(&k, ep, now);
	if (e && !ct_is_over(e, f->key.proto, syn)) {
		ct_touch(e, f->key.proto, f->tcp_flags, 0, len, now);
		if (dir == CT_EGRESS && (e->service.id != f->service.id || e->service.backend != f->service.backend))
			e->service = f->service;
		return CT_ESTABLISHED;
	}
	ct_reverse(&k, &f->key, dir == CT_EGRESS ? CT_INGRESS : CT_EGRESS);
	e = ct_find(&k, ep, now);
	if (e && !syn && !ct_is_over(e, f->key.proto, syn)) {
		ct_touch(e, f->key.proto, f->tcp_flags, 1, len, now);
		*svc = e->service;
		return CT_REPLY;
	}
	if (!f->icmp_error)
		return CT_NEW;
	if (!ipv6_equal(f->related.saddr, f->key.daddr))
		return CT_UNRELATED;
	/* The error answers a packet the endpoint sent (its egress entry) or
	 * one delivered to it (its ingress entry). */
	k = f->related;
	k.dir = dir == CT_EGRESS ? CT_INGRESS : CT_EGRESS;
	e = ct_find(&k, ep, now);
	if (e && k.dir == CT_EGRESS)
		about = e->service; /* a translated flow it sent */
	if (!e) {
		ct_reverse(&k, &f->related, dir);
		e = ct_find(&k, ep, now);
	}
	if (!e)
		return CT_UNRELATED;
	if (!from_node && !ipv6_equal(f->related.daddr, f->key.saddr))
		return CT_NEW;
	*svc = about;
	return CT_RELATED;
}

/* ct_create records a new flow of endpoint ep under key (its dir set),
 * with policy's part of the entry (NULL: no decision, as for a service
 * entry), and the flow's translation when
 * with_service is set: the sender's entry of a translated flow (and the
 * service entry) name the service and backend, so that its replies are
 * translated back; so does the receiver's entry of a hairpinned flow,
 * whose replies are turned around by the receiver's own program. */
static __always_inline void ct_create(const struct ct_key *key, const struct flow *f, __u16 ep,
				      const struct ct_policy *policy, int with_service, __u32 len)
{
	struct ct_entry e = {
		.endpoint = ep,
		.tcp_flags = f->tcp_flags,
		.policy = {.rule = POLICY_NO_RULE},
		.packets = 1,
		.bytes = len,
	};
	struct ct_key k = *key; /* on the stack, as ct_lookup's */

	if (policy)
		e.policy = *policy;
	if (with_service)
		e.service = f->service;
	e.expires = now_ns() + ct_lifetime(key->proto, f->tcp_flags, e.flags);
	bpf_map_update_elem(&conntrack, &k, &e, BPF_ANY);
}
