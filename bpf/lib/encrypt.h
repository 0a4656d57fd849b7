/* Encryption between nodes. BPF only steers: the kernel encrypts.
 *
 * IPsec: a packet for another node is marked with that node's ID and the
 * key in use (skb->mark); the xfrm policy installed for that node and key
 * matches the mark and encrypts. bpf_redirect skips xfrm, so a marked
 * packet goes where the stack routes it: natively routed traffic to the
 * stack (which forwards, then encrypts), VXLAN traffic to the VXLAN
 * device, whose own route lookup carries the mark (VXLAN inside ESP).
 * ESP that arrives is marked with its sender's ID before the stack
 * decrypts it: an xfrm state is found by destination, SPI and mark, never
 * by source. Package node installs the states and policies.
 *
 * WireGuard: packets for other nodes are redirected into the WireGuard
 * device, which encrypts towards the peer whose allowed IPs hold the
 * destination: natively routed pod traffic from from-endpoint, VXLAN
 * packets (node to node) from to-netdev. */
#pragma once

#include "common.h"
#include "node.h"
#include "mark.h"

#define IPSEC_SPI_MAX 15
#define MARK_NODE_MAX 0xffff

/* How traffic between nodes is encrypted (node_settings.encryption). */
enum encryption {
	ENCRYPT_NONE = 0,
	ENCRYPT_IPSEC = 1,
	ENCRYPT_WIREGUARD = 2,
};

/* The SPI of the IPsec key packets to other nodes are encrypted with;
 * 0 while no key is installed. Package node switches it in one update
 * (key rotation), so a packet uses one key or the other. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipsec_spi SEC(".maps");

/* ipsec_mark marks the packet to be encrypted towards node with the key
 * in use, and reports whether it could: 0 when there is no key (or the
 * node's ID does not fit the mark), and the packet must not leave. */
static __always_inline int ipsec_mark(struct __sk_buff *skb, __u32 node)
{
	__u32 zero = 0, *spi = bpf_map_lookup_elem(&ipsec_spi, &zero);

	if (!spi || *spi == 0 || *spi > IPSEC_SPI_MAX || node > MARK_NODE_MAX)
		return 0;
	skb->mark = MARK_ENCRYPT | *spi << 12 | node << 16;
	return 1;
}

/* ipsec_mark_arriving marks ESP from another node's address with that
 * node's ID, for the stack to decrypt with that node's state, and
 * reports whether it did. ESP from anywhere else (a pod's own) is left as
 * it is: no state of sluice's matches it. */
static __always_inline int ipsec_mark_arriving(struct __sk_buff *skb, __u8 family, const __u8 *saddr)
{
	__u32 *node = node_of_addr(family, saddr);

	if (!node || *node > MARK_NODE_MAX)
		return 0;
	skb->mark = MARK_DECRYPT | *node << 16;
	return 1;
}
