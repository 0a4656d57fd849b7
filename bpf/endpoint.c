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
#include "lib/lb.h"

/* enforce decides a packet of endpoint ep in direction dir (its own: egress
 * for what it sends, ingress for what it receives) from or to the remote
 * identity: a packet of a tracked flow, a reply or a related ICMP error
 * passes; a new flow meets the endpoint's policy, is counted against the
 * rule that decided, reported when policy verdicts are on, and tracked if
 * it passes. A reply delivered to the client of a service flow is made to
 * come from the frontend, an ICMP error about one to quote the frontend. It returns 0 to let the packet on, or the drop
 * verdict; packet pointers taken before are invalid after it. */
static __always_inline int enforce(struct __sk_buff *skb, struct flow *f, __u16 ep, __u8 dir,
				   __u32 identity)
{
	__u8 ct_dir = dir == DIR_EGRESS ? CT_EGRESS : CT_INGRESS;
	struct policy_result res;
	enum ct_status status;

	status = ct_lookup(f, ct_dir, skb->len);
	if ((status == CT_REPLY || status == CT_RELATED) && f->rev_nat && dir == DIR_INGRESS &&
	    lb_reverse(skb, f) < 0)
		return drop(skb, REASON_MALFORMED, dir, ep);
	if (status != CT_NEW)
		return 0;
	res = policy_check(ep, dir, identity, f->key.proto, f->l4_port);
	policy_count(ep, dir, res.rule);
	if (event_enabled(EVENT_FLAG_POLICY))
		event_report_skb(skb, event_what(EVENT_POLICY, res.verdict, dir, f->key.proto), ep, identity,
				 (__u32)res.rule << 16 | f->l4_port);
	if (res.verdict == POLICY_DENIED)
		return drop(skb, REASON_POLICY_DENIED, dir, ep);
	ct_create(f, ct_dir, ep, identity, res.rule, res.verdict == POLICY_AUDITED, skb->len);
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
	ret = tracked ? 0 : enforce(skb, f, dst->id, DIR_INGRESS, identity);
	if (ret)
		return ret;

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

/* identity_of is the security identity of an ipcache entry: world for an
 * address the ipcache does not know. */
static __always_inline __u32 identity_of(struct ipcache_value *v)
{
	return v ? v->identity : IDENTITY_WORLD;
}

/* ttl_decrement lowers the IPv4 TTL by one as a router hop does. The TTL is
 * the high byte of its 16-bit checksum word, so the checksum grows by 0x0100
 * (RFC 1624 incremental update, as the kernel's ip_decrease_ttl does). */
static __always_inline void ttl_decrement(struct iphdr *ip)
{
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xffff));
	ip->ttl--;
}

static __always_inline int from_endpoint_ipv4(struct __sk_buff *skb, struct endpoint_info *src)
{
	struct iphdr *ip = header(skb, ETH_HLEN, sizeof(*ip));
	struct ipcache_value *remote;
	struct endpoint_info *dst;
	struct flow f = {};
	int ret;

	if (!ip || !ipv4_valid(skb, ip))
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (!(src->flags & ENDPOINT_F_IPV4) || ip->saddr != src->ipv4)
		return drop(skb, REASON_SPOOFED_SOURCE_IP, DIR_EGRESS, src->id);
	if (is_tunnel(ip->protocol))
		return drop(skb, REASON_TUNNELED, DIR_EGRESS, src->id);
	if (flow_parse4(skb, ip, &f) < 0)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);

	/* Policy applies to where the packet goes after translation: the
	 * backend's identity and port. */
	ret = lb_translate(skb, &f, src->id);
	if (ret)
		return ret;
	remote = ipcache_lookup4(*(__be32 *)f.key.daddr);
	ret = enforce(skb, &f, src->id, DIR_EGRESS, identity_of(remote));
	if (ret)
		return ret;
	dst = local_endpoint(remote);
	/* A reply of a flow the endpoint sent to itself through a frontend
	 * goes back to it, from the frontend. */
	if (f.rev_nat) {
		if (lb_hairpin_reply(skb, &f) < 0)
			return drop(skb, REASON_NO_BACKEND, DIR_EGRESS, src->id);
		dst = src;
	}
	ip = header(skb, ETH_HLEN, sizeof(*ip));
	if (!ip)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (dst && ip->ttl > 1) {
		ttl_decrement(ip);
		return to_endpoint(skb, dst, &f, src->identity, f.rev_nat != 0);
	}
	trace(skb, TRACE_TO_STACK, DIR_EGRESS, src->id);
	return TC_ACT_OK;
}

static __always_inline int from_endpoint_ipv6(struct __sk_buff *skb, struct endpoint_info *src)
{
	struct ipv6hdr *ip = header(skb, ETH_HLEN, sizeof(*ip));
	struct ipcache_value *remote;
	struct endpoint_info *dst;
	struct flow f = {};
	int ret;

	if (!ip || !ipv6_valid(skb, ip))
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	/* Neighbour discovery, router solicitation and MLD stay on the link:
	 * from the endpoint's link-local address (or, for duplicate address
	 * detection and MLD, from ::) to a link-local or link-scope multicast
	 * destination. The host stack gets them as from any neighbour; no
	 * other packet may use such a source. */
	if (ipv6_is_linklocal(ip->saddr) || ipv6_is_unspecified(ip->saddr)) {
		if (ipv6_is_linklocal_multicast(ip->daddr) ||
		    (ipv6_is_linklocal(ip->daddr) && !ipv6_is_unspecified(ip->saddr)))
			return TC_ACT_OK;
		return drop(skb, REASON_SPOOFED_SOURCE_IP, DIR_EGRESS, src->id);
	}
	if (!(src->flags & ENDPOINT_F_IPV6) || !ipv6_equal(ip->saddr, src->ipv6))
		return drop(skb, REASON_SPOOFED_SOURCE_IP, DIR_EGRESS, src->id);

	/* The parser reads with helpers, which leaves ip valid. */
	if (flow_parse6(skb, ip, &f) < 0)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (is_tunnel(f.key.proto))
		return drop(skb, REASON_TUNNELED, DIR_EGRESS, src->id);

	if (!flow_is_link_control(&f)) {
		ret = lb_translate(skb, &f, src->id);
		if (ret)
			return ret;
		remote = ipcache_lookup6(f.key.daddr);
		ret = enforce(skb, &f, src->id, DIR_EGRESS, identity_of(remote));
		if (ret)
			return ret;
	} else {
		remote = ipcache_lookup6(ip->daddr);
	}
	dst = local_endpoint(remote);
	if (f.rev_nat) { /* a hairpinned flow's reply, as for IPv4 */
		if (lb_hairpin_reply(skb, &f) < 0)
			return drop(skb, REASON_NO_BACKEND, DIR_EGRESS, src->id);
		dst = src;
	}
	ip = header(skb, ETH_HLEN, sizeof(*ip));
	if (!ip)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (dst && ip->hop_limit > 1) {
		ip->hop_limit--; /* no checksum in the IPv6 header */
		return to_endpoint(skb, dst, &f, src->identity, f.rev_nat != 0);
	}
	trace(skb, TRACE_TO_STACK, DIR_EGRESS, src->id);
	return TC_ACT_OK;
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
	int ret;

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
		ret = from_endpoint_ipv4(skb, src);
		break;
	case bpf_htons(ETH_P_IPV6):
		ret = from_endpoint_ipv6(skb, src);
		break;
	case bpf_htons(ETH_P_ARP):
		ret = from_endpoint_arp(skb, src);
		break;
	case bpf_htons(ETH_P_8021Q):
	case bpf_htons(ETH_P_8021AD):
		return drop(skb, REASON_VLAN_TAGGED, DIR_EGRESS, src->id);
	default:
		return drop(skb, REASON_UNSUPPORTED_L3, DIR_EGRESS, src->id);
	}
	if (ret == TC_ACT_OK || ret == TC_ACT_REDIRECT)
		forwarded(skb, DIR_EGRESS);
	return ret;
}

/* from_host runs on tcx egress of an endpoint's host-side veth, on every
 * packet the host stack sends to the workload (what other endpoints send
 * comes by bpf_redirect_peer and never passes here), and enforces the
 * endpoint's ingress policy on it. The remote identity is the host's for
 * what the node itself sends (no ingress interface), the ipcache's (or
 * world) for what it forwards. Link-scope IPv6 (neighbour discovery, MLD)
 * and ARP pass. */
SEC("tc")
int from_host(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *dst = bpf_map_lookup_elem(&endpoints, &ifindex);
	struct ipcache_value *remote = NULL;
	struct ethhdr *eth;
	struct flow f = {};
	int ret = 0;

	if (!dst)
		return TC_ACT_OK; /* being deleted */
	pull_headers(skb);
	eth = header(skb, 0, sizeof(*eth));
	if (!eth)
		return drop(skb, REASON_MALFORMED, DIR_INGRESS, dst->id);
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = header(skb, ETH_HLEN, sizeof(*ip));

		if (!ip || !ipv4_valid(skb, ip) || flow_parse4(skb, ip, &f) < 0)
			return drop(skb, REASON_MALFORMED, DIR_INGRESS, dst->id);
		remote = ipcache_lookup4(ip->saddr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip = header(skb, ETH_HLEN, sizeof(*ip));

		if (!ip || !ipv6_valid(skb, ip))
			return drop(skb, REASON_MALFORMED, DIR_INGRESS, dst->id);
		/* Link-scope traffic from a link-scope source: neighbour
		 * discovery and MLD the workload needs, as from_endpoint lets
		 * through the other way. */
		if ((ipv6_is_linklocal(ip->saddr) || ipv6_is_unspecified(ip->saddr)) &&
		    (ipv6_is_linklocal(ip->daddr) || ipv6_is_linklocal_multicast(ip->daddr)))
			goto deliver;
		if (flow_parse6(skb, ip, &f) < 0)
			return drop(skb, REASON_MALFORMED, DIR_INGRESS, dst->id);
		if (flow_is_link_control(&f))
			goto deliver;
		remote = ipcache_lookup6(ip->saddr);
	} else {
		goto deliver;
	}
	ret = enforce(skb, &f, dst->id, DIR_INGRESS,
		      skb->ingress_ifindex ? identity_of(remote) : IDENTITY_HOST);
	if (ret)
		return ret;
deliver:
	endpoint_count(dst->id, 1, skb->len);
	forwarded(skb, DIR_INGRESS);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "GPL";
