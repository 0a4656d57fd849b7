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

/* to_endpoint delivers a packet to the local endpoint dst: it becomes a frame
 * from the endpoint's gateway to the endpoint, and crosses straight into the
 * endpoint's namespace (bpf_redirect_peer), without the host stack.
 *
 * What cannot be known here: whether the workload's end of the veth is up.
 * The kernel drops a packet redirected to a peer that is down after this
 * program has counted it as delivered. */
static __always_inline int to_endpoint(struct __sk_buff *skb, struct endpoint_info *dst)
{
	struct ethhdr *eth;
	__u32 mtu = 0;

	if (!(dst->flags & ENDPOINT_F_READY))
		return drop(skb, REASON_ENDPOINT_NOT_READY, DIR_INGRESS, dst->id);
	/* bpf_redirect_peer checks nothing about its target; bpf_check_mtu
	 * is the one helper that looks the device up, and fails for one that
	 * is gone (a workload namespace deleted behind sluice's back takes the
	 * veth pair with it). */
	if (bpf_check_mtu(skb, dst->ifindex, &mtu, 0, 0) < 0)
		return drop(skb, REASON_REDIRECT_FAILED, DIR_INGRESS, dst->id);

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
	struct endpoint_info *dst;

	if (!ip || !ipv4_valid(skb, ip))
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (!(src->flags & ENDPOINT_F_IPV4) || ip->saddr != src->ipv4)
		return drop(skb, REASON_SPOOFED_SOURCE_IP, DIR_EGRESS, src->id);
	if (is_tunnel(ip->protocol))
		return drop(skb, REASON_TUNNELED, DIR_EGRESS, src->id);

	dst = local_endpoint(ipcache_lookup4(ip->daddr));
	if (dst && ip->ttl > 1) {
		ttl_decrement(ip);
		return to_endpoint(skb, dst);
	}
	trace(skb, TRACE_TO_STACK, DIR_EGRESS, src->id);
	return TC_ACT_OK;
}

static __always_inline int from_endpoint_ipv6(struct __sk_buff *skb, struct endpoint_info *src)
{
	struct ipv6hdr *ip = header(skb, ETH_HLEN, sizeof(*ip));
	struct endpoint_info *dst;
	int proto;

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

	/* ipv6_upper_proto reads with a helper, which leaves ip valid. */
	proto = ipv6_upper_proto(skb, ip->nexthdr);
	if (proto < 0)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (is_tunnel(proto))
		return drop(skb, REASON_TUNNELED, DIR_EGRESS, src->id);

	dst = local_endpoint(ipcache_lookup6(ip->daddr));
	if (dst && ip->hop_limit > 1) {
		ip->hop_limit--; /* no checksum in the IPv6 header */
		return to_endpoint(skb, dst);
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

char __license[] SEC("license") = "GPL";
