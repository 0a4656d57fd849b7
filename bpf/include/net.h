/* Packet headers: Ethernet, IPv4, IPv6 and the numbers that name what comes
 * next. Layouts are the wire formats (RFC 791, RFC 8200); version and
 * header-length nibbles are plain bytes, read with the accessors below, so
 * the same code serves both byte orders. */
#pragma once

#include "types.h"

#define ETH_ALEN 6
#define ETH_HLEN 14
#define IP_DF 0x4000 /* the IPv4 "don't fragment" flag, in frag_off */

/* skb->pkt_type: a frame to this host's MAC, and one to another host's. */
#define PACKET_HOST 0
#define PACKET_OTHERHOST 3

/* EtherTypes */
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_8021Q 0x8100
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021AD 0x88A8

struct ethhdr {
	__u8 h_dest[ETH_ALEN];
	__u8 h_source[ETH_ALEN];
	__be16 h_proto;
} __attribute__((packed));

/* IP protocol numbers (also IPv6 next-header values). */
enum {
	IPPROTO_HOPOPTS = 0,
	IPPROTO_ICMP = 1,
	IPPROTO_IGMP = 2,
	IPPROTO_IPIP = 4,
	IPPROTO_TCP = 6,
	IPPROTO_UDP = 17,
	IPPROTO_DCCP = 33,
	IPPROTO_IPV6 = 41,
	IPPROTO_ROUTING = 43,
	IPPROTO_FRAGMENT = 44,
	IPPROTO_GRE = 47,
	IPPROTO_ESP = 50,
	IPPROTO_AH = 51,
	IPPROTO_ICMPV6 = 58,
	IPPROTO_NONE = 59,
	IPPROTO_DSTOPTS = 60,
	IPPROTO_SCTP = 132,
	IPPROTO_UDPLITE = 136,
};

struct iphdr {
	__u8 ver_ihl; /* version (high nibble), header length in words */
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

static __always_inline __u8 ipv4_version(const struct iphdr *ip) { return ip->ver_ihl >> 4; }
static __always_inline __u32 ipv4_hdrlen(const struct iphdr *ip) { return (ip->ver_ihl & 0xf) * 4; }

struct ipv6hdr {
	__u8 ver_tc; /* version (high nibble), traffic class */
	__u8 flow_lbl[3];
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

static __always_inline __u8 ipv6_version(const struct ipv6hdr *ip) { return ip->ver_tc >> 4; }

/* The start of every IPv6 extension header but the fragment header, whose
 * length is fixed (8 bytes). */
struct ipv6_opt_hdr {
	__u8 nexthdr;
	__u8 hdrlen; /* in 8-byte units, not counting the first 8 bytes */
};
