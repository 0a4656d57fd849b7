/* Why a packet was dropped, and where a traced packet was seen.
 *
 * These numbers are a stable interface: they appear in events, counters and
 * the CLI. Never renumber or reuse one; add new ones at the end. The Go list
 * in datapath/reason.go must name every one (a test compares the two). */
#pragma once

enum drop_reason {
	REASON_FORWARDED = 0,        /* not a drop: counts packets let through */
	REASON_MALFORMED = 1,        /* headers truncated or inconsistent */
	REASON_UNSUPPORTED_L3 = 2,   /* EtherType the datapath does not handle */
	REASON_SPOOFED_SOURCE_IP = 3,
	REASON_SPOOFED_SOURCE_MAC = 4,
	REASON_UNKNOWN_ENDPOINT = 5, /* packet on an interface with no endpoint */
	REASON_POLICY_DENIED = 6,
	REASON_NO_BACKEND = 7,
	REASON_PREFILTER_DENIED = 8,
	REASON_REDIRECT_FAILED = 9,  /* the destination's interface is gone */
	REASON_VLAN_TAGGED = 10,     /* a VLAN-tagged frame from an endpoint */
	REASON_TUNNELED = 11,        /* an IP protocol endpoints may not send: an encapsulation (its inner source is unchecked) or one not on the list */
	REASON_ENDPOINT_NOT_READY = 12, /* the destination endpoint is being created or deleted */
	REASON_NO_CONNECTION = 13,   /* a TCP segment other than a SYN, of no connection conntrack knows */
	REASON_FRAG_NO_FIRST = 14,   /* a later fragment whose first fragment was not seen */
	REASON_NODE_UNREACHABLE = 15, /* a destination in the cluster's pod ranges, on no node the datapath knows */
	REASON_UNKNOWN_NODE = 16,    /* an overlay packet from an underlay address of no node */
	REASON_TUNNEL_IDENTITY = 17, /* an overlay packet whose VNI holds no identity a workload of another node may have */
	REASON_SPOOFED_NODE_SOURCE = 18, /* from another node, a source that node does not own; from outside, a local pod's */
	REASON_IDENTITY_TOO_LARGE = 19, /* a source identity the VNI's 24 bits cannot carry */
	REASON_NO_LOCAL_ENDPOINT = 20, /* an overlay packet for an address no local endpoint has */
	REASON_NO_ROUTE = 21,        /* no route, or no neighbour, towards the node of the destination */
	REASON_SNAT_NO_PORT = 22,    /* masquerading found no free port towards the destination */
	REASON_SNAT_MAP_FULL = 23,   /* the masquerading map has no room for another flow */
	REASON_FRAG_NEEDED = 24,     /* larger than the tunnel carries: answered with ICMP fragmentation needed or packet too big */
	REASON_NO_KEY = 25,          /* encryption between nodes is on and has no key (IPsec), or the node none (WireGuard) */
	REASON_ICMP_UNRELATED = 26,  /* an ICMP error to an endpoint quoting a packet it did not send, or a flow of its conntrack does not know */
	REASON_MAX = 255,
};

enum trace_point {
	TRACE_FROM_ENDPOINT = 1,
	TRACE_TO_ENDPOINT = 2,
	TRACE_TO_STACK = 3,
	TRACE_FROM_NETDEV = 4,
	TRACE_TO_NETDEV = 5,
	TRACE_FROM_OVERLAY = 6,
	TRACE_TO_OVERLAY = 7,
	TRACE_TO_ENCRYPT = 8, /* handed to IPsec or WireGuard, towards another node */
};
