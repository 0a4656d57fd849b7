//go:build ignore

/* Test programs for the events and counters core. The verdict comes from
 * skb->mark, which a BPF_PROG_TEST_RUN context sets: bits 0-7 the drop reason
 * (0: forward), bit 8 the direction, bits 16-31 the endpoint ID. */
#include "../lib/common.h"
#include "../lib/events.h"
#include "../lib/policy.h"

SEC("tc")
int probe_tc(struct __sk_buff *skb)
{
	__u32 reason = skb->mark & 0xff;
	enum direction dir = (skb->mark >> 8) & 1;
	__u32 endpoint = skb->mark >> 16;

	if (reason)
		return drop(skb, reason, dir, endpoint);
	trace(skb, TRACE_FROM_ENDPOINT, dir, endpoint);
	forwarded(skb, dir);
	return TC_ACT_OK;
}

/* Drops every IPv4 packet whose TTL is 1, so real traffic can choose. */
SEC("xdp")
int probe_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 *ttl = data + 14 + 8;

	if (data + 14 + 20 > end)
		return XDP_PASS;
	if (*ttl == 1)
		return xdp_drop(ctx, REASON_MALFORMED, DIR_INGRESS, 0);
	xdp_trace(ctx, TRACE_FROM_NETDEV, DIR_INGRESS, 0);
	xdp_forwarded(ctx, DIR_INGRESS);
	return XDP_PASS;
}

char __license[] SEC("license") = "GPL";

/* What probe_policy decides, after the Ethernet header of its frame. */
struct policy_probe_args {
	__u32 identity;
	__u16 endpoint;
	__u8 dir;
	__u8 proto;
	__u16 port;
	__u16 pad;
};

/* Runs the datapath's policy decision on the arguments in the frame and
 * returns its packed result (verdict << 16 | rule), so tests can compare
 * the program itself with the semantics. */
SEC("tc")
int probe_policy(struct __sk_buff *skb)
{
	struct policy_probe_args a;

	if (bpf_skb_load_bytes(skb, 14, &a, sizeof(a)) < 0)
		return -1;
	return policy_decide(a.endpoint, a.dir, a.identity, a.proto, a.port);
}
