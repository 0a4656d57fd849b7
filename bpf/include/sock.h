/* The kernel's sockets, as the socket iterators (SEC("iter/udp"), Linux
 * 5.9) hand them to a program: the iterator's context, the few fields of
 * struct sock_common a program reads, and bpf_sock_destroy.
 *
 * These are kernel-internal structures, not ABI: their layout changes
 * between builds of the kernel. preserve_access_index makes every field
 * access a CO-RE relocation, which the loader fixes up by field name
 * against the running kernel's BTF, so only the names here matter, never
 * the offsets. */
#pragma once

#include "bpf.h"

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

/* What every socket starts with (include/net/sock.h). For an IPv4-mapped
 * peer (::ffff:a.b.c.d) an IPv6 socket has skc_daddr set as well. */
struct sock_common {
	__be32 skc_daddr;             /* the connected peer, IPv4 */
	__be16 skc_dport;             /* and its port */
	unsigned short skc_family;    /* AF_INET or AF_INET6 */
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr; /* the connected peer, IPv6 */
} __attribute__((preserve_access_index));

/* A UDP socket starts with a struct sock, which starts with a struct
 * sock_common; the verifier follows that chain itself. */
struct udp_sock;

/* skc_state of a connected UDP socket (a TCP state's name, as the kernel
 * reuses it). */
#define TCP_ESTABLISHED 1

/* The context of an iter/udp program: one UDP socket of the network
 * namespace the iterator was opened in (NULL once, after the last). */
struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
};

/* bpf_sock_destroy aborts a socket as `ss --kill` does: a UDP socket is
 * disconnected, and its next receive fails with ECONNABORTED. Only
 * iter/tcp and iter/udp programs may call it. It returns 0 when it
 * destroyed the socket. Linux 6.5. */
extern int bpf_sock_destroy(struct sock_common *sk) __ksym;
