/* The flow a packet belongs to: addresses, protocol, ports (or the ICMP
 * identifier), TCP flags, and for an ICMP error the flow it is about. It is
 * what conntrack keys on and what policy decides by. */
#pragma once

#include "common.h"
#include "../include/net.h"
#include "parse.h"
#include "ct.h"      /* struct ct_key */
#include "service.h" /* struct ct_service, struct lb_flow */

/* The flow a packet belongs to, filled in by the parser; load balancing
 * fills in its parts. Laid out without holes: it lives on the stack of
 * every program. */
struct flow {
	struct ct_key key;         /* as this packet has it (dir set by the caller) */
	__u8 tcp_flags;            /* of this packet */
	__u8 icmp_error;           /* an ICMP error: related holds the flow it is about */
	__u8 frag;                 /* enum frag_kind */
	__u8 pad;
	__u16 l4_port;             /* dport, or ICMP type << 8 | code, host order */
	__u16 l4_off;              /* where the L4 header starts; 0 for a later fragment */
	__u32 frag_id;             /* a fragment's datagram identification */
	__u16 related_l3_off;      /* an ICMP error: where the packet it quotes starts */
	__u16 related_l4_off;      /* and that packet's L4 header */
	struct ct_service service; /* the translation it went through: the entries it creates record it */
	struct lb_flow lb;         /* load balancing's choice, and what replies go back to */
	struct ct_key related __attribute__((aligned(8))); /* read as 8-byte words */
};

/* tcp_is_syn reports whether the flow's packet opens a TCP connection: a
 * SYN without ACK. */
static __always_inline int tcp_is_syn(const struct flow *f)
{
	return f->key.proto == IPPROTO_TCP && (f->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
}

/* ICMP and ICMPv6 types the parser tells apart. */
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129

struct l4_ports {
	__be16 sport;
	__be16 dport;
};

/* icmp_head is the first 8 bytes of an ICMP or ICMPv6 header. */
struct icmp_head {
	__u8 type;
	__u8 code;
	__be16 checksum;
	__be16 id; /* echo */
	__be16 seq;
};

/* flow_l4 fills in the ports of proto, whose header starts at off, into key:
 * TCP, UDP and SCTP ports; for ICMP echo the identifier, as the source
 * port of a request and the destination port of a reply, so that a reply
 * is the reverse of its request. It returns the ICMP head, or type 0xff. */
static __always_inline int flow_l4(struct __sk_buff *skb, __u32 off, __u8 proto, struct ct_key *key,
				   struct icmp_head *icmp)
{
	struct l4_ports ports;

	icmp->type = 0xff;
	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (bpf_skb_load_bytes(skb, off, &ports, sizeof(ports)) < 0)
			return -1;
		key->sport = ports.sport;
		key->dport = ports.dport;
		return 0;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if (bpf_skb_load_bytes(skb, off, icmp, sizeof(*icmp)) < 0)
			return -1;
		if (icmp->type == ICMP_ECHO || icmp->type == ICMPV6_ECHO_REQUEST)
			key->sport = icmp->id;
		else if (icmp->type == ICMP_ECHOREPLY || icmp->type == ICMPV6_ECHO_REPLY)
			key->dport = icmp->id;
		return 0;
	}
	return 0;
}

/* flow_is_link_control reports neighbour discovery and MLD in the exact
 * shape that keeps a link working: router and neighbour solicitations and
 * advertisements and redirects (ICMPv6 133 to 137) with hop limit 255,
 * which no router forwards (RFC 4861), and MLD queries, reports and done
 * messages (130 to 132, 143) with hop limit 1 to a multicast group (RFC
 * 2710, 3810), all to a link-local or link-scope multicast address (MLD:
 * any multicast address). Policy does not apply to it, as it does not to
 * ARP. Every other ICMPv6 message is a flow that policy decides. */
static __always_inline int flow_is_link_control(const struct flow *f, __u8 hop_limit)
{
	__u8 type = f->l4_port >> 8;
	const __u8 *dst = f->key.daddr;

	if (f->key.proto != IPPROTO_ICMPV6 || !f->l4_off)
		return 0;
	if (type >= 133 && type <= 137)
		return hop_limit == 255 && (ipv6_is_linklocal(dst) || ipv6_is_linklocal_multicast(dst));
	if ((type >= 130 && type <= 132) || type == 143)
		return hop_limit == 1 && dst[0] == 0xff;
	return 0;
}

static __always_inline int icmp4_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

static __always_inline int icmp6_is_error(__u8 type)
{
	return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG ||
	       type == ICMPV6_TIME_EXCEED || type == ICMPV6_PARAMPROB;
}

/* flow_parse4 fills f from the IPv4 header ip (after the Ethernet header),
 * which the caller checked. Returns -1 for headers cut short. */
static __always_inline int flow_parse4(struct __sk_buff *skb, struct iphdr *ip, struct flow *f)
{
	__u32 off = ETH_HLEN + ipv4_hdrlen(ip);
	struct icmp_head icmp;
	struct iphdr inner;

	f->key.family = 4;
	f->key.proto = ip->protocol;
	*(__be32 *)f->key.saddr = ip->saddr;
	*(__be32 *)f->key.daddr = ip->daddr;
	if (bpf_ntohs(ip->frag_off) & 0x3fff) { /* more fragments, or an offset */
		f->frag = bpf_ntohs(ip->frag_off) & 0x1fff ? FRAG_LATER : FRAG_FIRST;
		f->frag_id = ip->id;
		if (f->frag == FRAG_LATER)
			return 0; /* no ports: frag_ports gives the first one's */
	}
	if (flow_l4(skb, off, ip->protocol, &f->key, &icmp) < 0)
		return -1;
	f->l4_off = off;
	f->l4_port = bpf_ntohs(f->key.dport);
	if (ip->protocol == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, off + 13, &f->tcp_flags, 1) < 0)
			return -1;
	} else if (ip->protocol == IPPROTO_ICMP) {
		f->l4_port = (__u16)icmp.type << 8 | icmp.code;
		if (!icmp4_is_error(icmp.type))
			return 0;
		/* The packet the error is about follows the ICMP header. */
		if (bpf_skb_load_bytes(skb, off + 8, &inner, sizeof(inner)) < 0 || ipv4_version(&inner) != 4)
			return 0; /* not one to relate: policy decides it */
		f->icmp_error = 1;
		f->related_l3_off = off + 8;
		f->related_l4_off = off + 8 + ipv4_hdrlen(&inner);
		f->related.family = 4;
		f->related.proto = inner.protocol;
		*(__be32 *)f->related.saddr = inner.saddr;
		*(__be32 *)f->related.daddr = inner.daddr;
		if (flow_l4(skb, off + 8 + ipv4_hdrlen(&inner), inner.protocol, &f->related, &icmp) < 0)
			f->icmp_error = 0;
	}
	return 0;
}

/* flow_parse6 is flow_parse4 for the IPv6 header ip. */
static __always_inline int flow_parse6(struct __sk_buff *skb, struct ipv6hdr *ip, struct flow *f)
{
	struct icmp_head icmp;
	struct ipv6hdr inner;
	__u32 off, inner_off, inner_id;
	__u8 inner_frag;
	int proto;

	f->key.family = 6;
	__builtin_memcpy(f->key.saddr, ip->saddr, 16);
	__builtin_memcpy(f->key.daddr, ip->daddr, 16);
	proto = ipv6_upper_proto(skb, ETH_HLEN, ip->nexthdr, &off, &f->frag, &f->frag_id);
	if (proto < 0)
		return -1;
	f->key.proto = proto;
	if (f->frag == FRAG_LATER)
		return 0; /* no ports: frag_ports gives the first one's */
	if (flow_l4(skb, off, proto, &f->key, &icmp) < 0)
		return -1;
	f->l4_off = off;
	f->l4_port = bpf_ntohs(f->key.dport);
	if (proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, off + 13, &f->tcp_flags, 1) < 0)
			return -1;
	} else if (proto == IPPROTO_ICMPV6) {
		f->l4_port = (__u16)icmp.type << 8 | icmp.code;
		if (!icmp6_is_error(icmp.type))
			return 0;
		if (bpf_skb_load_bytes(skb, off + 8, &inner, sizeof(inner)) < 0 || ipv6_version(&inner) != 6)
			return 0;
		proto = ipv6_upper_proto(skb, off + 8, inner.nexthdr, &inner_off, &inner_frag, &inner_id);
		if (proto < 0)
			return 0;
		f->icmp_error = 1;
		f->related_l3_off = off + 8;
		f->related_l4_off = inner_off;
		f->related.family = 6;
		f->related.proto = proto;
		__builtin_memcpy(f->related.saddr, inner.saddr, 16);
		__builtin_memcpy(f->related.daddr, inner.daddr, 16);
		if (flow_l4(skb, inner_off, proto, &f->related, &icmp) < 0)
			f->icmp_error = 0;
	}
	return 0;
}
