//go:build ignore

/* The overlay program: from-overlay runs on the VXLAN device the datapath
 * owns in ROUTING_VXLAN, on every packet the kernel decapsulated. A
 * packet is let in only from a known node's underlay address, with a VNI
 * that carries an identity a workload of another node may have, and an
 * inner source inside that node's pod CIDRs; it then meets the
 * destination endpoint's ingress policy with that identity. */
#include "lib/common.h"
#include "lib/reasons.h"
#include "lib/events.h"
#include "lib/deliver.h"
#include "lib/node.h"

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

/* sender_owns reports whether the inner source is the sending node's to
 * use: inside its pod CIDRs, or, for what the node itself sends, one of
 * its underlay addresses. */
static __always_inline int sender_owns(struct flow *f, __u32 node, __u32 identity)
{
	struct node_route *r = node_route_of(f->key.family, f->key.saddr);
	__u32 *owner;

	if (r && r->node == node)
		return 1;
	if (identity != IDENTITY_REMOTE_NODE)
		return 0;
	owner = node_of_addr(f->key.family, f->key.saddr);
	return owner && *owner == node;
}

SEC("tc")
int from_overlay(struct __sk_buff *skb)
{
	struct ipcache_value *remote;
	struct endpoint_info *dst;
	__u8 outer[16] = {};
	struct flow f = {};
	__u32 identity, *node;
	__u8 family;
	int ret;

	trace(skb, TRACE_FROM_OVERLAY, DIR_INGRESS, 0);
	if (tunnel_source(skb, &family, outer, &identity) < 0)
		return drop(skb, REASON_MALFORMED, DIR_INGRESS, 0);
	node = node_of_addr(family, outer);
	if (!node)
		return drop(skb, REASON_UNKNOWN_NODE, DIR_INGRESS, 0);
	/* What a node sends itself travels as the host's identity: here it
	 * is that remote node's. */
	if (identity == IDENTITY_HOST)
		identity = IDENTITY_REMOTE_NODE;
	else if (identity < IDENTITY_MIN_WORKLOAD)
		return drop(skb, REASON_TUNNEL_IDENTITY, DIR_INGRESS, 0);

	ret = parse_inbound(skb, &f);
	if (ret == INBOUND_PASS)
		return drop(skb, REASON_UNSUPPORTED_L3, DIR_INGRESS, 0);
	if (ret != INBOUND_IP)
		return inbound_drop(skb, ret, 0);
	if (!sender_owns(&f, *node, identity))
		return drop(skb, REASON_SPOOFED_NODE_SOURCE, DIR_INGRESS, 0);
	remote = f.key.family == 4 ? ipcache_lookup4(*(__be32 *)f.key.daddr) : ipcache_lookup6(f.key.daddr);
	dst = local_endpoint(remote);
	if (!dst)
		return drop(skb, REASON_NO_LOCAL_ENDPOINT, DIR_INGRESS, 0);
	if (!ttl_decrement(skb, f.key.family))
		return TC_ACT_OK; /* the stack answers it */
	return to_endpoint(skb, dst, &f, identity, 0);
}

char __license[] SEC("license") = "GPL";
