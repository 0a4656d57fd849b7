/* skb->mark as the datapath uses it between its own programs and the
 * kernel: bits 8-11 say what the mark is for; the rest depends on that.
 * A mark never leaves the node: crossing into another network namespace
 * (a veth to a pod, or to another node in tests) clears it, so a workload
 * cannot send one. */
#pragma once

#include "common.h"

#define MARK_MAGIC_MASK 0x0F00

/* IPsec (encrypt.h): 12-15 the key (SPI 1-15), 16-31 the other node's
 * ID. The masks are in internal/xfrm. */
#define MARK_ENCRYPT 0x0E00
#define MARK_DECRYPT 0x0D00

/* A packet from-endpoint forwarded to another node, on its way out of a
 * node device: it is a pod's packet to a pod, nothing for to-netdev to
 * masquerade or steer, and to-netdev lets it go without parsing it. The
 * whole mark, no other bits. */
#define MARK_FORWARDED 0x0C00

/* mark_forwarded marks a packet from-endpoint sends to another node
 * unencrypted, by redirect. */
static __always_inline void mark_forwarded(struct __sk_buff *skb)
{
	skb->mark = MARK_FORWARDED;
}

/* take_forwarded reports whether the packet carries MARK_FORWARDED, and
 * clears the mark: what follows the node device (a qdisc, the driver)
 * sees the packet as the stack would have sent it. */
static __always_inline int take_forwarded(struct __sk_buff *skb)
{
	if (skb->mark != MARK_FORWARDED)
		return 0;
	skb->mark = 0;
	return 1;
}
