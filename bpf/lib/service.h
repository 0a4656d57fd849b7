/* Service load balancing: a frontend (a virtual address, port and protocol)
 * balanced over backends. The maps are shared by the tc programs (per-packet
 * translation, bpf/lib/nat.h) and the socket programs (translation at
 * connect and sendmsg, bpf/sock.c); this header holds the maps and the
 * choice of a backend, which both make the same way. The layout is written
 * down in docs/architecture.md. */
#pragma once

#include "common.h"

#define LB_FRONTENDS 16384
#define LB_BACKENDS 131072
#define LB_SLOTS (1 << 20)
#define LB_AFFINITY 65536

/* Load balancing's part of a conntrack entry (bpf/lib/ct.h keeps it and
 * reads nothing in it): the service whose frontend the flow's replies come
 * from, and the backend it was sent to. */
struct ct_service {
	__u32 backend; /* backend ID; 0: none */
	__u16 id;      /* service ID; 0: not translated */
	__u16 pad;
};

/* Load balancing's part of a packet's flow (bpf/lib/flow.h): what
 * lb_translate chose for it, and what its replies go back to. */
struct lb_flow {
	__u32 counter; /* the backend's counter index */
	__u16 rev_nat; /* a reply (or an ICMP error about) a translated flow: the service whose frontend it comes from */
	__u8 flags;    /* enum lb_flow_flag */
	__u8 pad;
};

enum lb_flow_flag {
	LB_FLOW_NEW = 1 << 0,      /* a new service flow: lb_commit records it once let through */
	LB_FLOW_REMEMBER = 1 << 1, /* and remembers its backend for client affinity */
	LB_FLOW_HAIRPIN = 1 << 2,  /* translated to its own sender: the source is the frontend */
};

struct lb_frontend_key {
	__u8 addr[16]; /* IPv4 in the first 4 bytes */
	__be16 port;
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family; /* 4 or 6 */
};

enum lb_flag {
	LB_F_MAGLEV = 1 << 0, /* the slots are a Maglev table: a flow's hash picks one */
	LB_F_SOCKET = 1 << 1, /* translated by the socket programs */
	LB_F_TC = 1 << 2,     /* translated per packet by from-endpoint */
	LB_F_REJECT = 1 << 3, /* no backend: answer ICMP unreachable (else drop) */
	/* The slots are the service's terminating backends that still serve:
	 * it has no active one with a weight (lb_open). */
	LB_F_FALLBACK = 1 << 4,
};

/* A frontend points at one of the service's two slot tables. An update
 * writes the other one whole, then points the frontend at it: a packet sees
 * the old table or the new, never a mix. */
struct lb_frontend {
	__u32 service;  /* service ID, 1 to 65535: also the reverse NAT index */
	__u32 table;    /* the slot table in use: 2 * service + 0 or 1 */
	__u32 slots;    /* how many; 0: no backend takes new flows */
	__u32 affinity; /* client affinity timeout in seconds; 0: none */
	__u32 flags;    /* enum lb_flag */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_FRONTENDS);
	__type(key, struct lb_frontend_key);
	__type(value, struct lb_frontend);
	/* Replaced, never rewritten in place (see the endpoints map). */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_frontends SEC(".maps");

/* A service's frontend by its ID: what replies are translated back to. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_FRONTENDS);
	__type(key, __u32);
	__type(value, struct lb_frontend_key);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_revnat SEC(".maps");

/* An active backend is given new flows, and a terminating one that still
 * serves while its service has no active one (the frontend's
 * LB_F_FALLBACK); every state keeps the flows it has (a terminating
 * backend drains). service.State in Go, value for value. */
enum lb_backend_state {
	LB_ACTIVE = 0,
	LB_TERMINATING = 1, /* and no longer serving: never a new flow */
	LB_QUARANTINED = 2,
	LB_MAINTENANCE = 3,
	LB_TERMINATING_SERVING = 4,
};

struct lb_backend {
	__u8 addr[16];
	__be16 port;
	__u8 family;
	__u8 state;    /* enum lb_backend_state */
	__u32 service; /* whose: an ID is never shared between services */
	__u32 counter; /* its counters' index in lb_counters */
	__u16 weight;  /* 0: in no slot, so affinity must not pick it either */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_BACKENDS);
	/* backend ID: service << 16 | a number the service gives, never 0 */
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_backends SEC(".maps");

/* A selection table is kept in blocks of LB_SLOT_BLOCK slots: a service of
 * ten backends is one map entry, not ten, which makes writing ten thousand
 * services several times faster. */
#define LB_SLOT_BLOCK 16

struct lb_slot_key {
	__u32 table;
	__u32 block; /* slot / LB_SLOT_BLOCK */
};

struct lb_slot_block {
	__u32 backend[LB_SLOT_BLOCK]; /* backend ID per slot */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_SLOTS / LB_SLOT_BLOCK);
	__type(key, struct lb_slot_key);
	__type(value, struct lb_slot_block);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_slots SEC(".maps");

/* Per backend: packets and bytes translated to it per packet (tc), and the
 * flows (tc) and connections (socket) sent to it. An array, indexed by the
 * backend's counter index: no hashing on the per-packet path. User space
 * zeroes an index before it gives it to a backend. */
struct lb_backend_counters {
	__u64 packets;
	__u64 bytes;
	__u64 flows;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_backend_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_counters SEC(".maps");

/* Client affinity: the backend a client of a service was last sent to. */
struct lb_affinity_key {
	__u8 client[16];
	__u32 service;
};

struct lb_affinity_entry {
	__u64 last; /* CLOCK_MONOTONIC ns of its last new flow */
	__u32 backend;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_AFFINITY);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_affinity SEC(".maps");

/* lb_hash is MurmurHash3 (x86, 32-bit) of a flow's client address and port
 * and protocol: what picks a Maglev slot. service.FlowHash is its Go twin. */
static __always_inline __u32 lb_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = (k << 15) | (k >> 17);
	k *= 0x1b873593;
	h ^= k;
	h = (h << 13) | (h >> 19);
	return h * 5 + 0xe6546b64;
}

static __always_inline __u32 lb_hash(const __u8 *client, __be16 port, __u8 proto)
{
	const __u32 *w = (const __u32 *)client;
	__u32 h = 0;

	h = lb_mix(h, w[0]);
	h = lb_mix(h, w[1]);
	h = lb_mix(h, w[2]);
	h = lb_mix(h, w[3]);
	h = lb_mix(h, (__u32)bpf_ntohs(port) << 8 | proto);
	h ^= 20;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* lb_backend_of returns backend id if it still belongs to service, else NULL:
 * an ID outlives neither its service nor its removal. */
static __always_inline struct lb_backend *lb_backend_of(__u32 id, __u32 service)
{
	struct lb_backend *b;

	if (!id)
		return NULL;
	b = bpf_map_lookup_elem(&lb_backends, &id);
	if (!b || b->service != service)
		return NULL;
	return b;
}

/* lb_open reports whether backend b of frontend fe takes new flows by its
 * state: an active one does, and a terminating one that still serves while
 * fe's slots are the fallback ones. The weight is the caller's to check. */
static __always_inline int lb_open(const struct lb_frontend *fe, const struct lb_backend *b)
{
	return b->state == LB_ACTIVE || (b->state == LB_TERMINATING_SERVING && (fe->flags & LB_F_FALLBACK));
}

/* lb_count counts, at a backend's counter index, a packet of len bytes
 * (none when len is 0), and a new flow when new_flow is set. */
static __always_inline void lb_count(__u32 counter, __u32 len, int new_flow)
{
	struct lb_backend_counters *c = bpf_map_lookup_elem(&lb_counters, &counter);

	if (!c)
		return;
	if (len) {
		c->packets++;
		c->bytes += len;
	}
	if (new_flow)
		c->flows++;
}

/* lb_remember records backend as the last one client was sent to by
 * service, for client affinity. */
static __always_inline void lb_remember(__u32 service, const __u8 *client, __u32 backend)
{
	struct lb_affinity_key ak = {.service = service};
	struct lb_affinity_entry a = {.last = now_ns(), .backend = backend};

	__builtin_memcpy(ak.client, client, 16);
	bpf_map_update_elem(&lb_affinity, &ak, &a, BPF_ANY);
}

/* lb_select picks the backend of a new flow of frontend fe from client
 * (16 bytes): the client's affinity backend while it takes new flows (it
 * has a weight, and lb_open) and the timeout has not passed, else the slot
 * hash picks (a Maglev table) or a random one. It returns the backend's
 * ID, or 0 when no backend takes new flows. It records nothing: the caller
 * remembers the choice (lb_remember) once the flow is let through. */
static __always_inline __u32 lb_select(const struct lb_frontend *fe, const __u8 *client, __u32 hash,
				       struct lb_backend **out)
{
	struct lb_slot_key sk = {.table = fe->table};
	struct lb_slot_block *block;
	struct lb_backend *b;
	__u32 slot, id;

	if (!fe->slots)
		return 0;
	if (fe->affinity) {
		struct lb_affinity_key ak = {.service = fe->service};
		struct lb_affinity_entry *aff;

		__builtin_memcpy(ak.client, client, 16);
		aff = bpf_map_lookup_elem(&lb_affinity, &ak);
		if (aff && now_ns() - aff->last < (__u64)fe->affinity * NSEC_PER_SEC) {
			b = lb_backend_of(aff->backend, fe->service);
			if (b && b->weight && lb_open(fe, b)) {
				*out = b;
				return aff->backend;
			}
		}
	}
	if (!(fe->flags & LB_F_MAGLEV))
		hash = bpf_get_prandom_u32();
	slot = hash % fe->slots;
	sk.block = slot / LB_SLOT_BLOCK;
	block = bpf_map_lookup_elem(&lb_slots, &sk);
	if (!block)
		return 0;
	id = block->backend[slot % LB_SLOT_BLOCK];
	b = lb_backend_of(id, fe->service);
	if (!b)
		return 0;
	*out = b;
	return id;
}

/* The socket programs' reverse translation: a socket (by cookie) that was
 * sent to a backend sees the frontend as its peer. */
struct lb_sock_key {
	__u64 cookie;
	__u8 addr[16]; /* the backend */
	__be16 port;
	__u8 family;
	__u8 pad[5];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_AFFINITY);
	__type(key, struct lb_sock_key);
	__type(value, struct lb_frontend_key);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_sock_revnat SEC(".maps");
