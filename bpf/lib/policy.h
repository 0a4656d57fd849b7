/* Network policy: what each endpoint may send and receive, as map entries
 * that user space compiles from rules (policy.Compile). A lookup costs a
 * few hash lookups whatever the number of rules: one per combination of
 * (remote identity or any) x (protocol or any) x (port prefix length in
 * use). Deny beats allow: every combination is looked up and one deny
 * decides. */
#pragma once

#include "common.h"

#define POLICY_ENTRIES 262144
#define POLICY_ENDPOINTS 16384

/* Policy's part of a conntrack entry (bpf/lib/ct.h keeps it and reads
 * nothing in it): what decided the flow when it began. */
struct ct_policy {
	__u32 identity; /* the remote identity */
	__u16 rule;     /* the rule that allowed it; POLICY_NO_RULE: none */
	__u8 audited;   /* policy would have denied it (audit mode) */
	__u8 pad;
};

/* One entry: traffic of an endpoint in a direction, with a remote
 * identity (0: any) and an L4 protocol (0: any) to a port prefix. For ICMP
 * and ICMPv6 the "port" is type << 8 | code. */
struct policy_key {
	__u32 identity;
	__u16 endpoint;
	__u8 dir;         /* enum direction, the endpoint's */
	__u8 proto;
	__u16 port;       /* host byte order, masked to port_prefix bits */
	__u8 port_prefix; /* 0..16; 0 with proto 0 */
	__u8 pad;
};

enum policy_entry_flag {
	POLICY_DENY = 1 << 0,
};

struct policy_entry {
	__u16 rule;  /* index of the rule in its direction, for counters and events */
	__u8 flags;  /* enum policy_entry_flag */
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, POLICY_ENTRIES);
	__type(key, struct policy_key);
	__type(value, struct policy_entry);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy SEC(".maps");

/* What an endpoint's policy in one direction looks like, so a lookup
 * probes only combinations that have entries. */
struct policy_meta_key {
	__u16 endpoint;
	__u8 dir;
	__u8 pad;
};

enum policy_meta_flag {
	POLICY_META_AUDIT = 1 << 0, /* would-be drops pass, reported as audited */
};

/* Bits of policy_meta.shapes: which (identity, protocol) combinations have
 * entries. */
enum policy_shape {
	POLICY_SHAPE_ID_PROTO = 1 << 0, /* this identity, this protocol */
	POLICY_SHAPE_ID_ANY = 1 << 1,   /* this identity, any protocol */
	POLICY_SHAPE_ANY_PROTO = 1 << 2,/* any identity, this protocol */
	POLICY_SHAPE_ANY_ANY = 1 << 3,  /* any identity, any protocol */
};

struct policy_meta_value {
	__u32 port_prefixes; /* bit k: entries with port_prefix k exist */
	__u8 shapes;         /* enum policy_shape */
	__u8 flags;          /* enum policy_meta_flag */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, POLICY_ENDPOINTS * 2);
	__type(key, struct policy_meta_key);
	__type(value, struct policy_meta_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_meta SEC(".maps");

/* Per-rule hit counters: new flows each rule decided. */
struct policy_counter_key {
	__u16 endpoint;
	__u8 dir;
	__u8 pad;
	__u16 rule;
	__u16 pad2;
};

struct policy_counter {
	__u64 flows;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, POLICY_ENTRIES);
	__type(key, struct policy_counter_key);
	__type(value, struct policy_counter);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_counters SEC(".maps");

enum policy_verdict {
	POLICY_ALLOWED = 1,  /* by a rule, or no policy in that direction */
	POLICY_DENIED = 2,
	POLICY_AUDITED = 3,  /* denied, but let through in audit mode */
};

/* POLICY_NO_RULE: the verdict came from no rule (no policy, or no rule
 * matched). */
#define POLICY_NO_RULE 0xffff

struct policy_result {
	__u8 verdict; /* enum policy_verdict */
	__u16 rule;
};

/* policy_probe looks one combination up and folds it into res: a deny
 * decides at once (returns 1), an allow is kept. */
static __always_inline int policy_probe(struct policy_key *key, struct policy_result *res)
{
	struct policy_entry *e = bpf_map_lookup_elem(&policy, key);

	if (!e)
		return 0;
	if (e->flags & POLICY_DENY) {
		res->verdict = POLICY_DENIED;
		res->rule = e->rule;
		return 1;
	}
	if (res->verdict != POLICY_ALLOWED) {
		res->verdict = POLICY_ALLOWED;
		res->rule = e->rule;
	}
	return 0;
}

/* policy_probe_ports probes every port prefix length in use, for one
 * identity and a specific protocol. */
static __always_inline int policy_probe_ports(struct policy_key *key, __u16 port, __u32 prefixes,
					      struct policy_result *res)
{
	for (int k = 16; k >= 0; k--) {
		if (!(prefixes & (1U << k)))
			continue;
		key->port_prefix = k;
		key->port = k ? port & (__u16)(0xffff << (16 - k)) : 0;
		if (policy_probe(key, res))
			return 1;
	}
	return 0;
}

/* policy_probe_identity probes the entries of one remote identity (0: any
 * identity): those of the packet's protocol by port prefix, then those of
 * any protocol. proto_shape and any_shape are the shape bits that say
 * whether such entries exist. */
static __always_inline int policy_probe_identity(struct policy_key *key, __u32 identity, __u8 proto,
						 __u16 port, struct policy_meta_value *meta,
						 __u8 proto_shape, __u8 any_shape,
						 struct policy_result *res)
{
	key->identity = identity;
	key->proto = proto;
	if ((meta->shapes & proto_shape) && policy_probe_ports(key, port, meta->port_prefixes, res))
		return 1;
	key->proto = 0;
	key->port = 0;
	key->port_prefix = 0;
	return (meta->shapes & any_shape) && policy_probe(key, res);
}

/* Identities given to CIDR peers: they are addresses outside the cluster,
 * so a rule for the reserved identity world matches them too. */
#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2
#define IDENTITY_REMOTE_NODE 6 /* another node's own addresses */
#define IDENTITY_MIN_WORKLOAD 256
#define CIDR_IDENTITY_FIRST (1U << 24)
#define CIDR_IDENTITY_LAST ((2U << 24) - 1)

static __always_inline int identity_is_cidr(__u32 identity)
{
	return identity >= CIDR_IDENTITY_FIRST && identity <= CIDR_IDENTITY_LAST;
}

/* policy_decide decides a new flow of endpoint ep in direction dir with the
 * remote identity, protocol and port (ICMP: type << 8 | code). It is a
 * global function, so the verifier checks its probes once, not at every
 * place a program decides. */
__noinline int policy_decide(__u16 ep, __u8 dir, __u32 identity, __u8 proto, __u16 port)
{
	struct policy_meta_key mk = { .endpoint = ep, .dir = dir };
	struct policy_result res = { .verdict = 0, .rule = POLICY_NO_RULE };
	struct policy_key key = { .endpoint = ep, .dir = dir };
	struct policy_meta_value *meta = bpf_map_lookup_elem(&policy_meta, &mk);

	if (!meta)
		return POLICY_ALLOWED << 16 | POLICY_NO_RULE; /* no policy in this direction */
	if (policy_probe_identity(&key, identity, proto, port, meta,
				  POLICY_SHAPE_ID_PROTO, POLICY_SHAPE_ID_ANY, &res))
		goto denied;
	if (identity_is_cidr(identity) &&
	    policy_probe_identity(&key, IDENTITY_WORLD, proto, port, meta,
				  POLICY_SHAPE_ID_PROTO, POLICY_SHAPE_ID_ANY, &res))
		goto denied;
	if (policy_probe_identity(&key, 0, proto, port, meta,
				  POLICY_SHAPE_ANY_PROTO, POLICY_SHAPE_ANY_ANY, &res))
		goto denied;
	if (res.verdict == POLICY_ALLOWED)
		return POLICY_ALLOWED << 16 | res.rule;
	res.verdict = POLICY_DENIED;
denied:
	if (meta->flags & POLICY_META_AUDIT)
		res.verdict = POLICY_AUDITED;
	return (__u32)res.verdict << 16 | res.rule;
}

/* policy_check is policy_decide, unpacked. */
static __always_inline struct policy_result policy_check(__u16 ep, __u8 dir, __u32 identity,
							  __u8 proto, __u16 port)
{
	__u32 r = policy_decide(ep, dir, identity, proto, port);
	struct policy_result res = { .verdict = r >> 16, .rule = r & 0xffff };

	return res;
}

/* policy_count counts a new flow against the rule that decided it. */
static __always_inline void policy_count(__u16 ep, __u8 dir, __u16 rule)
{
	struct policy_counter_key k = { .endpoint = ep, .dir = dir, .rule = rule };
	struct policy_counter *c;

	if (rule == POLICY_NO_RULE)
		return;
	c = bpf_map_lookup_elem(&policy_counters, &k);
	if (c) {
		c->flows++;
		return;
	}
	struct policy_counter one = { .flows = 1 };
	bpf_map_update_elem(&policy_counters, &k, &one, BPF_NOEXIST);
}
