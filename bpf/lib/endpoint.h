/* Local endpoints: workloads connected to the node by a veth pair. */
#pragma once

#include "common.h"

#define ENDPOINTS_MAX 16384

enum endpoint_flag {
	ENDPOINT_F_IPV4 = 1 << 0,
	ENDPOINT_F_IPV6 = 1 << 1,
	/* Its devices are up and its program attached: packets may be
	 * delivered to it. Unset while Create and Delete run. */
	ENDPOINT_F_READY = 1 << 2,
};

/* What the datapath knows of an endpoint, keyed by its host-side ifindex. */
struct endpoint_info {
	__u32 id;
	__u32 identity;
	__u32 ifindex; /* host side */
	__u32 flags;   /* enum endpoint_flag */
	__u8 mac[6];      /* workload side: the only source MAC it may use */
	__u8 host_mac[6]; /* host side: the gateway MAC the workload sends to */
	__be32 ipv4;
	__u8 ipv6[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ENDPOINTS_MAX);
	__type(key, __u32);
	__type(value, struct endpoint_info);
	/* Not preallocated: an update then replaces the element instead of
	 * rewriting it in place, so a reader on another CPU sees the old value
	 * or the new one, never a mix or another endpoint's. */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

/* Per-endpoint counters; "out" leaves the workload, "in" reaches it. */
struct endpoint_counters {
	__u64 packets_out;
	__u64 bytes_out;
	__u64 packets_in;
	__u64 bytes_in;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, ENDPOINTS_MAX);
	__type(key, __u32); /* endpoint ID */
	__type(value, struct endpoint_counters);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ep_counters SEC(".maps");

static __always_inline void endpoint_count(__u32 id, int in, __u32 bytes)
{
	struct endpoint_counters *c = bpf_map_lookup_elem(&ep_counters, &id);

	if (!c)
		return;
	if (in) {
		c->packets_in++;
		c->bytes_in += bytes;
	} else {
		c->packets_out++;
		c->bytes_out += bytes;
	}
}
