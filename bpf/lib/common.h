/* Definitions every sluice program shares: the kernel interface and the
 * layout version of the pinned maps. */
#pragma once

#include "../include/bpf.h"

/* Bumped whenever a pinned map changes its key, value or meaning. Go reads
 * it from this enum (bpf2go), so the two cannot disagree. */
enum layout_version {
	LAYOUT_VERSION = 7,
};

#define NSEC_PER_SEC 1000000000ULL

/* now_ns is CLOCK_MONOTONIC to within a tick, the clock of conntrack,
 * NAT and affinity lifetimes (seconds long): a fraction of the cost of
 * bpf_ktime_get_ns, whose clock read is a paravirtual call in many VMs. */
static __always_inline __u64 now_ns(void)
{
	return bpf_ktime_get_coarse_ns();
}

/* Direction of a packet relative to the workload or node it concerns. */
enum direction {
	DIR_INGRESS = 0,
	DIR_EGRESS = 1,
};

/* The one-entry map that stamps a pinned datapath with its layout version, so
 * a process built for another layout refuses it instead of misreading it. */
struct layout_stamp {
	__u32 version;
	__u32 reserved;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct layout_stamp);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} layout SEC(".maps");
