/* Delivery of what comes over the overlay: the checks a packet from
 * another node's pods passes before it meets the destination's ingress
 * policy, shared by from-overlay (the VXLAN device's decapsulation) and
 * from-netdev (which takes the common case off the underlay itself). */
#pragma once

#include "common.h"
#include "reasons.h"
#include "events.h"
#include "deliver.h"
#include "node.h"


/* overlay_identity is the identity a node's VNI stands for: what a node
 * sends itself travels as the host's identity, which here is that remote
 * node's; 0 for a VNI no workload of another node may have. */
static __always_inline __u32 overlay_identity(__u32 vni)
{
	if (vni == IDENTITY_HOST)
		return IDENTITY_REMOTE_NODE;
	return vni < IDENTITY_MIN_WORKLOAD ? 0 : vni;
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

/* overlay_deliver decides a decapsulated packet (its Ethernet header
 * first) that node sent with the identity (overlay_identity), parsed
 * into f, which the caller gives zeroed: its inner source must be the
 * node's to use; to the node itself it goes to the stack, to a local
 * endpoint through its ingress policy. remote is the ipcache's entry for
 * the inner destination when the caller looked it up already, else
 * NULL. */
static __always_inline int overlay_deliver(struct __sk_buff *skb, struct flow *f, __u32 node, __u32 identity,
					   struct ipcache_value *remote)
{
	struct endpoint_info *dst;
	int ret;

	ret = parse_inbound(skb, f);
	if (ret == INBOUND_PASS)
		return drop(skb, REASON_UNSUPPORTED_L3, DIR_INGRESS, 0);
	if (ret != INBOUND_IP)
		return inbound_drop(skb, ret, 0);
	if (!sender_owns(f, node, identity))
		return drop(skb, REASON_SPOOFED_NODE_SOURCE, DIR_INGRESS, 0);
	if (!remote)
		remote = f->key.family == 4 ? ipcache_lookup4(*(__be32 *)f->key.daddr) : ipcache_lookup6(f->key.daddr);
	if (identity_of(remote) == IDENTITY_HOST) {
		/* To the node itself: a pod's reply to what the node sent it
		 * over the overlay (to-overlay), or a pod's own flow. Its
		 * Ethernet header is addressed to the pod's gateway on the
		 * other node: the stack takes it for the node all the same. */
		if (bpf_skb_change_type(skb, PACKET_HOST) < 0)
			return drop(skb, REASON_MALFORMED, DIR_INGRESS, 0);
		trace(skb, TRACE_TO_STACK, DIR_INGRESS, 0);
		return TC_ACT_OK;
	}
	dst = local_endpoint(remote);
	if (!dst)
		return drop(skb, REASON_NO_LOCAL_ENDPOINT, DIR_INGRESS, 0);
	if (!ttl_decrement(skb, f->key.family))
		return TC_ACT_OK; /* the stack answers it */
	return to_endpoint(skb, dst, f, identity, 0);
}
