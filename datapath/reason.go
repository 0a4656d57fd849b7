package datapath

import (
	"fmt"

	"github.com/sluicedp/sluice/internal/bpfobj"
)

// Reason says why a packet was dropped. The numbers are stable (they are
// shared with the BPF programs, events and the CLI) and never reused.
// ReasonForwarded is not a drop: it counts packets that were let through.
type Reason uint8

const (
	ReasonForwarded        = Reason(bpfobj.TypesDropReasonREASON_FORWARDED)
	ReasonMalformed        = Reason(bpfobj.TypesDropReasonREASON_MALFORMED)
	ReasonUnsupportedL3    = Reason(bpfobj.TypesDropReasonREASON_UNSUPPORTED_L3)
	ReasonSpoofedSourceIP  = Reason(bpfobj.TypesDropReasonREASON_SPOOFED_SOURCE_IP)
	ReasonSpoofedSourceMAC = Reason(bpfobj.TypesDropReasonREASON_SPOOFED_SOURCE_MAC)
	ReasonUnknownEndpoint  = Reason(bpfobj.TypesDropReasonREASON_UNKNOWN_ENDPOINT)
	ReasonPolicyDenied     = Reason(bpfobj.TypesDropReasonREASON_POLICY_DENIED)
	ReasonNoBackend        = Reason(bpfobj.TypesDropReasonREASON_NO_BACKEND)
	ReasonPrefilterDenied  = Reason(bpfobj.TypesDropReasonREASON_PREFILTER_DENIED)
	ReasonRedirectFailed   = Reason(bpfobj.TypesDropReasonREASON_REDIRECT_FAILED)
	ReasonVLANTagged       = Reason(bpfobj.TypesDropReasonREASON_VLAN_TAGGED)
	ReasonTunneled         = Reason(bpfobj.TypesDropReasonREASON_TUNNELED)
	ReasonEndpointNotReady = Reason(bpfobj.TypesDropReasonREASON_ENDPOINT_NOT_READY)
	ReasonNoConnection     = Reason(bpfobj.TypesDropReasonREASON_NO_CONNECTION)
	ReasonFragNoFirst      = Reason(bpfobj.TypesDropReasonREASON_FRAG_NO_FIRST)

	ReasonNodeUnreachable   = Reason(bpfobj.TypesDropReasonREASON_NODE_UNREACHABLE)
	ReasonUnknownNode       = Reason(bpfobj.TypesDropReasonREASON_UNKNOWN_NODE)
	ReasonTunnelIdentity    = Reason(bpfobj.TypesDropReasonREASON_TUNNEL_IDENTITY)
	ReasonSpoofedNodeSource = Reason(bpfobj.TypesDropReasonREASON_SPOOFED_NODE_SOURCE)
	ReasonIdentityTooLarge  = Reason(bpfobj.TypesDropReasonREASON_IDENTITY_TOO_LARGE)
	ReasonNoLocalEndpoint   = Reason(bpfobj.TypesDropReasonREASON_NO_LOCAL_ENDPOINT)
	ReasonNoRoute           = Reason(bpfobj.TypesDropReasonREASON_NO_ROUTE)
	ReasonSNATNoPort        = Reason(bpfobj.TypesDropReasonREASON_SNAT_NO_PORT)
	ReasonSNATMapFull       = Reason(bpfobj.TypesDropReasonREASON_SNAT_MAP_FULL)
	ReasonFragNeeded        = Reason(bpfobj.TypesDropReasonREASON_FRAG_NEEDED)
	ReasonNoKey             = Reason(bpfobj.TypesDropReasonREASON_NO_KEY)
	ReasonICMPUnrelated     = Reason(bpfobj.TypesDropReasonREASON_ICMP_UNRELATED)
)

// reasonNames holds every reason's name and what it means; a test checks it
// against the enum compiled into the BPF objects.
var reasonNames = map[Reason]struct{ name, doc string }{
	ReasonForwarded:        {"FORWARDED", "not a drop: the packet was let through"},
	ReasonMalformed:        {"MALFORMED", "headers truncated or inconsistent"},
	ReasonUnsupportedL3:    {"UNSUPPORTED_L3", "EtherType the datapath does not handle"},
	ReasonSpoofedSourceIP:  {"SPOOFED_SOURCE_IP", "source IP is not the sending endpoint's"},
	ReasonSpoofedSourceMAC: {"SPOOFED_SOURCE_MAC", "source MAC is not the sending endpoint's"},
	ReasonUnknownEndpoint:  {"UNKNOWN_ENDPOINT", "packet on an interface that has no endpoint"},
	ReasonPolicyDenied:     {"POLICY_DENIED", "no policy rule allows it, or a deny rule matched"},
	ReasonNoBackend:        {"NO_BACKEND", "service has no usable backend"},
	ReasonPrefilterDenied:  {"PREFILTER_DENIED", "source is in the CIDR prefilter"},
	ReasonRedirectFailed:   {"REDIRECT_FAILED", "the destination's interface is gone"},
	ReasonVLANTagged:       {"VLAN_TAGGED", "a VLAN-tagged frame from an endpoint"},
	ReasonTunneled:         {"TUNNELED", "an IP protocol endpoints may not send: an encapsulation such as IP-in-IP, GRE or EtherIP (the inner source cannot be checked), or any protocol not on the list"},
	ReasonEndpointNotReady: {"ENDPOINT_NOT_READY", "the destination endpoint is being created or deleted"},
	ReasonFragNoFirst:      {"FRAG_NO_FIRST", "a later fragment whose first fragment was not seen (out of order, or never sent): it has no ports to be decided by"},
	ReasonNoConnection:     {"NO_CONNECTION", "a TCP segment other than a SYN, of no connection conntrack knows (never opened, revoked by a policy, expired or reset)"},

	ReasonNodeUnreachable:   {"NODE_UNREACHABLE", "the destination is in the cluster's pod ranges but on no node the datapath knows (a node deleted, or never added)"},
	ReasonUnknownNode:       {"UNKNOWN_NODE", "an overlay packet from an underlay address that is no node's"},
	ReasonTunnelIdentity:    {"TUNNEL_IDENTITY", "an overlay packet whose VNI holds a reserved identity, a node-local one (a CIDR's), or none"},
	ReasonSpoofedNodeSource: {"SPOOFED_NODE_SOURCE", "a packet from another node whose source is outside that node's pod CIDRs, or one from outside that claims a local pod's address"},
	ReasonIdentityTooLarge:  {"IDENTITY_TOO_LARGE", "the sender's identity does not fit the 24 bits of the VXLAN network identifier"},
	ReasonNoLocalEndpoint:   {"NO_LOCAL_ENDPOINT", "an overlay packet for an address no local endpoint has"},
	ReasonNoRoute:           {"NO_ROUTE", "the kernel has no route, or no neighbour, towards the node of the destination"},
	ReasonSNATNoPort:        {"SNAT_NO_PORT", "masquerading found no free port of the node towards the destination (61000-65535 for each destination address, port and protocol)"},
	ReasonSNATMapFull:       {"SNAT_MAP_FULL", "the masquerading map has no room for another flow (Limits.Conntrack)"},
	ReasonFragNeeded:        {"FRAG_NEEDED", "larger than the tunnel carries (the endpoints' MTU): answered with ICMP fragmentation needed or ICMPv6 packet too big, so that path MTU discovery works"},
	ReasonNoKey:             {"NO_KEY", "encryption between nodes is on, and there is no IPsec key yet (node.SetIPsecKeys) or the node's ID does not fit the mark: the packet is not sent in clear"},
	ReasonICMPUnrelated:     {"ICMP_UNRELATED", "an ICMP error to an endpoint that quotes a packet the endpoint did not send, or a flow of the endpoint's conntrack does not know: forged, or about a flow long gone"},
}

// String returns the reason's stable name, such as "POLICY_DENIED".
func (r Reason) String() string {
	if n, ok := reasonNames[r]; ok {
		return n.name
	}
	return fmt.Sprintf("REASON_%d", uint8(r))
}

// Doc says in a few words what the reason means.
func (r Reason) Doc() string { return reasonNames[r].doc }

// Reasons lists every known reason in numeric order.
func Reasons() []Reason {
	var out []Reason
	for r := range 256 {
		if _, ok := reasonNames[Reason(r)]; ok {
			out = append(out, Reason(r))
		}
	}
	return out
}

// TracePoint says where a traced packet was seen.
type TracePoint uint8

const (
	TraceFromEndpoint = TracePoint(bpfobj.TypesTracePointTRACE_FROM_ENDPOINT)
	TraceToEndpoint   = TracePoint(bpfobj.TypesTracePointTRACE_TO_ENDPOINT)
	TraceToStack      = TracePoint(bpfobj.TypesTracePointTRACE_TO_STACK)
	TraceFromNetdev   = TracePoint(bpfobj.TypesTracePointTRACE_FROM_NETDEV)
	TraceToNetdev     = TracePoint(bpfobj.TypesTracePointTRACE_TO_NETDEV)
	TraceFromOverlay  = TracePoint(bpfobj.TypesTracePointTRACE_FROM_OVERLAY)
	TraceToOverlay    = TracePoint(bpfobj.TypesTracePointTRACE_TO_OVERLAY)
	TraceToEncrypt    = TracePoint(bpfobj.TypesTracePointTRACE_TO_ENCRYPT)
)

var traceNames = map[TracePoint]string{
	TraceFromEndpoint: "FROM_ENDPOINT",
	TraceToEndpoint:   "TO_ENDPOINT",
	TraceToStack:      "TO_STACK",
	TraceFromNetdev:   "FROM_NETDEV",
	TraceToNetdev:     "TO_NETDEV",
	TraceFromOverlay:  "FROM_OVERLAY",
	TraceToOverlay:    "TO_OVERLAY",
	TraceToEncrypt:    "TO_ENCRYPT",
}

func (p TracePoint) String() string {
	if n, ok := traceNames[p]; ok {
		return n
	}
	return fmt.Sprintf("TRACE_%d", uint8(p))
}

// Direction is a packet's direction relative to the endpoint or node it
// concerns: Ingress goes towards it, Egress leaves it.
type Direction uint8

const (
	Ingress = Direction(bpfobj.TypesDirectionDIR_INGRESS)
	Egress  = Direction(bpfobj.TypesDirectionDIR_EGRESS)
)

func (d Direction) String() string {
	if d == Egress {
		return "egress"
	}
	return "ingress"
}
