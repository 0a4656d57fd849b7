/* ARP for Ethernet and IPv4 (RFC 826), as it follows the Ethernet header. */
#pragma once

#include "../include/net.h"

struct arp_eth_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__be32 spa;
	__u8 tha[ETH_ALEN];
	__be32 tpa;
} __attribute__((packed));
