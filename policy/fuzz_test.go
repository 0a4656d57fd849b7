package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
)

// universe holds the prefixes fuzzed policies name, nested in each other
// so that excepts and more specific prefixes abound.
var universe = func() []netip.Prefix {
	var out []netip.Prefix
	for _, s := range []string{
		"0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.2.0.0/16",
		"192.168.0.0/16", "192.168.1.0/24",
		"::/0", "fd00::/8", "fd00:1::/32", "fd00:1:2::/48", "2001:db8::/32",
	} {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}()

// universeID is the CIDR identity of a prefix of universe, the same every
// time.
func universeID(p netip.Prefix) datapath.Identity {
	return CIDRIdentityFirst + datapath.Identity(slices.Index(universe, p))*7 + 3
}

// fuzzInput hands out the fuzzer's bytes, then zeros.
type fuzzInput []byte

func (in *fuzzInput) byte() byte {
	if len(*in) == 0 {
		return 0
	}
	b := (*in)[0]
	*in = (*in)[1:]
	return b
}

func (in *fuzzInput) pick(n int) int { return int(in.byte()) % n }

func (in *fuzzInput) u16() uint16 { return uint16(in.byte())<<8 | uint16(in.byte()) }

var (
	fuzzIdentities = []datapath.Identity{256, 257, 258}
	fuzzPorts      = []uint16{0, 1, 53, 79, 80, 81, 443, 1023, 1024, 8000, 8080, 32768, 65534, 65535}
	fuzzICMP       = []uint8{0, 3, 8, 11, 128, 255}
)

// genPolicy derives a valid policy from the input.
func genPolicy(in *fuzzInput) Policy {
	p := Policy{Audit: in.pick(4) == 0}
	for _, rules := range []*[]Rule{&p.Ingress, &p.Egress} {
		switch in.pick(5) {
		case 0:
			continue
		case 1:
			*rules = []Rule{}
			continue
		}
		n := 1 + in.pick(8)
		for range n {
			*rules = append(*rules, genRule(in))
		}
	}
	return p
}

func genRule(in *fuzzInput) Rule {
	var r Rule
	if in.pick(3) == 0 {
		r.Action = Deny
	}
	for range in.pick(4) {
		r.Peers = append(r.Peers, genPeer(in))
	}
	for range in.pick(4) {
		r.Ports = append(r.Ports, genPort(in))
	}
	return r
}

func genPeer(in *fuzzInput) Peer {
	switch k := in.pick(9); {
	case k < 3:
		return Peer{Identity: fuzzIdentities[in.pick(len(fuzzIdentities))]}
	case k < 6:
		return Peer{Reserved: Reserved(k - 2)}
	}
	peer := Peer{CIDR: universe[in.pick(len(universe))]}
	var inside []netip.Prefix
	for _, q := range universe {
		if holds(peer.CIDR, q) && q != peer.CIDR {
			inside = append(inside, q)
		}
	}
	if len(inside) > 0 {
		for range in.pick(3) {
			peer.Except = append(peer.Except, inside[in.pick(len(inside))])
		}
	}
	return peer
}

func genPort(in *fuzzInput) Port {
	protos := []Protocol{TCP, UDP, SCTP, ICMP, ICMPv6, AnyProtocol}
	p := Port{Protocol: protos[in.pick(len(protos))]}
	switch {
	case p.Protocol.isICMP():
		if in.pick(4) != 0 {
			t := fuzzICMP[in.pick(len(fuzzICMP))]
			p.ICMPType = &t
			if in.pick(2) == 0 {
				c := fuzzICMP[in.pick(len(fuzzICMP))]
				p.ICMPCode = &c
			}
		}
	case p.Protocol.hasPorts():
		p.Port = fuzzPorts[in.pick(len(fuzzPorts))]
		if in.pick(4) == 0 {
			p.Port = in.u16()
		}
		if p.Port != 0 && in.pick(2) == 0 {
			p.EndPort = max(p.Port, fuzzPorts[in.pick(len(fuzzPorts))])
			if in.pick(4) == 0 {
				p.EndPort = max(p.Port, in.u16())
			}
		}
	}
	return p
}

// fuzzPacket is a new flow to decide.
type fuzzPacket struct {
	remote datapath.Identity
	proto  Protocol
	port   uint16
}

func (p fuzzPacket) String() string {
	return fmt.Sprintf("%s %s port %d (%#04x)", p.remote, p.proto, p.port, p.port)
}

// genPackets returns packets from every remote end there is, of every
// protocol, to the ports at and around those the policy names.
func genPackets(p Policy, known []netip.Prefix, in *fuzzInput) []fuzzPacket {
	remotes := []datapath.Identity{datapath.IdentityHost, datapath.IdentityWorld, 259}
	remotes = append(remotes, fuzzIdentities...)
	for _, q := range known {
		remotes = append(remotes, universeID(q))
	}
	ports := map[uint16]bool{0: true, 80: true, 65535: true, in.u16(): true, in.u16(): true}
	icmp := map[uint16]bool{0: true, 0x0800: true, in.u16(): true}
	for _, r := range slices.Concat(p.Ingress, p.Egress) {
		for _, port := range r.Ports {
			for _, q := range []uint16{port.Port, port.EndPort} {
				ports[q-1], ports[q], ports[q+1] = true, true, true
				ports[q/2+port.Port/2] = true
			}
			if port.ICMPType != nil {
				t := uint16(*port.ICMPType) << 8
				icmp[t], icmp[t|1], icmp[t-1], icmp[t+0x100] = true, true, true, true
				if port.ICMPCode != nil {
					icmp[t|uint16(*port.ICMPCode)] = true
				}
			}
		}
	}
	var out []fuzzPacket
	for _, remote := range remotes {
		for _, proto := range []Protocol{TCP, UDP, SCTP, ICMP, ICMPv6, 47} {
			set := ports
			switch {
			case proto.isICMP():
				set = icmp
			case proto == 47:
				set = map[uint16]bool{0: true}
			}
			for port := range set {
				out = append(out, fuzzPacket{remote, proto, port})
			}
		}
	}
	return out
}

// fuzzCase is a fuzzed policy with what the datapath knows around it.
type fuzzCase struct {
	policy   Policy
	endpoint uint16
	known    []netip.Prefix // prefixes with a CIDR identity in the ipcache
	ids      map[netip.Prefix]datapath.Identity
}

// genCase derives a policy, the endpoint and the ipcache's CIDR prefixes:
// the policy's own and some of other policies.
func genCase(t testing.TB, in *fuzzInput) (fuzzCase, *Compiled) {
	fc := fuzzCase{policy: genPolicy(in), endpoint: 1 + uint16(in.byte()), ids: map[netip.Prefix]datapath.Identity{}}
	c, err := Compile(fc.policy)
	if err != nil {
		t.Fatalf("Compile(%s): %v", describe(fc.policy), err)
	}
	fc.known = c.Prefixes()
	others := in.u16()
	for i, q := range universe {
		if others&(1<<i) != 0 && !slices.Contains(fc.known, q) {
			fc.known = append(fc.known, q)
		}
	}
	for _, q := range fc.known {
		fc.ids[q] = universeID(q)
	}
	return fc, c
}

func (fc fuzzCase) cidrOf(id datapath.Identity) (netip.Prefix, bool) {
	for _, q := range fc.known {
		if universeID(q) == id {
			return q, true
		}
	}
	return netip.Prefix{}, false
}

// checkEntries checks what every key and meta value must look like.
func checkEntries(t testing.TB, c *Compiled, m *MapEntries, endpoint uint16) {
	t.Helper()
	for k, v := range m.Entries {
		mask := uint16(0)
		if k.PortPrefix > 0 {
			mask = uint16(0xffff << (16 - int(k.PortPrefix)))
		}
		if k.Endpoint != endpoint || k.Dir > 1 || k.PortPrefix > 16 || k.Port&^mask != 0 ||
			k.Proto == 0 && (k.Port != 0 || k.PortPrefix != 0) || k.Pad != 0 || v.Pad != 0 ||
			int(v.Rule) >= c.Rules(datapath.Direction(k.Dir)) || v.Flags&^policyDeny != 0 {
			t.Fatalf("bad entry %+v: %+v", k, v)
		}
		if _, ok := m.Meta[metaKey(endpoint, datapath.Direction(k.Dir))]; !ok {
			t.Fatalf("entry %+v of a direction without meta", k)
		}
	}
	for _, dir := range []datapath.Direction{datapath.Ingress, datapath.Egress} {
		if _, ok := m.Meta[metaKey(endpoint, dir)]; ok != c.Enforced(dir) {
			t.Fatalf("%s: meta %v, enforced %v", dir, ok, c.Enforced(dir))
		}
	}
	if len(m.Meta) > 2 {
		t.Fatalf("meta of other endpoints: %+v", m.Meta)
	}
}

// FuzzCompile checks that the datapath's lookup (emulated) on the entries
// of a random policy decides every packet as the semantics do.
func FuzzCompile(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10"))
	f.Add([]byte{0, 3, 7, 1, 3, 7, 0, 6, 1, 3, 8, 2, 5, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Fuzz(func(t *testing.T, data []byte) {
		in := fuzzInput(data)
		fc, c := genCase(t, &in)
		m, err := c.Resolve(fc.endpoint, fc.ids)
		if err != nil {
			t.Fatalf("Resolve: %v", err)
		}
		checkEntries(t, c, m, fc.endpoint)
		for _, pkt := range genPackets(fc.policy, fc.known, &in) {
			for _, dir := range []datapath.Direction{datapath.Ingress, datapath.Egress} {
				want := refVerdict(fc.policy, dir, pkt.remote, fc.cidrOf, pkt.proto, pkt.port)
				got := policyCheck(m, fc.endpoint, uint8(dir), uint32(pkt.remote), uint8(pkt.proto), pkt.port)
				if got != want {
					t.Fatalf("%s %s: datapath %+v, semantics %+v\npolicy %s\nknown %v",
						dir, pkt, got, want, describe(fc.policy), fc.known)
				}
				if v, rule := m.Decide(fc.endpoint, dir, pkt.remote, uint8(pkt.proto), pkt.port); uint8(v) != got.verdict || rule != got.rule {
					t.Fatalf("%s %s: Decide %s rule %d, datapath %+v", dir, pkt, v, rule, got)
				}
			}
		}
	})
}

func metaKey(endpoint uint16, dir datapath.Direction) bpfobj.TypesPolicyMetaKey {
	return bpfobj.TypesPolicyMetaKey{Endpoint: endpoint, Dir: uint8(dir)}
}

// describe writes a policy out for failure messages.
func describe(p Policy) string {
	s := fmt.Sprintf("audit=%v", p.Audit)
	for _, d := range []struct {
		name  string
		rules []Rule
	}{{"ingress", p.Ingress}, {"egress", p.Egress}} {
		if d.rules == nil {
			continue
		}
		s += fmt.Sprintf("\n%s (%d rules):", d.name, len(d.rules))
		for i, r := range d.rules {
			s += fmt.Sprintf("\n  %d %s peers", i, r.Action)
			for _, peer := range r.Peers {
				switch {
				case peer.Identity != 0:
					s += fmt.Sprintf(" id:%d", peer.Identity)
				case peer.Reserved != 0:
					s += " " + peer.Reserved.String()
				default:
					s += fmt.Sprintf(" %s-%v", peer.CIDR, peer.Except)
				}
			}
			s += " ports"
			for _, port := range r.Ports {
				s += fmt.Sprintf(" %s:%d-%d", port.Protocol, port.Port, port.EndPort)
				if port.ICMPType != nil {
					s += fmt.Sprintf(" type %d", *port.ICMPType)
				}
				if port.ICMPCode != nil {
					s += fmt.Sprintf(" code %d", *port.ICMPCode)
				}
			}
		}
	}
	return s
}
