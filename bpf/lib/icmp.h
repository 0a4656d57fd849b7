/* ICMP and ICMPv6 errors made in place of the packet they answer: the
 * port unreachable a frontend with no backend sends when it rejects
 * instead of dropping, and the "fragmentation needed" or "packet too
 * big" for a packet larger than the tunnel carries. */
#pragma once

#include "common.h"
#include "../include/net.h"
#include "parse.h"
#include "flow.h"

#define ICMP_PORT_UNREACH 3   /* code of ICMP_DEST_UNREACH */
#define ICMP_FRAG_NEEDED 4    /* code of ICMP_DEST_UNREACH */
#define ICMPV6_PORT_UNREACH 4 /* code of ICMPV6_DEST_UNREACH */

/* How much of the packet an answer quotes: as much as fits in 576 bytes
 * for IPv4 (RFC 1812 4.3.2.3), in the minimum MTU of 1280 for IPv6 (RFC
 * 4443 2.4). A quote that reaches past the extension headers and options
 * to the ports is what lets the sender's socket see the refusal. */
#define ICMP_QUOTE_MAX (576 - 20 - 8)
#define ICMPV6_QUOTE_MAX (1280 - 40 - 8)

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

/* The pseudo header ICMPv6's checksum covers (RFC 8200 8.1). */
struct __attribute__((aligned(8))) icmp6_pseudo {
	__u8 saddr[16];
	__u8 daddr[16];
	__be32 len;
	__be32 next; /* 58 in the last byte */
};

/* The bytes of a checksum are summed this many at a time. */
#define CSUM_CHUNK 64

/* packet_csum adds len bytes of the packet from off (len at most max, a
 * constant) to the one's complement sum seed. Chunks start at even
 * offsets and the last is padded with zeros, as the sum wants an odd
 * byte at the end. */
static __always_inline __s64 packet_csum(struct __sk_buff *skb, __u32 off, __u32 len, __u32 max, __s64 seed)
{
	__u8 buf[CSUM_CHUNK] __attribute__((aligned(4)));

	for (__u32 done = 0; done < max; done += CSUM_CHUNK) {
		__u32 n = len - done;

		if (done >= len)
			break;
		if (n > CSUM_CHUNK)
			n = CSUM_CHUNK;
		/* n is 1 to CSUM_CHUNK already; this says so to the verifier. */
		n = ((n - 1) & (CSUM_CHUNK - 1)) + 1;
		__builtin_memset(buf, 0, sizeof(buf));
		if (bpf_skb_load_bytes(skb, off + done, buf, n) < 0)
			return -1;
		seed = bpf_csum_diff(NULL, 0, (__be32 *)buf, sizeof(buf), (__u32)seed);
		if (seed < 0)
			return -1;
	}
	return seed;
}

/* An answer's headers, as they go in front of the quote: no padding. */
struct icmp4_head {
	struct iphdr ip;
	struct icmp_head icmp;
};

struct icmp6_head {
	struct ipv6hdr ip;
	struct icmp_head icmp;
};

_Static_assert(sizeof(struct icmp4_head) == 28, "IPv4 answer headers are 28 bytes");
_Static_assert(sizeof(struct icmp6_head) == 48, "IPv6 answer headers are 48 bytes");

/* icmp_quote makes room for an answer's headers (hlen bytes) in front of
 * the packet, which it trims to the quote; it returns the quote's length,
 * or -1. */
static __always_inline int icmp_quote(struct __sk_buff *skb, __u32 hlen, __u32 max)
{
	__u32 quote = skb->len - ETH_HLEN;

	if (quote > max)
		quote = max;
	if (bpf_skb_change_tail(skb, ETH_HLEN + quote, 0) < 0 ||
	    bpf_skb_adjust_room(skb, hlen, BPF_ADJ_ROOM_MAC, 0) < 0)
		return -1;
	return quote;
}

/* icmp4_error turns the IPv4 packet of flow f into the ICMP error of
 * that type and code that answers it, from from, with rest as the 4 bytes
 * after the checksum (the next hop's MTU, for fragmentation needed): back
 * to its sender, with the Ethernet addresses swapped. Returns -1 when it
 * cannot.
 *
 * What the skb says about checksums it leaves: a packet the kernel was to
 * finish the L4 checksum of (CHECKSUM_PARTIAL) stays so marked, and no BPF
 * helper resets that. The answer goes back into the sender's own
 * namespace, addressed to the sender (anti-spoofing saw to that), where
 * such a packet counts as verified and is never finished: the mark has no
 * effect there. */
static __always_inline int icmp4_error(struct __sk_buff *skb, struct flow *f, __be32 from, __u8 type, __u8 code,
				       __be32 rest)
{
	struct icmp4_head h = {};
	int quote;
	__s64 sum;

	quote = icmp_quote(skb, sizeof(h), ICMP_QUOTE_MAX);
	if (quote < 0)
		return -1;
	h.ip = (struct iphdr){
		.ver_ihl = 0x45,
		.tot_len = bpf_htons(sizeof(h) + quote),
		.ttl = 64,
		.protocol = IPPROTO_ICMP,
		.saddr = from,
		.daddr = *(__be32 *)f->key.saddr,
	};
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&h.ip, sizeof(h.ip), 0);
	h.ip.check = csum_fold(sum);
	h.icmp.type = type;
	h.icmp.code = code;
	__builtin_memcpy(&h.icmp.id, &rest, sizeof(rest));
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&h.icmp, sizeof(h.icmp), 0);
	sum = packet_csum(skb, ETH_HLEN + sizeof(h), quote, ICMP_QUOTE_MAX, sum);
	if (sum < 0)
		return -1;
	h.icmp.checksum = csum_fold(sum);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0) < 0)
		return -1;
	mac_swap(skb);
	return 0;
}

/* icmp6_error is icmp4_error for IPv6. */
static __always_inline int icmp6_error(struct __sk_buff *skb, struct flow *f, const __u8 *from, __u8 type, __u8 code,
				       __be32 rest)
{
	struct icmp6_pseudo ph = {};
	struct icmp6_head h = {};
	int quote;
	__s64 sum;

	quote = icmp_quote(skb, sizeof(h), ICMPV6_QUOTE_MAX);
	if (quote < 0)
		return -1;
	h.ip.ver_tc = 0x60;
	h.ip.payload_len = bpf_htons(sizeof(h.icmp) + quote);
	h.ip.nexthdr = IPPROTO_ICMPV6;
	h.ip.hop_limit = 64;
	__builtin_memcpy(h.ip.saddr, from, 16);
	__builtin_memcpy(h.ip.daddr, f->key.saddr, 16);
	h.icmp.type = type;
	h.icmp.code = code;
	__builtin_memcpy(&h.icmp.id, &rest, sizeof(rest));
	__builtin_memcpy(ph.saddr, h.ip.saddr, 16);
	__builtin_memcpy(ph.daddr, h.ip.daddr, 16);
	ph.len = bpf_htonl(sizeof(h.icmp) + quote);
	ph.next = bpf_htonl(IPPROTO_ICMPV6);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&h.icmp, sizeof(h.icmp), sum);
	sum = packet_csum(skb, ETH_HLEN + sizeof(h), quote, ICMPV6_QUOTE_MAX, sum);
	if (sum < 0)
		return -1;
	h.icmp.checksum = csum_fold(sum);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0) < 0)
		return -1;
	mac_swap(skb);
	return 0;
}

/* icmp4_port_unreachable answers the packet with a port unreachable. */
static __always_inline int icmp4_port_unreachable(struct __sk_buff *skb, struct flow *f, __be32 from)
{
	return icmp4_error(skb, f, from, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0);
}

/* icmp6_port_unreachable answers the packet with a port unreachable. */
static __always_inline int icmp6_port_unreachable(struct __sk_buff *skb, struct flow *f, const __u8 *from)
{
	return icmp6_error(skb, f, from, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0);
}
