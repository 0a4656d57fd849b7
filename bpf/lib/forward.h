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
#include "icmp.h"
#include "encrypt.h"
#include "mark.h"

/* The VNI has 24 bits: identities from 1 << 24 (a node's CIDR identities
 * among them) have no meaning on another node and cannot travel. */
#define TUNNEL_IDENTITY_MAX ((1U << 24) - 1)

/* to_node's answers that are no verdict: a destination it does not
 * forward (one on this node, or outside the cluster), which the caller
 * delivers; and a packet too big for the tunnel, which the caller answers
 * (too_big). */
#define FORWARD_HERE (-1)
#define FORWARD_TOO_BIG (-2)

/* tunnel_key sets the packet's tunnel key: the VXLAN device encapsulates
 * it towards the node's underlay address (IPv4 when the node has one)
 * with the identity as the VNI, marked for the node's xfrm policy when
 * IPsec is on. It returns 0, or the drop verdict. */
static __always_inline int tunnel_key(struct __sk_buff *skb, struct node_settings *cfg, struct node_route *r,
				      __u32 identity, __u16 ep)
{
	struct bpf_tunnel_key key = {.tunnel_id = identity, .tunnel_ttl = 64};
	__u64 flags = 0;

	if (identity > TUNNEL_IDENTITY_MAX)
		return drop(skb, REASON_IDENTITY_TOO_LARGE, DIR_EGRESS, ep);
	if (r->flags & NODE_F_IPV4) {
		/* No outer UDP checksum over IPv4, as Linux's VXLAN devices
		 * send by default: the inner packet has its own. IPv6 needs one. */
		key.remote_ipv4 = bpf_ntohl(r->ipv4);
		flags = BPF_F_ZERO_CSUM_TX;
	} else {
		__builtin_memcpy(key.remote_ipv6, r->ipv6, 16);
		flags = BPF_F_TUNINFO_IPV6;
	}
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), flags) < 0)
		return drop(skb, REASON_NO_ROUTE, DIR_EGRESS, ep);
	/* The VXLAN device routes the packet it makes with this mark: the
	 * xfrm policy of the node and key encrypts it. */
	if (cfg->encryption == ENCRYPT_IPSEC && !ipsec_mark(skb, r->node))
		return drop(skb, REASON_NO_KEY, DIR_EGRESS, ep);
	trace(skb, TRACE_TO_OVERLAY, DIR_EGRESS, ep);
	return 0;
}

/* to_tunnel hands the packet to the VXLAN device, keyed (tunnel_key);
 * unencrypted, the packet the device makes leaves the node device marked
 * forwarded (mark.h). */
static __always_inline int to_tunnel(struct __sk_buff *skb, struct node_settings *cfg, struct node_route *r,
				     __u32 identity, __u16 ep)
{
	int ret = tunnel_key(skb, cfg, r, identity, ep);

	if (ret)
		return ret;
	if (cfg->encryption == ENCRYPT_NONE)
		mark_forwarded(skb);
	return bpf_redirect(cfg->tunnel_ifindex, 0);
}

/* l3_len is the length of the packet past its Ethernet header or, for a
 * GSO packet, of each segment it is to be cut into. */
static __always_inline __u32 l3_len(struct __sk_buff *skb, const struct flow *f)
{
	__u32 l4 = 8; /* UDP's header */
	__u8 doff;

	if (!skb->gso_size)
		return skb->len - ETH_HLEN;
	if (f->key.proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, f->l4_off + 12, &doff, 1) < 0)
			return skb->len - ETH_HLEN;
		l4 = (doff >> 4) * 4;
	}
	return skb->gso_size + (f->l4_off - ETH_HLEN) + l4;
}

/* may_fragment reports an IPv4 packet without DF: what a router may cut
 * up rather than answer. */
static __always_inline int may_fragment(struct __sk_buff *skb, struct flow *f)
{
	struct iphdr *ip;

	if (f->key.family != 4)
		return 0;
	ip = header(skb, ETH_HLEN, sizeof(*ip));
	return ip && !(ip->frag_off & bpf_htons(IP_DF));
}

/* to_route sends the packet out of the node device the kernel's route
 * for its destination names (the route to the pod CIDR via its node,
 * which package node installs), to the next hop's MAC, or through the
 * neighbour subsystem while that MAC is not yet known. What the route's
 * MTU cannot carry goes to the stack to be fragmented (IPv4 without DF)
 * or is answered (FORWARD_TOO_BIG). What leaves is marked forwarded
 * (mark.h). */
static __always_inline int to_route(struct __sk_buff *skb, struct flow *f, __u16 ep)
{
	struct bpf_fib_lookup fib = {.ifindex = skb->ifindex, .l4_protocol = f->key.proto};
	struct ethhdr *eth;
	long ret;

	fib.family = f->key.family == 4 ? AF_INET : AF_INET6;
	__builtin_memcpy(fib.src, f->key.saddr, 16);
	__builtin_memcpy(fib.dst, f->key.daddr, 16);
	/* Each segment of a GSO packet is what must fit the route. */
	fib.tot_len = l3_len(skb, f);
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (ret == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return may_fragment(skb, f) ? FORWARD_HERE : FORWARD_TOO_BIG;
	if ((ret == BPF_FIB_LKUP_RET_SUCCESS || ret == BPF_FIB_LKUP_RET_NO_NEIGH) && !ttl_decrement(skb, f->key.family))
		return FORWARD_HERE;
	if (ret == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The lookup left the next hop where the destination was. */
		struct bpf_redir_neigh nh = {.nh_family = fib.family};

		__builtin_memcpy(nh.ipv6_nh, fib.dst, 16);
		trace(skb, TRACE_TO_NETDEV, DIR_EGRESS, ep);
		mark_forwarded(skb);
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
	mark_forwarded(skb);
	return bpf_redirect(fib.ifindex, 0);
}

/* How much of a packet to_ipsec makes linear. */
#define IPSEC_PULL_LEN 128

/* to_ipsec hands a natively routed packet to the stack, marked for the
 * node's xfrm policy: the stack forwards it along the route to the pod
 * CIDR and encrypts it (bpf_redirect would skip xfrm). */
static __always_inline int to_ipsec(struct __sk_buff *skb, struct node_route *r, __u16 ep)
{
	if (!ipsec_mark(skb, r->node))
		return drop(skb, REASON_NO_KEY, DIR_EGRESS, ep);
	/* A TCP segment from a local socket is a clone with its payload in
	 * pages the socket keeps. Handed to ESP (Linux 6.1) in that shape,
	 * only its linear headers left encrypted and the payload in clear:
	 * the packet goes with its first IPSEC_PULL_LEN bytes made linear and
	 * its own, as the stack always saw it here. */
	bpf_skb_pull_data(skb, skb->len < IPSEC_PULL_LEN ? skb->len : IPSEC_PULL_LEN);
	trace(skb, TRACE_TO_ENCRYPT, DIR_EGRESS, ep);
	return TC_ACT_OK;
}

/* to_wireguard sends a natively routed packet into the WireGuard device,
 * which encrypts it for the peer whose allowed IPs (the node's pod CIDRs)
 * hold its destination; the device takes the Ethernet header off. */
static __always_inline int to_wireguard(struct __sk_buff *skb, struct node_settings *cfg, __u16 ep)
{
	trace(skb, TRACE_TO_ENCRYPT, DIR_EGRESS, ep);
	return bpf_redirect(cfg->wg_ifindex, 0);
}

/* exceeds_tunnel reports whether the packet (or a segment of it) is
 * larger than the tunnel carries, the endpoints' MTU, and may not be
 * fragmented: IPv6, or IPv4 with DF set (the tunnel fragments the rest). */
static __always_inline int exceeds_tunnel(struct __sk_buff *skb, struct flow *f, struct node_settings *cfg)
{
	return cfg->endpoint_mtu && l3_len(skb, f) > cfg->endpoint_mtu && !may_fragment(skb, f);
}

/* too_big answers a packet exceeds_tunnel refused with ICMP's
 * "fragmentation needed" or ICMPv6's "packet too big", with the
 * endpoints' MTU, from the node, straight back into endpoint ep, so that
 * its path MTU discovery works. A global function, called by the
 * endpoint program itself: the answer's buffers stay out of to_node's
 * stack. */
__noinline int too_big(struct __sk_buff *skb, struct flow *f, __u16 ep)
{
	struct node_settings *cfg = node_config_get();
	__be32 mtu;
	int ret;

	if (!f || !cfg)
		return TC_ACT_SHOT;
	mtu = bpf_htonl(cfg->endpoint_mtu);
	drop(skb, REASON_FRAG_NEEDED, DIR_EGRESS, ep);
	if (f->key.family == 4)
		ret = icmp4_error(skb, f, cfg->flags & NODE_CONFIG_IPV4 ? *(__be32 *)cfg->ipv4 : *(__be32 *)f->key.daddr,
				  ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu);
	else
		ret = icmp6_error(skb, f, cfg->flags & NODE_CONFIG_IPV6 ? cfg->ipv6 : f->key.daddr, ICMPV6_PKT_TOOBIG, 0, mtu);
	if (ret < 0)
		return TC_ACT_SHOT;
	return bpf_redirect_peer(skb->ifindex, 0);
}

/* to_node forwards the flow's packet, which endpoint ep (0: the node)
 * sends with the identity, when its destination is in another node's pod
 * CIDRs, or, over VXLAN, is another node's underlay address (that node's
 * own traffic to pods comes over the overlay, and its node devices take
 * no pod's source from outside: the replies go back the same way); a
 * destination in the cluster's pod ranges that is on no node known is
 * dropped. It returns the verdict (TC_ACT_OK: the stack forwards
 * it, encrypted), FORWARD_HERE for a destination it does not forward, or
 * FORWARD_TOO_BIG. A router hop: the TTL goes down by one, and a packet
 * that would expire goes to the stack, which answers it. A global
 * function: verified once for every caller. */
__noinline int to_node(struct __sk_buff *skb, struct flow *f, __u32 identity, __u16 ep)
{
	struct node_settings *cfg = node_config_get();
	struct node_route to_addr = {};
	struct node_route *r;
	__u32 *node;

	if (!f || !cfg || cfg->routing == ROUTING_LOCAL)
		return FORWARD_HERE;
	r = node_route_of(f->key.family, f->key.daddr);
	if (!r && cfg->routing == ROUTING_VXLAN) {
		node = node_of_addr(f->key.family, f->key.daddr);
		if (node) {
			to_addr.node = *node;
			if (f->key.family == 4) {
				to_addr.flags = NODE_F_IPV4;
				to_addr.ipv4 = *(__be32 *)f->key.daddr;
			} else {
				to_addr.flags = NODE_F_IPV6;
				__builtin_memcpy(to_addr.ipv6, f->key.daddr, 16);
			}
			r = &to_addr;
		}
	}
	if (!r || r->node == NODE_LOCAL)
		return FORWARD_HERE;
	if (r->node == NODE_NONE)
		return drop(skb, REASON_NODE_UNREACHABLE, DIR_EGRESS, ep);
	if (cfg->routing == ROUTING_NATIVE && cfg->encryption == ENCRYPT_IPSEC)
		return to_ipsec(skb, r, ep);
	if (cfg->routing == ROUTING_NATIVE && cfg->encryption != ENCRYPT_WIREGUARD)
		return to_route(skb, f, ep);
	if (exceeds_tunnel(skb, f, cfg))
		return FORWARD_TOO_BIG;
	if (!ttl_decrement(skb, f->key.family))
		return FORWARD_HERE;
	if (cfg->routing == ROUTING_NATIVE)
		return to_wireguard(skb, cfg, ep);
	return to_tunnel(skb, cfg, r, identity, ep);
}
