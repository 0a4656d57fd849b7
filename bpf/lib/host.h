/* The node itself as a peer: which addresses are the node's own. */
#pragma once

#include "common.h"
#include "flow.h"

/* node_owns_dst reports whether the destination of the flow's packet,
 * which arrived on the skb's device, is an address of the node: the
 * kernel's routing table, asked as it would route the packet, says it is
 * local (or broadcast, or multicast: what the node receives itself). With
 * forwarding off on that device the stack can only deliver the packet to
 * the node or drop it, so it counts as the node's too. Asking the kernel
 * keeps the answer current as addresses come and go, with nothing to
 * sync. It costs a FIB lookup, so it is asked for new flows only. A
 * global function: its lookup's 64 bytes stay out of the caller's stack. */
__noinline int node_owns_dst(struct __sk_buff *skb, const struct flow *f)
{
	struct bpf_fib_lookup fib = {.ifindex = skb->ifindex};
	long ret;

	if (!f)
		return 0;
	fib.family = f->key.family == 4 ? AF_INET : AF_INET6;
	fib.l4_protocol = f->key.proto;
	__builtin_memcpy(fib.src, f->key.saddr, 16);
	__builtin_memcpy(fib.dst, f->key.daddr, 16);
	/* tot_len stays 0: the MTU is not the question. */
	ret = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	return ret == BPF_FIB_LKUP_RET_NOT_FWDED || ret == BPF_FIB_LKUP_RET_FWD_DISABLED;
}
