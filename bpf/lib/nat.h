/* Address and port rewriting of TCP and UDP packets in tc, with their
 * checksums: the IPv4 header's, and the L4 one, which covers the addresses
 * through the pseudo header. The helpers update a checksum the NIC is still
 * to fill in (CHECKSUM_PARTIAL) as well as a complete one, and leave a UDP
 * checksum of 0 (none, IPv4 only) as it is. */
#pragma once

#include "common.h"
#include "../include/net.h"
#include "flow.h"
#include "parse.h"

#define IPV4_SADDR_OFF (ETH_HLEN + 12)
#define IPV4_DADDR_OFF (ETH_HLEN + 16)
#define IPV4_CHECK_OFF (ETH_HLEN + 10)
#define IPV6_SADDR_OFF (ETH_HLEN + 8)
#define IPV6_DADDR_OFF (ETH_HLEN + 24)

/* nat_is_echo reports an ICMP or ICMPv6 echo request or reply, whose
 * identifier stands for its port. */
static __always_inline int nat_is_echo(const struct flow *f)
{
	__u8 type = f->l4_port >> 8;

	if (f->key.proto == IPPROTO_ICMP)
		return type == ICMP_ECHO || type == ICMP_ECHOREPLY;
	if (f->key.proto == IPPROTO_ICMPV6)
		return type == ICMPV6_ECHO_REQUEST || type == ICMPV6_ECHO_REPLY;
	return 0;
}

/* nat_csum_off is where the L4 checksum of the flow's packet is, or 0 for a
 * protocol this file does not rewrite or a later fragment, which has no L4
 * header (the first fragment's checksum covers the whole datagram). */
static __always_inline __u32 nat_csum_off(const struct flow *f)
{
	if (!f->l4_off)
		return 0;
	if (f->key.proto == IPPROTO_TCP)
		return f->l4_off + 16;
	if (f->key.proto == IPPROTO_UDP)
		return f->l4_off + 6;
	if (nat_is_echo(f))
		return f->l4_off + 2;
	return 0;
}

/* nat_port_off is where the port nat_rewrite writes is: the source or
 * destination port, or an echo's identifier (both ways). */
static __always_inline __u32 nat_port_off(const struct flow *f, int dest)
{
	if (nat_is_echo(f))
		return f->l4_off + 4;
	return f->l4_off + (dest ? 2 : 0);
}

/* csum_replace4 is the IPv4 header checksum check after a 32-bit field
 * of the header changed from from to to (RFC 1624): one's complement sums
 * are the same in either byte order, so no swap is needed. */
static __always_inline __sum16 csum_replace4(__sum16 check, __be32 from, __be32 to)
{
	__u32 sum = (__u16)~check;

	sum += (~from & 0xffff) + (~from >> 16) + (to & 0xffff) + (to >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__sum16)~sum;
}

/* nat_rewrite sets the source (dest == 0) or destination (dest == 1)
 * address and port (an echo's identifier) of the flow's packet to addr
 * and port, and updates f's key to match; a later fragment gets only the
 * address. The L4 checksum
 * goes through the helper, which knows whether the NIC is still to fill
 * it in; the IP header is written in place (pull_headers made it linear).
 * It returns -1 when the packet cannot be rewritten. Every packet pointer
 * taken before is invalid after it. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, struct flow *f, int dest, const __u8 *addr,
				       __be16 port)
{
	__u8 *old_addr = dest ? f->key.daddr : f->key.saddr;
	__be16 *old_port = dest ? &f->key.dport : &f->key.sport;
	__u32 csum_off = nat_csum_off(f);
	__u64 mangled = f->key.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (!csum_off && f->frag != FRAG_LATER)
		return -1;
	if (f->key.family == 4) {
		__be32 from = *(__be32 *)old_addr, to = *(const __be32 *)addr;
		struct iphdr *ip;

		if (from != to) {
			/* ICMP's checksum has no pseudo header. */
			if (csum_off && f->key.proto != IPPROTO_ICMP &&
			    bpf_l4_csum_replace(skb, csum_off, from, to, BPF_F_PSEUDO_HDR | mangled | sizeof(to)) < 0)
				return -1;
			ip = header(skb, ETH_HLEN, sizeof(*ip));
			if (!ip)
				return -1;
			ip->check = csum_replace4(ip->check, from, to);
			if (dest)
				ip->daddr = to;
			else
				ip->saddr = to;
			*(__be32 *)old_addr = to;
		}
	} else {
		__be32 from[4], to[4];
		struct ipv6hdr *ip;
		__s64 diff;

		__builtin_memcpy(from, old_addr, 16);
		__builtin_memcpy(to, addr, 16);
		diff = bpf_csum_diff(from, 16, to, 16, 0);
		if (diff < 0 || (csum_off && bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled) < 0))
			return -1;
		ip = header(skb, ETH_HLEN, sizeof(*ip));
		if (!ip)
			return -1;
		__builtin_memcpy(dest ? ip->daddr : ip->saddr, to, 16);
		__builtin_memcpy(old_addr, addr, 16);
	}
	/* A later fragment has no ports to write: the flow's are noted. */
	if (*old_port != port && csum_off &&
	    (bpf_l4_csum_replace(skb, csum_off, *old_port, port, mangled | sizeof(port)) < 0 ||
	     bpf_skb_store_bytes(skb, nat_port_off(f, dest), &port, sizeof(port), 0) < 0))
		return -1;
	*old_port = port;
	return 0;
}

/* Which end of the quoted packet nat_rewrite_quoted rewrites. */
enum quoted_end {
	QUOTED_DST = 0, /* a service's backend: the reply's reverse translation */
	QUOTED_SRC = 1, /* the node's address and port: masquerading's */
};

/* nat_rewrite_quoted makes the packet an ICMP or ICMPv6 error quotes (the
 * flow f->related, as its sender sent it) have addr and port at the end
 * given, and the error's own address that was that end's too (its source
 * when the quoted destination sent it; its destination, the quoted
 * sender) with them: what the sender of a translated flow expects to
 * read. An echo's identifier stands for the port. The checksums of the
 * error and of the quoted IPv4 header follow; the quoted L4 checksum,
 * which nobody checks, is left. f follows too. It returns -1 when the
 * packet cannot be rewritten. */
static __always_inline int nat_rewrite_quoted(struct __sk_buff *skb, struct flow *f, enum quoted_end end,
					      const __u8 *addr, __be16 port)
{
	__u32 csum_off = f->l4_off + 2, port_off = f->related_l4_off + (end == QUOTED_SRC ? 0 : 2);
	__u8 *quoted = end == QUOTED_SRC ? f->related.saddr : f->related.daddr;
	__u8 *outer = end == QUOTED_SRC ? f->key.daddr : f->key.saddr;
	__be16 *old_port = end == QUOTED_SRC ? &f->related.sport : &f->related.dport;
	int outer_too;

	if (f->related.proto == IPPROTO_ICMP || f->related.proto == IPPROTO_ICMPV6)
		port_off = f->related_l4_off + 4;
	if (f->key.family == 4) {
		__be32 from = *(__be32 *)quoted, to = *(const __be32 *)addr;
		__u32 check_off = f->related_l3_off + 10;
		__sum16 old_check, new_check;

		outer_too = *(__be32 *)outer == from;
		if (bpf_skb_load_bytes(skb, check_off, &old_check, 2) < 0 ||
		    bpf_l3_csum_replace(skb, check_off, from, to, sizeof(to)) < 0 ||
		    bpf_skb_load_bytes(skb, check_off, &new_check, 2) < 0 ||
		    bpf_l4_csum_replace(skb, csum_off, from, to, sizeof(to)) < 0 ||
		    bpf_l4_csum_replace(skb, csum_off, old_check, new_check, 2) < 0 ||
		    bpf_skb_store_bytes(skb, f->related_l3_off + (end == QUOTED_SRC ? 12 : 16), &to, sizeof(to), 0) < 0)
			return -1;
		/* ICMP has no pseudo header: the outer address is the IP
		 * header's alone. */
		if (outer_too && (bpf_l3_csum_replace(skb, IPV4_CHECK_OFF, from, to, sizeof(to)) < 0 ||
				  bpf_skb_store_bytes(skb, end == QUOTED_SRC ? IPV4_DADDR_OFF : IPV4_SADDR_OFF, &to,
						      sizeof(to), 0) < 0))
			return -1;
	} else {
		__be32 from[4], to[4];
		__s64 diff;

		__builtin_memcpy(from, quoted, 16);
		__builtin_memcpy(to, addr, 16);
		outer_too = ipv6_equal(outer, quoted);
		diff = bpf_csum_diff(from, 16, to, 16, 0);
		if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, diff, 0) < 0 ||
		    bpf_skb_store_bytes(skb, f->related_l3_off + (end == QUOTED_SRC ? 8 : 24), to, 16, 0) < 0)
			return -1;
		/* ICMPv6's checksum covers the outer addresses too. */
		if (outer_too && (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR) < 0 ||
				  bpf_skb_store_bytes(skb, end == QUOTED_SRC ? IPV6_DADDR_OFF : IPV6_SADDR_OFF, to, 16, 0) < 0))
			return -1;
	}
	if (*old_port != port &&
	    (bpf_l4_csum_replace(skb, csum_off, *old_port, port, sizeof(port)) < 0 ||
	     bpf_skb_store_bytes(skb, port_off, &port, sizeof(port), 0) < 0))
		return -1;
	*old_port = port;
	__builtin_memcpy(quoted, addr, 16);
	if (outer_too)
		__builtin_memcpy(outer, addr, 16);
	return 0;
}
