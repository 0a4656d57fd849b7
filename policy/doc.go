// Package policy holds the ingress and egress rules of an endpoint: peers by
// identity, CIDR or reserved entity, protocols, ports, port ranges and ICMP
// types, to allow or deny. The datapath decides a packet in a few hash
// lookups whatever the number of rules.
//
// Compile checks a Policy and turns it into policy map entries, with no
// datapath; Resolve gives the entries an endpoint and the identities of
// their CIDRs; Diff and Plan say what changes from one set of entries to
// another, Plan in an order that lets no packet meet a policy that is
// neither. Apply does all of it on a datapath.
//
// # Semantics
//
// A packet is decided in one direction of one endpoint (egress for what it
// sends, ingress for what it receives) by its remote identity, protocol and
// port (ICMP: type and code). The remote identity is the ipcache's: the
// identity of a workload, 1 for the host, the CIDR identity of the most
// specific prefix that holds an address outside the cluster, 2 (world) for
// an address with no entry.
//
//	case                                             verdict
//	-----------------------------------------------  ------------------------------------------
//	no policy in the direction (nil slice)           allowed, by no rule
//	a policy, no rule matches (an empty slice has    denied (POLICY_DENIED), by no rule
//	  no rule to match)
//	an allow rule matches, no deny rule does         allowed
//	a deny rule matches                              denied, whatever allow rules match, their
//	                                                   order or how specific they are
//	Audit set and the policy denies                  passes, reported as audited
//
//	peer                matches a packet whose remote end
//	------------------  ---------------------------------------------------------------
//	Identity            has that identity
//	CIDR, Except        has an address inside CIDR and outside every Except: the most
//	                      specific prefix holding the address gives it its identity, so
//	                      an except is a more specific prefix with another identity, and
//	                      an address with a workload identity (a local endpoint, a remote
//	                      workload) is matched by that identity, not by a CIDR
//	World               is outside the cluster: no ipcache entry (identity 2) or a CIDR
//	                      identity (CIDRIdentityFirst to CIDRIdentityLast)
//	Host                is the node (identity 1)
//	All, or no peers    has any identity
//
//	port                matches a packet
//	------------------  ---------------------------------------------------------------
//	no ports            of any protocol to any port
//	AnyProtocol         of any protocol to any port
//	TCP, UDP, SCTP      of that protocol: to any port (Port 0), to Port (EndPort 0), or
//	                      to Port through EndPort
//	ICMP, ICMPv6        of that protocol (ICMP is IPv4's, ICMPv6 IPv6's): any type, the
//	                      type ICMPType with any code, or ICMPType and ICMPCode
//
// A policy decides the first packet of a flow only. Its replies, and the
// ICMP errors it causes, pass because connection tracking knows the flow:
// the policy is not looked up for them. When Apply replaces a policy, the
// tracked flows the new one no longer allows are forgotten, so their next
// packets meet it and are dropped; the flows it still allows go on.
//
// # Which rule decides
//
// A verdict names the rule that decided it, by its index in its direction,
// for counters and events: a deny names a deny rule that matched, an allow
// an allow rule that matched, and NoRule is named when there is no policy
// or no rule matched. When several rules of that action match, the most
// specific decides, in this order:
//
//   - the peer: an Identity, Host, a CIDR, or World for an address with no
//     ipcache entry; then World for an address with a CIDR identity; then
//     All or no peers;
//   - the protocol: a protocol before any protocol;
//   - the port: the rule whose port key is longer, that is a single port
//     before the part of a range holding the port (a range is cut into
//     aligned blocks of 2^n ports; the smaller the block, the more
//     specific) before any port, and ICMP type and code before type before
//     any type;
//   - the lower index.
//
// That is the order in which the datapath probes its map.
//
// # Map entries
//
// Compile turns every pair of a rule's peers and port keys into a policy
// map key (bpf/lib/policy.h): the peer's identity (0 for All or no peers, 2
// for World, 1 for Host), the protocol (0 for any) and a port with its
// prefix length. A single port is prefix 16; a range is the fewest aligned
// power-of-two blocks that cover it exactly; any port is prefix 0; an ICMP
// type is type<<8 with prefix 8, type and code type<<8|code with prefix 16.
// Where rules give the same key a deny wins over an allow, and among
// equals the lower index. Each direction with a policy also gets a meta
// value that says which kinds of entries exist, so the datapath probes only
// those.
//
// A CIDR's identity is the datapath's to give (one per prefix, shared by
// every policy that names it), so compiled entries name a CIDR peer by its
// prefix until Resolve is handed the identities. A packet carries the
// identity of the most specific prefix that holds its address, so a CIDR
// peer's entries name, besides its own identity, those of the more specific
// prefixes the ipcache holds inside it, save those inside its excepts: a
// rule for 10.0.0.0/8 still matches 10.1.2.3 once another rule has named
// 10.1.0.0/16, and a deny of 10.0.0.0/8 still denies it.
package policy
