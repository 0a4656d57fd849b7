//go:build ignore

/* The node-device programs, on each of the node's devices
 * (Config.Node.Devices). from-netdev runs on tcx ingress, on every packet
 * from the underlay: a reply to a masqueraded flow is turned back to its
 * pod; a packet for a local endpoint meets its ingress policy and crosses
 * straight into the workload's namespace, and so does VXLAN from another
 * node's pod to one, decapsulated here in the plain case (vxlan_take);
 * everything else (the node's own traffic, the rest of the overlay's UDP)
 * goes on to the stack. to-netdev runs on tcx
 * egress: what pods send outside the cluster leaves with the node's
 * address (snat.h). */
#include "lib/common.h"
#include "lib/reasons.h"
#include "lib/events.h"
#include "lib/deliver.h"
#include "lib/node.h"
#include "lib/snat.h"
#include "lib/encrypt.h"
#include "lib/mark.h"
#include "lib/overlay.h"

/* source_allowed reports whether a packet from the underlay may have the
 * flow's source: never a local pod's address, nor, unless the nodes route
 * natively, any address of the cluster's pod ranges (over VXLAN, pods of
 * other nodes come through the overlay). */
static __always_inline int source_allowed(struct node_settings *cfg, struct flow *f)
{
	struct node_route *r = node_route_of(f->key.family, f->key.saddr);

	if (!r)
		return 1;
	if (r->node == NODE_LOCAL || r->node == NODE_NONE)
		return 0;
	return cfg->routing == ROUTING_NATIVE;
}

/* VXLAN as this node's peers send it: flags with only the VNI bit. */
#define VXLAN_FLAGS_VNI 0x08

/* The ECN field of the IPv4 TOS byte, and its "congestion experienced". */
#define IP_ECN_MASK 0x03
#define IP_ECN_CE 0x03

/* Outer headers past the outer IP header that from-netdev takes off:
 * UDP, VXLAN and the inner Ethernet header. */
#define VXLAN_INNER_IP (8 + 8 + ETH_HLEN)

/* vxlan_take decapsulates, on the underlay, a VXLAN packet from another
 * node's pod to a local endpoint, and delivers it as from-overlay would,
 * without the kernel's VXLAN receive path (a UDP socket lookup and a
 * metadata allocation per packet, then a second pass through the
 * stack). Only the plain case: IPv4 in IPv4 to the node's address, not
 * encrypted (the stack's xfrm policy must see what arrives then),
 * not a GSO or fragmented packet, from a known node with a workload's
 * identity, to a local endpoint, without a congestion mark or a reserved
 * bit. Anything else returns -1 and goes the kernel's way, where
 * from-overlay decides it (and counts what it drops). f, the outer
 * packet's flow, becomes the inner one's. */
static __always_inline int vxlan_take(struct __sk_buff *skb, struct node_settings *cfg, struct flow *f)
{
	__u32 identity, vni, vxlan[2], *node;
	struct ipcache_value *remote;
	struct iphdr *outer;
	__u16 inner_proto;
	__be32 inner_dst;

	if (cfg->routing != ROUTING_VXLAN || cfg->encryption != ENCRYPT_NONE || f->key.family != 4 ||
	    f->key.proto != IPPROTO_UDP || f->key.dport != bpf_htons(cfg->tunnel_port) || f->frag != FRAG_NONE ||
	    skb->gso_size || !node_config_addr(cfg, 4, f->key.daddr))
		return -1;
	/* Congestion marked on the way (ECN CE) is the kernel's to carry
	 * inwards, or to drop the packet for (RFC 6040). */
	outer = header(skb, ETH_HLEN, sizeof(*outer));
	if (!outer || (outer->tos & IP_ECN_MASK) == IP_ECN_CE)
		return -1;
	if (bpf_skb_load_bytes(skb, f->l4_off + 8, vxlan, sizeof(vxlan)) < 0 ||
	    bpf_skb_load_bytes(skb, f->l4_off + VXLAN_INNER_IP - 2, &inner_proto, 2) < 0 ||
	    bpf_skb_load_bytes(skb, f->l4_off + VXLAN_INNER_IP + __builtin_offsetof(struct iphdr, daddr), &inner_dst,
			       4) < 0)
		return -1;
	/* Reserved bits set are the kernel's to refuse (and count). */
	if (vxlan[0] != bpf_htonl(VXLAN_FLAGS_VNI << 24) || (bpf_ntohl(vxlan[1]) & 0xff) ||
	    inner_proto != bpf_htons(ETH_P_IP))
		return -1;
	vni = bpf_ntohl(vxlan[1]) >> 8;
	identity = overlay_identity(vni);
	node = node_of_addr(4, f->key.saddr);
	if (!identity || !node)
		return -1;
	remote = ipcache_lookup4(inner_dst);
	if (!local_endpoint(remote))
		return -1;
	if (bpf_skb_adjust_room(skb, -(__s32)(f->l4_off - ETH_HLEN + VXLAN_INNER_IP), BPF_ADJ_ROOM_MAC, 0) < 0)
		return -1;
	trace(skb, TRACE_FROM_OVERLAY, DIR_INGRESS, 0);
	__builtin_memset(f, 0, sizeof(*f));
	return overlay_deliver(skb, f, *node, identity, remote);
}

SEC("tc")
int from_netdev(struct __sk_buff *skb)
{
	struct node_settings *cfg = node_config_get();
	struct ipcache_value *remote;
	struct endpoint_info *dst;
	struct flow f = {};
	int ret, verdict;

	/* A frame to another host's MAC (flooded by the link, or handed up
	 * in promiscuous mode) is not the node's: the stack drops it. */
	if (!cfg || skb->pkt_type == PACKET_OTHERHOST)
		return TC_ACT_OK;
	ret = parse_inbound(skb, &f);
	if (ret == INBOUND_PASS || ret == INBOUND_MALFORMED)
		return TC_ACT_OK; /* not for an endpoint, or the stack's to drop */
	/* ESP from another node: the stack decrypts it with that node's
	 * state, and the packet inside comes back through here. */
	if (ret == INBOUND_IP && f.key.proto == IPPROTO_ESP && cfg->encryption == ENCRYPT_IPSEC &&
	    ipsec_mark_arriving(skb, f.key.family, f.key.saddr))
		return TC_ACT_OK;
	if (!source_allowed(cfg, &f))
		return drop(skb, REASON_SPOOFED_NODE_SOURCE, DIR_INGRESS, 0);
	if (ret == INBOUND_IP && (verdict = vxlan_take(skb, cfg, &f)) >= 0)
		return verdict;
	if (ret == INBOUND_IP && snat_in(skb, &f) < 0)
		return drop(skb, REASON_MALFORMED, DIR_INGRESS, 0);
	remote = f.key.family == 4 ? ipcache_lookup4(*(__be32 *)f.key.daddr) : ipcache_lookup6(f.key.daddr);
	dst = local_endpoint(remote);
	if (!dst)
		return TC_ACT_OK;
	trace(skb, TRACE_FROM_NETDEV, DIR_INGRESS, dst->id);
	if (ret != INBOUND_IP)
		return inbound_drop(skb, ret, dst->id);
	if (!ttl_decrement(skb, f.key.family))
		return TC_ACT_OK; /* the stack answers it */
	return to_endpoint(skb, dst, &f, IDENTITY_OF_SOURCE, 0);
}

/* to_wireguard_node reports whether the flow is VXLAN to another node that
 * WireGuard must carry: the VXLAN device's packets, with their identity
 * in the VNI, go inside WireGuard (allowed IPs: the node's addresses). */
static __always_inline int to_wireguard_node(struct node_settings *cfg, struct flow *f)
{
	return cfg->encryption == ENCRYPT_WIREGUARD && cfg->routing == ROUTING_VXLAN &&
	       f->key.proto == IPPROTO_UDP && f->key.dport == bpf_htons(cfg->tunnel_port) &&
	       node_of_addr(f->key.family, f->key.daddr);
}

/* to_netdev masquerades what pods send to the world, and sends VXLAN to
 * nodes into WireGuard when it is on. Everything else, and what it
 * cannot parse, leaves as it is: at once what from-endpoint forwarded to
 * another node. */
SEC("tc")
int to_netdev(struct __sk_buff *skb)
{
	struct node_settings *cfg = node_config_get();
	struct flow f = {};
	struct ethhdr *eth;
	int ret;

	if (take_forwarded(skb))
		return TC_ACT_OK;
	pull_headers(skb);
	eth = header(skb, 0, sizeof(*eth));
	if (!eth)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = header(skb, ETH_HLEN, sizeof(*ip));

		if (!ip || !ipv4_valid(skb, ip) || flow_parse4(skb, ip, &f) < 0)
			return TC_ACT_OK;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip = header(skb, ETH_HLEN, sizeof(*ip));

		if (!ip || !ipv6_valid(skb, ip) || flow_parse6(skb, ip, &f) < 0)
			return TC_ACT_OK;
	} else {
		return TC_ACT_OK;
	}
	if (cfg && to_wireguard_node(cfg, &f)) {
		trace(skb, TRACE_TO_ENCRYPT, DIR_EGRESS, 0);
		return bpf_redirect(cfg->wg_ifindex, 0);
	}
	ret = snat_out(skb, &f);
	if (ret)
		return ret;
	trace(skb, TRACE_TO_NETDEV, DIR_EGRESS, 0);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "GPL";
