package policy

import (
	"errors"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/sluicedp/sluice/datapath"
)

func u8(v uint8) *uint8 { return &v }

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func TestCompileRejects(t *testing.T) {
	in := func(peers []Peer, ports ...Port) Policy {
		return Policy{Egress: []Rule{{}, {Peers: peers, Ports: ports}}}
	}
	peer := func(p Peer) Policy { return in([]Peer{{Identity: 300}, p}) }
	port := func(p Port) Policy { return in(nil, Port{Protocol: TCP, Port: 80}, p) }
	for _, tc := range []struct {
		name   string
		policy Policy
		want   string
	}{
		{"invalid CIDR", peer(Peer{CIDR: netip.PrefixFrom(netip.MustParseAddr("10.0.0.0"), 33)}),
			"egress rule 1: peer 1: CIDR invalid Prefix is not a valid prefix"},
		{"non-canonical CIDR", peer(Peer{CIDR: pfx("10.1.2.3/8")}),
			"egress rule 1: peer 1: CIDR 10.1.2.3/8 is not canonical: want 10.0.0.0/8"},
		{"IPv4-mapped CIDR", peer(Peer{CIDR: pfx("::ffff:10.0.0.0/104")}),
			"egress rule 1: peer 1: CIDR ::ffff:10.0.0.0/104 is IPv4-mapped"},
		{"except outside", peer(Peer{CIDR: pfx("10.0.0.0/8"), Except: []netip.Prefix{pfx("11.0.0.0/16")}}),
			"egress rule 1: peer 1: except 11.0.0.0/16 is outside CIDR 10.0.0.0/8"},
		{"except not more specific", peer(Peer{CIDR: pfx("10.0.0.0/8"), Except: []netip.Prefix{pfx("10.0.0.0/8")}}),
			"egress rule 1: peer 1: except 10.0.0.0/8 is not more specific than CIDR 10.0.0.0/8"},
		{"except less specific", peer(Peer{CIDR: pfx("10.1.0.0/16"), Except: []netip.Prefix{pfx("10.0.0.0/8")}}),
			"except 10.0.0.0/8 is outside CIDR 10.1.0.0/16"},
		{"except of another family", peer(Peer{CIDR: pfx("10.0.0.0/8"), Except: []netip.Prefix{pfx("fd00::/16")}}),
			"egress rule 1: peer 1: except fd00::/16 is not of the address family of CIDR 10.0.0.0/8"},
		{"except not canonical", peer(Peer{CIDR: pfx("10.0.0.0/8"), Except: []netip.Prefix{pfx("10.1.2.3/16")}}),
			"egress rule 1: peer 1: except 10.1.2.3/16 is not canonical: want 10.1.0.0/16"},
		{"except without CIDR", peer(Peer{Identity: 300, Except: []netip.Prefix{pfx("10.1.0.0/16")}}),
			"egress rule 1: peer 1: an except without a CIDR"},
		{"no peer", peer(Peer{}), "egress rule 1: peer 1: names no peer"},
		{"identity and CIDR", peer(Peer{Identity: 300, CIDR: pfx("10.0.0.0/8")}),
			"egress rule 1: peer 1: sets more than one of Identity (300), CIDR (10.0.0.0/8) and Reserved (none)"},
		{"CIDR and reserved", peer(Peer{CIDR: pfx("10.0.0.0/8"), Reserved: World}),
			"egress rule 1: peer 1: sets more than one of"},
		{"reserved identity", peer(Peer{Identity: datapath.IdentityWorld}),
			"egress rule 1: peer 1: identity world is reserved (below 256): name it with Reserved"},
		{"CIDR identity", peer(Peer{Identity: CIDRIdentityFirst + 5}),
			"egress rule 1: peer 1: identity 16777221 is a CIDR identity"},
		{"unknown reserved", peer(Peer{Reserved: 9}), "egress rule 1: peer 1: reserved(9): want World, Host, All or RemoteNode"},
		{"unknown action", Policy{Ingress: []Rule{{}, {}, {Action: 2}}}, "ingress rule 2: action(2): want Allow or Deny"},
		{"unknown protocol", port(Port{Protocol: 47}),
			"egress rule 1: port 1: protocol 47: want TCP, UDP, SCTP, ICMP, ICMPv6 or AnyProtocol"},
		{"EndPort without Port", port(Port{Protocol: UDP, EndPort: 80}),
			"egress rule 1: port 1: EndPort 80 with Port 0, which is any port"},
		{"EndPort below Port", port(Port{Protocol: SCTP, Port: 80, EndPort: 79}),
			"egress rule 1: port 1: EndPort 79 below Port 80"},
		{"port on ICMP", port(Port{Protocol: ICMP, Port: 8}), "egress rule 1: port 1: port 8 (EndPort 0) on ICMP, which has no ports"},
		{"port on ICMPv6", port(Port{Protocol: ICMPv6, EndPort: 8}), "port 0 (EndPort 8) on ICMPv6, which has no ports"},
		{"port on any protocol", port(Port{Port: 80}), "egress rule 1: port 1: port 80 (EndPort 0) on any protocol, which has no ports"},
		{"ICMP type on TCP", port(Port{Protocol: TCP, ICMPType: u8(8)}), "egress rule 1: port 1: ICMP type or code on TCP"},
		{"ICMP code on UDP", port(Port{Protocol: UDP, ICMPCode: u8(0)}), "egress rule 1: port 1: ICMP type or code on UDP"},
		{"ICMP type on any protocol", port(Port{ICMPType: u8(8)}), "ICMP type or code on any protocol"},
		{"ICMP code without type", port(Port{Protocol: ICMPv6, ICMPCode: u8(1)}),
			"egress rule 1: port 1: ICMP code 1 without a type"},
		{"too many rules", Policy{Ingress: make([]Rule, MaxRules+1)}, "ingress: 65536 rules, at most 65535"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Compile(tc.policy)
			if !errors.Is(err, datapath.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrInvalid saying %q", err, tc.want)
			}
		})
	}
}

func TestCompileAccepts(t *testing.T) {
	p := Policy{
		Ingress: make([]Rule, MaxRules),
		Egress: []Rule{{
			Action: Deny,
			Peers: []Peer{{Identity: datapath.MinIdentity}, {Identity: CIDRIdentityLast + 1}, {Reserved: World},
				{Reserved: Host}, {Reserved: All}, {CIDR: pfx("0.0.0.0/0"), Except: []netip.Prefix{pfx("10.0.0.0/8"), pfx("10.1.2.3/32")}},
				{CIDR: pfx("fd00::/8"), Except: []netip.Prefix{pfx("fd00:1::/32")}}},
			Ports: []Port{{Protocol: TCP}, {Protocol: UDP, Port: 53}, {Protocol: SCTP, Port: 1, EndPort: 65535},
				{Protocol: TCP, Port: 80, EndPort: 80}, {Protocol: ICMP}, {Protocol: ICMP, ICMPType: u8(8)},
				{Protocol: ICMPv6, ICMPType: u8(128), ICMPCode: u8(0)}, {}},
		}},
	}
	if _, err := Compile(p); err != nil {
		t.Fatal(err)
	}
}

// TestHeaderConstants checks the constants Go shares with bpf/lib/policy.h.
func TestHeaderConstants(t *testing.T) {
	src, err := os.ReadFile("../bpf/lib/policy.h")
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]struct {
		text      string
		got, want uint32
	}{
		"POLICY_NO_RULE":      {"0xffff", NoRule, policyNoRule},
		"IDENTITY_HOST":       {"1", uint32(datapath.IdentityHost), identityHost},
		"IDENTITY_WORLD":      {"2", uint32(datapath.IdentityWorld), identityWorld},
		"CIDR_IDENTITY_FIRST": {"(1U << 24)", uint32(CIDRIdentityFirst), cidrIdentityFirst},
		"CIDR_IDENTITY_LAST":  {"((2U << 24) - 1)", uint32(CIDRIdentityLast), cidrIdentityLast},
	} {
		m := regexp.MustCompile(`(?m)^#define ` + name + ` (.*)$`).FindSubmatch(src)
		if m == nil || string(m[1]) != want.text || want.got != want.want {
			t.Errorf("%s: header says %q, want %q (Go: %#x and %#x)", name, m, want.text, want.got, want.want)
		}
	}
}
