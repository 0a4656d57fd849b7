/* Forwarding to the pods of other nodes: over VXLAN, with the sender's
 * identity in the VNI so that the receiving node enforces its policy on
 * the true source, or routed natively out of a node device. */
#pragma once

#include "common.h"
#include "reasons.h"
#include "events.h"
#include "flow.h"
#include "node.h"
#include "deliver.h"

/* The VNI has 24 bits: identities from 1 << 24 (a node's CIDR identities
 * among them) have no meaning on another node and cannot travel. */
#define TUNNEL_IDENTITY_MAX ((1U << 24) - 1)

/* to_node's answer for a destination it does not forward: one on this
 * node, or outside the cluster. The caller delivers it. */
#define FORWARD_HERE (-1)

/* to_tunnel hands the packet to the VXLAN device, which encapsulates it
 * towards the node's underlay address (IPv4 when the node has one) with
 * the identity as the VNI. */
static __always_inline int to_tunnel(struct __sk_buff *skb, struct node_settings *cfg, struct node_route *r,
				     __u32 identity, __u16 ep)
{
	struct bpf_tunnel_key key = {.tunnel_id = identity, .tunnel_ttl = 64};
	__u64 flags = 0;

	if (identity > TUNNEL_IDENTITY_MAX)
		return drop(skb, REASON_IDENTITY_TOO_LARGE, DIR_EGRESS, ep);
	if (r->flags & NODE_F_IPV4) {
		key.remote_ipv4 = bpf_ntohl(r->ipv4);
	} else {
		__builtin_memcpy(key.remote_ipv6, r->ipv6, 16);
		flags = BPF_F_TUNINFO_IPV6;
	}
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), flags) < 0)
		return drop(skb, REASON_NO_ROUTE, DIR_EGRESS, ep);
	trace(skb, TRACE_TO_OVERLAY, DIR_EGRESS, ep);
	return bpf_redirect(cfg->tunnel_ifindex, 0);
}

/* to_route sends the packet out of the node device the kernel's route
 * for its destination names (the route to the pod CIDR via its node,
 * which package node installs), to the next hop's MAC, or through the
 * neighbour subsystem while that MAC is not yet known. */
static __always_inline int to_route(struct __sk_buff *skb, struct flow *f, __u16 ep)
{
	struct bpf_fib_lookup fib = {.ifindex = skb->ifindex, .l4_protocol = f->key.proto};
	struct ethhdr *eth;
	long ret;

	fib.family = f->key.family == 4 ? AF_INET : AF_INET6;
	__builtin_memcpy(fib.src, f->key.saddr, 16);
	__builtin_memcpy(fib.dst, f->key.daddr, 16);
	if (f->key.family == 4)
		fib.tot_len = skb->len - ETH_HLEN;
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The lookup left the next hop where the destination was. */
		struct bpf_redir_neigh nh = {.nh_family = fib.family};

		__builtin_memcpy(nh.ipv6_nh, fib.dst, 16);
		trace(skb, TRACE_TO_NETDEV, DIR_EGRESS, ep);
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	if (ret != BPF_FIB_LKUP_RET_SUCCESS)
		return drop(skb, REASON_NO_ROUTE, DIR_EGRESS, ep);
	eth = header(skb, 0, sizeof(*eth));
	if (!eth)
		return drop(skb, REASON_MALFORMED, DIR_EGRESS, ep);
	/* The lookup's MACs are 2-byte aligned on the stack: no mac_copy. */
	__builtin_memcpy(eth->h_dest, fib.dmac, 6);
	__builtin_memcpy(eth->h_source, fib.smac, 6);
	trace(skb, TRACE_TO_NETDEV, DIR_EGRESS, ep);
	return bpf_redirect(fib.ifindex, 0);
}

/* to_node forwards the flow's packet, which endpoint ep (0: the node)
 * sends with the identity, when its destination is in another node's pod
 * CIDRs; a destination in the cluster's pod ranges that is on no node
 * known is dropped. It returns the verdict, or FORWARD_HERE for a
 * destination it does not forward. A router hop: the TTL goes down by
 * one, and a packet that would expire goes to the stack, which answers
 * it. A global function: verified once for every caller. */
__noinline int to_node(struct __sk_buff *skb, struct flow *f, __u32 identity, __u16 ep)
{
	struct node_settings *cfg = node_config_get();
	struct node_route *r;

	if (!f || !cfg || cfg->routing == ROUTING_LOCAL)
		return FORWARD_HERE;
	r = node_route_of(f->key.family, f->key.daddr);
	if (!r || r->node == NODE_LOCAL)
		return FORWARD_HERE;
	if (r->node == NODE_NONE)
		return drop(skb, REASON_NODE_UNREACHABLE, DIR_EGRESS, ep);
	if (!ttl_decrement(skb, f->key.family))
		return FORWARD_HERE;
	if (cfg->routing == ROUTING_VXLAN)
		return to_tunnel(skb, cfg, r, identity, ep);
	return to_route(skb, f, ep);
}
