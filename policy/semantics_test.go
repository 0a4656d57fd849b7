package policy

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/sluicedp/sluice/datapath"
)

// The ipcache of the semantics tests: three nested prefixes outside the
// cluster, with their CIDR identities.
var (
	net8  = pfx("10.0.0.0/8")
	net16 = pfx("10.1.0.0/16")
	net24 = pfx("10.1.2.0/24")

	semanticsIDs = map[netip.Prefix]datapath.Identity{
		net8: CIDRIdentityFirst + 8, net16: CIDRIdentityFirst + 16, net24: CIDRIdentityFirst + 24,
	}
)

func semanticsCIDROf(id datapath.Identity) (netip.Prefix, bool) {
	for p, q := range semanticsIDs {
		if q == id {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

// flow is a packet to decide and the verdict it must get.
type flow struct {
	dir     datapath.Direction
	remote  datapath.Identity
	proto   Protocol
	port    uint16
	verdict uint8
	rule    uint16
}

var (
	web             = datapath.Identity(300)
	db              = datapath.Identity(301)
	other           = datapath.Identity(302)
	world           = datapath.IdentityWorld
	host            = datapath.IdentityHost
	ingress, egress = datapath.Ingress, datapath.Egress
)

func allowed(dir datapath.Direction, remote datapath.Identity, proto Protocol, port uint16, rule uint16) flow {
	return flow{dir, remote, proto, port, policyAllowed, rule}
}

func denied(dir datapath.Direction, remote datapath.Identity, proto Protocol, port uint16, rule uint16) flow {
	return flow{dir, remote, proto, port, policyDenied, rule}
}

func audited(dir datapath.Direction, remote datapath.Identity, proto Protocol, port uint16, rule uint16) flow {
	return flow{dir, remote, proto, port, policyAudited, rule}
}

// TestSemantics checks each row of the semantics tables in the package doc,
// through Compile, Resolve and the datapath's lookup, and through the
// reference evaluator.
func TestSemantics(t *testing.T) {
	for _, tc := range []struct {
		row    string
		policy Policy
		flows  []flow
	}{
		{"no policy in the direction: allowed", Policy{Egress: []Rule{{Peers: []Peer{{Identity: db}}}}}, []flow{
			allowed(ingress, web, TCP, 80, NoRule), allowed(ingress, world, UDP, 53, NoRule),
			allowed(egress, db, TCP, 5432, 0), denied(egress, web, TCP, 80, NoRule),
		}},
		{"a policy, no rule matches: denied", Policy{Ingress: []Rule{{Peers: []Peer{{Identity: web}}, Ports: []Port{{Protocol: TCP, Port: 80}}}}}, []flow{
			allowed(ingress, web, TCP, 80, 0), denied(ingress, web, TCP, 81, NoRule), denied(ingress, web, UDP, 80, NoRule),
			denied(ingress, db, TCP, 80, NoRule), allowed(egress, db, TCP, 80, NoRule),
		}},
		{"an empty slice has no rule to match", Policy{Ingress: []Rule{}, Egress: []Rule{}}, []flow{
			denied(ingress, web, TCP, 80, NoRule), denied(egress, world, ICMP, 0x0800, NoRule), denied(egress, host, 47, 0, NoRule),
		}},
		{"a deny rule matches: denied whatever the order", Policy{Ingress: []Rule{
			{Peers: []Peer{{Identity: web}}},
			{Action: Deny, Peers: []Peer{{Identity: web}}, Ports: []Port{{Protocol: TCP, Port: 22}}},
		}}, []flow{denied(ingress, web, TCP, 22, 1), allowed(ingress, web, TCP, 23, 0)}},
		{"a deny rule matches: denied whatever the specificity", Policy{Ingress: []Rule{
			{Action: Deny, Peers: []Peer{{Reserved: World}}},
			{Action: Deny, Peers: []Peer{{Identity: db}}, Ports: []Port{{Protocol: TCP}}},
			{Peers: []Peer{{CIDR: net24}, {Identity: db}}, Ports: []Port{{Protocol: TCP, Port: 443}}},
			{Peers: []Peer{{Reserved: All}}, Ports: []Port{{Protocol: TCP, Port: 443}}},
		}}, []flow{
			denied(ingress, semanticsIDs[net24], TCP, 443, 0), denied(ingress, world, TCP, 443, 0),
			denied(ingress, db, TCP, 443, 1), denied(ingress, db, UDP, 443, NoRule), allowed(ingress, web, TCP, 443, 3),
		}},
		{"a deny of a wider CIDR covers the narrower ones inside", Policy{Egress: []Rule{
			{Peers: []Peer{{CIDR: net24}}},
			{Action: Deny, Peers: []Peer{{CIDR: net8}}},
		}}, []flow{denied(egress, semanticsIDs[net24], TCP, 80, 1), denied(egress, semanticsIDs[net8], TCP, 80, 1)}},
		{"audit: would-be drops pass, reported as audited", Policy{Audit: true, Ingress: []Rule{
			{Peers: []Peer{{Identity: web}}},
			{Action: Deny, Peers: []Peer{{Identity: db}}},
		}, Egress: []Rule{}}, []flow{
			allowed(ingress, web, TCP, 80, 0), audited(ingress, db, TCP, 80, 1), audited(ingress, other, TCP, 80, NoRule),
			audited(egress, web, UDP, 53, NoRule),
		}},
		{"peer Identity: that identity", Policy{Egress: []Rule{{Peers: []Peer{{Identity: db}, {Identity: web}}}}}, []flow{
			allowed(egress, db, TCP, 5432, 0), allowed(egress, web, UDP, 1, 0), denied(egress, other, TCP, 5432, NoRule),
			denied(egress, world, TCP, 5432, NoRule), denied(egress, host, TCP, 5432, NoRule),
		}},
		{"peer CIDR with Except: inside the CIDR, outside every except", Policy{Egress: []Rule{
			{Peers: []Peer{{CIDR: net8, Except: []netip.Prefix{net16}}}},
		}}, []flow{
			allowed(egress, semanticsIDs[net8], TCP, 80, 0), denied(egress, semanticsIDs[net16], TCP, 80, NoRule),
			denied(egress, semanticsIDs[net24], TCP, 80, NoRule), denied(egress, world, TCP, 80, NoRule),
			denied(egress, web, TCP, 80, NoRule),
		}},
		{"peer CIDR: the prefixes inside it are inside it", Policy{Egress: []Rule{
			{Peers: []Peer{{CIDR: net8, Except: []netip.Prefix{net24}}}},
			{Peers: []Peer{{CIDR: net16}}, Ports: []Port{{Protocol: UDP}}},
		}}, []flow{
			allowed(egress, semanticsIDs[net16], TCP, 80, 0), allowed(egress, semanticsIDs[net16], UDP, 80, 1),
			denied(egress, semanticsIDs[net24], TCP, 80, NoRule), allowed(egress, semanticsIDs[net24], UDP, 80, 1),
		}},
		{"peer World: no ipcache entry or a CIDR identity", Policy{Ingress: []Rule{{Peers: []Peer{{Reserved: World}}}}}, []flow{
			allowed(ingress, world, TCP, 80, 0), allowed(ingress, semanticsIDs[net8], TCP, 80, 0), allowed(ingress, semanticsIDs[net24], UDP, 53, 0),
			denied(ingress, host, TCP, 80, NoRule), denied(ingress, web, TCP, 80, NoRule),
		}},
		{"peer Host: the node", Policy{Ingress: []Rule{{Peers: []Peer{{Reserved: Host}}}}}, []flow{
			allowed(ingress, host, TCP, 10250, 0), denied(ingress, world, TCP, 10250, NoRule), denied(ingress, web, TCP, 10250, NoRule),
		}},
		{"peer All, or no peers: any identity", Policy{
			Ingress: []Rule{{Peers: []Peer{{Reserved: All}}, Ports: []Port{{Protocol: TCP, Port: 80}}}},
			Egress:  []Rule{{Ports: []Port{{Protocol: TCP, Port: 80}}}},
		}, []flow{
			allowed(ingress, host, TCP, 80, 0), allowed(ingress, world, TCP, 80, 0), allowed(ingress, semanticsIDs[net16], TCP, 80, 0),
			allowed(ingress, web, TCP, 80, 0), allowed(egress, host, TCP, 80, 0), allowed(egress, semanticsIDs[net8], TCP, 80, 0),
			allowed(egress, other, TCP, 80, 0), denied(egress, other, TCP, 81, NoRule),
		}},
		{"no ports, AnyProtocol: any protocol and port", Policy{
			Ingress: []Rule{{Peers: []Peer{{Identity: web}}}},
			Egress:  []Rule{{Peers: []Peer{{Identity: web}}, Ports: []Port{{Protocol: TCP, Port: 80}, {}}}},
		}, []flow{
			allowed(ingress, web, TCP, 1, 0), allowed(ingress, web, ICMPv6, 0x8000, 0), allowed(ingress, web, 47, 0, 0),
			allowed(egress, web, UDP, 9, 0), allowed(egress, web, 47, 0, 0),
		}},
		{"TCP, UDP, SCTP: any port, one port, a range", Policy{Ingress: []Rule{
			{Ports: []Port{{Protocol: TCP}}},
			{Ports: []Port{{Protocol: UDP, Port: 53}}},
			{Ports: []Port{{Protocol: SCTP, Port: 8000, EndPort: 8080}}},
		}}, []flow{
			allowed(ingress, web, TCP, 0, 0), allowed(ingress, web, TCP, 65535, 0),
			allowed(ingress, web, UDP, 53, 1), denied(ingress, web, UDP, 54, NoRule), denied(ingress, web, SCTP, 53, NoRule),
			denied(ingress, web, SCTP, 7999, NoRule), allowed(ingress, web, SCTP, 8000, 2), allowed(ingress, web, SCTP, 8063, 2),
			allowed(ingress, web, SCTP, 8064, 2), allowed(ingress, web, SCTP, 8080, 2), denied(ingress, web, SCTP, 8081, NoRule),
		}},
		{"ICMP, ICMPv6: any type, a type, a type and code", Policy{Egress: []Rule{
			{Ports: []Port{{Protocol: ICMP, ICMPType: u8(8)}}},
			{Ports: []Port{{Protocol: ICMPv6, ICMPType: u8(1), ICMPCode: u8(4)}}},
			{Peers: []Peer{{Identity: db}}, Ports: []Port{{Protocol: ICMPv6}}},
		}}, []flow{
			allowed(egress, web, ICMP, 0x0800, 0), allowed(egress, web, ICMP, 0x08ff, 0), denied(egress, web, ICMP, 0x0900, NoRule),
			denied(egress, web, ICMPv6, 0x0800, NoRule), allowed(egress, web, ICMPv6, 0x0104, 1), denied(egress, web, ICMPv6, 0x0103, NoRule),
			allowed(egress, db, ICMPv6, 0x8000, 2), denied(egress, db, ICMP, 0x0000, NoRule), denied(egress, web, TCP, 0x0800, NoRule),
		}},
		{"which rule: the peer first", Policy{Ingress: []Rule{
			{Peers: []Peer{{Reserved: All}}, Ports: []Port{{Protocol: TCP, Port: 80}}},
			{Peers: []Peer{{Reserved: World}}, Ports: []Port{{Protocol: TCP, Port: 80}}},
			{Peers: []Peer{{CIDR: net8}}},
		}}, []flow{
			allowed(ingress, semanticsIDs[net16], TCP, 80, 2), allowed(ingress, semanticsIDs[net8], TCP, 80, 2),
			allowed(ingress, world, TCP, 80, 1), allowed(ingress, web, TCP, 80, 0),
		}},
		{"which rule: then the protocol, then the port, then the index", Policy{Ingress: []Rule{
			{Peers: []Peer{{Identity: web}}},
			{Peers: []Peer{{Identity: web}}, Ports: []Port{{Protocol: TCP}}},
			{Peers: []Peer{{Identity: web}}, Ports: []Port{{Protocol: TCP, Port: 1, EndPort: 65535}}},
			{Peers: []Peer{{Identity: web}}, Ports: []Port{{Protocol: TCP, Port: 80, EndPort: 95}}},
			{Peers: []Peer{{Identity: web}}, Ports: []Port{{Protocol: TCP, Port: 80}}},
			{Peers: []Peer{{Identity: web}}, Ports: []Port{{Protocol: TCP, Port: 80}}},
		}}, []flow{
			allowed(ingress, web, UDP, 80, 0), allowed(ingress, web, TCP, 0, 1), allowed(ingress, web, TCP, 1, 2),
			allowed(ingress, web, TCP, 100, 2), allowed(ingress, web, TCP, 81, 3), allowed(ingress, web, TCP, 80, 4),
		}},
	} {
		t.Run(tc.row, func(t *testing.T) {
			c, err := Compile(tc.policy)
			if err != nil {
				t.Fatal(err)
			}
			m, err := c.Resolve(9, semanticsIDs)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range tc.flows {
				want := policyResult{verdict: f.verdict, rule: f.rule}
				name := fmt.Sprintf("%s %s %s port %#x", f.dir, f.remote, f.proto, f.port)
				if got := policyCheck(m, 9, uint8(f.dir), uint32(f.remote), uint8(f.proto), f.port); got != want {
					t.Errorf("%s: datapath %+v, want %+v", name, got, want)
				}
				if got := refVerdict(tc.policy, f.dir, f.remote, semanticsCIDROf, f.proto, f.port); got != want {
					t.Errorf("%s: semantics %+v, want %+v", name, got, want)
				}
			}
		})
	}
}
