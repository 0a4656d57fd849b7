/* The ipcache: which security identity an address belongs to, and which
 * local endpoint has it. */
#pragma once

#include "common.h"

#define IPCACHE_ENTRIES 65536

/* LPM key: the family byte and padding are part of the matched prefix, so
 * prefixlen is 32 plus the address prefix length. */
struct ipcache_key {
	__u32 prefixlen;
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16]; /* IPv4 in the first 4 bytes */
};

#define IPCACHE_PREFIX_BASE 32

/* Who wrote an entry; only its writer changes or removes it (the rules are
 * in internal/ipcache). */
enum ipcache_source {
	IPCACHE_SOURCE_ENDPOINT = 1, /* a local endpoint's address */
	IPCACHE_SOURCE_NODE = 2,     /* a node's address: the local node's (host), a remote one's (remote-node) */
	IPCACHE_SOURCE_IDENTITY = 3, /* an identity given to a prefix */
	IPCACHE_SOURCE_CIDR = 4,     /* a CIDR peer of policies */
};

/* Where a remote address lives is not the ipcache's question: node_cidrs
 * (node.h) answers it, so that an identity given to a remote pod's address
 * never hides which node has it. */
struct ipcache_value {
	__u32 identity;
	__u32 ifindex;   /* host-side interface of a local endpoint, else 0 */
	__u8 source;     /* enum ipcache_source */
	/* Bits of the entry's own prefix. A lookup returns the longest match;
	 * this tells user space an exact entry from a covering one. */
	__u8 prefix_len;
	__u8 pad[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, IPCACHE_ENTRIES);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipcache SEC(".maps");

static __always_inline struct ipcache_value *ipcache_lookup4(__be32 addr)
{
	struct ipcache_key key = {
		.prefixlen = IPCACHE_PREFIX_BASE + 32,
		.family = 4,
	};

	*(__be32 *)key.addr = addr;
	return bpf_map_lookup_elem(&ipcache, &key);
}

static __always_inline struct ipcache_value *ipcache_lookup6(const __u8 *addr)
{
	struct ipcache_key key = {
		.prefixlen = IPCACHE_PREFIX_BASE + 128,
		.family = 6,
	};

	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&ipcache, &key);
}
