/* Closing the connected UDP sockets that the socket programs (bpf/sock.c)
 * sent to a backend that left its service: a connected UDP socket chose
 * its backend once, at connect, and would keep sending to it forever. User space names the (frontend, backend) pairs to
 * close in sock_destroy_targets and runs the iterator of
 * bpf/sock_destroy.c over the sockets of each network namespace. */
#pragma once

#include "service.h"

#define SOCK_DESTROY_TARGETS 1024

/* A backend that sockets sent to it for a frontend must leave. */
struct sock_destroy_key {
	struct lb_frontend_key frontend;
	__u8 addr[16]; /* the backend; IPv4 in the first 4 bytes */
	__be16 port;
	__u8 family; /* 4 or 6, as the frontend's */
	__u8 pad;
};

/* The targets of a run, written by user space before it; the value is
 * unused. Private to the loaded iterator, never pinned. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SOCK_DESTROY_TARGETS);
	__type(key, struct sock_destroy_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} sock_destroy_targets SEC(".maps");
