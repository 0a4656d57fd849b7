package policy

import (
	"cmp"
	"net/netip"

	"github.com/sluicedp/sluice/datapath"
)

// This file decides packets from the semantics in the package doc, rule
// by rule, without map entries: the fuzzer holds the compiled entries and
// the datapath's lookup to it.

// cidrOfFunc returns the prefix that gave a CIDR identity, and false for
// any other identity.
type cidrOfFunc func(datapath.Identity) (netip.Prefix, bool)

// specificity ranks a match of a rule: lower is more specific (see "Which
// rule decides" in the package doc).
type specificity struct {
	peer  int // 0: the identity itself, 1: World for a CIDR address, 2: any peer
	proto int // 0: the protocol, 1: any protocol
	port  int // 16 minus the length of the port key
	rule  int
}

func (s specificity) compare(o specificity) int {
	return cmp.Or(cmp.Compare(s.peer, o.peer), cmp.Compare(s.proto, o.proto),
		cmp.Compare(s.port, o.port), cmp.Compare(s.rule, o.rule))
}

// refVerdict decides a new flow in direction dir with the remote identity
// (never 0: an address with no ipcache entry is world), the protocol and
// the port (ICMP: type<<8 | code). A remote address is modelled by its
// identity and, for a CIDR identity, by the prefix that gave it: the most
// specific known prefix holding the address, so a known prefix holds the
// address exactly when it holds that prefix.
func refVerdict(p Policy, dir datapath.Direction, remote datapath.Identity, cidrOf cidrOfFunc,
	proto Protocol, port uint16) policyResult {
	rules := p.Ingress
	if dir == datapath.Egress {
		rules = p.Egress
	}
	if rules == nil {
		return policyResult{verdict: policyAllowed, rule: NoRule}
	}
	var best [2]*specificity // by Action
	for i, r := range rules {
		peer, ok := matchPeers(r.Peers, remote, cidrOf)
		if !ok {
			continue
		}
		protoRank, portRank, ok := matchPorts(r.Ports, proto, port)
		if !ok {
			continue
		}
		s := specificity{peer: peer, proto: protoRank, port: portRank, rule: i}
		if b := best[r.Action]; b == nil || s.compare(*b) < 0 {
			best[r.Action] = &s
		}
	}
	res := policyResult{verdict: policyDenied, rule: NoRule}
	switch {
	case best[Deny] != nil:
		res.rule = uint16(best[Deny].rule)
	case best[Allow] != nil:
		return policyResult{verdict: policyAllowed, rule: uint16(best[Allow].rule)}
	}
	if p.Audit {
		res.verdict = policyAudited
	}
	return res
}

// matchPeers reports whether one of the peers (any peer if none) matches
// the remote end, and the most specific match.
func matchPeers(peers []Peer, remote datapath.Identity, cidrOf cidrOfFunc) (int, bool) {
	if len(peers) == 0 {
		return 2, true
	}
	prefix, isCIDR := cidrOf(remote)
	best, found := 2, false
	for _, p := range peers {
		rank := -1
		switch {
		case p.Identity != 0 && p.Identity == remote:
			rank = 0
		case p.Reserved == Host && remote == datapath.IdentityHost:
			rank = 0
		case p.Reserved == World && remote == datapath.IdentityWorld:
			rank = 0
		case p.Reserved == RemoteNode && remote == datapath.IdentityRemoteNode:
			rank = 0
		case p.Reserved == World && isCIDR:
			rank = 1
		case p.Reserved == All:
			rank = 2
		case p.CIDR.IsValid() && isCIDR && holds(p.CIDR, prefix):
			rank = 0
			for _, e := range p.Except {
				if holds(e, prefix) {
					rank = -1
				}
			}
		}
		if rank >= 0 {
			best, found = min(best, rank), true
		}
	}
	return best, found
}

// holds reports whether prefix p holds prefix q.
func holds(p, q netip.Prefix) bool {
	return p.Addr().Is4() == q.Addr().Is4() && p.Bits() <= q.Bits() && p.Contains(q.Addr())
}

// matchPorts reports whether one of the ports (any if none) matches the
// protocol and port, and the most specific match.
func matchPorts(ports []Port, proto Protocol, port uint16) (protoRank, portRank int, ok bool) {
	if len(ports) == 0 {
		return 1, 16, true
	}
	protoRank, portRank = 1, 16
	for _, p := range ports {
		pr, po := 0, -1
		switch {
		case p.Protocol == AnyProtocol:
			pr, po = 1, 16
		case p.Protocol != proto:
		case p.Protocol.isICMP():
			typ, code := uint8(port>>8), uint8(port)
			switch {
			case p.ICMPType == nil:
				po = 16
			case *p.ICMPType != typ:
			case p.ICMPCode == nil:
				po = 8
			case *p.ICMPCode == code:
				po = 0
			}
		case p.Port == 0:
			po = 16
		case p.EndPort == 0:
			if port == p.Port {
				po = 0
			}
		case p.Port <= port && port <= p.EndPort:
			po = 16 - blockPrefix(port, p.Port, p.EndPort)
		}
		if po < 0 {
			continue
		}
		if !ok || pr < protoRank || pr == protoRank && po < portRank {
			protoRank, portRank = pr, po
		}
		ok = true
	}
	return protoRank, portRank, ok
}

// blockPrefix returns the prefix length of the largest aligned block of
// ports that holds port and lies within lo..hi.
func blockPrefix(port, lo, hi uint16) int {
	for k := 0; k <= 16; k++ {
		size := 1 << (16 - k)
		first := int(port) &^ (size - 1)
		if first >= int(lo) && first+size-1 <= int(hi) {
			return k
		}
	}
	panic("port outside its range")
}
