/* Bounds-checked access to packet headers of a tc program. */
#pragma once

#include "common.h"
#include "../include/net.h"
#include "arp.h"

/* Bytes at the start of a packet that the programs read headers from
 * directly: Ethernet and the largest fixed IP header, IPv6's (the rest
 * they read with helpers). A frame whose head is not all in the linear
 * area (a large frame from a raw socket keeps only its Ethernet header
 * there) is pulled up to this much before anything is parsed. Never
 * more: a TCP segment's payload sits in pages its socket keeps for
 * retransmission, and pulling any of it copies the packet. */
#define PULL_LEN (ETH_HLEN + sizeof(struct ipv6hdr))

/* header returns a pointer to len bytes at offset off of the packet, or NULL
 * when the linear area is shorter. */
static __always_inline void *header(struct __sk_buff *skb, __u32 off, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (data + off + len > end)
		return NULL;
	return data + off;
}

/* pull_headers makes the first PULL_LEN bytes (or the whole packet, when it
 * is shorter) linear, so that header() finds them. It invalidates every
 * packet pointer taken before; it costs nothing when the head is linear. */
static __always_inline void pull_headers(struct __sk_buff *skb)
{
	__u32 want = skb->len < PULL_LEN ? skb->len : PULL_LEN;

	if ((void *)(long)skb->data + want > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, want);
}

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return *(const __u32 *)a == *(const __u32 *)b &&
	       *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
	*(__u32 *)dst = *(const __u32 *)src;
	*(__u16 *)(dst + 4) = *(const __u16 *)(src + 4);
}

static __always_inline int ipv6_equal(const __u8 *a, const __u8 *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] == y[0] && x[1] == y[1];
}

/* fe80::/10 */
static __always_inline int ipv6_is_linklocal(const __u8 *a)
{
	return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;
}

/* ff02::/16: link-scope multicast (all nodes, all routers, solicited-node,
 * MLDv2 reports) */
static __always_inline int ipv6_is_linklocal_multicast(const __u8 *a)
{
	return a[0] == 0xff && (a[1] & 0x0f) == 0x02;
}

/* :: */
static __always_inline int ipv6_is_unspecified(const __u8 *a)
{
	const __u64 *x = (const __u64 *)a;

	return x[0] == 0 && x[1] == 0;
}

/* ipv4_valid checks that the lengths of the IPv4 header ip, after an
 * Ethernet header, fit each other and the packet (Ethernet padding may
 * follow the IP packet). */
static __always_inline int ipv4_valid(struct __sk_buff *skb, const struct iphdr *ip)
{
	__u32 hlen = ipv4_hdrlen(ip);
	__u32 tot = bpf_ntohs(ip->tot_len);

	if (ipv4_version(ip) != 4 || hlen < sizeof(*ip))
		return 0;
	/* A GSO packet over 64 KiB (BIG TCP) says 0. Its size is read only
	 * then: the field lives in another cache line. */
	if (tot == 0)
		return skb->gso_size && ETH_HLEN + hlen <= skb->len;
	return hlen <= tot && ETH_HLEN + tot <= skb->len;
}

/* ipv6_valid checks the version and payload length of the IPv6 header ip,
 * after an Ethernet header, against the packet's length. A payload length
 * of 0 (a jumbogram, or a GSO packet over 64 KiB) is not checked. */
static __always_inline int ipv6_valid(struct __sk_buff *skb, const struct ipv6hdr *ip)
{
	__u32 payload = bpf_ntohs(ip->payload_len);

	return ipv6_version(ip) == 6 && ETH_HLEN + sizeof(*ip) + payload <= skb->len;
}

/* How many IPv6 extension headers a program walks before it gives up. */
#define IPV6_MAX_EXTHDRS 4

static __always_inline int ipv6_is_exthdr(__u8 nexthdr)
{
	return nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	       nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_FRAGMENT || nexthdr == IPPROTO_AH;
}

/* Where a packet stands among the fragments of its datagram. */
enum frag_kind {
	FRAG_NONE = 0,  /* not fragmented */
	FRAG_FIRST = 1, /* the first fragment: it holds the upper header */
	FRAG_LATER = 2, /* any other: no upper header */
};

/* ipv6_upper_proto finds the protocol after the extension headers of the
 * IPv6 header at l3off, whose next-header value is nexthdr: hop-by-hop,
 * routing, destination options, fragment and authentication headers are
 * skipped. It returns the protocol, or -1 when a header is cut short or
 * there are more than IPV6_MAX_EXTHDRS; *l4off is where the protocol's
 * header starts, *frag says whether the packet is a fragment (FRAG_LATER:
 * one other than the first, which holds no such header) and *frag_id is
 * then its datagram's identification. */
static __always_inline int ipv6_upper_proto(struct __sk_buff *skb, __u32 l3off, __u8 nexthdr,
					    __u32 *l4off, __u8 *frag, __u32 *frag_id)
{
	__u32 off = l3off + sizeof(struct ipv6hdr);
	struct ipv6_opt_hdr opt;
	struct {
		__be16 frag_off; /* offset << 3 | more fragments */
		__be32 id;
	} __attribute__((packed)) fh;

	*frag = FRAG_NONE;
#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXTHDRS; i++) {
		if (!ipv6_is_exthdr(nexthdr))
			break;
		if (bpf_skb_load_bytes(skb, off, &opt, sizeof(opt)) < 0)
			return -1;
		if (nexthdr == IPPROTO_FRAGMENT) {
			if (bpf_skb_load_bytes(skb, off + 2, &fh, sizeof(fh)) < 0)
				return -1;
			if (bpf_ntohs(fh.frag_off) & 0xfff8)
				*frag = FRAG_LATER;
			else if (bpf_ntohs(fh.frag_off) & 1)
				*frag = FRAG_FIRST;
			*frag_id = fh.id;
			off += 8;
		} else if (nexthdr == IPPROTO_AH) {
			off += (opt.hdrlen + 2) * 4;
		} else {
			off += (opt.hdrlen + 1) * 8;
		}
		nexthdr = opt.nexthdr;
	}
	*l4off = off;
	return ipv6_is_exthdr(nexthdr) ? -1 : nexthdr;
}

/* endpoint_may_send reports whether an endpoint may send IP protocol
 * proto (after IPv6 extension headers). It is a list of what may pass,
 * not of what may not: an encapsulation carries a packet whose inner
 * source nothing checks, and whatever decapsulates it on the node (a
 * fallback tunnel device takes any IP-in-IP, GRE or EtherIP packet
 * addressed to it) would take that source as given. So IP-in-IP, IPv6 in
 * IP, GRE, EtherIP, ENCAP, MPLS in IP, L2TPv3 and every protocol not named
 * here are dropped as TUNNELED. UDP encapsulations (VXLAN, Geneve, FOU)
 * are UDP: sluice's own overlay takes them only from remote nodes. ESP
 * decapsulates only under a security association its receiver set up. */
static __always_inline int endpoint_may_send(int proto, __u8 family)
{
	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE:
	case IPPROTO_SCTP:
	case IPPROTO_DCCP:
	case IPPROTO_ESP:
		return 1;
	case IPPROTO_ICMP:
	case IPPROTO_IGMP:
		return family == 4;
	case IPPROTO_ICMPV6:
	case IPPROTO_NONE:
		return family == 6;
	}
	return 0;
}
