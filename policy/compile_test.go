package policy

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
)

// TestPortRanges checks, for every port, that the keys of a range match
// it exactly when it is in the range, through one key, and that they are
// the fewest aligned blocks.
func TestPortRanges(t *testing.T) {
	for _, tc := range []struct {
		lo, hi uint16
		blocks int
	}{
		{1, 65535, 16}, {80, 80, 1}, {1024, 2047, 1}, {8000, 8080, 3}, {0, 0, 1},
		{65535, 65535, 1}, {32768, 65535, 1}, {1, 1, 1}, {2, 5, 2}, {1023, 1024, 2},
	} {
		t.Run(fmt.Sprintf("%d-%d", tc.lo, tc.hi), func(t *testing.T) {
			keys := Port{Protocol: TCP, Port: tc.lo, EndPort: tc.hi}.appendKeys(nil)
			if len(keys) != tc.blocks {
				t.Errorf("%d blocks %v, want %d", len(keys), keys, tc.blocks)
			}
			for port := range 65536 {
				var n int
				for _, k := range keys {
					mask := uint16(0)
					if k.prefix > 0 {
						mask = uint16(0xffff << (16 - int(k.prefix)))
					}
					if k.proto != uint8(TCP) || k.port&^mask != 0 {
						t.Fatalf("key %+v", k)
					}
					if uint16(port)&mask == k.port {
						n++
					}
				}
				in := tc.lo == 0 || tc.lo <= uint16(port) && uint16(port) <= tc.hi
				if n != 0 != in || n > 1 {
					t.Fatalf("port %d: %d keys match, in range %v", port, n, in)
				}
			}
		})
	}
}

func TestPortKeys(t *testing.T) {
	for _, tc := range []struct {
		port Port
		want []portKey
	}{
		{Port{}, []portKey{{}}},
		{Port{Protocol: UDP}, []portKey{{proto: 17}}},
		{Port{Protocol: TCP, Port: 443}, []portKey{{proto: 6, prefix: 16, port: 443}}},
		{Port{Protocol: SCTP, Port: 443, EndPort: 443}, []portKey{{proto: 132, prefix: 16, port: 443}}},
		{Port{Protocol: TCP, Port: 8000, EndPort: 8080}, []portKey{{6, 10, 8000}, {6, 12, 8064}, {6, 16, 8080}}},
		{Port{Protocol: ICMP}, []portKey{{proto: 1}}},
		{Port{Protocol: ICMP, ICMPType: u8(8)}, []portKey{{proto: 1, prefix: 8, port: 0x0800}}},
		{Port{Protocol: ICMPv6, ICMPType: u8(128)}, []portKey{{proto: 58, prefix: 8, port: 0x8000}}},
		{Port{Protocol: ICMP, ICMPType: u8(3), ICMPCode: u8(4)}, []portKey{{proto: 1, prefix: 16, port: 0x0304}}},
		{Port{Protocol: ICMPv6, ICMPType: u8(255), ICMPCode: u8(255)}, []portKey{{proto: 58, prefix: 16, port: 0xffff}}},
	} {
		if got := tc.port.appendKeys(nil); !slices.Equal(got, tc.want) {
			t.Errorf("%+v: %v, want %v", tc.port, got, tc.want)
		}
	}
}

// TestEntries checks the map entries of a small policy one by one.
func TestEntries(t *testing.T) {
	p := Policy{
		Ingress: []Rule{
			{Peers: []Peer{{Identity: 300}}, Ports: []Port{{Protocol: TCP, Port: 80}}},
			{Action: Deny, Peers: []Peer{{Identity: 300}, {Reserved: Host}}, Ports: []Port{{Protocol: TCP, Port: 80}}},
			{Peers: []Peer{{Reserved: World}}},
			{Ports: []Port{{Protocol: ICMP, ICMPType: u8(8)}}},
			{Peers: []Peer{{Reserved: All}, {Identity: 301}}, Ports: []Port{{Protocol: UDP}}},
			{Action: Deny, Peers: []Peer{{Reserved: World}}},
			{Peers: []Peer{{CIDR: pfx("10.0.0.0/8"), Except: []netip.Prefix{pfx("10.1.0.0/16")}}}},
		},
		Egress: []Rule{},
		Audit:  true,
	}
	c, err := Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := c.Prefixes(), []netip.Prefix{pfx("10.0.0.0/8"), pfx("10.1.0.0/16")}; !slices.Equal(got, want) {
		t.Errorf("prefixes %v, want %v", got, want)
	}
	ids := map[netip.Prefix]datapath.Identity{
		pfx("10.0.0.0/8"): CIDRIdentityFirst, pfx("10.1.0.0/16"): CIDRIdentityFirst + 1,
		pfx("10.2.0.0/16"): CIDRIdentityFirst + 2, pfx("10.1.2.0/24"): CIDRIdentityFirst + 3,
		pfx("11.0.0.0/8"): CIDRIdentityFirst + 4, pfx("fd00::/8"): CIDRIdentityFirst + 5,
	}
	m, err := c.Resolve(7, ids)
	if err != nil {
		t.Fatal(err)
	}
	key := func(id uint32, proto uint8, port uint16, prefix uint8) bpfobj.TypesPolicyKey {
		return bpfobj.TypesPolicyKey{Identity: id, Endpoint: 7, Dir: uint8(datapath.Ingress), Proto: proto, Port: port, PortPrefix: prefix}
	}
	allow := func(rule uint16) bpfobj.TypesPolicyEntry { return bpfobj.TypesPolicyEntry{Rule: rule} }
	deny := func(rule uint16) bpfobj.TypesPolicyEntry {
		return bpfobj.TypesPolicyEntry{Rule: rule, Flags: policyDeny}
	}
	want := map[bpfobj.TypesPolicyKey]bpfobj.TypesPolicyEntry{
		key(300, 6, 80, 16):                       deny(1), // deny beats the allow of rule 0
		key(1, 6, 80, 16):                         deny(1),
		key(2, 0, 0, 0):                           deny(5), // and rule 2's allow
		key(0, 1, 0x0800, 8):                      allow(3),
		key(0, 17, 0, 0):                          allow(4),
		key(301, 17, 0, 0):                        allow(4),
		key(uint32(CIDRIdentityFirst), 0, 0, 0):   allow(6),
		key(uint32(CIDRIdentityFirst+2), 0, 0, 0): allow(6), // inside 10.0.0.0/8, not 10.1.0.0/16
	}
	if !maps.Equal(m.Entries, want) {
		t.Errorf("entries\n%v\nwant\n%v", m.Entries, want)
	}
	wantMeta := map[bpfobj.TypesPolicyMetaKey]bpfobj.TypesPolicyMetaValue{
		{Endpoint: 7, Dir: uint8(datapath.Ingress)}: {
			PortPrefixes: 1<<16 | 1<<8 | 1<<0,
			Shapes:       policyShapeIDProto | policyShapeIDAny | policyShapeAnyProto,
			Flags:        policyMetaAudit,
		},
		{Endpoint: 7, Dir: uint8(datapath.Egress)}: {Flags: policyMetaAudit},
	}
	if !maps.Equal(m.Meta, wantMeta) {
		t.Errorf("meta %v, want %v", m.Meta, wantMeta)
	}
	if c.Rules(datapath.Ingress) != 7 || c.Rules(datapath.Egress) != 0 || !c.Enforced(datapath.Egress) {
		t.Errorf("rules %d and %d, egress enforced %v", c.Rules(datapath.Ingress), c.Rules(datapath.Egress), c.Enforced(datapath.Egress))
	}
}

func TestNoPolicy(t *testing.T) {
	c, err := Compile(Policy{Audit: true, Egress: []Rule{{}}})
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Resolve(1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Enforced(datapath.Ingress) || c.Rules(datapath.Ingress) != 0 || len(m.Meta) != 1 || len(m.Entries) != 1 {
		t.Errorf("ingress enforced %v, %d rules; meta %v, entries %v", c.Enforced(datapath.Ingress), c.Rules(datapath.Ingress), m.Meta, m.Entries)
	}
}

func TestResolveRejects(t *testing.T) {
	c, err := Compile(Policy{Ingress: []Rule{{Peers: []Peer{{CIDR: pfx("10.0.0.0/8"), Except: []netip.Prefix{pfx("10.1.0.0/16")}}}}}})
	if err != nil {
		t.Fatal(err)
	}
	good := map[netip.Prefix]datapath.Identity{pfx("10.0.0.0/8"): CIDRIdentityFirst, pfx("10.1.0.0/16"): CIDRIdentityLast}
	with := func(p netip.Prefix, id datapath.Identity) map[netip.Prefix]datapath.Identity {
		ids := maps.Clone(good)
		ids[p] = id
		return ids
	}
	for _, tc := range []struct {
		name     string
		endpoint uint16
		ids      map[netip.Prefix]datapath.Identity
		want     string
	}{
		{"endpoint 0", 0, good, "endpoint 0"},
		{"missing", 1, map[netip.Prefix]datapath.Identity{pfx("10.0.0.0/8"): CIDRIdentityFirst}, "no identity for 10.1.0.0/16"},
		{"below the range", 1, with(pfx("10.0.0.0/8"), 1000), "10.0.0.0/8 has identity 1000: want 16777216 to 33554431"},
		{"above the range", 1, with(pfx("11.0.0.0/8"), CIDRIdentityLast+1), "11.0.0.0/8 has identity 33554432"},
		{"shared", 1, with(pfx("11.0.0.0/8"), CIDRIdentityFirst), "10.0.0.0/8 and 11.0.0.0/8 both have identity 16777216"},
		{"not canonical", 1, with(pfx("11.1.0.0/8"), CIDRIdentityFirst+9), "prefix 11.1.0.0/8 is not canonical"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.Resolve(tc.endpoint, tc.ids)
			if !errors.Is(err, datapath.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrInvalid saying %q", err, tc.want)
			}
		})
	}
}
