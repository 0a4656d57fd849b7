/* Fragments: only the first fragment of a datagram carries its ports, so
 * the datapath remembers them under the datagram's identity and gives them
 * to the later fragments. With the ports, a later fragment finds its
 * flow's conntrack entry, and with it the first one's decision and
 * translation. */
#pragma once

#include "common.h"
#include "flow.h"

#define FRAG_ENTRIES 8192

/* A datagram: addresses and protocol as its fragments arrive (before any
 * translation), and its identification (16 bits for IPv4, 32 for IPv6). */
struct frag_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 id;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

struct frag_ports {
	__be16 sport;
	__be16 dport;
	__u16 l4_port; /* what policy decides by: dport, or ICMP type << 8 | code */
	__u16 pad;
};

/* An LRU: a datagram whose fragments never all come leaves an entry the
 * map reuses; the kernel gives up reassembling after 30 s anyway. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FRAG_ENTRIES);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fragments SEC(".maps");

/* frag_ports records the ports of a first fragment and gives them to a
 * later one. It returns 0, or -1 for a later fragment whose first was not
 * seen (out of order, or never sent), which has no ports to be decided by.
 * A global function: its key stays out of the caller's stack. */
__noinline int frag_ports(struct flow *f)
{
	struct frag_key k = {};
	struct frag_ports *p;

	if (!f || f->frag == FRAG_NONE)
		return 0;
	__builtin_memcpy(k.saddr, f->key.saddr, 16);
	__builtin_memcpy(k.daddr, f->key.daddr, 16);
	k.id = f->frag_id;
	k.proto = f->key.proto;
	k.family = f->key.family;
	if (f->frag == FRAG_FIRST) {
		struct frag_ports v = {.sport = f->key.sport, .dport = f->key.dport, .l4_port = f->l4_port};

		bpf_map_update_elem(&fragments, &k, &v, BPF_ANY);
		return 0;
	}
	p = bpf_map_lookup_elem(&fragments, &k);
	if (!p)
		return -1;
	f->key.sport = p->sport;
	f->key.dport = p->dport;
	f->l4_port = p->l4_port;
	return 0;
}
