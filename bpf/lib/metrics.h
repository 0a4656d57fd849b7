/* Per-CPU packet and byte counters by (direction, reason). Reason 0 counts
 * forwarded packets; every other reason is a drop. */
#pragma once

#include "common.h"
#include "reasons.h"

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* An array, not a hash: the index is (direction << 8) | reason, so a lookup
 * never misses and the map can never fill up. */
#define METRICS_ENTRIES 512

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, METRICS_ENTRIES);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} metrics SEC(".maps");

static __always_inline void metrics_count(enum drop_reason reason, enum direction dir, __u32 bytes)
{
	__u32 key = ((__u32)(dir & 1) << 8) | (reason & 0xff);
	struct metrics_value *v = bpf_map_lookup_elem(&metrics, &key);

	if (v) {
		v->packets++;
		v->bytes += bytes;
	}
}
