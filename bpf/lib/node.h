/* The cluster as this node sees it: how it reaches other nodes (its
 * configuration), which node each pod CIDR lives on, and which underlay
 * address belongs to which node. Package node writes the remote nodes'
 * entries, the datapath's Open the local node's. */
#pragma once

#include "common.h"
#include "ipcache.h"
#include "parse.h"

#define NODE_CIDRS_MAX 16384
#define NODE_ADDRS_MAX 8192

/* Node 0 is the local node; remote nodes are numbered from 1. The
 * cluster's pod ranges (Config.Node.ClusterCIDRs) point to NODE_NONE:
 * an address in them that no node's pod CIDR covers is unreachable. */
enum node_id {
	NODE_LOCAL = 0,
	NODE_NONE = 0xffffffff,
};

/* How traffic to another node's pods leaves. */
enum routing_mode {
	ROUTING_LOCAL = 0,  /* no remote nodes: a single-node datapath */
	ROUTING_VXLAN = 1,  /* encapsulated in VXLAN, the source identity in the VNI */
	ROUTING_NATIVE = 2, /* routed as it is, through the node devices */
};

enum node_config_flag {
	NODE_CONFIG_IPV4 = 1 << 0,       /* ipv4 holds the node's IPv4 address */
	NODE_CONFIG_IPV6 = 1 << 1,       /* ipv6 holds its IPv6 address */
	NODE_CONFIG_MASQUERADE = 1 << 2, /* pods' traffic to the world leaves with them (snat.h) */
};

struct node_settings {
	__u32 routing;        /* enum routing_mode */
	__u32 tunnel_ifindex; /* the VXLAN device, in ROUTING_VXLAN */
	__u32 endpoint_mtu;   /* packets to other nodes larger than this are too big */
	__u32 flags;          /* enum node_config_flag */
	__u32 encryption;     /* enum encryption (encrypt.h) */
	__u32 wg_ifindex;     /* the WireGuard device, with ENCRYPT_WIREGUARD */
	__u16 tunnel_port;    /* VXLAN's UDP port, in ROUTING_VXLAN */
	__u16 pad;
	__u8 ipv4[16];        /* IPv4 in the first 4 bytes, as flows hold it */
	__u8 ipv6[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_settings);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_config SEC(".maps");

enum node_flag {
	NODE_F_IPV4 = 1 << 0, /* the node has an IPv4 underlay address */
	NODE_F_IPV6 = 1 << 1, /* and an IPv6 one */
};

/* Where a pod CIDR lives: its node and that node's underlay addresses
 * (copied into every CIDR of the node, so that one lookup finds the
 * tunnel's far end). The key is the ipcache's. */
struct node_route {
	__u32 node;   /* NODE_LOCAL, or a remote node's ID */
	__u32 flags;  /* enum node_flag */
	__be32 ipv4;
	__u8 ipv6[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, NODE_CIDRS_MAX);
	__type(key, struct ipcache_key);
	__type(value, struct node_route);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_cidrs SEC(".maps");

/* An underlay address of a remote node. */
struct node_addr_key {
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16]; /* IPv4 in the first 4 bytes */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NODE_ADDRS_MAX);
	__type(key, struct node_addr_key);
	__type(value, __u32); /* the node's ID */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_addrs SEC(".maps");

static __always_inline struct node_settings *node_config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&node_config, &zero);
}

/* node_config_addr reports whether the address (of the family, 16 bytes,
 * IPv4 in the first 4) is the node's underlay address of its family, the
 * one it masquerades with. */
static __always_inline int node_config_addr(const struct node_settings *cfg, __u8 family, const __u8 *addr)
{
	if (family == 4)
		return (cfg->flags & NODE_CONFIG_IPV4) && *(const __u32 *)addr == *(const __u32 *)cfg->ipv4;
	return (cfg->flags & NODE_CONFIG_IPV6) && ipv6_equal(addr, cfg->ipv6);
}

/* node_route_of returns where the address (of the family, 16 bytes,
 * IPv4 in the first 4) lives, or NULL when it is in no pod CIDR. */
static __always_inline struct node_route *node_route_of(__u8 family, const __u8 *addr)
{
	struct ipcache_key key = {.family = family};

	key.prefixlen = IPCACHE_PREFIX_BASE + (family == 4 ? 32 : 128);
	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&node_cidrs, &key);
}

/* node_of_addr returns the ID of the remote node with the underlay
 * address, or NULL for an address that is no node's. */
static __always_inline __u32 *node_of_addr(__u8 family, const __u8 *addr)
{
	struct node_addr_key key = {.family = family};

	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&node_addrs, &key);
}
