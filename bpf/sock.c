//go:build ignore

/* The socket programs: service translation for the processes of one cgroup
 * (datapath.Config.Cgroup), done once per socket instead of once per
 * packet. connect and sendmsg send a socket that asks for a frontend
 * translated at socket level (LB_F_SOCKET) to one of its backends, so its
 * packets carry the backend's address from the start and from-endpoint
 * has nothing to rewrite; recvmsg and getpeername make the backend look
 * like the frontend again, so the application sees the address it asked
 * for. The maps are pinned by name and shared with the endpoint programs.
 *
 * What they choose differently from the per-packet translation (lb.h):
 *   - Client affinity is per network namespace, not per client address: a
 *     socket's source address is not known before connect, and every
 *     process of a pod shares the pod's namespace as it shares its
 *     address (see sock_client). Cilium does the same.
 *   - Maglev has no 5-tuple to hash here, so the slot is random.
 *   - With no backend that takes new flows, connect and sendmsg fail with
 *     EPERM (what a hook that rejects a call gives), as in Cilium; there
 *     is no packet to answer with an ICMP error.
 *   - An unconnected UDP socket chooses again for every datagram it sends
 *     (each is counted as a flow); a client that needs one backend
 *     connects, or its frontend has affinity.
 *   - An IPv6 socket that asks for an IPv4-mapped address (::ffff:a.b.c.d)
 *     is translated with the IPv4 frontend and backend; the kernel runs
 *     connect6 but sendmsg4 for it, and shows replies and peers to it
 *     mapped. */
#include "lib/common.h"
#include "include/net.h"
#include "lib/service.h"

/* sock_load4 reads the address and port a call of an IPv4 socket names
 * (the destination of connect and sendmsg, the peer or source of
 * getpeername and recvmsg) into a frontend key. */
static __always_inline void sock_load4(struct bpf_sock_addr *ctx, struct lb_frontend_key *k)
{
	__u32 ip = ctx->user_ip4;
	__u32 port = ctx->user_port;

	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->addr, &ip, 4);
	k->port = (__be16)port;
	k->proto = ctx->protocol;
	k->family = 4;
}

static __always_inline void sock_store4(struct bpf_sock_addr *ctx, const struct lb_frontend_key *k)
{
	__u32 ip;

	__builtin_memcpy(&ip, k->addr, 4);
	ctx->user_ip4 = ip;
	ctx->user_port = k->port;
}

/* sock_load6 is sock_load4 for an IPv6 socket. An IPv4-mapped address
 * becomes an IPv4 key, and sock_load6 returns 1 for it, 0 otherwise. */
static __always_inline int sock_load6(struct bpf_sock_addr *ctx, struct lb_frontend_key *k)
{
	__u32 ip[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	__u32 port = ctx->user_port;
	int mapped = !ip[0] && !ip[1] && ip[2] == bpf_htonl(0xffff);

	__builtin_memset(k, 0, sizeof(*k));
	if (mapped) {
		__builtin_memcpy(k->addr, &ip[3], 4);
		k->family = 4;
	} else {
		__builtin_memcpy(k->addr, ip, 16);
		k->family = 6;
	}
	k->port = (__be16)port;
	k->proto = ctx->protocol;
	return mapped;
}

static __always_inline void sock_store6(struct bpf_sock_addr *ctx, const struct lb_frontend_key *k, int mapped)
{
	__u32 ip[4];

	if (mapped) {
		ip[0] = 0;
		ip[1] = 0;
		ip[2] = bpf_htonl(0xffff);
		__builtin_memcpy(&ip[3], k->addr, 4);
	} else {
		__builtin_memcpy(ip, k->addr, 16);
	}
	ctx->user_ip6[0] = ip[0];
	ctx->user_ip6[1] = ip[1];
	ctx->user_ip6[2] = ip[2];
	ctx->user_ip6[3] = ip[3];
	ctx->user_port = k->port;
}

/* sock_client names the client for affinity: the socket's network
 * namespace, as an address no real client has, the namespace's cookie in
 * the discard-only prefix 100::/64 (RFC 6666). The affinity map is shared
 * with the per-packet translation, whose keys are client addresses. */
static __always_inline void sock_client(struct bpf_sock_addr *ctx, __u8 *client)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);

	__builtin_memset(client, 0, 16);
	client[0] = 0x01;
	__builtin_memcpy(client + 8, &cookie, 8);
}

/* sock_forward sends the socket to a backend when dst is a frontend
 * translated at socket level: dst becomes the backend's address and port,
 * and the socket (by its cookie) remembers the frontend for sock_reverse.
 * It returns 1 when it translated, 0 when dst is no such frontend, and -1
 * when the frontend has no backend that takes new flows. */
static __always_inline int sock_forward(struct bpf_sock_addr *ctx, struct lb_frontend_key *dst)
{
	struct lb_sock_key rk = {};
	struct lb_backend *b = NULL;
	struct lb_frontend *fe;
	__u8 client[16];
	__u32 id;

	if (dst->proto != IPPROTO_TCP && dst->proto != IPPROTO_UDP)
		return 0;
	fe = bpf_map_lookup_elem(&lb_frontends, dst);
	if (!fe || !(fe->flags & LB_F_SOCKET))
		return 0;
	sock_client(ctx, client);
	id = lb_select(fe, client, bpf_get_prandom_u32(), &b);
	/* No NAT46 or 64: a backend of the other family is no backend for
	 * this socket. */
	if (!id || b->family != dst->family)
		return -1;
	lb_count(b->counter, 0, 1);
	if (fe->affinity)
		lb_remember(fe->service, client, id);

	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.addr, b->addr, 16);
	rk.port = b->port;
	rk.family = b->family;
	/* The LRU makes room by itself; should the update fail all the same,
	 * the socket works and only sees the backend as its peer. */
	bpf_map_update_elem(&lb_sock_revnat, &rk, dst, BPF_ANY);

	__builtin_memcpy(dst->addr, b->addr, 16);
	dst->port = b->port;
	return 1;
}

/* sock_reverse makes peer (the socket's peer, or where a datagram came
 * from) the frontend when it is a backend that sock_forward sent this
 * socket to, and returns 1 then. While the frontend is gone or no longer
 * translated at socket level the backend shows as it is, and the record
 * goes. */
static __always_inline int sock_reverse(struct bpf_sock_addr *ctx, struct lb_frontend_key *peer)
{
	struct lb_sock_key rk = {.port = peer->port, .family = peer->family};
	struct lb_frontend_key *fk;
	struct lb_frontend *fe;

	__builtin_memcpy(rk.addr, peer->addr, 16);
	rk.cookie = bpf_get_socket_cookie(ctx);
	fk = bpf_map_lookup_elem(&lb_sock_revnat, &rk);
	if (!fk)
		return 0;
	fe = bpf_map_lookup_elem(&lb_frontends, fk);
	if (!fe || !(fe->flags & LB_F_SOCKET)) {
		bpf_map_delete_elem(&lb_sock_revnat, &rk);
		return 0;
	}
	__builtin_memcpy(peer->addr, fk->addr, 16);
	peer->port = fk->port;
	return 1;
}

static __always_inline int forward4(struct bpf_sock_addr *ctx)
{
	struct lb_frontend_key k;
	int ret;

	sock_load4(ctx, &k);
	ret = sock_forward(ctx, &k);
	if (ret < 0)
		return SYS_REJECT;
	if (ret > 0)
		sock_store4(ctx, &k);
	return SYS_PROCEED;
}

static __always_inline int forward6(struct bpf_sock_addr *ctx)
{
	struct lb_frontend_key k;
	int mapped, ret;

	mapped = sock_load6(ctx, &k);
	ret = sock_forward(ctx, &k);
	if (ret < 0)
		return SYS_REJECT;
	if (ret > 0)
		sock_store6(ctx, &k, mapped);
	return SYS_PROCEED;
}

static __always_inline int reverse4(struct bpf_sock_addr *ctx)
{
	struct lb_frontend_key k;

	sock_load4(ctx, &k);
	if (sock_reverse(ctx, &k))
		sock_store4(ctx, &k);
	return SYS_PROCEED;
}

static __always_inline int reverse6(struct bpf_sock_addr *ctx)
{
	struct lb_frontend_key k;
	int mapped;

	mapped = sock_load6(ctx, &k);
	if (sock_reverse(ctx, &k))
		sock_store6(ctx, &k, mapped);
	return SYS_PROCEED;
}

/* connect: TCP, and UDP sockets that connect. */
SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx);
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx);
}

/* sendmsg: each datagram of an unconnected UDP socket (a connected one
 * was translated at connect). */
SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx);
}

SEC("cgroup/sendmsg6")
int sendmsg6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx);
}

/* recvmsg: the source address a UDP socket reads with a datagram. */
SEC("cgroup/recvmsg4")
int recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

SEC("cgroup/recvmsg6")
int recvmsg6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

/* getpeername: the peer of a connected socket (Linux 5.8). */
SEC("cgroup/getpeername4")
int getpeername4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

SEC("cgroup/getpeername6")
int getpeername6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

char __license[] SEC("license") = "GPL";
