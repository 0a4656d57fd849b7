//go:build ignore

/* The socket iterator that closes connected UDP sockets sent to a backend
 * that must no longer have them (bpf/lib/sock_destroy.h). A connected UDP
 * socket was translated once, at connect (bpf/sock.c), and would keep
 * sending to its backend after the backend was removed from its service:
 * nothing on the path tells a UDP client that its peer is gone. Destroyed,
 * its next receive fails with ECONNABORTED, and a client that connects
 * again is sent to a backend that takes flows.
 *
 * User space runs the iterator in each network namespace with sockets of
 * the datapath's cgroup; it reads one socket cookie (8 bytes, native
 * order) per socket destroyed. It is an object of its own, loaded only
 * when needed: bpf_sock_destroy came with Linux 6.5, and a kernel without
 * it refuses the program, not the socket programs. */
#include "lib/common.h"
#include "include/sock.h"
#include "lib/service.h"
#include "lib/sock_destroy.h"

/* sock_peer reads the connected peer of sk into the backend part of rk
 * (address, port, family) and returns 1, or returns 0 when sk is not
 * connected. An IPv4-mapped peer of an IPv6 socket is an IPv4 backend, as
 * connect6 translated it. */
static __always_inline int sock_peer(struct sock_common *sk, struct lb_sock_key *rk)
{
	__u16 family = sk->skc_family;
	__u32 ip[4];

	if (sk->skc_state != TCP_ESTABLISHED)
		return 0;
	rk->port = sk->skc_dport;
	if (family == AF_INET) {
		ip[0] = sk->skc_daddr;
		__builtin_memcpy(rk->addr, ip, 4);
		rk->family = 4;
		return 1;
	}
	if (family != AF_INET6)
		return 0;
	ip[0] = sk->skc_v6_daddr.in6_u.u6_addr32[0];
	ip[1] = sk->skc_v6_daddr.in6_u.u6_addr32[1];
	ip[2] = sk->skc_v6_daddr.in6_u.u6_addr32[2];
	ip[3] = sk->skc_v6_daddr.in6_u.u6_addr32[3];
	if (!ip[0] && !ip[1] && ip[2] == bpf_htonl(0xffff)) {
		__builtin_memcpy(rk->addr, &ip[3], 4);
		rk->family = 4;
	} else {
		__builtin_memcpy(rk->addr, ip, 16);
		rk->family = 6;
	}
	return 1;
}

/* destroy_udp destroys a connected UDP socket when the socket programs
 * sent it to its peer for a frontend, and sock_destroy_targets names that
 * frontend and backend. A socket that connected to the backend's address
 * by itself is none of the service's business and stays; so does one sent
 * there for another frontend of the same backend. */
SEC("iter/udp")
int destroy_udp(struct bpf_iter__udp *ctx)
{
	struct sock_common *sk = (struct sock_common *)ctx->udp_sk;
	struct sock_destroy_key target = {};
	struct lb_sock_key rk = {};
	struct lb_frontend_key *fk;
	__u64 cookie;

	if (!sk || !sock_peer(sk, &rk))
		return 0;
	cookie = bpf_get_socket_cookie(sk);
	rk.cookie = cookie;
	fk = bpf_map_lookup_elem(&lb_sock_revnat, &rk);
	if (!fk)
		return 0;
	target.frontend = *fk;
	__builtin_memcpy(target.addr, rk.addr, 16);
	target.port = rk.port;
	target.family = rk.family;
	if (!bpf_map_lookup_elem(&sock_destroy_targets, &target))
		return 0;
	if (bpf_sock_destroy(sk))
		return 0;
	/* The cookie names no socket any more. */
	bpf_map_delete_elem(&lb_sock_revnat, &rk);
	bpf_seq_write(ctx->meta->seq, &cookie, sizeof(cookie));
	return 0;
}

char __license[] SEC("license") = "GPL";
