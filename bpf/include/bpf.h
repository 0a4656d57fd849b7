/* The parts of the kernel's BPF interface (include/uapi/linux/bpf.h and
 * pkt_cls.h) that sluice's programs use: program contexts, map types and
 * flags, verdicts, and the helpers with their numbers. These are stable
 * kernel ABI; only what is used is here. */
#pragma once

#include "types.h"

/* Map types (enum bpf_map_type). */
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_HASH = 5,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_LPM_TRIE = 11,
	BPF_MAP_TYPE_RINGBUF = 27,
};

/* Map creation flags. */
enum {
	BPF_F_NO_PREALLOC = 1U << 0,
};

/* Checksum helper flags (bpf_l3_csum_replace, bpf_l4_csum_replace). */
enum {
	BPF_F_PSEUDO_HDR = 1ULL << 4,     /* the field is in the pseudo header too */
	BPF_F_MARK_MANGLED_0 = 1ULL << 5, /* UDP: a 0 checksum (none) stays 0 */
};

/* bpf_skb_adjust_room modes. */
enum {
	BPF_ADJ_ROOM_NET = 0, /* room after the network header */
	BPF_ADJ_ROOM_MAC = 1, /* room after the MAC header */
};

/* bpf_map_update_elem flags. */
enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

/* How a map is pinned (libbpf's convention, read by cilium/ebpf). */
enum {
	LIBBPF_PIN_NONE = 0,
	LIBBPF_PIN_BY_NAME = 1,
};

/* tc verdicts. */
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_REDIRECT 7

/* XDP verdicts (enum xdp_action). */
enum {
	XDP_ABORTED = 0,
	XDP_DROP = 1,
	XDP_PASS = 2,
	XDP_TX = 3,
	XDP_REDIRECT = 4,
};

/* The tc program context. Field offsets are ABI: the verifier rewrites each
 * access into the kernel's sk_buff. */
struct __sk_buff {
	__u32 len;
	__u32 pkt_type;
	__u32 mark;
	__u32 queue_mapping;
	__u32 protocol;
	__u32 vlan_present;
	__u32 vlan_tci;
	__u32 vlan_proto;
	__u32 priority;
	__u32 ingress_ifindex;
	__u32 ifindex;
	__u32 tc_index;
	__u32 cb[5];
	__u32 hash;
	__u32 tc_classid;
	__u32 data;
	__u32 data_end;
	__u32 napi_id;
	__u32 family;
	__u32 remote_ip4;
	__u32 local_ip4;
	__u32 remote_ip6[4];
	__u32 local_ip6[4];
	__u32 remote_port;
	__u32 local_port;
	__u32 data_meta;
	__u64 flow_keys; /* a pointer in the kernel's view */
	__u64 tstamp;
	__u32 wire_len;
	__u32 gso_segs;
	__u64 sk;        /* a pointer in the kernel's view */
	__u32 gso_size;
};

/* The XDP program context. */
struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};

/* bpf_fib_lookup's parameters and results (struct bpf_fib_lookup, 64
 * bytes since Linux 4.18). Only what sluice reads or sets is named. */
struct bpf_fib_lookup {
	__u8 family; /* AF_INET or AF_INET6 */
	__u8 l4_protocol;
	__be16 sport;
	__be16 dport;
	__u16 tot_len;
	__u32 ifindex;
	__be32 flowinfo;
	__u32 src[4]; /* IPv4 in the first word */
	__u32 dst[4];
	__be16 h_vlan_proto;
	__be16 h_vlan_TCI;
	__u8 smac[6];
	__u8 dmac[6];
};

#define AF_INET 2
#define AF_INET6 10

/* bpf_fib_lookup results. */
enum {
	BPF_FIB_LKUP_RET_SUCCESS = 0,
	BPF_FIB_LKUP_RET_NOT_FWDED = 4,   /* a local, broadcast or multicast route */
	BPF_FIB_LKUP_RET_FWD_DISABLED = 5, /* forwarding is off on the device */
	BPF_FIB_LKUP_RET_NO_NEIGH = 7,     /* a route, but no neighbour entry for its next hop */
	BPF_FIB_LKUP_RET_FRAG_NEEDED = 8,  /* tot_len is more than the route's MTU */
};

/* bpf_skb_set_tunnel_key's and bpf_skb_get_tunnel_key's key (struct
 * bpf_tunnel_key, 44 bytes since Linux 5.19). */
struct bpf_tunnel_key {
	__u32 tunnel_id;
	union {
		__u32 remote_ipv4; /* host order */
		__u32 remote_ipv6[4]; /* network order */
	};
	__u8 tunnel_tos;
	__u8 tunnel_ttl;
	__u16 tunnel_ext;
	__u32 tunnel_label;
	union {
		__u32 local_ipv4;
		__u32 local_ipv6[4];
	};
};

#define BPF_F_TUNINFO_IPV6 (1ULL << 0)
#define BPF_F_ZERO_CSUM_TX (1ULL << 1)

/* bpf_redirect_neigh's next hop (struct bpf_redir_neigh). */
struct bpf_redir_neigh {
	__u32 nh_family;
	union {
		__be32 ipv4_nh;
		__u32 ipv6_nh[4];
	};
};

/* Errors helpers return, negated. */
#define EEXIST 17

/* Map and section declarations, read by the loader (libbpf's convention). */
#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

/* A kernel function (kfunc) a program calls by name: the loader finds it
 * in the running kernel's BTF, and refuses the program where it is not
 * (cilium/ebpf: ErrNotSupported). */
#define __ksym __attribute__((section(".ksyms")))

/* Helpers: the kernel calls them by number. */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static __u32 (*bpf_get_prandom_u32)(void) = (void *)7;
static __u64 (*bpf_ktime_get_coarse_ns)(void) = (void *)160;
static long (*bpf_skb_store_bytes)(struct __sk_buff *skb, __u32 offset, const void *from, __u32 len, __u64 flags) = (void *)9;
static long (*bpf_l3_csum_replace)(struct __sk_buff *skb, __u32 offset, __u64 from, __u64 to, __u64 size) = (void *)10;
static long (*bpf_l4_csum_replace)(struct __sk_buff *skb, __u32 offset, __u64 from, __u64 to, __u64 flags) = (void *)11;
static long (*bpf_skb_change_type)(struct __sk_buff *skb, __u32 type) = (void *)32;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) = (void *)26;
static __s64 (*bpf_csum_diff)(__be32 *from, __u32 from_size, __be32 *to, __u32 to_size, __wsum seed) = (void *)28;
static long (*bpf_skb_adjust_room)(struct __sk_buff *skb, __s32 len_diff, __u32 mode, __u64 flags) = (void *)50;
static long (*bpf_skb_change_tail)(struct __sk_buff *skb, __u32 len, __u64 flags) = (void *)38;
static long (*bpf_skb_pull_data)(struct __sk_buff *skb, __u32 len) = (void *)39;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)46;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) = (void *)131;
static void (*bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)132;
static long (*bpf_skb_get_tunnel_key)(struct __sk_buff *skb, struct bpf_tunnel_key *key, __u32 size, __u64 flags) = (void *)20;
static long (*bpf_skb_set_tunnel_key)(struct __sk_buff *skb, struct bpf_tunnel_key *key, __u32 size, __u64 flags) = (void *)21;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;
static long (*bpf_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen, __u64 flags) = (void *)152;
static long (*bpf_fib_lookup)(void *ctx, struct bpf_fib_lookup *params, int plen, __u32 flags) = (void *)69;
static long (*bpf_redirect_peer)(__u32 ifindex, __u64 flags) = (void *)155;
static long (*bpf_check_mtu)(void *ctx, __u32 ifindex, __u32 *mtu_len, __s32 len_diff, __u64 flags) = (void *)163;
static __u64 (*bpf_xdp_get_buff_len)(struct xdp_md *xdp_md) = (void *)188;
static long (*bpf_xdp_load_bytes)(struct xdp_md *xdp_md, __u32 offset, void *buf, __u32 len) = (void *)189;

/* The cgroup sock_addr program context (connect, sendmsg, recvmsg,
 * getpeername of inet sockets). Field offsets are ABI: the verifier
 * rewrites each access into the kernel's sockaddr and socket. The
 * addresses are in network order; user_port is a __be16 widened to 32
 * bits. Writes must be 4 bytes wide (8 also for user_ip6). */
struct bpf_sock_addr {
	__u32 user_family;
	__u32 user_ip4;
	__u32 user_ip6[4];
	__u32 user_port;
	__u32 family;
	__u32 type;
	__u32 protocol;
	__u32 msg_src_ip4;
	__u32 msg_src_ip6[4];
	__u64 sk; /* a pointer in the kernel's view */
};

/* cgroup program verdicts: SYS_REJECT makes the call fail with EPERM. The
 * recvmsg and getpeername hooks must always return SYS_PROCEED. */
#define SYS_REJECT 0
#define SYS_PROCEED 1

static __u64 (*bpf_get_netns_cookie)(void *ctx) = (void *)122;

/* The iterator programs (SEC("iter/...")) write their output, which user
 * space reads from the iterator's file, to a seq_file: the context's
 * meta->seq. Only a pointer to it is ever held. */
struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
};

static long (*bpf_seq_write)(struct seq_file *m, const void *data, __u32 len) = (void *)127;
