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

/* enforce decides a packet of endpoint ep in direction dir (its own: egress
 * for what it sends, ingress for what it receives) from or to the remote
 * identity: a packet of a tracked flow, a reply or a related ICMP error
 * passes; a new flow meets the endpoint's policy, is counted against the
 * rule that decided, reported when policy verdicts are on, and tracked if
 * it passes. Only a SYN opens a TCP connection: any other segment of one
 * conntrack does not know (never opened, revoked by a new policy, expired,
 * reset) is dropped, so a flow a policy revoked cannot come back by
 * sending. A new flow the endpoint sends to an address that the ipcache
 * knows only as the world's or a CIDR's, but that the node owns, has the
 * host's identity. A reply (or related ICMP error) of a translated flow
 * gets its service in f->lb.rev_nat, for reverse_nat. It returns 0 to let
 * the packet on, or the drop verdict; packet pointers taken before are
 * invalid after it. A global function: every path that delivers calls it,
 * and the verifier checks it once. */
__noinline int enforce(struct __sk_buff *skb, struct flow *f, __u16 ep, __u8 dir, __u32 identity)
{
	__u8 ct_dir = dir == DIR_EGRESS ? CT_EGRESS : CT_INGRESS;
	struct ct_service reply = {};
	struct policy_result res;
	struct ct_policy decided;
	enum ct_status status;

	if (!f)
		return TC_ACT_SHOT;
	status = ct_lookup(f, ct_dir, ep, dir == DIR_INGRESS && identity == IDENTITY_HOST, skb->len, &reply);
	if (status != CT_NEW) {
		f->lb.rev_nat = reply.id;
		return 0;
	}
	if (f->key.proto == IPPROTO_TCP && f->l4_off && !tcp_is_syn(f))
		return drop(skb, REASON_NO_CONNECTION, dir, ep);
	if (dir == DIR_EGRESS && (identity == IDENTITY_WORLD || identity_is_cidr(identity)) &&
	    node_owns_dst(skb, f))
		identity = IDENTITY_HOST;
	res = policy_check(ep, dir, identity, f->key.proto, f->l4_port);
	policy_count(ep, dir, res.rule);
	if (event_enabled(EVENT_FLAG_POLICY))
		event_report_skb(skb, event_what(EVENT_POLICY, res.verdict, dir, f->key.proto), ep, identity,
				 (__u32)res.rule << 16 | f->l4_port);
	if (res.verdict == POLICY_DENIED)
		return drop(skb, REASON_POLICY_DENIED, dir, ep);
	decided = (struct ct_policy){.identity = identity, .rule = res.rule, .audited = res.verdict == POLICY_AUDITED};
	f->key.dir = ct_dir;
	ct_create(&f->key, f, ep, &decided, ct_dir != CT_INGRESS || (f->lb.flags & LB_FLOW_HAIRPIN), skb->len);
	return 0;
}

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

/* reverse_nat makes a reply delivered to the client of a translated flow
 * (f->lb.rev_nat, from conntrack) come from the frontend, and an ICMP error
 * about one quote the frontend. It returns 0, or the drop verdict. */
static __always_inline int reverse_nat(struct __sk_buff *skb, struct flow *f, __u16 ep)
{
	if (f->lb.rev_nat && lb_reverse(skb, f) < 0)
		return drop(skb, REASON_MALFORMED, DIR_INGRESS, ep);
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
	if (!tracked) {
		ret = enforce(skb, f, dst->id, DIR_INGRESS, identity);
		if (!ret)
			ret = reverse_nat(skb, f, dst->id);
		if (ret)
			return ret;
	}

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

/* ttl_decrement lowers the IPv4 TTL or IPv6 hop limit by one as a router
 * hop does, and returns 0 when the packet would expire instead (the stack
 * then answers it). The TTL is the high byte of its 16-bit checksum word,
 * so the checksum grows by 0x0100 (RFC 1624 incremental update, as the
 * kernel's ip_decrease_ttl does); IPv6 has no header checksum. */
static __always_inline int ttl_decrement(struct __sk_buff *skb, __u8 family)
{
	if (family == 4) {
		struct iphdr *ip = header(skb, ETH_HLEN, sizeof(*ip));
		__u32 check;

		if (!ip || ip->ttl <= 1)
			return 0;
		check = ip->check;
		check += bpf_htons(0x0100);
		ip->check = (__u16)(check + (check >= 0xffff));
		ip->ttl--;
		return 1;
	}
	struct ipv6hdr *ip6 = header(skb, ETH_HLEN, sizeof(*ip6));

	if (!ip6 || ip6->hop_limit <= 1)
		return 0;
	ip6->hop_limit--;
	return 1;
}

/* from_endpoint_deliver sends on a packet of endpoint src that its egress
 * policy let through: to the local endpoint dst (NULL: none), or to the
 * stack. What is translated for a service is recorded only once the
 * packet is let through (lb_commit). */
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
	struct ipcache_value *remote = NULL;
	struct ethhdr *eth;
	struct flow f = {};
	__u32 identity;
	int ret;

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

		if (!ip || !ipv6_valid(skb, ip) || flow_parse6(skb, ip, &f) < 0)
			return drop(skb, REASON_MALFORMED, DIR_INGRESS, dst->id);
		if (flow_is_link_control(&f, ip->hop_limit))
			goto deliver;
		remote = ipcache_lookup6(ip->saddr);
	} else {
		goto deliver;
	}
	if (f.frag != FRAG_NONE && frag_ports(&f) < 0)
		return drop(skb, REASON_FRAG_NO_FIRST, DIR_INGRESS, dst->id);
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
