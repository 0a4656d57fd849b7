/* ICMP and ICMPv6 port unreachable answers, made in place of the packet
 * they answer: what a frontend with no backend sends when it rejects
 * instead of dropping. */
#pragma once

#include "common.h"
#include "../include/net.h"
#include "parse.h"
#include "flow.h"

#define ICMP_PORT_UNREACH 3   /* code of ICMP_DEST_UNREACH */
#define ICMPV6_PORT_UNREACH 4 /* code of ICMPV6_DEST_UNREACH */

/* How much of the packet an answer quotes: its IP header and the first 8
 * bytes after it (RFC 792), the fixed header for IPv6. A fixed size: an
 * IPv4 packet with options is not answered. */
#define ICMP_QUOTE (20 + 8)
#define ICMPV6_QUOTE (40 + 8)

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* mac_swap swaps the frame's destination and source MAC addresses. */
static __always_inline void mac_swap(struct __sk_buff *skb)
{
	__u16 m[6], t; /* two addresses, as 16-bit words */

	if (bpf_skb_load_bytes(skb, 0, m, sizeof(m)) < 0)
		return;
	for (int i = 0; i < 3; i++) {
		t = m[i];
		m[i] = m[i + 3];
		m[i + 3] = t;
	}
	bpf_skb_store_bytes(skb, 0, m, sizeof(m), 0);
}

struct __attribute__((aligned(8))) icmp4_answer {
	struct iphdr ip;
	struct icmp_head icmp;
	__u8 quote[ICMP_QUOTE];
};

/* icmp4_port_unreachable turns the IPv4 packet of flow f into the port
 * unreachable that answers it, from from: back to its sender, with the
 * Ethernet addresses swapped. Returns -1 when it cannot. */
static __always_inline int icmp4_port_unreachable(struct __sk_buff *skb, struct flow *f, __be32 from)
{
	struct icmp4_answer a = {};
	__u32 len = sizeof(a);
	__s64 sum;

	if (skb->len < ETH_HLEN + ICMP_QUOTE ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, a.quote, ICMP_QUOTE) < 0 ||
	    ipv4_hdrlen((struct iphdr *)a.quote) != sizeof(struct iphdr))
		return -1;
	a.ip = (struct iphdr){
		.ver_ihl = 0x45,
		.tot_len = bpf_htons(len),
		.ttl = 64,
		.protocol = IPPROTO_ICMP,
		.saddr = from,
		.daddr = *(__be32 *)f->key.saddr,
	};
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&a.ip, sizeof(a.ip), 0);
	a.ip.check = csum_fold(sum);
	a.icmp.type = ICMP_DEST_UNREACH;
	a.icmp.code = ICMP_PORT_UNREACH;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&a.icmp, sizeof(a.icmp) + ICMP_QUOTE, 0);
	a.icmp.checksum = csum_fold(sum);
	if (bpf_skb_change_tail(skb, ETH_HLEN + len, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &a, len, 0) < 0)
		return -1;
	mac_swap(skb);
	return 0;
}

struct __attribute__((aligned(8))) icmp6_answer {
	struct ipv6hdr ip;
	struct icmp_head icmp;
	__u8 quote[ICMPV6_QUOTE];
};

/* The pseudo header ICMPv6's checksum covers (RFC 8200 8.1). */
struct __attribute__((aligned(8))) icmp6_pseudo {
	__u8 saddr[16];
	__u8 daddr[16];
	__be32 len;
	__be32 next; /* 58 in the last byte */
};

/* icmp6_port_unreachable is icmp4_port_unreachable for IPv6. */
static __always_inline int icmp6_port_unreachable(struct __sk_buff *skb, struct flow *f, const __u8 *from)
{
	struct icmp6_answer a = {};
	struct icmp6_pseudo ph = {};
	__u32 len = sizeof(a);
	__s64 sum;

	if (skb->len < ETH_HLEN + ICMPV6_QUOTE ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, a.quote, ICMPV6_QUOTE) < 0)
		return -1;
	a.ip.ver_tc = 0x60;
	a.ip.payload_len = bpf_htons(sizeof(a.icmp) + ICMPV6_QUOTE);
	a.ip.nexthdr = IPPROTO_ICMPV6;
	a.ip.hop_limit = 64;
	__builtin_memcpy(a.ip.saddr, from, 16);
	__builtin_memcpy(a.ip.daddr, f->key.saddr, 16);
	a.icmp.type = ICMPV6_DEST_UNREACH;
	a.icmp.code = ICMPV6_PORT_UNREACH;
	__builtin_memcpy(ph.saddr, a.ip.saddr, 16);
	__builtin_memcpy(ph.daddr, a.ip.daddr, 16);
	ph.len = bpf_htonl(sizeof(a.icmp) + ICMPV6_QUOTE);
	ph.next = bpf_htonl(IPPROTO_ICMPV6);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&a.icmp, sizeof(a.icmp) + ICMPV6_QUOTE, sum);
	a.icmp.checksum = csum_fold(sum);
	if (bpf_skb_change_tail(skb, ETH_HLEN + len, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &a, len, 0) < 0)
		return -1;
	mac_swap(skb);
	return 0;
}
