//go:build ignore

/* The endpoint programs: from-endpoint runs on the host end of every
 * endpoint's veth pair. The maps are pinned by name and shared with the
 * programs of the other hook families. */
#include "lib/common.h"
#include "lib/reasons.h"
#include "lib/metrics.h"
#include "lib/events.h"
#include "lib/parse.h"
#include "lib/ipcache.h"
#include "lib/endpoint.h"
#include "lib/ledger.h"
#include "lib/policy.h"
#include "lib/ct.h"
#include "lib/flow.h"
#include "lib/track.h"
#include "lib/lb.h"
#include "lib/icmp.h"
#include "lib/host.h"
#include "lib/frag.h"
#include "lib/deliver.h"
#include "lib/forward.h"
/* Only for its map: the datapath pins every map the endpoint object has,
 * and the node devices' programs masquerade with it. */
#include "lib/snat.h"

/* reject answers the flow's packet, to a frontend with no backend that
 * rejects, with a port unreachable from the frontend (bpf/lib/icmp.h),
 * sent straight back into the endpoint it came from. A global function:
 * verified once. */
__noinline int reject(struct __sk_buff *skb, struct flow *f)
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

/* translate_verdict drops (or answers) a packet lb_translate did not let
 * on from endpoint ep: no backend is a NO_BACKEND drop, answered or not. */
static __always_inline int translate_verdict(struct __sk_buff *skb, struct flow *f, int result, __u16 ep)
{
	int verdict;

	if (result == LB_MALFORMED)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, ep);
	verdict = drop(skb, REASON_NO_BACKEND, DIR_EGRESS, ep);
	return result == LB_REJECT ? reject(skb, f) : verdict;
}

/* from_endpoint_deliver sends on a packet of endpoint src that its egress
 * policy let through: to the local endpoint dst (NULL: none), to another
 * node, or to the stack. What is translated for a service is recorded
 * only once the packet is let through (lb_commit). */
static __always_inline int from_endpoint_deliver(struct __sk_buff *skb, struct endpoint_info *src,
						 struct endpoint_info *dst, struct flow *f)
{
	int ret;

	/* A reply of a flow the endpoint sent to itself through a frontend
	 * goes back to it, from the frontend. */
	if (f->lb.rev_nat) {
		if (lb_hairpin_reply(skb, f) < 0)
			return drop(skb, REASON_NO_BACKEND, DIR_EGRESS, src->id);
		dst = src;
	}
	if (dst && ttl_decrement(skb, f->key.family)) {
		ret = to_endpoint(skb, dst, f, src->identity, f->lb.rev_nat != 0);
		if (ret != TC_ACT_REDIRECT)
			return ret;
	} else if (!dst && (ret = to_node(skb, f, src->identity, src->id)) != FORWARD_HERE) {
		if (ret == FORWARD_TOO_BIG)
			return too_big(skb, f, src->id);
		if (ret != TC_ACT_REDIRECT && ret != TC_ACT_OK)
			return ret;
	} else {
		ret = TC_ACT_OK;
		trace(skb, TRACE_TO_STACK, DIR_EGRESS, src->id);
	}
	lb_commit(f, src->id, skb->len);
	forwarded(skb, DIR_EGRESS);
	return ret;
}

static __always_inline int from_endpoint_ipv4(struct __sk_buff *skb, struct endpoint_info *src)
{
	struct iphdr *ip = header(skb, ETH_HLEN, sizeof(*ip));
	struct ipcache_value *remote;
	struct flow f = {};
	int ret;

	if (!ip || !ipv4_valid(skb, ip))
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (!(src->flags & ENDPOINT_F_IPV4) || ip->saddr != src->ipv4)
		return drop(skb, REASON_SPOOFED_SOURCE_IP, DIR_EGRESS, src->id);
	if (!endpoint_may_send(ip->protocol, 4))
		return drop(skb, REASON_TUNNELED, DIR_EGRESS, src->id);
	if (flow_parse4(skb, ip, &f) < 0)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (f.frag != FRAG_NONE && frag_ports(&f) < 0)
		return drop(skb, REASON_FRAG_NO_FIRST, DIR_EGRESS, src->id);

	/* Policy applies to where the packet goes after translation: the
	 * backend's identity and port. */
	ret = lb_translate(skb, &f, src->id);
	if (ret != LB_OK)
		return translate_verdict(skb, &f, ret, src->id);
	remote = ipcache_lookup4(*(__be32 *)f.key.daddr);
	ret = enforce(skb, &f, src->id, DIR_EGRESS, identity_of(remote));
	if (ret)
		return ret;
	return from_endpoint_deliver(skb, src, local_endpoint(remote), &f);
}

static __always_inline int from_endpoint_ipv6(struct __sk_buff *skb, struct endpoint_info *src)
{
	struct ipv6hdr *ip = header(skb, ETH_HLEN, sizeof(*ip));
	struct ipcache_value *remote;
	struct flow f = {};
	int link_scope, ret;
	__u8 hop_limit;

	if (!ip || !ipv6_valid(skb, ip))
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	/* A link-local (or, for duplicate address detection and MLD, the
	 * unspecified) source may only reach the link: a link-local or
	 * link-scope multicast destination. The one other node on the link
	 * is the host end, so the host is the peer; no other packet may use
	 * such a source. Which link-local address the workload uses is not
	 * checked: the link is its own. */
	link_scope = ipv6_is_linklocal(ip->saddr) || ipv6_is_unspecified(ip->saddr);
	if (link_scope) {
		if (!ipv6_is_linklocal_multicast(ip->daddr) &&
		    !(ipv6_is_linklocal(ip->daddr) && !ipv6_is_unspecified(ip->saddr)))
			return drop(skb, REASON_SPOOFED_SOURCE_IP, DIR_EGRESS, src->id);
	} else if (!(src->flags & ENDPOINT_F_IPV6) || !ipv6_equal(ip->saddr, src->ipv6)) {
		return drop(skb, REASON_SPOOFED_SOURCE_IP, DIR_EGRESS, src->id);
	}
	hop_limit = ip->hop_limit;

	/* The parser reads with helpers, which leaves ip valid. */
	if (flow_parse6(skb, ip, &f) < 0)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (!endpoint_may_send(f.key.proto, 6))
		return drop(skb, REASON_TUNNELED, DIR_EGRESS, src->id);
	if (f.frag != FRAG_NONE && frag_ports(&f) < 0)
		return drop(skb, REASON_FRAG_NO_FIRST, DIR_EGRESS, src->id);
	/* Neighbour discovery and MLD, in their exact shape, pass as ARP
	 * does; everything else on the link meets policy as traffic with
	 * the host. */
	if (flow_is_link_control(&f, hop_limit)) {
		forwarded(skb, DIR_EGRESS);
		return TC_ACT_OK;
	}
	if (link_scope) {
		ret = enforce(skb, &f, src->id, DIR_EGRESS, IDENTITY_HOST);
		if (ret)
			return ret;
		return from_endpoint_deliver(skb, src, NULL, &f);
	}
	ret = lb_translate(skb, &f, src->id);
	if (ret != LB_OK)
		return translate_verdict(skb, &f, ret, src->id);
	remote = ipcache_lookup6(f.key.daddr);
	ret = enforce(skb, &f, src->id, DIR_EGRESS, identity_of(remote));
	if (ret)
		return ret;
	return from_endpoint_deliver(skb, src, local_endpoint(remote), &f);
}

static __always_inline int from_endpoint_arp(struct __sk_buff *skb, struct endpoint_info *src)
{
	struct arp_eth_ipv4 *arp = header(skb, ETH_HLEN, sizeof(*arp));

	if (!arp)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (!mac_equal(arp->sha, src->mac))
		return drop(skb, REASON_SPOOFED_SOURCE_MAC, DIR_EGRESS, src->id);
	if (arp->spa != src->ipv4 && arp->spa != 0) /* 0: an address probe */
		return drop(skb, REASON_SPOOFED_SOURCE_IP, DIR_EGRESS, src->id);
	forwarded(skb, DIR_EGRESS);
	return TC_ACT_OK;
}

/* from_endpoint runs on tcx ingress of an endpoint's host-side veth, on
 * every packet the workload sends. */
SEC("tc")
int from_endpoint(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *src = bpf_map_lookup_elem(&endpoints, &ifindex);
	struct ethhdr *eth;

	if (!src)
		return drop(skb, REASON_UNKNOWN_ENDPOINT, DIR_EGRESS, 0);
	trace(skb, TRACE_FROM_ENDPOINT, DIR_EGRESS, src->id);
	/* The kernel takes a VLAN tag off before tc runs, and
	 * bpf_redirect_peer would carry it into the destination. */
	if (skb->vlan_present)
		return drop(skb, REASON_VLAN_TAGGED, DIR_EGRESS, src->id);

	pull_headers(skb);
	eth = header(skb, 0, sizeof(*eth));
	if (!eth)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (!mac_equal(eth->h_source, src->mac))
		return drop(skb, REASON_SPOOFED_SOURCE_MAC, DIR_EGRESS, src->id);

	endpoint_count(src->id, 0, skb->len);
	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IP):
		return from_endpoint_ipv4(skb, src);
	case bpf_htons(ETH_P_IPV6):
		return from_endpoint_ipv6(skb, src);
	case bpf_htons(ETH_P_ARP):
		return from_endpoint_arp(skb, src);
	case bpf_htons(ETH_P_8021Q):
	case bpf_htons(ETH_P_8021AD):
		return drop(skb, REASON_VLAN_TAGGED, DIR_EGRESS, src->id);
	}
	return drop(skb, REASON_UNSUPPORTED_L3, DIR_EGRESS, src->id);
}

/* from_host runs on tcx egress of an endpoint's host-side veth, on every
 * packet the host stack sends to the workload (what other endpoints send
 * comes by bpf_redirect_peer and never passes here), and enforces the
 * endpoint's ingress policy on it. The remote identity is the host's for
 * what the node itself sends (no ingress interface); for what it forwards,
 * the ipcache's (or world), except that a local endpoint's identity goes
 * only with packets that came from that endpoint's own interface: a
 * forwarded packet that claims an endpoint's address from elsewhere is the
 * world's. Neighbour discovery and MLD (flow_is_link_control) and ARP
 * pass. */
SEC("tc")
int from_host(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *dst = bpf_map_lookup_elem(&endpoints, &ifindex);
	struct ipcache_value *remote;
	struct flow f = {};
	__u32 identity;
	int ret;

	if (!dst)
		return TC_ACT_OK; /* being deleted */
	ret = parse_inbound(skb, &f);
	if (ret == INBOUND_PASS)
		goto deliver;
	if (ret != INBOUND_IP)
		return inbound_drop(skb, ret, dst->id);
	remote = f.key.family == 4 ? ipcache_lookup4(*(__be32 *)f.key.saddr) : ipcache_lookup6(f.key.saddr);
	if (!skb->ingress_ifindex)
		identity = IDENTITY_HOST;
	else if (remote && remote->ifindex && remote->ifindex != skb->ingress_ifindex)
		identity = IDENTITY_WORLD;
	else
		identity = identity_of(remote);
	ret = enforce(skb, &f, dst->id, DIR_INGRESS, identity);
	if (!ret)
		ret = reverse_nat(skb, &f, dst->id);
	if (ret)
		return ret;
deliver:
	endpoint_count(dst->id, 1, skb->len);
	forwarded(skb, DIR_INGRESS);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "GPL";
