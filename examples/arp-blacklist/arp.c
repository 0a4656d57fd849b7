//go:build ignore

/* XDP program that drops ARP packets asking about (or announcing) a
 * blacklisted IPv4 address: the ARP target protocol address is looked up in
 * the blacklist map, whose value counts the drops for that address.
 * Everything else, including ARP it cannot parse, passes. */
#include "../../bpf/include/bpf.h"
#include "../../bpf/include/net.h"
#include "../../bpf/lib/arp.h"

#define MAX_BLACKLIST 100000

/* Key: IPv4 address in network byte order. Value: packets dropped for it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BLACKLIST);
	__type(key, __be32);
	__type(value, __u64);
} blacklist SEC(".maps");

/* Per-CPU totals, indexed by enum verdict. */
enum verdict {
	VERDICT_PASSED = 0,
	VERDICT_DROPPED = 1,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} totals SEC(".maps");

static __always_inline int count(enum verdict v)
{
	__u32 key = v;
	__u64 *n = bpf_map_lookup_elem(&totals, &key);

	if (n)
		(*n)++;
	return v == VERDICT_DROPPED ? XDP_DROP : XDP_PASS;
}

SEC("xdp")
int arp_blacklist(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct arp_eth_ipv4 *arp = data + sizeof(*eth);
	__u64 *drops;

	if ((void *)(arp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_ARP))
		return count(VERDICT_PASSED);
	if (arp->ptype != bpf_htons(ETH_P_IP) || arp->plen != 4)
		return count(VERDICT_PASSED);

	drops = bpf_map_lookup_elem(&blacklist, &arp->tpa);
	if (!drops)
		return count(VERDICT_PASSED);
	__sync_fetch_and_add(drops, 1);
	return count(VERDICT_DROPPED);
}

char __license[] SEC("license") = "GPL";
