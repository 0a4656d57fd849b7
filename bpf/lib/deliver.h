/* Delivery to a local endpoint, the one way every program hands a packet
 * to a workload: conntrack, the endpoint's ingress policy, reverse NAT of
 * a service's replies, then straight into the workload's namespace. The
 * endpoint, node-device and overlay programs all include it. */
#pragma once

#include "common.h"
#include "reasons.h"
#include "metrics.h"
#include "events.h"
#include "parse.h"
#include "ipcache.h"
#include "endpoint.h"
#include "policy.h"
#include "ct.h"
#include "flow.h"
#include "track.h"
#include "lb.h"
#include "host.h"
#include "frag.h"

/* IDENTITY_OF_SOURCE, as enforce's identity, stands for the ipcache's
 * identity of the packet's source, looked up only when it matters: for a
 * new flow (or an ICMP error), never for a packet conntrack lets through. */
#define IDENTITY_OF_SOURCE 0

/* identity_of is the security identity of an ipcache entry: world for an
 * address the ipcache does not know. */
static __always_inline __u32 identity_of(struct ipcache_value *v)
{
	return v ? v->identity : IDENTITY_WORLD;
}

/* source_identity is the ipcache's identity of the flow's source. */
static __always_inline __u32 source_identity(const struct flow *f)
{
	return identity_of(f->key.family == 4 ? ipcache_lookup4(*(const __be32 *)f->key.saddr)
					      : ipcache_lookup6(f->key.saddr));
}

/* enforce decides a packet of endpoint ep in direction dir (its own: egress
 * for what it sends, ingress for what it receives) from or to the remote
 * identity: a packet of a tracked flow, a reply or a related ICMP error
 * passes; an ICMP error about no flow of the endpoint's is dropped on its
 * way in (what it quotes never left the endpoint: a forgery) and decided
 * as a new flow on its way out; a new flow meets the endpoint's policy, is
 * counted against the rule that decided, reported when policy verdicts
 * are on, and tracked if it passes. Only a SYN opens a TCP connection:
 * any other segment of one conntrack does not know (never opened, revoked
 * by a new policy, expired, reset) is dropped, so a flow a policy revoked
 * cannot come back by sending. A new flow the endpoint sends to an
 * address that the ipcache knows only as the world's or a CIDR's, but
 * that the node owns, has the host's identity. A reply (or related ICMP
 * error) of a translated flow gets its service in f->lb.rev_nat, for
 * reverse_nat. It returns 0 to let the packet on, or the drop verdict;
 * packet pointers taken before are invalid after it. A global function:
 * every path that delivers calls it, and the verifier checks it once. */
__noinline int enforce(struct __sk_buff *skb, struct flow *f, __u16 ep, __u8 dir, __u32 identity)
{
	__u8 ct_dir = dir == DIR_EGRESS ? CT_EGRESS : CT_INGRESS;
	struct ct_service reply = {};
	struct policy_result res;
	struct ct_policy decided;
	enum ct_status status;

	if (!f)
		return TC_ACT_SHOT;
	if (identity == IDENTITY_OF_SOURCE && f->icmp_error)
		identity = source_identity(f);
	status = ct_lookup(f, ct_dir, ep, dir == DIR_INGRESS && identity == IDENTITY_HOST, skb->len, &reply);
	if (status == CT_UNRELATED && dir == DIR_INGRESS)
		return drop(skb, REASON_ICMP_UNRELATED, dir, ep);
	if (status != CT_NEW && status != CT_UNRELATED) {
		f->lb.rev_nat = reply.id;
		return 0;
	}
	if (f->key.proto == IPPROTO_TCP && f->l4_off && !tcp_is_syn(f))
		return drop(skb, REASON_NO_CONNECTION, dir, ep);
	if (identity == IDENTITY_OF_SOURCE)
		identity = source_identity(f);
	if (dir == DIR_EGRESS && (identity == IDENTITY_WORLD || identity_is_cidr(identity)) &&
	    node_owns_dst(skb, f))
		identity = IDENTITY_HOST;
	res = policy_check(ep, dir, identity, f->key.proto, f->l4_port);
	policy_count(ep, dir, res.rule);
	if (event_enabled(EVENT_FLAG_POLICY))
		event_report_skb(skb, event_what(EVENT_POLICY, res.verdict, dir, f->key.proto), ep, identity,
				 (__u32)res.rule << 16 | f->l4_port);
	if (res.verdict == POLICY_DENIED)
		return drop(skb, REASON_POLICY_DENIED, dir, ep);
	decided = (struct ct_policy){.identity = identity, .rule = res.rule, .audited = res.verdict == POLICY_AUDITED};
	f->key.dir = ct_dir;
	ct_create(&f->key, f, ep, &decided, ct_dir != CT_INGRESS || (f->lb.flags & LB_FLOW_HAIRPIN), skb->len);
	return 0;
}

/* reverse_nat makes a reply delivered to the client of a translated flow
 * (f->lb.rev_nat, from conntrack) come from the frontend, and an ICMP error
 * about one quote the frontend. It returns 0, or the drop verdict. */
static __always_inline int reverse_nat(struct __sk_buff *skb, struct flow *f, __u16 ep)
{
	if (f->lb.rev_nat && lb_reverse(skb, f) < 0)
		return drop(skb, REASON_MALFORMED, DIR_INGRESS, ep);
	return 0;
}

/* to_endpoint delivers a packet from the remote identity to the local
 * endpoint dst, if dst's ingress policy lets it (tracked: the packet is a
 * reply conntrack let through already): it becomes a frame from the
 * endpoint's gateway to the endpoint, and crosses straight into the
 * endpoint's namespace (bpf_redirect_peer), without the host stack.
 *
 * What cannot be known here: whether the workload's end of the veth is up.
 * The kernel drops a packet redirected to a peer that is down after this
 * program has counted it as delivered. */
static __always_inline int to_endpoint(struct __sk_buff *skb, struct endpoint_info *dst,
				       struct flow *f, __u32 identity, int tracked)
{
	struct ethhdr *eth;
	__u32 mtu = 0;
	int ret;

	if (!(dst->flags & ENDPOINT_F_READY))
		return drop(skb, REASON_ENDPOINT_NOT_READY, DIR_INGRESS, dst->id);
	/* bpf_redirect_peer checks nothing about its target; bpf_check_mtu
	 * is the one helper that looks the device up, and fails for one that
	 * is gone (a workload namespace deleted behind sluice's back takes the
	 * veth pair with it). */
	if (bpf_check_mtu(skb, dst->ifindex, &mtu, 0, 0) < 0)
		return drop(skb, REASON_REDIRECT_FAILED, DIR_INGRESS, dst->id);
	if (!tracked) {
		ret = enforce(skb, f, dst->id, DIR_INGRESS, identity);
		if (!ret)
			ret = reverse_nat(skb, f, dst->id);
		if (ret)
			return ret;
	}

	eth = header(skb, 0, sizeof(*eth));
	if (!eth)
		return drop(skb, REASON_MALFORMED, DIR_INGRESS, dst->id);
	mac_copy(eth->h_dest, dst->mac);
	mac_copy(eth->h_source, dst->host_mac);

	trace(skb, TRACE_TO_ENDPOINT, DIR_INGRESS, dst->id);
	endpoint_count(dst->id, 1, skb->len);
	forwarded(skb, DIR_INGRESS);
	return bpf_redirect_peer(dst->ifindex, 0);
}

/* local_endpoint returns the local endpoint an ipcache entry points to, or
 * NULL when the address is not a local endpoint's. */
static __always_inline struct endpoint_info *local_endpoint(struct ipcache_value *v)
{
	if (!v || !v->ifindex)
		return NULL;
	return bpf_map_lookup_elem(&endpoints, &v->ifindex);
}

/* ttl_decrement lowers the IPv4 TTL or IPv6 hop limit by one as a router
 * hop does, and returns 0 when the packet would expire instead (the stack
 * then answers it). The TTL is the high byte of its 16-bit checksum word,
 * so the checksum grows by 0x0100 (RFC 1624 incremental update, as the
 * kernel's ip_decrease_ttl does); IPv6 has no header checksum. */
static __always_inline int ttl_decrement(struct __sk_buff *skb, __u8 family)
{
	if (family == 4) {
		struct iphdr *ip = header(skb, ETH_HLEN, sizeof(*ip));
		__u32 check;

		if (!ip || ip->ttl <= 1)
			return 0;
		check = ip->check;
		check += bpf_htons(0x0100);
		ip->check = (__u16)(check + (check >= 0xffff));
		ip->ttl--;
		return 1;
	}
	struct ipv6hdr *ip6 = header(skb, ETH_HLEN, sizeof(*ip6));

	if (!ip6 || ip6->hop_limit <= 1)
		return 0;
	ip6->hop_limit--;
	return 1;
}

/* What parse_inbound found. */
enum inbound {
	INBOUND_MALFORMED = -1,
	INBOUND_PASS = 0, /* not IP, or neighbour discovery or MLD: not decided here */
	INBOUND_IP = 1,   /* f holds the flow; a later fragment has its ports */
	INBOUND_NO_FIRST = 2, /* a later fragment whose first was not seen */
};

/* parse_inbound parses a packet on its way to a local endpoint, from the
 * host, another node or the overlay, into f. Packet pointers taken
 * before are invalid after it. A global function: the parser, the
 * largest part of every inbound program, is verified once. */
__noinline int parse_inbound(struct __sk_buff *skb, struct flow *f)
{
	struct ethhdr *eth;

	if (!f)
		return INBOUND_MALFORMED;
	pull_headers(skb);
	eth = header(skb, 0, sizeof(*eth));
	if (!eth)
		return INBOUND_MALFORMED;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = header(skb, ETH_HLEN, sizeof(*ip));

		if (!ip || !ipv4_valid(skb, ip) || flow_parse4(skb, ip, f) < 0)
			return INBOUND_MALFORMED;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip = header(skb, ETH_HLEN, sizeof(*ip));

		if (!ip || !ipv6_valid(skb, ip) || flow_parse6(skb, ip, f) < 0)
			return INBOUND_MALFORMED;
		if (flow_is_link_control(f, ip->hop_limit))
			return INBOUND_PASS;
	} else {
		return INBOUND_PASS;
	}
	if (f->frag != FRAG_NONE && frag_ports(f) < 0)
		return INBOUND_NO_FIRST;
	return INBOUND_IP;
}

/* inbound_drop is the drop verdict for what parse_inbound refused. */
static __always_inline int inbound_drop(struct __sk_buff *skb, int parsed, __u16 ep)
{
	return drop(skb, parsed == INBOUND_NO_FIRST ? REASON_FRAG_NO_FIRST : REASON_MALFORMED, DIR_INGRESS, ep);
}
