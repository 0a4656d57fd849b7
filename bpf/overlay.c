//go:build ignore

/* The overlay programs, on the VXLAN device the datapath owns in
 * ROUTING_VXLAN. from-overlay runs on every packet the kernel
 * decapsulated: a packet is let in only from a known node's underlay
 * address, with a VNI that carries an identity a workload of another node
 * may have, and an inner source inside that node's pod CIDRs; it then
 * meets the destination endpoint's ingress policy with that identity, or,
 * addressed to the node, goes to the stack. to-overlay addresses the
 * node's own traffic to other nodes' pods. */
#include "lib/common.h"
#include "lib/reasons.h"
#include "lib/events.h"
#include "lib/deliver.h"
#include "lib/node.h"
#include "lib/forward.h"
#include "lib/overlay.h"

/* What bpf_skb_get_tunnel_key returns for a packet without a key (and
 * for flags it does not know, which it is never given here). */
#define EINVAL 22

/* tunnel_source reads the outer source address of a decapsulated packet
 * (the family, the address as 16 bytes) and its VNI. It returns -1 when
 * the packet carries no tunnel metadata. */
static __always_inline int tunnel_source(struct __sk_buff *skb, __u8 *family, __u8 *addr, __u32 *vni)
{
	struct bpf_tunnel_key key = {};

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0) {
		__be32 a = bpf_htonl(key.remote_ipv4);

		*family = 4;
		__builtin_memcpy(addr, &a, 4);
	} else if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), BPF_F_TUNINFO_IPV6) == 0) {
		*family = 6;
		__builtin_memcpy(addr, key.remote_ipv6, 16);
	} else {
		return -1;
	}
	*vni = key.tunnel_id;
	return 0;
}

SEC("tc")
int from_overlay(struct __sk_buff *skb)
{
	__u32 identity, vni, *node;
	__u8 outer[16] = {};
	struct flow f = {};
	__u8 family;

	trace(skb, TRACE_FROM_OVERLAY, DIR_INGRESS, 0);
	if (tunnel_source(skb, &family, outer, &vni) < 0)
		return drop(skb, REASON_MALFORMED, DIR_INGRESS, 0);
	node = node_of_addr(family, outer);
	if (!node)
		return drop(skb, REASON_UNKNOWN_NODE, DIR_INGRESS, 0);
	identity = overlay_identity(vni);
	if (!identity)
		return drop(skb, REASON_TUNNEL_IDENTITY, DIR_INGRESS, 0);
	return overlay_deliver(skb, &f, *node, identity, NULL);
}

/* ipv6_link_scope reports an IPv6 destination the kernel's own link
 * control uses (multicast, link-local): never another node's pod. */
static __always_inline int ipv6_link_scope(const __u8 *daddr)
{
	return daddr[0] == 0xff || (daddr[0] == 0xfe && (daddr[1] & 0xc0) == 0x80);
}

/* to_overlay runs on the VXLAN device's egress. What from-endpoint
 * redirects here has its tunnel key and passes. Anything else is the
 * node's own traffic, which the routes to the cluster's pod ranges lead
 * into the device: it goes to the node of the destination's pod CIDR
 * with the host's identity (that node takes it for remote-node, and
 * checks that the inner source is this node's address). The kernel's own
 * IPv6 link control goes on to the device, which drops what has no key. */
SEC("tc")
int to_overlay(struct __sk_buff *skb)
{
	struct node_settings *cfg = node_config_get();
	struct bpf_tunnel_key key;
	struct node_route *r;
	__u8 daddr[16] = {};
	__u8 family;
	int ret;

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) != -EINVAL)
		return TC_ACT_OK; /* keyed by from-endpoint (IPv4 or IPv6) */
	if (!cfg)
		return TC_ACT_SHOT;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		family = 4;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, daddr), daddr, 4) < 0)
			return drop(skb, REASON_MALFORMED, DIR_EGRESS, 0);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		family = 6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + __builtin_offsetof(struct ipv6hdr, daddr), daddr, 16) < 0)
			return drop(skb, REASON_MALFORMED, DIR_EGRESS, 0);
		if (ipv6_link_scope(daddr))
			return TC_ACT_OK;
	} else {
		return drop(skb, REASON_UNSUPPORTED_L3, DIR_EGRESS, 0);
	}
	r = node_route_of(family, daddr);
	if (!r || r->node == NODE_NONE)
		return drop(skb, REASON_NODE_UNREACHABLE, DIR_EGRESS, 0);
	if (r->node == NODE_LOCAL)
		return drop(skb, REASON_NO_LOCAL_ENDPOINT, DIR_EGRESS, 0);
	ret = tunnel_key(skb, cfg, r, IDENTITY_HOST, 0);
	return ret ? ret : TC_ACT_OK;
}

char __license[] SEC("license") = "GPL";
