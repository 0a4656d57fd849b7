package policy

import (
	"fmt"
	"net/netip"

	"github.com/sluicedp/sluice/datapath"
)

// Policy is what an endpoint may receive (Ingress) and send (Egress).
type Policy struct {
	// Ingress and Egress are the rules of each direction. A nil slice is no
	// policy in that direction: everything is allowed. An empty, non-nil
	// slice is a policy with no rule: everything is denied.
	Ingress, Egress []Rule
	// Audit lets the packets the policy would drop through; they are
	// reported as audited.
	Audit bool
}

// Rule allows or denies the packets of some peers to some ports.
type Rule struct {
	Action Action
	// Peers are the remote ends the rule matches; none is any peer.
	Peers []Peer
	// Ports are the protocols and ports the rule matches; none is any
	// protocol and port.
	Ports []Port
}

// Action is what a rule does with the packets it matches.
type Action uint8

const (
	// Allow lets the packets through, unless a deny rule matches them too.
	Allow Action = iota
	// Deny drops the packets, whatever allow rules match them.
	Deny
)

func (a Action) String() string {
	switch a {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	}
	return fmt.Sprintf("action(%d)", uint8(a))
}

// Peer is the remote end of a packet. Exactly one of Identity, CIDR and
// Reserved is set.
type Peer struct {
	// Identity is a workload identity, at least datapath.MinIdentity and
	// outside the CIDR identities.
	Identity datapath.Identity
	// CIDR is an IPv4 or IPv6 prefix, canonical (its host bits zero).
	CIDR netip.Prefix
	// Except are prefixes inside CIDR, more specific and canonical, whose
	// addresses the peer leaves out.
	Except []netip.Prefix
	// Reserved is World, Host, All or RemoteNode.
	Reserved Reserved
}

// Reserved names a peer by what it is rather than by identity or address.
type Reserved uint8

const (
	// World is every address outside the cluster: one with no ipcache
	// entry (datapath.IdentityWorld) or one with a CIDR identity.
	World Reserved = iota + 1
	// Host is the node itself (datapath.IdentityHost).
	Host
	// All is every peer, whatever its identity.
	All
	// RemoteNode is every other node of the cluster
	// (datapath.IdentityRemoteNode): their addresses, and what they send
	// themselves over VXLAN.
	RemoteNode
)

func (r Reserved) String() string {
	switch r {
	case 0:
		return "none"
	case World:
		return "world"
	case Host:
		return "host"
	case All:
		return "all"
	case RemoteNode:
		return "remote-node"
	}
	return fmt.Sprintf("reserved(%d)", uint8(r))
}

// Protocol is an L4 protocol by its IP protocol number.
type Protocol uint8

// The protocols a Port may name.
const (
	AnyProtocol Protocol = 0
	ICMP        Protocol = 1
	TCP         Protocol = 6
	UDP         Protocol = 17
	ICMPv6      Protocol = 58
	SCTP        Protocol = 132
)

func (p Protocol) String() string {
	switch p {
	case AnyProtocol:
		return "any protocol"
	case ICMP:
		return "ICMP"
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	case ICMPv6:
		return "ICMPv6"
	case SCTP:
		return "SCTP"
	}
	return fmt.Sprintf("protocol %d", uint8(p))
}

// hasPorts reports whether the protocol has ports (TCP, UDP, SCTP).
func (p Protocol) hasPorts() bool { return p == TCP || p == UDP || p == SCTP }

// isICMP reports whether the protocol has ICMP types and codes.
func (p Protocol) isICMP() bool { return p == ICMP || p == ICMPv6 }

// Port is a protocol and, for TCP, UDP and SCTP, a port or range of ports;
// for ICMP and ICMPv6, a type and code.
type Port struct {
	Protocol Protocol
	// Port is one port, or the first of the range Port..EndPort when
	// EndPort is set; 0 is any port (then EndPort is 0 too).
	Port, EndPort uint16
	// ICMPType is the ICMP or ICMPv6 type, nil for any; ICMPCode narrows
	// it to one code and needs ICMPType.
	ICMPType, ICMPCode *uint8
}

// Bounds of the identities the datapath gives CIDR prefixes
// (CIDR_IDENTITY_FIRST and CIDR_IDENTITY_LAST in bpf/lib/policy.h). A
// packet with one of them comes from or goes to an address outside the
// cluster, so World matches it.
const (
	CIDRIdentityFirst datapath.Identity = 1 << 24
	CIDRIdentityLast  datapath.Identity = 2<<24 - 1
)

// NoRule is the rule a verdict names when no rule decided it
// (POLICY_NO_RULE): there is no policy in that direction, or no rule
// matched.
const NoRule = 0xffff

// MaxRules is the most rules one direction may have: rule indexes are 16
// bits and NoRule is taken.
const MaxRules = NoRule

// validate checks everything Compile needs, one direction at a time.
func (p Policy) validate() error {
	for _, d := range []struct {
		dir   datapath.Direction
		rules []Rule
	}{{datapath.Ingress, p.Ingress}, {datapath.Egress, p.Egress}} {
		if len(d.rules) > MaxRules {
			return fmt.Errorf("policy: %s: %d rules, at most %d (rule indexes are 16 bits): %w",
				d.dir, len(d.rules), MaxRules, datapath.ErrInvalid)
		}
		for i, r := range d.rules {
			if err := r.validate(); err != nil {
				return fmt.Errorf("policy: %s rule %d: %s: %w", d.dir, i, err, datapath.ErrInvalid)
			}
		}
	}
	return nil
}

// validate returns what is wrong with the rule, as a message without the
// sentinel.
func (r Rule) validate() error {
	if r.Action != Allow && r.Action != Deny {
		return fmt.Errorf("%s: want Allow or Deny", r.Action)
	}
	for j, peer := range r.Peers {
		if err := peer.validate(); err != nil {
			return fmt.Errorf("peer %d: %w", j, err)
		}
	}
	for j, port := range r.Ports {
		if err := port.validate(); err != nil {
			return fmt.Errorf("port %d: %w", j, err)
		}
	}
	return nil
}

func (p Peer) validate() error {
	set := 0
	for _, isSet := range []bool{p.Identity != 0, p.CIDR != netip.Prefix{}, p.Reserved != 0} {
		if isSet {
			set++
		}
	}
	switch {
	case len(p.Except) > 0 && p.CIDR == netip.Prefix{}:
		return fmt.Errorf("an except without a CIDR")
	case set == 0:
		return fmt.Errorf("names no peer: set one of Identity, CIDR and Reserved")
	case set > 1:
		return fmt.Errorf("sets more than one of Identity (%s), CIDR (%s) and Reserved (%s): set exactly one",
			p.Identity, p.CIDR, p.Reserved)
	case p.Reserved > RemoteNode:
		return fmt.Errorf("%s: want World, Host, All or RemoteNode", p.Reserved)
	case p.Identity != 0 && p.Identity < datapath.MinIdentity:
		return fmt.Errorf("identity %s is reserved (below %d): name it with Reserved (World, Host, All or RemoteNode)",
			p.Identity, datapath.MinIdentity)
	case p.Identity >= CIDRIdentityFirst && p.Identity <= CIDRIdentityLast:
		return fmt.Errorf("identity %s is a CIDR identity, which the datapath gives prefixes: name the CIDR instead",
			p.Identity)
	case p.CIDR != netip.Prefix{}:
		if err := checkPrefix("CIDR", p.CIDR); err != nil {
			return err
		}
	}
	for _, e := range p.Except {
		if err := checkPrefix("except", e); err != nil {
			return err
		}
		switch {
		case e.Addr().Is4() != p.CIDR.Addr().Is4():
			return fmt.Errorf("except %s is not of the address family of CIDR %s", e, p.CIDR)
		case !p.CIDR.Contains(e.Addr()):
			return fmt.Errorf("except %s is outside CIDR %s", e, p.CIDR)
		case e.Bits() <= p.CIDR.Bits():
			return fmt.Errorf("except %s is not more specific than CIDR %s", e, p.CIDR)
		}
	}
	return nil
}

// checkPrefix checks that a CIDR or except prefix is valid and canonical.
func checkPrefix(what string, p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return fmt.Errorf("%s %s is not a valid prefix", what, p)
	case p.Addr().Is4In6():
		return fmt.Errorf("%s %s is IPv4-mapped: write it as an IPv4 prefix", what, p)
	case p != p.Masked():
		return fmt.Errorf("%s %s is not canonical: want %s", what, p, p.Masked())
	}
	return nil
}

func (p Port) validate() error {
	switch {
	case !p.Protocol.hasPorts() && !p.Protocol.isICMP() && p.Protocol != AnyProtocol:
		return fmt.Errorf("%s: want TCP, UDP, SCTP, ICMP, ICMPv6 or AnyProtocol", p.Protocol)
	case !p.Protocol.hasPorts() && (p.Port != 0 || p.EndPort != 0):
		return fmt.Errorf("port %d (EndPort %d) on %s, which has no ports", p.Port, p.EndPort, p.Protocol)
	case !p.Protocol.isICMP() && (p.ICMPType != nil || p.ICMPCode != nil):
		return fmt.Errorf("ICMP type or code on %s", p.Protocol)
	case p.ICMPCode != nil && p.ICMPType == nil:
		return fmt.Errorf("ICMP code %d without a type", *p.ICMPCode)
	case p.Port == 0 && p.EndPort != 0:
		return fmt.Errorf("EndPort %d with Port 0, which is any port: set Port to the first of the range", p.EndPort)
	case p.EndPort != 0 && p.EndPort < p.Port:
		return fmt.Errorf("EndPort %d below Port %d", p.EndPort, p.Port)
	}
	return nil
}
