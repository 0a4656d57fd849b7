package policy_test

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/policy"
)

// A step is one crafted frame run through the node's real programs: sent
// by endpoint from (from-endpoint), or, when from is nil, sent by the
// node's stack to endpoint to (from-host) as if it came in on ingress
// (0: made by the node itself). The verdict and the reason whose counter
// grows by one are what the datapath must do with it.
type step struct {
	name    string
	from    *endpoint.Endpoint
	to      *endpoint.Endpoint
	ingress int
	frame   []byte
	verdict uint32
	reason  datapath.Reason
	dir     datapath.Direction
}

// crafted runs steps in order on node n: each may depend on the flows the
// steps before it left.
func (n *node) crafted(t *testing.T, steps []step) {
	t.Helper()
	progs, err := core.Of(n.dp).EndpointPrograms()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range steps {
		before, err := n.dp.Metrics()
		if err != nil {
			t.Fatal(err)
		}
		prog, skb := progs.FromEndpoint, &progtest.SKB{}
		if s.from != nil {
			skb.Ifindex = uint32(s.from.HostIfindex)
		} else {
			prog = progs.FromHost
			skb.Ifindex, skb.IngressIfindex = uint32(s.to.HostIfindex), uint32(s.ingress)
		}
		var r progtest.Result
		if err := nsrun.Do(n.ns.Handle, func() (err error) {
			r, err = progtest.Run(prog, s.frame, skb)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		after, err := n.dp.Metrics()
		if err != nil {
			t.Fatal(err)
		}
		key := datapath.MetricKey{Reason: s.reason, Direction: s.dir}
		grew := after[key].Packets - before[key].Packets
		// The workloads' own neighbour discovery may be forwarded
		// meanwhile; nothing else happens on the node.
		if r.Verdict != s.verdict || grew == 0 || (s.reason != datapath.ReasonForwarded && grew != 1) {
			t.Errorf("%s: verdict %d, %v %v counter +%d; want verdict %d and that counter +1", s.name, r.Verdict, s.reason, s.dir, grew, s.verdict)
		}
	}
}

// eth is the Ethernet header of a frame ep's workload sends, or, with
// toEP, one the node sends it.
func eth(ep *endpoint.Endpoint, toEP bool) *packet.Ethernet {
	if toEP {
		return &packet.Ethernet{Src: ep.HostMAC, Dst: ep.MAC}
	}
	return &packet.Ethernet{Src: ep.MAC, Dst: ep.HostMAC}
}

// ip is an IP header from src to dst, of their family.
func ip(src, dst netip.Addr) packet.Layer {
	if src.Is4() {
		return &packet.IPv4{Src: src, Dst: dst}
	}
	return &packet.IPv6{Src: src, Dst: dst}
}

// unreachable is an ICMP or ICMPv6 port unreachable from src to dst,
// quoting a UDP datagram from qsrc:qsport to qdst:qdport.
func unreachable(e *packet.Ethernet, src, dst, qsrc, qdst netip.Addr, qsport, qdport uint16) []byte {
	quoted := packet.Build(ip(qsrc, qdst), &packet.UDP{SrcPort: qsport, DstPort: qdport})
	icmp := &packet.ICMP{Type: 3, Code: 3}
	if src.Is6() {
		icmp = &packet.ICMP{Type: 1, Code: 4}
	}
	return packet.Build(e, ip(src, dst), icmp, packet.Payload(quoted))
}

func udpFrame(e *packet.Ethernet, src, dst netip.Addr, sport, dport uint16) []byte {
	return packet.Build(e, ip(src, dst), &packet.UDP{SrcPort: sport, DstPort: dport})
}

func tcpFrame(e *packet.Ethernet, src, dst netip.Addr, sport, dport uint16, flags uint8) []byte {
	return packet.Build(e, ip(src, dst), &packet.TCP{SrcPort: sport, DstPort: dport, Flags: flags})
}

func apply(t *testing.T, n *node, ep *endpoint.Endpoint, p policy.Policy) {
	t.Helper()
	if _, err := policy.Apply(context.Background(), n.dp, ep.ID, p); err != nil {
		t.Fatal(err)
	}
}

func fromID(id datapath.Identity) []policy.Peer { return []policy.Peer{{Identity: id}} }

const (
	in  = datapath.Ingress
	out = datapath.Egress
	ok  = progtest.TCActOK
	red = progtest.TCActRedirect
	dr  = progtest.TCActShot
	fwd = datapath.ReasonForwarded
)

// An ICMP error is related to a tracked flow only when it goes to the
// sender of the packet it quotes, from that packet's destination (or from
// the node itself, a router on the way). Endpoint a talks to c and takes
// nothing in: b cannot push errors into a by quoting a's flow, nor can the
// world through the node; an error quoting a packet a did not send (c's,
// the wrong way round) or a flow a never had is dropped whoever sends it.
func TestICMPErrorsFromTheQuotedPeerOnly(t *testing.T) {
	n := newNode(t)
	apply(t, n, n.a, policy.Policy{Ingress: []policy.Rule{}})
	a, b, c := n.a, n.b, n.c
	for _, fam := range []struct {
		name          string
		a, b, c, host netip.Addr
	}{
		{"IPv4", a.IPv4, b.IPv4, c.IPv4, netip.MustParseAddr("198.19.9.1")},
		{"IPv6", a.IPv6, b.IPv6, c.IPv6, netip.MustParseAddr("fd00:2:9::1")},
	} {
		t.Run(fam.name, func(t *testing.T) {
			n.crafted(t, []step{
				{name: "a's flow to c", from: a, frame: udpFrame(eth(a, false), fam.a, fam.c, 41000, 53), verdict: red, reason: fwd, dir: out},
				{name: "b quotes it to a", from: b, frame: unreachable(eth(b, false), fam.b, fam.a, fam.a, fam.c, 41000, 53),
					verdict: dr, reason: datapath.ReasonPolicyDenied, dir: in},
				{name: "the world quotes it to a through the node", to: a, ingress: b.HostIfindex,
					frame: unreachable(eth(a, true), fam.host, fam.a, fam.a, fam.c, 41000, 53), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: in},
				{name: "a router on the way (the node) answers it", to: a,
					frame: unreachable(eth(a, true), fam.host, fam.a, fam.a, fam.c, 41000, 53), verdict: ok, reason: fwd, dir: in},
				{name: "c answers it", from: c, frame: unreachable(eth(c, false), fam.c, fam.a, fam.a, fam.c, 41000, 53), verdict: red, reason: fwd, dir: out},
				{name: "c quotes it turned around", from: c, frame: unreachable(eth(c, false), fam.c, fam.a, fam.c, fam.a, 53, 41000),
					verdict: dr, reason: datapath.ReasonICMPUnrelated, dir: in},
				{name: "c quotes a flow a never had", from: c, frame: unreachable(eth(c, false), fam.c, fam.a, fam.a, fam.c, 41001, 53),
					verdict: dr, reason: datapath.ReasonICMPUnrelated, dir: in},
				{name: "the node quotes a flow a never had", to: a,
					frame: unreachable(eth(a, true), fam.host, fam.a, fam.a, fam.b, 41000, 53), verdict: dr, reason: datapath.ReasonICMPUnrelated, dir: in},
			})
		})
	}
}

// A tracked flow belongs to the endpoint that made it, and is over once
// its lifetime is: an entry of another endpoint under the same tuple (its
// addresses reused) and an expired one are as if absent, and Delete takes
// an endpoint's flows with it.
func TestConntrackOwnerAndExpiry(t *testing.T) {
	n := newNode(t)
	a, c := n.a, n.c
	apply(t, n, c, policy.Policy{Ingress: []policy.Rule{}})
	ct := core.Of(n.dp).Map(bpfobj.EndpointMapConntrack)
	// An entry that lets 198.19.9.1:80 -> c:41000 in as a reply: c's
	// egress flow, owned by owner, expiring at expires.
	plant := func(owner uint16, expires time.Duration) {
		var k bpfobj.TypesCtKey
		copy(k.Saddr[:], c.IPv4.AsSlice())
		copy(k.Daddr[:], []byte{198, 19, 9, 1})
		k.Sport, k.Dport = htons(41000), htons(80)
		k.Proto, k.Family, k.Dir = 6, 4, uint8(bpfobj.TypesCtDirCT_EGRESS)
		v := bpfobj.TypesCtEntry{Endpoint: owner, Expires: uint64(int64(monotonic()) + int64(expires))}
		v.Policy.Identity, v.Policy.Rule = 2, 0xffff
		if err := ct.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	reply := tcpFrame(eth(c, true), netip.MustParseAddr("198.19.9.1"), c.IPv4, 80, 41000, packet.ACK)
	plant(a.ID, time.Hour)
	n.crafted(t, []step{{name: "reply to another endpoint's flow", to: c, ingress: a.HostIfindex, frame: reply, verdict: dr, reason: datapath.ReasonNoConnection, dir: in}})
	plant(c.ID, -time.Second)
	n.crafted(t, []step{{name: "reply to an expired flow", to: c, ingress: a.HostIfindex, frame: reply, verdict: dr, reason: datapath.ReasonNoConnection, dir: in}})
	plant(c.ID, time.Hour)
	n.crafted(t, []step{{name: "reply to its own live flow", to: c, ingress: a.HostIfindex, frame: reply, verdict: ok, reason: fwd, dir: in}})

	if err := endpoint.Delete(context.Background(), n.dp, c.ID); err != nil {
		t.Fatal(err)
	}
	flows, err := n.dp.Flows()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		if f.Endpoint == c.ID {
			t.Errorf("deleted endpoint %d left %v", c.ID, f)
		}
	}
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

// monotonic is CLOCK_MONOTONIC, bpf_ktime_get_ns's clock.
func monotonic() uint64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

// The node's own addresses are the host, whatever device holds them, and
// not the world: a rule for the host matches them, and a deny of the
// world does not block the node's own services (node-local DNS).
func TestNodeAddressesAreTheHost(t *testing.T) {
	n := newNode(t)
	self := n.nodeAddrs(t, "198.19.8.1", "fd00:2:8::1")
	world := n.outside(t, "198.19.3.1", "fd00:2:3::1")
	apply(t, n, n.a, policy.Policy{Egress: []policy.Rule{
		{Action: policy.Deny, Peers: []policy.Peer{{Reserved: policy.World}}},
		{Peers: []policy.Peer{{Reserved: policy.Host}}, Ports: []policy.Port{{Protocol: policy.UDP, Port: 53}}},
	}})
	n.run(t, []check{
		{"udp", n.a, self, 53, true},
		{"udp", n.a, self, 54, false},
		{"udp", n.a, world, 53, false},
	})
	flows, err := n.dp.Flows()
	if err != nil {
		t.Fatal(err)
	}
	hosts := 0
	for _, f := range flows {
		if f.Endpoint == n.a.ID && f.Direction == datapath.Egress && (f.Dst.Addr() == self.v4 || f.Dst.Addr() == self.v6) {
			if f.Remote != datapath.IdentityHost {
				t.Errorf("%v: remote %v, want host", f, f.Remote)
			}
			hosts++
		}
	}
	if hosts != 2 {
		t.Errorf("%d flows to the node's addresses tracked, want 2", hosts)
	}
}

// Neighbour discovery and MLD pass without policy only in their exact
// shape (hop limit, link-scope destination); everything else between
// link-local addresses is traffic with the host, and policy decides it,
// as it decides every other ICMPv6 message.
func TestLinkLocalMeetsPolicy(t *testing.T) {
	n := newNode(t)
	a := n.a
	apply(t, n, a, policy.Policy{
		Egress:  []policy.Rule{{Ports: []policy.Port{{Protocol: policy.UDP, Port: 53}}}},
		Ingress: []policy.Rule{},
	})
	ll, hostLL := netip.MustParseAddr("fe80::2"), netip.MustParseAddr("fe80::1")
	solicited, mldv2 := netip.MustParseAddr("ff02::1:ff00:1"), netip.MustParseAddr("ff02::16")
	v6 := func(e *packet.Ethernet, src, dst netip.Addr, hop uint8, l4 packet.Layer) []byte {
		return packet.Build(e, &packet.IPv6{Src: src, Dst: dst, HopLimit: hop}, l4)
	}
	icmp := func(typ uint8) *packet.ICMP { return &packet.ICMP{Type: typ} }
	syn := &packet.TCP{SrcPort: 40000, DstPort: 22, Flags: packet.SYN}
	n.crafted(t, []step{
		{name: "neighbour solicitation", from: a, frame: v6(eth(a, false), ll, solicited, 255, icmp(135)), verdict: ok, reason: fwd, dir: out},
		{name: "duplicate address detection", from: a, frame: v6(eth(a, false), netip.IPv6Unspecified(), solicited, 255, icmp(135)), verdict: ok, reason: fwd, dir: out},
		{name: "neighbour advertisement to the host end", from: a, frame: v6(eth(a, false), ll, hostLL, 255, icmp(136)), verdict: ok, reason: fwd, dir: out},
		{name: "MLDv2 report", from: a, frame: v6(eth(a, false), ll, mldv2, 1, icmp(143)), verdict: ok, reason: fwd, dir: out},
		{name: "TCP to the host end's link-local address", from: a, frame: v6(eth(a, false), ll, hostLL, 64, syn), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: out},
		{name: "UDP 53 to the host end's link-local address", from: a, frame: v6(eth(a, false), ll, hostLL, 64, &packet.UDP{SrcPort: 5353, DstPort: 53}), verdict: ok, reason: fwd, dir: out},
		{name: "echo request to the host end", from: a, frame: v6(eth(a, false), ll, hostLL, 64, icmp(128)), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: out},
		{name: "solicitation with a routable hop limit", from: a, frame: v6(eth(a, false), ll, hostLL, 64, icmp(135)), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: out},
		{name: "solicitation to a global address", from: a, frame: v6(eth(a, false), a.IPv6, n.b.IPv6, 255, icmp(135)), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: out},
		{name: "MLD query to a global address", from: a, frame: v6(eth(a, false), a.IPv6, n.b.IPv6, 1, icmp(130)), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: out},
		{name: "MLD report with hop limit 64", from: a, frame: v6(eth(a, false), ll, mldv2, 64, icmp(143)), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: out},
		{name: "the host's solicitation", to: a, frame: v6(eth(a, true), hostLL, solicited, 255, icmp(135)), verdict: ok, reason: fwd, dir: in},
		{name: "the host's TCP from its link-local address", to: a, frame: v6(eth(a, true), hostLL, ll, 64, syn), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: in},
	})
}

// A local endpoint's identity goes only with packets from its own
// interface: a packet the node forwards from elsewhere with an endpoint's
// address as its source is the world's.
func TestForgedSourceThroughTheNode(t *testing.T) {
	n := newNode(t)
	a, b, c := n.a, n.b, n.c
	apply(t, n, c, policy.Policy{Ingress: []policy.Rule{{Peers: fromID(a.Identity)}}})
	for _, src := range []netip.Addr{a.IPv4, a.IPv6} {
		dst := c.IPv4
		if src.Is6() {
			dst = c.IPv6
		}
		n.crafted(t, []step{
			{name: "a's address from b's interface", to: c, ingress: b.HostIfindex, frame: udpFrame(eth(c, true), src, dst, 1000, 53),
				verdict: dr, reason: datapath.ReasonPolicyDenied, dir: in},
			{name: "a's address from a's interface", to: c, ingress: a.HostIfindex, frame: udpFrame(eth(c, true), src, dst, 1001, 53),
				verdict: ok, reason: fwd, dir: in},
		})
	}
}

// An endpoint may send the IP protocols on one list; every encapsulation,
// and every protocol not on it, is dropped as TUNNELED, whatever the
// policy.
func TestEndpointProtocols(t *testing.T) {
	n := newNode(t)
	a, b := n.a, n.b
	raw := func(dst netip.Addr, proto uint8) []byte {
		payload := packet.Payload(make([]byte, 40))
		if dst.Is4() {
			return packet.Build(eth(a, false), &packet.IPv4{Src: a.IPv4, Dst: dst, Protocol: proto}, payload)
		}
		return packet.Build(eth(a, false), &packet.IPv6{Src: a.IPv6, Dst: dst, NextHeader: proto}, payload)
	}
	var steps []step
	for _, dst := range []netip.Addr{b.IPv4, b.IPv6} {
		for _, p := range []struct {
			name  string
			proto uint8
			pass  bool
		}{
			{"IP-in-IP", 4, false}, {"IPv6 in IP", 41, false}, {"GRE", 47, false}, {"EtherIP", 97, false},
			{"ENCAP", 98, false}, {"KA9Q IP-in-IP", 94, false}, {"L2TPv3", 115, false}, {"MPLS in IP", 137, false},
			{"Ethernet (SRv6)", 143, false}, {"PIPE", 131, false}, {"OSPF", 89, false}, {"VRRP", 112, false},
			{"protocol 253 (experiments)", 253, false}, {"reserved 255", 255, false},
			{"ESP", 50, true}, {"SCTP", 132, true}, {"DCCP", 33, true}, {"UDP-Lite", 136, true},
		} {
			v, r, d := uint32(dr), datapath.ReasonTunneled, out
			if p.pass {
				v, r = red, fwd
			}
			steps = append(steps, step{name: p.name + " to " + dst.String(), from: a, frame: raw(dst, p.proto), verdict: v, reason: r, dir: d})
		}
	}
	steps = append(steps,
		step{name: "IGMP over IPv6", from: a, frame: raw(b.IPv6, 2), verdict: dr, reason: datapath.ReasonTunneled, dir: out},
		step{name: "ICMP over IPv6", from: a, frame: raw(b.IPv6, 1), verdict: dr, reason: datapath.ReasonTunneled, dir: out},
		step{name: "ICMPv6 over IPv4", from: a, frame: raw(b.IPv4, 58), verdict: dr, reason: datapath.ReasonTunneled, dir: out},
	)
	n.crafted(t, steps)
}

// TCP: only a SYN opens a connection; a SYN on the reply tuple of another
// connection is no reply; nothing passes after a RST; one FIN is a
// half-close that keeps the connection; a SYN after the close starts over.
func TestTCPState(t *testing.T) {
	n := newNode(t)
	a, b := n.a, n.b
	apply(t, n, a, policy.Policy{Ingress: []policy.Rule{}}) // a accepts nothing
	seg := func(from, to *endpoint.Endpoint, sport, dport uint16, flags uint8) []byte {
		return tcpFrame(eth(from, false), from.IPv4, to.IPv4, sport, dport, flags)
	}
	n.crafted(t, []step{
		{name: "data with no connection", from: a, frame: seg(a, b, 41000, 80, packet.ACK), verdict: dr, reason: datapath.ReasonNoConnection, dir: out},
		{name: "a opens", from: a, frame: seg(a, b, 41000, 80, packet.SYN), verdict: red, reason: fwd, dir: out},
		{name: "b opens one on its reply tuple", from: b, frame: seg(b, a, 80, 41000, packet.SYN), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: in},
		{name: "b answers", from: b, frame: seg(b, a, 80, 41000, packet.SYN|packet.ACK), verdict: red, reason: fwd, dir: out},
		{name: "a acknowledges", from: a, frame: seg(a, b, 41000, 80, packet.ACK), verdict: red, reason: fwd, dir: out},
		{name: "a half-closes", from: a, frame: seg(a, b, 41000, 80, packet.FIN|packet.ACK), verdict: red, reason: fwd, dir: out},
	})
	// A half-close keeps the established lifetime.
	flows, err := n.dp.Flows()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		if f.Endpoint == a.ID && f.Src.Port() == 41000 && (time.Until(f.Expires) < time.Hour || !f.HalfClosed) {
			t.Errorf("after one FIN: %v expires in %v, half-closed %v", f, time.Until(f.Expires), f.HalfClosed)
		}
	}
	n.crafted(t, []step{
		{name: "b still sends", from: b, frame: seg(b, a, 80, 41000, packet.ACK|packet.PSH), verdict: red, reason: fwd, dir: out},
		{name: "b resets", from: b, frame: seg(b, a, 80, 41000, packet.RST), verdict: red, reason: fwd, dir: out},
		// (b's own SYN above left b an entry of its own for the tuple,
		// which took the RST: a's side drops it.)
		{name: "b's data after its RST", from: b, frame: seg(b, a, 80, 41000, packet.ACK|packet.PSH), verdict: dr, reason: datapath.ReasonNoConnection, dir: in},
		{name: "a's data after the RST", from: a, frame: seg(a, b, 41000, 80, packet.ACK), verdict: dr, reason: datapath.ReasonNoConnection, dir: out},
		{name: "a opens the same tuple again", from: a, frame: seg(a, b, 41000, 80, packet.SYN), verdict: red, reason: fwd, dir: out},
		{name: "b answers the new one", from: b, frame: seg(b, a, 80, 41000, packet.SYN|packet.ACK), verdict: red, reason: fwd, dir: out},
	})
}

// A stricter policy governs the connections already running: adding a
// deny rule, or applying the first policy in a direction, cuts every
// tracked connection it does not allow, both ways, and neither side brings
// it back by sending on it.
func TestStricterPolicyCutsRunningConnections(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy func(n *node) (*endpoint.Endpoint, policy.Policy)
	}{
		{"first egress policy of the client", func(n *node) (*endpoint.Endpoint, policy.Policy) {
			return n.a, policy.Policy{Egress: []policy.Rule{{Ports: []policy.Port{{Protocol: policy.UDP, Port: 53}}}}}
		}},
		{"the client's first egress policy, allowing nothing", func(n *node) (*endpoint.Endpoint, policy.Policy) {
			return n.a, policy.Policy{Egress: []policy.Rule{}}
		}},
		{"a deny added to the server's policy", func(n *node) (*endpoint.Endpoint, policy.Policy) {
			return n.b, policy.Policy{Ingress: []policy.Rule{
				{Peers: fromID(1001)},
				{Action: policy.Deny, Peers: fromID(1001), Ports: []policy.Port{{Protocol: policy.TCP, Port: 80}}},
			}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			apply(t, n, n.b, policy.Policy{Ingress: []policy.Rule{{Peers: fromID(1001)}}})
			type conn struct {
				addr           netip.Addr
				client, server net.Conn
			}
			var conns []conn
			for _, addr := range []netip.Addr{n.b.IPv4, n.b.IPv6} {
				client, server := tcpPair(t, n.a, n.b, addr)
				defer client.Close()
				defer server.Close()
				if !carries(client, server, wait) || !carries(server, client, wait) {
					t.Fatalf("%s: no data before the policy", addr)
				}
				conns = append(conns, conn{addr, client, server})
			}
			ep, p := tc.policy(n)
			apply(t, n, ep, p)
			for _, c := range conns {
				if carries(c.client, c.server, deny) {
					t.Errorf("%s: the client's data still got through", c.addr)
				}
				if carries(c.server, c.client, deny) {
					t.Errorf("%s: the server's data still got through", c.addr)
				}
			}
		})
	}
}

// tcpPair connects from one endpoint to another's port 80 at addr and
// returns both ends.
func tcpPair(t *testing.T, from, to *endpoint.Endpoint, addr netip.Addr) (client, server net.Conn) {
	t.Helper()
	var ln net.Listener
	if err := inNS(to, func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, 80).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	if err := inNS(from, func() (err error) {
		client, err = net.DialTimeout("tcp", netip.AddrPortFrom(addr, 80).String(), wait)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if server = <-accepted; server == nil {
		t.Fatal("accept failed")
	}
	return client, server
}

// carries reports whether a message written on one end arrives on the
// other within timeout.
func carries(from, to net.Conn, timeout time.Duration) bool {
	from.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := from.Write([]byte("data")); err != nil {
		return false
	}
	to.SetReadDeadline(time.Now().Add(timeout))
	b := make([]byte, 4)
	_, err := io.ReadFull(to, b)
	return err == nil
}

// Later fragments carry no ports: they get their first fragment's, and so
// its decision (and translation); one whose first was not seen is dropped
// with a reason of its own.
func TestFragmentsFollowTheirFirst(t *testing.T) {
	n := newNode(t)
	a, b := n.a, n.b
	apply(t, n, b, policy.Policy{Ingress: []policy.Rule{{Peers: fromID(a.Identity), Ports: []policy.Port{{Protocol: policy.UDP, Port: 53}}}}})
	body := packet.Payload(make([]byte, 24))
	rest := packet.Payload(make([]byte, 16))
	v4 := func(id uint16, first bool, dport uint16) []byte {
		if first {
			return packet.Build(eth(a, false), &packet.IPv4{Src: a.IPv4, Dst: b.IPv4, ID: id, MoreFragments: true}, &packet.UDP{SrcPort: 4000, DstPort: dport}, body)
		}
		return packet.Build(eth(a, false), &packet.IPv4{Src: a.IPv4, Dst: b.IPv4, ID: id, Protocol: packet.ProtoUDP, FragOffset: 4}, rest)
	}
	v6 := func(id uint32, first bool, dport uint16) []byte {
		fh := []byte{packet.ProtoUDP, 0, 0, 0, 0, 0, 0, 0}
		binary.BigEndian.PutUint32(fh[4:], id)
		ip := &packet.IPv6{Src: a.IPv6, Dst: b.IPv6, NextHeader: 44}
		if first {
			fh[3] = 1 // more fragments
			return packet.Build(eth(a, false), ip, packet.Payload(append(fh, packet.Build(&packet.UDP{SrcPort: 4000, DstPort: dport}, body)...)))
		}
		binary.BigEndian.PutUint16(fh[2:], 4<<3) // offset 32 bytes, last
		return packet.Build(eth(a, false), ip, packet.Payload(append(fh, rest...)))
	}
	n.crafted(t, []step{
		{name: "IPv4: a later fragment before its first", from: a, frame: v4(99, false, 0), verdict: dr, reason: datapath.ReasonFragNoFirst, dir: out},
		{name: "IPv4: first fragment to port 53", from: a, frame: v4(7, true, 53), verdict: red, reason: fwd, dir: out},
		{name: "IPv4: its later fragment", from: a, frame: v4(7, false, 0), verdict: red, reason: fwd, dir: out},
		{name: "IPv4: first fragment to port 54", from: a, frame: v4(8, true, 54), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: in},
		{name: "IPv4: its later fragment", from: a, frame: v4(8, false, 0), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: in},
		{name: "IPv6: a later fragment before its first", from: a, frame: v6(99, false, 0), verdict: dr, reason: datapath.ReasonFragNoFirst, dir: out},
		{name: "IPv6: first fragment to port 53", from: a, frame: v6(7, true, 53), verdict: red, reason: fwd, dir: out},
		{name: "IPv6: its later fragment", from: a, frame: v6(7, false, 0), verdict: red, reason: fwd, dir: out},
		{name: "IPv6: first fragment to port 54", from: a, frame: v6(8, true, 54), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: in},
		{name: "IPv6: its later fragment", from: a, frame: v6(8, false, 0), verdict: dr, reason: datapath.ReasonPolicyDenied, dir: in},
	})

	// Real datagrams larger than the link's MTU, both ways, under a port
	// policy on both ends.
	apply(t, n, a, policy.Policy{Egress: []policy.Rule{{Peers: fromID(b.Identity), Ports: []policy.Port{{Protocol: policy.UDP, Port: 53}}}}})
	for _, dst := range []netip.Addr{b.IPv4, b.IPv6} {
		if got := bigEcho(t, a, b, netip.AddrPortFrom(dst, 53), 4000); got != 4000 {
			t.Errorf("a 4000-byte datagram to %s and back: %d bytes came back", dst, got)
		}
	}
}

// bigEcho sends a datagram of size bytes from one endpoint to dst, where
// the other echoes it, and returns how many bytes came back.
func bigEcho(t *testing.T, from, to *endpoint.Endpoint, dst netip.AddrPort, size int) int {
	t.Helper()
	testutil.OpenNetNS(t, to.NetNS).EchoUDP(t, dst)
	got := 0
	if err := inNS(from, func() error {
		c, err := net.Dial("udp", dst.String())
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 65536)
		for range 3 { // a lost fragment loses the datagram: try again
			c.SetDeadline(time.Now().Add(wait / 3))
			if _, err := c.Write(make([]byte, size)); err != nil {
				return err
			}
			if got, err = c.Read(buf); err == nil {
				return nil
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return got
}
