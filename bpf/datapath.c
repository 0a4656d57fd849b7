//go:build ignore

/* The sluice datapath object: its maps are pinned and shared by every
 * program. */
#include "lib/common.h"
#include "lib/reasons.h"
#include "lib/metrics.h"
#include "lib/events.h"
#include "lib/parse.h"
#include "lib/ipcache.h"
#include "lib/endpoint.h"

/* to_endpoint delivers a packet to a local endpoint: it becomes a frame from
 * the endpoint's gateway to the endpoint, and crosses straight into the
 * endpoint's namespace (bpf_redirect_peer), without the host stack. */
static __always_inline int to_endpoint(struct __sk_buff *skb, __u32 ifindex)
{
	struct endpoint_info *dst = bpf_map_lookup_elem(&endpoints, &ifindex);
	struct ethhdr *eth;

	if (!dst)
		return TC_ACT_OK; /* being deleted: let the stack decide */
	eth = header(skb, 0, sizeof(*eth));
	if (!eth)
		return drop(skb, REASON_MALFORMED, DIR_INGRESS, dst->id);
	mac_copy(eth->h_dest, dst->mac);
	mac_copy(eth->h_source, dst->host_mac);

	trace(skb, TRACE_TO_ENDPOINT, DIR_INGRESS, dst->id);
	endpoint_count(dst->id, 1, skb->len);
	forwarded(skb, DIR_INGRESS);
	if (bpf_redirect_peer(ifindex, 0) != TC_ACT_REDIRECT)
		return drop(skb, REASON_REDIRECT_FAILED, DIR_INGRESS, dst->id);
	return TC_ACT_REDIRECT;
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
	struct iphdr *ip = header(skb, sizeof(struct ethhdr), sizeof(*ip));
	struct ipcache_value *dst;

	if (!ip || ip->ihl < 5 || ip->version != 4)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	if (!(src->flags & ENDPOINT_F_IPV4) || ip->saddr != src->ipv4)
		return drop(skb, REASON_SPOOFED_SOURCE_IP, DIR_EGRESS, src->id);

	dst = ipcache_lookup4(ip->daddr);
	if (dst && dst->ifindex && ip->ttl > 1) {
		ttl_decrement(ip);
		return to_endpoint(skb, dst->ifindex);
	}
	trace(skb, TRACE_TO_STACK, DIR_EGRESS, src->id);
	return TC_ACT_OK;
}

static __always_inline int from_endpoint_ipv6(struct __sk_buff *skb, struct endpoint_info *src)
{
	struct ipv6hdr *ip = header(skb, sizeof(struct ethhdr), sizeof(*ip));
	struct ipcache_value *dst;

	if (!ip || ip->version != 6)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, src->id);
	/* Link-local and unspecified sources (neighbour discovery, MLD) stay on
	 * the link: the host stack gets them as from any neighbour. */
	if ((ip->saddr.in6_u.u6_addr8[0] == 0xfe && (ip->saddr.in6_u.u6_addr8[1] & 0xc0) == 0x80) ||
	    ip->daddr.in6_u.u6_addr8[0] == 0xff)
		return TC_ACT_OK;
	if (!(src->flags & ENDPOINT_F_IPV6) || !ipv6_equal(ip->saddr.in6_u.u6_addr8, src->ipv6))
		return drop(skb, REASON_SPOOFED_SOURCE_IP, DIR_EGRESS, src->id);

	dst = ipcache_lookup6(ip->daddr.in6_u.u6_addr8);
	if (dst && dst->ifindex && ip->hop_limit > 1) {
		ip->hop_limit--; /* no checksum in the IPv6 header */
		return to_endpoint(skb, dst->ifindex);
	}
	trace(skb, TRACE_TO_STACK, DIR_EGRESS, src->id);
	return TC_ACT_OK;
}

static __always_inline int from_endpoint_arp(struct __sk_buff *skb, struct endpoint_info *src)
{
	struct arp_eth_ipv4 *arp = header(skb, sizeof(struct ethhdr), sizeof(*arp));

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
	default:
		return drop(skb, REASON_UNSUPPORTED_L3, DIR_EGRESS, src->id);
	}
	if (ret == TC_ACT_OK || ret == TC_ACT_REDIRECT)
		forwarded(skb, DIR_EGRESS);
	return ret;
}

char __license[] SEC("license") = "GPL";
