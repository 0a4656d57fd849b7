package policy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/policy"
)

// node is a datapath with three endpoints, a (identity 1001), b (1002) and
// c (1003), in namespaces of their own, dual stack.
type node struct {
	dp      *datapath.Datapath
	ns      *testutil.NetNS
	a, b, c *endpoint.Endpoint
	world   *testutil.NetNS // see outside
}

func newNode(t testing.TB) *node {
	t.Helper()
	return newNodeWith(t, datapath.Limits{Conntrack: 4096}) // small, quick to make
}

// newNodeWith is newNode with map sizes of its own.
func newNodeWith(t testing.TB, limits datapath.Limits) *node {
	t.Helper()
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name: "node", NetNS: ns.Path, BPFFS: testutil.BPFFS(t),
		Node:   datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24"), netip.MustParsePrefix("fd00:1::/64")}},
		Limits: limits,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := dp.Unload(); err != nil {
			t.Error(err)
		}
	})
	n := &node{dp: dp, ns: ns}
	for i, ep := range []**endpoint.Endpoint{&n.a, &n.b, &n.c} {
		*ep, err = endpoint.Create(context.Background(), dp, endpoint.Spec{
			ID:       uint16(i + 1),
			IPv4:     netip.AddrFrom4([4]byte{198, 18, 1, byte(11 + i)}),
			IPv6:     netip.MustParseAddr(fmt.Sprintf("fd00:1::%x", 0x11+i)),
			Identity: datapath.Identity(1001 + i),
			NetNS:    testutil.Name("sluice-t-"),
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// inNS runs fn in the endpoint's namespace.
func inNS(ep *endpoint.Endpoint, fn func() error) error {
	h, err := netns.GetFromName(ep.NetNS)
	if err != nil {
		return err
	}
	defer h.Close()
	return nsrun.Do(h, fn)
}

// place is where traffic goes: an endpoint, or addresses of the node.
type place struct {
	name   string
	do     func(fn func() error) error // run fn in its namespace
	v4, v6 netip.Addr
}

func at(ep *endpoint.Endpoint) place {
	return place{fmt.Sprint("endpoint ", ep.ID), func(fn func() error) error { return inNS(ep, fn) }, ep.IPv4, ep.IPv6}
}

// outside returns a place outside the node with the given addresses: a
// namespace of its own behind a veth pair, which the node routes to (with
// forwarding on) and which routes the endpoints' addresses back through
// the node. Its addresses are no endpoint's and not the node's: the
// world's.
func (n *node) outside(t *testing.T, v4, v6 string) place {
	t.Helper()
	if n.world == nil {
		n.world = testutil.NewNetNS(t)
		testutil.Veth(t, n.ns, "ext0", n.world, "ext1")
		n.ns.Do(t, func() error {
			for _, knob := range []string{"ipv4/ip_forward", "ipv6/conf/all/forwarding"} {
				if err := os.WriteFile("/proc/sys/net/"+knob, []byte("1"), 0o644); err != nil {
					return err
				}
			}
			return nil
		})
		ext0, err := netdev.Get(n.ns.Handle, "ext0")
		if err != nil {
			t.Fatal(err)
		}
		for _, gw := range []string{"198.19.255.254", "fd00:2:ffff::1"} {
			if err := netdev.DefaultRoute(n.world.Handle, "ext1", netip.MustParseAddr(gw), ext0.MAC); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, a := range []string{v4, v6} {
		addr := netip.MustParseAddr(a)
		n.world.AddAddr(t, "ext1", netip.PrefixFrom(addr, addr.BitLen()).String())
		if err := netdev.HostRoute(n.ns.Handle, "ext0", addr); err != nil {
			t.Fatal(err)
		}
	}
	return place{"outside " + v4, func(fn func() error) error { return nsrun.Do(n.world.Handle, fn) },
		netip.MustParseAddr(v4), netip.MustParseAddr(v6)}
}

// nodeAddrs gives the node the given addresses, on a device of its own,
// and returns the node as a place with them: the host.
func (n *node) nodeAddrs(t *testing.T, v4, v6 string) place {
	t.Helper()
	n.ns.Do(t, func() error {
		if _, err := netlink.LinkByName("own0"); err == nil {
			return nil
		}
		// A veth pair with both ends here: the kernel may lack dummy
		// devices.
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "own0"}, PeerName: "own1"}); err != nil {
			return err
		}
		for _, name := range []string{"own0", "own1"} {
			l, err := netlink.LinkByName(name)
			if err == nil {
				err = netlink.LinkSetUp(l)
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
	n.ns.AddAddr(t, "own0", v4+"/32")
	n.ns.AddAddr(t, "own0", v6+"/128")
	return place{"node " + v4, func(fn func() error) error { return nsrun.Do(n.ns.Handle, fn) },
		netip.MustParseAddr(v4), netip.MustParseAddr(v6)}
}

// wait is how long a check waits for what a policy allows; a denied packet
// is given deny to show up.
const (
	wait = 5 * time.Second
	deny = 200 * time.Millisecond
)

// tcp reports whether a TCP connection from one endpoint to another's port
// is made and carries a message back.
func tcp(t *testing.T, from *endpoint.Endpoint, to place, addr netip.Addr, port uint16, want bool) bool {
	t.Helper()
	var ln net.Listener
	if err := to.do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, port).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	timeout := deny
	if want {
		timeout = wait
	}
	ok := false
	inNS(from, func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(addr, port).String(), timeout)
		if err != nil {
			return nil
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(timeout))
		b := make([]byte, 2)
		_, err = c.Read(b)
		ok = err == nil && string(b) == "hi"
		return nil
	})
	return ok
}

// udp reports whether a datagram from one endpoint to another's port gets
// its echo.
func udp(t *testing.T, from *endpoint.Endpoint, to place, addr netip.Addr, port uint16, want bool) bool {
	t.Helper()
	var pc net.PacketConn
	if err := to.do(func() (err error) {
		pc, err = net.ListenPacket("udp", netip.AddrPortFrom(addr, port).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		b := make([]byte, 16)
		n, peer, err := pc.ReadFrom(b)
		if err == nil {
			pc.WriteTo(b[:n], peer)
		}
	}()
	timeout := deny
	if want {
		timeout = wait
	}
	ok := false
	inNS(from, func() error {
		c, err := net.Dial("udp", netip.AddrPortFrom(addr, port).String())
		if err != nil {
			return nil
		}
		defer c.Close()
		c.Write([]byte("hi"))
		c.SetReadDeadline(time.Now().Add(timeout))
		b := make([]byte, 2)
		_, err = c.Read(b)
		ok = err == nil
		return nil
	})
	return ok
}

// ping reports whether an echo request from one endpoint to addr is
// answered.
func ping(t *testing.T, from *endpoint.Endpoint, addr netip.Addr, want bool) bool {
	t.Helper()
	h, err := netns.GetFromName(from.NetNS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	timeout := deny
	if want {
		timeout = wait
	}
	return testutil.Ping(t, h, addr, testutil.PingOptions{Timeout: timeout}) > 0
}

func u8(v uint8) *uint8 { return &v }

// check is one flow a scenario tries, and whether its policy allows it.
type check struct {
	proto   string // "tcp", "udp", "icmp"
	from    *endpoint.Endpoint
	to      any // *endpoint.Endpoint or place
	port    uint16
	allowed bool
}

func (n *node) run(t *testing.T, checks []check) {
	t.Helper()
	for _, c := range checks {
		to, ok := c.to.(place)
		if ep, isEP := c.to.(*endpoint.Endpoint); isEP {
			to, ok = at(ep), true
		}
		if !ok {
			t.Fatalf("check to %T", c.to)
		}
		for _, addr := range []netip.Addr{to.v4, to.v6} {
			var got bool
			switch c.proto {
			case "tcp":
				got = tcp(t, c.from, to, addr, c.port, c.allowed)
			case "udp":
				got = udp(t, c.from, to, addr, c.port, c.allowed)
			case "icmp":
				got = ping(t, c.from, addr, c.allowed)
			}
			if got != c.allowed {
				t.Errorf("%s endpoint %d -> %s %s port %d: got through %t, want %t", c.proto, c.from.ID, to.name, addr, c.port, got, c.allowed)
			}
		}
	}
}

// Each scenario applies policies and tries real TCP, UDP and ICMP, over
// IPv4 and IPv6, between endpoints a (1001), b (1002) and c (1003).
func TestScenarios(t *testing.T) {
	tcpPort := func(p uint16) policy.Port { return policy.Port{Protocol: policy.TCP, Port: p} }
	id := func(i datapath.Identity) policy.Peer { return policy.Peer{Identity: i} }
	allow := func(peers []policy.Peer, ports ...policy.Port) policy.Rule {
		return policy.Rule{Action: policy.Allow, Peers: peers, Ports: ports}
	}
	denyRule := func(peers []policy.Peer, ports ...policy.Port) policy.Rule {
		return policy.Rule{Action: policy.Deny, Peers: peers, Ports: ports}
	}
	cidr := func(s string, except ...string) policy.Peer {
		p := policy.Peer{CIDR: netip.MustParsePrefix(s)}
		for _, e := range except {
			p.Except = append(p.Except, netip.MustParsePrefix(e))
		}
		return p
	}
	type applied struct {
		ep uint16
		p  policy.Policy
	}
	for _, sc := range []struct {
		name     string
		policies func(n *node) []applied
		checks   func(t *testing.T, n *node) []check
	}{
		{"no policy allows all", nil, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"udp", n.a, n.b, 53, true}, {"icmp", n.a, n.b, 0, true}}
		}},
		{"ingress by identity and port", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow([]policy.Peer{id(1001)}, tcpPort(80))}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{
				{"tcp", n.a, n.b, 80, true}, {"tcp", n.a, n.b, 81, false}, {"tcp", n.c, n.b, 80, false},
				{"udp", n.a, n.b, 80, false}, {"icmp", n.a, n.b, 0, false},
				{"tcp", n.b, n.a, 80, true}, // egress of b: no policy
			}
		}},
		{"default deny with an empty rule list", func(n *node) []applied {
			return []applied{{n.a.ID, policy.Policy{Egress: []policy.Rule{}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{
				{"tcp", n.a, n.b, 80, false}, {"icmp", n.a, n.b, 0, false},
				{"tcp", n.b, n.a, 80, true}, // replies of what a receives leave
				{"icmp", n.b, n.a, 0, true},
			}
		}},
		{"deny beats allow", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{
				allow(nil), denyRule([]policy.Peer{id(1001)}, tcpPort(81)),
			}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"tcp", n.a, n.b, 81, false}, {"tcp", n.c, n.b, 81, true}}
		}},
		{"deny first in order beats a later, more specific allow", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{
				denyRule([]policy.Peer{id(1001)}), allow([]policy.Peer{id(1001)}, tcpPort(80)),
			}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, false}, {"tcp", n.c, n.b, 80, false}}
		}},
		{"port range", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{
				allow(nil, policy.Port{Protocol: policy.TCP, Port: 8000, EndPort: 8080}),
			}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 8000, true}, {"tcp", n.a, n.b, 8080, true}, {"tcp", n.a, n.b, 8043, true},
				{"tcp", n.a, n.b, 7999, false}, {"tcp", n.a, n.b, 8081, false}}
		}},
		{"UDP port", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow(nil, policy.Port{Protocol: policy.UDP, Port: 53})}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"udp", n.a, n.b, 53, true}, {"udp", n.a, n.b, 54, false}, {"tcp", n.a, n.b, 53, false}}
		}},
		{"ICMP echo by type", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{
				allow(nil, policy.Port{Protocol: policy.ICMP, ICMPType: u8(8)}, policy.Port{Protocol: policy.ICMPv6, ICMPType: u8(128)}),
			}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"icmp", n.a, n.b, 0, true}, {"tcp", n.a, n.b, 80, false}}
		}},
		{"ICMP of another type", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{
				allow(nil, policy.Port{Protocol: policy.ICMP, ICMPType: u8(13)}, policy.Port{Protocol: policy.ICMPv6, ICMPType: u8(129)}),
			}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"icmp", n.a, n.b, 0, false}}
		}},
		{"egress by CIDR with except", func(n *node) []applied {
			return []applied{{n.a.ID, policy.Policy{Egress: []policy.Rule{
				allow([]policy.Peer{cidr("198.19.0.0/16", "198.19.2.0/24"), cidr("fd00:2::/32", "fd00:2:2::/48")}),
			}}}}
		}, func(t *testing.T, n *node) []check {
			in, except := n.outside(t, "198.19.1.1", "fd00:2:1::1"), n.outside(t, "198.19.2.1", "fd00:2:2::1")
			return []check{{"tcp", n.a, in, 80, true}, {"tcp", n.a, except, 80, false},
				// A CIDR peer is outside the cluster: it does not match
				// local endpoints inside its range.
				{"tcp", n.a, n.b, 80, false}}
		}},
		{"egress to world", func(n *node) []applied {
			return []applied{{n.a.ID, policy.Policy{Egress: []policy.Rule{allow([]policy.Peer{{Reserved: policy.World}}, tcpPort(80))}}}}
		}, func(t *testing.T, n *node) []check {
			out := n.outside(t, "198.19.3.1", "fd00:2:3::1")
			return []check{{"tcp", n.a, out, 80, true}, {"tcp", n.a, out, 81, false}, {"tcp", n.a, n.b, 80, false}}
		}},
		{"egress by identity and ingress by identity", func(n *node) []applied {
			return []applied{
				{n.a.ID, policy.Policy{Egress: []policy.Rule{allow([]policy.Peer{id(1002)}, tcpPort(80))}}},
				{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow([]policy.Peer{id(1001)}, tcpPort(80))}}},
			}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"tcp", n.a, n.c, 80, false}, {"tcp", n.c, n.b, 80, false}}
		}},
		{"reserved all", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow([]policy.Peer{{Reserved: policy.All}}, tcpPort(80))}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"tcp", n.c, n.b, 80, true}, {"tcp", n.c, n.b, 81, false}}
		}},
		{"TCP to any port", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow([]policy.Peer{id(1001)}, policy.Port{Protocol: policy.TCP})}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"tcp", n.a, n.b, 4444, true}, {"udp", n.a, n.b, 53, false}}
		}},
		{"any protocol", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow([]policy.Peer{id(1001)}, policy.Port{Protocol: policy.AnyProtocol})}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"udp", n.a, n.b, 53, true}, {"icmp", n.a, n.b, 0, true}, {"tcp", n.c, n.b, 80, false}}
		}},
		{"several peers", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow([]policy.Peer{id(1001), id(1003)}, tcpPort(80))}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"tcp", n.c, n.b, 80, true}}
		}},
		{"several ports", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow(nil, tcpPort(80), policy.Port{Protocol: policy.UDP, Port: 53})}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"udp", n.a, n.b, 53, true}, {"tcp", n.a, n.b, 53, false}, {"udp", n.a, n.b, 80, false}}
		}},
		{"deny an identity, allow the rest", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow(nil), denyRule([]policy.Peer{id(1003)})}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"icmp", n.a, n.b, 0, true}, {"tcp", n.c, n.b, 80, false}, {"icmp", n.c, n.b, 0, false}}
		}},
		{"egress deny a port", func(n *node) []applied {
			return []applied{{n.a.ID, policy.Policy{Egress: []policy.Rule{allow(nil), denyRule(nil, tcpPort(81))}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"tcp", n.a, n.b, 81, false}, {"tcp", n.a, n.c, 81, false}}
		}},
		{"UDP range", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow(nil, policy.Port{Protocol: policy.UDP, Port: 5000, EndPort: 5010})}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"udp", n.a, n.b, 5005, true}, {"udp", n.a, n.b, 5010, true}, {"udp", n.a, n.b, 5011, false}, {"udp", n.a, n.b, 4999, false}}
		}},
		{"ICMP type and code", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{
				allow(nil, policy.Port{Protocol: policy.ICMP, ICMPType: u8(8), ICMPCode: u8(0)}, policy.Port{Protocol: policy.ICMPv6, ICMPType: u8(128), ICMPCode: u8(0)}),
			}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"icmp", n.a, n.b, 0, true}}
		}},
		{"ICMP type with another code", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{
				allow(nil, policy.Port{Protocol: policy.ICMP, ICMPType: u8(8), ICMPCode: u8(1)}, policy.Port{Protocol: policy.ICMPv6, ICMPType: u8(128), ICMPCode: u8(1)}),
			}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"icmp", n.a, n.b, 0, false}}
		}},
		{"egress deny world", func(n *node) []applied {
			return []applied{{n.a.ID, policy.Policy{Egress: []policy.Rule{allow(nil), denyRule([]policy.Peer{{Reserved: policy.World}})}}}}
		}, func(t *testing.T, n *node) []check {
			out := n.outside(t, "198.19.4.1", "fd00:2:4::1")
			return []check{{"tcp", n.a, out, 80, false}, {"tcp", n.a, n.b, 80, true}}
		}},
		{"egress deny a CIDR", func(n *node) []applied {
			return []applied{{n.a.ID, policy.Policy{Egress: []policy.Rule{allow(nil),
				denyRule([]policy.Peer{cidr("198.19.5.0/24"), cidr("fd00:2:5::/48")})}}}}
		}, func(t *testing.T, n *node) []check {
			denied, other := n.outside(t, "198.19.5.1", "fd00:2:5::1"), n.outside(t, "198.19.6.1", "fd00:2:6::1")
			return []check{{"tcp", n.a, denied, 80, false}, {"tcp", n.a, other, 80, true}}
		}},
		{"both directions default deny", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{}, Egress: []policy.Rule{}}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, false}, {"tcp", n.b, n.a, 80, false}, {"icmp", n.b, n.a, 0, false}}
		}},
		{"the sender allows, the receiver does not", func(n *node) []applied {
			return []applied{
				{n.a.ID, policy.Policy{Egress: []policy.Rule{allow(nil)}}},
				{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow([]policy.Peer{id(1003)})}}},
			}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, false}, {"tcp", n.c, n.b, 80, true}}
		}},
		{"audit with an allow rule", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{allow([]policy.Peer{id(1001)})}, Audit: true}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"tcp", n.c, n.b, 80, true}}
		}},
		{"audit lets through", func(n *node) []applied {
			return []applied{{n.b.ID, policy.Policy{Ingress: []policy.Rule{}, Audit: true}}}
		}, func(t *testing.T, n *node) []check {
			return []check{{"tcp", n.a, n.b, 80, true}, {"icmp", n.a, n.b, 0, true}}
		}},
	} {
		t.Run(sc.name, func(t *testing.T) {
			n := newNode(t)
			if sc.policies != nil {
				for _, a := range sc.policies(n) {
					if _, err := policy.Apply(context.Background(), n.dp, a.ep, a.p); err != nil {
						t.Fatalf("apply to %d: %v", a.ep, err)
					}
				}
			}
			n.run(t, sc.checks(t, n))
		})
	}
}

// What the node itself sends to an endpoint meets the endpoint's ingress
// policy as identity host, on the path that does not go through
// bpf_redirect_peer.
func TestHostToEndpoint(t *testing.T) {
	n := newNode(t)
	n.nodeAddrs(t, "198.19.8.1", "fd00:2:8::1") // to send from
	fromNode := func(addr netip.Addr, want bool) bool {
		t.Helper()
		to := at(n.b)
		var ln net.Listener
		if err := to.do(func() (err error) {
			ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, 80).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			if c, err := ln.Accept(); err == nil {
				c.Close()
			}
		}()
		timeout := deny
		if want {
			timeout = wait
		}
		ok := false
		n.ns.Do(t, func() error {
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(addr, 80).String(), timeout)
			if err == nil {
				c.Close()
				ok = true
			}
			return nil
		})
		return ok
	}
	for _, addr := range []netip.Addr{n.b.IPv4, n.b.IPv6} {
		if !fromNode(addr, true) {
			t.Errorf("node -> %s with no policy: no connection", addr)
		}
	}
	only := func(peers ...policy.Peer) {
		t.Helper()
		p := policy.Policy{Ingress: []policy.Rule{{Peers: peers, Ports: []policy.Port{{Protocol: policy.TCP, Port: 80}}}}}
		if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, p); err != nil {
			t.Fatal(err)
		}
	}
	only(policy.Peer{Identity: 1001})
	for _, addr := range []netip.Addr{n.b.IPv4, n.b.IPv6} {
		if fromNode(addr, false) {
			t.Errorf("node -> %s: connected though only identity 1001 may", addr)
		}
	}
	only(policy.Peer{Reserved: policy.Host})
	for _, addr := range []netip.Addr{n.b.IPv4, n.b.IPv6} {
		if !fromNode(addr, true) {
			t.Errorf("node -> %s: no connection though the host may", addr)
		}
	}
}

// A policy naming an identity follows the identity, not the addresses: an
// endpoint that takes the identity gets through without any policy applied
// again, and so does an address assigned the identity.
func TestIdentityChanges(t *testing.T) {
	n := newNode(t)
	p := policy.Policy{Ingress: []policy.Rule{{Peers: []policy.Peer{{Identity: 5000}}}}}
	if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, p); err != nil {
		t.Fatal(err)
	}
	n.run(t, []check{{"tcp", n.a, n.b, 80, false}})
	if _, err := endpoint.Update(context.Background(), n.dp, n.a.ID, endpoint.Changes{Identity: 5000}); err != nil {
		t.Fatal(err)
	}
	n.run(t, []check{{"tcp", n.a, n.b, 80, true}, {"tcp", n.c, n.b, 80, false}})

	// An address of the world, given the identity.
	pe := policy.Policy{Egress: []policy.Rule{{Peers: []policy.Peer{{Identity: 6000}}}}}
	if _, err := policy.Apply(context.Background(), n.dp, n.c.ID, pe); err != nil {
		t.Fatal(err)
	}
	out := n.outside(t, "198.19.7.1", "fd00:2:7::1")
	n.run(t, []check{{"tcp", n.c, out, 80, false}})
	for _, pfx := range []string{"198.19.7.0/24", "fd00:2:7::/48"} {
		if err := policy.AssignIdentity(context.Background(), n.dp, netip.MustParsePrefix(pfx), 6000); err != nil {
			t.Fatal(err)
		}
	}
	n.run(t, []check{{"tcp", n.c, out, 81, true}})
}

// tcpConn opens a TCP connection from one endpoint to another's port 80,
// whose server end echoes, and returns a function that sends a message and
// reports whether it came back.
func tcpConn(t *testing.T, from, to *endpoint.Endpoint, addr netip.Addr) func(timeout time.Duration) bool {
	t.Helper()
	c, server := tcpPair(t, from, to, addr)
	t.Cleanup(func() { c.Close(); server.Close() })
	go func() {
		b := make([]byte, 64)
		for {
			n, err := server.Read(b)
			if err != nil {
				return
			}
			server.Write(b[:n])
		}
	}()
	return func(timeout time.Duration) bool {
		c.SetDeadline(time.Now().Add(timeout))
		if _, err := c.Write([]byte("echo")); err != nil {
			return false
		}
		b := make([]byte, 4)
		_, err := io.ReadFull(c, b)
		return err == nil
	}
}

// Replacing a policy under an open connection: one the new policy still
// allows keeps working; one it no longer allows is forgotten, and its next
// packets are dropped, as segments of no connection conntrack knows, and
// counted.
func TestReplaceUnderOpenConnection(t *testing.T) {
	n := newNode(t)
	allow80 := policy.Policy{Ingress: []policy.Rule{{Peers: []policy.Peer{{Identity: 1001}}, Ports: []policy.Port{{Protocol: policy.TCP, Port: 80}}}}}
	if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, allow80); err != nil {
		t.Fatal(err)
	}
	send := tcpConn(t, n.a, n.b, n.b.IPv4)
	if !send(wait) {
		t.Fatal("no echo before the replacement")
	}
	// Still allowed: the same rule with another beside it.
	both := allow80
	both.Ingress = append(both.Ingress, policy.Rule{Peers: []policy.Peer{{Identity: 1003}}})
	if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, both); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if !send(wait) {
			t.Fatalf("echo %d lost after a replacement that still allows the connection", i)
		}
	}
	// No longer allowed.
	before := revoked(t, n.dp)
	if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, policy.Policy{Ingress: []policy.Rule{}}); err != nil {
		t.Fatal(err)
	}
	if send(deny) {
		t.Error("the connection went on after its policy was withdrawn")
	}
	if after := revoked(t, n.dp); after <= before {
		t.Errorf("NO_CONNECTION drops went from %d to %d", before, after)
	}
}

// revoked counts the packets dropped as NO_CONNECTION, both ways.
func revoked(t *testing.T, dp *datapath.Datapath) uint64 {
	t.Helper()
	m, err := dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return m[datapath.MetricKey{Reason: datapath.ReasonNoConnection, Direction: datapath.Ingress}].Packets +
		m[datapath.MetricKey{Reason: datapath.ReasonNoConnection, Direction: datapath.Egress}].Packets
}

// An ICMP error about an allowed flow gets through a policy that denies
// everything else: a datagram to a closed port of the node comes back as
// "port unreachable", which the socket sees as a refused connection.
func TestRelatedICMPError(t *testing.T) {
	n := newNode(t)
	out := n.outside(t, "198.19.9.1", "fd00:2:9::1")
	p := policy.Policy{
		Egress:  []policy.Rule{{Ports: []policy.Port{{Protocol: policy.UDP, Port: 9999}}}},
		Ingress: []policy.Rule{},
	}
	if _, err := policy.Apply(context.Background(), n.dp, n.a.ID, p); err != nil {
		t.Fatal(err)
	}
	for _, addr := range []netip.Addr{out.v4, out.v6} {
		var refused bool
		inNS(n.a, func() error {
			c, err := net.Dial("udp", netip.AddrPortFrom(addr, 9999).String())
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(wait))
			c.Write([]byte("x"))
			_, err = c.Read(make([]byte, 1))
			refused = errors.Is(err, syscall.ECONNREFUSED)
			return nil
		})
		if !refused {
			t.Errorf("UDP to %s: no port unreachable came back", addr)
		}
	}
}

// Audit mode lets what it would drop through, and reports it as audited;
// per-rule counters count the flows each rule decided.
func TestAuditEventsAndCounters(t *testing.T) {
	n := newNode(t)
	if err := n.dp.SetEventConfig(context.Background(), datapath.EventConfig{Drops: true, PolicyVerdicts: true}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	events, err := n.dp.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p := policy.Policy{Ingress: []policy.Rule{{Peers: []policy.Peer{{Identity: 1001}}, Ports: []policy.Port{{Protocol: policy.TCP, Port: 80}}}}, Audit: true}
	if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, p); err != nil {
		t.Fatal(err)
	}
	n.run(t, []check{{"tcp", n.a, n.b, 80, true}, {"tcp", n.c, n.b, 80, true}})
	var allowed, audited bool
	for !allowed || !audited {
		select {
		case ev := <-events:
			pe, ok := ev.(*datapath.PolicyEvent)
			if !ok || pe.Endpoint != uint32(n.b.ID) || pe.Direction != datapath.Ingress {
				continue
			}
			switch {
			case pe.Verdict == datapath.VerdictAllowed && pe.Remote == 1001 && pe.Rule == 0 && pe.Port == 80:
				allowed = true
			case pe.Verdict == datapath.VerdictAudited && pe.Remote == 1003 && pe.Rule == -1:
				audited = true
			}
		case <-ctx.Done():
			t.Fatalf("policy events: allowed %t, audited %t", allowed, audited)
		}
	}
	c, err := policy.ReadCounters(n.dp, n.b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Ingress) != 1 || c.Ingress[0] != 2 { // IPv4 and IPv6
		t.Errorf("rule counters %v, want the one rule at 2 flows", c.Ingress)
	}
}

// Bad input and unknown endpoints are refused with the documented errors,
// and leave the policy and the maps as they were.
func TestApplyErrors(t *testing.T) {
	n := newNode(t)
	good := policy.Policy{Ingress: []policy.Rule{{Peers: []policy.Peer{{Identity: 1001}}}}}
	if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, good); err != nil {
		t.Fatal(err)
	}
	if _, err := policy.Apply(context.Background(), n.dp, 99, good); !errors.Is(err, datapath.ErrNotFound) {
		t.Errorf("unknown endpoint: %v, want ErrNotFound", err)
	}
	for name, bad := range map[string]policy.Policy{
		"non-canonical CIDR":    {Ingress: []policy.Rule{{Peers: []policy.Peer{{CIDR: netip.MustParsePrefix("198.19.1.1/16")}}}}},
		"range end below start": {Ingress: []policy.Rule{{Ports: []policy.Port{{Protocol: policy.TCP, Port: 90, EndPort: 80}}}}},
		"reserved identity":     {Ingress: []policy.Rule{{Peers: []policy.Peer{{Identity: 2}}}}},
		"ICMP type on TCP":      {Egress: []policy.Rule{{Ports: []policy.Port{{Protocol: policy.TCP, ICMPType: u8(8)}}}}},
	} {
		if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, bad); !errors.Is(err, datapath.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	if got, err := policy.Get(n.dp, n.b.ID); err != nil || len(got.Ingress) != 1 || got.Egress != nil {
		t.Errorf("policy after refused applies: %+v, %v", got, err)
	}
	n.run(t, []check{{"tcp", n.a, n.b, 80, true}, {"tcp", n.c, n.b, 80, false}})
	if _, err := policy.Delete(context.Background(), n.dp, n.b.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := policy.Get(n.dp, n.b.ID); !errors.Is(err, datapath.ErrNotFound) {
		t.Errorf("Get after Delete: %v, want ErrNotFound", err)
	}
	n.run(t, []check{{"tcp", n.c, n.b, 80, true}})
}

// A CIDR one endpoint's policy names inside a CIDR another's policy allows
// gets an identity of its own; the other policy follows, and its traffic
// into the inner range goes on.
func TestNestedCIDRsAcrossPolicies(t *testing.T) {
	n := newNode(t)
	out := n.outside(t, "198.19.1.1", "fd00:2:1::1")
	outer := policy.Policy{Egress: []policy.Rule{{Peers: []policy.Peer{
		{CIDR: netip.MustParsePrefix("198.19.0.0/16")}, {CIDR: netip.MustParsePrefix("fd00:2::/32")}}}}}
	if _, err := policy.Apply(context.Background(), n.dp, n.a.ID, outer); err != nil {
		t.Fatal(err)
	}
	n.run(t, []check{{"tcp", n.a, out, 80, true}})
	inner := policy.Policy{Egress: []policy.Rule{{Action: policy.Deny, Peers: []policy.Peer{
		{CIDR: netip.MustParsePrefix("198.19.1.0/24")}, {CIDR: netip.MustParsePrefix("fd00:2:1::/48")}}}}}
	if _, err := policy.Apply(context.Background(), n.dp, n.c.ID, inner); err != nil {
		t.Fatal(err)
	}
	n.run(t, []check{{"tcp", n.a, out, 81, true}, {"tcp", n.c, out, 80, false}})
	if _, err := policy.Delete(context.Background(), n.dp, n.c.ID); err != nil {
		t.Fatal(err)
	}
	n.run(t, []check{{"tcp", n.a, out, 82, true}, {"tcp", n.c, out, 80, true}})
}

// Two handles on one datapath take turns: each Apply starts from what is
// in the maps, not from what that handle wrote last.
func TestTwoHandles(t *testing.T) {
	n := newNode(t)
	other, err := datapath.Open(context.Background(), datapath.Config{Name: "node", NetNS: n.ns.Path, BPFFS: filepathDir(n.dp)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	port := func(p uint16, id datapath.Identity) policy.Policy {
		return policy.Policy{Ingress: []policy.Rule{{Peers: []policy.Peer{{Identity: id}}, Ports: []policy.Port{{Protocol: policy.TCP, Port: p}}}}}
	}
	for i, step := range []struct {
		dp *datapath.Datapath
		p  policy.Policy
	}{{n.dp, port(80, 1001)}, {other, port(81, 1003)}, {n.dp, port(82, 1001)}} {
		if _, err := policy.Apply(context.Background(), step.dp, n.b.ID, step.p); err != nil {
			t.Fatalf("apply %d: %v", i, err)
		}
	}
	n.run(t, []check{{"tcp", n.a, n.b, 82, true}, {"tcp", n.a, n.b, 80, false}, {"tcp", n.c, n.b, 81, false}})
}

func filepathDir(dp *datapath.Datapath) string { return filepath.Dir(dp.PinDir()) }

// A CIDR identity goes when the last policy naming it does, also when that
// policy went with its endpoint.
func TestCIDRIdentityReleased(t *testing.T) {
	n := newNode(t)
	p := netip.MustParsePrefix("198.19.11.0/24")
	cidrPolicy := policy.Policy{Egress: []policy.Rule{{Peers: []policy.Peer{{CIDR: p}}}}}
	if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, cidrPolicy); err != nil {
		t.Fatal(err)
	}
	inIPCache := func() bool {
		_, ok, err := ipcache.Lookup(core.Of(n.dp).Objs.Ipcache, p)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if !inIPCache() {
		t.Fatal("the CIDR has no ipcache entry")
	}
	if err := endpoint.Delete(context.Background(), n.dp, n.b.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := policy.Apply(context.Background(), n.dp, n.a.ID, policy.Policy{Egress: []policy.Rule{{}}}); err != nil {
		t.Fatal(err)
	}
	if inIPCache() {
		t.Error("the CIDR of a deleted endpoint's policy kept its identity")
	}
}

// A handle's memo of what it wrote is trusted only while nobody wrote
// since, and a generation never repeats: after another handle deleted the
// policy and applied another, the first handle's next Apply starts from
// the maps, not from its memo (the generation a count would have started
// again at 1 with).
func TestGenerationsNeverRepeat(t *testing.T) {
	for _, again := range []uint16{3333, 1111} {
		t.Run(fmt.Sprint("then ", again), func(t *testing.T) {
			n := newNode(t)
			other, err := datapath.Open(context.Background(), datapath.Config{Name: "node", NetNS: n.ns.Path, BPFFS: filepathDir(n.dp)})
			if err != nil {
				t.Fatal(err)
			}
			defer other.Close()
			port := func(p uint16) policy.Policy {
				return policy.Policy{Ingress: []policy.Rule{{Peers: []policy.Peer{{Identity: 1001}}, Ports: []policy.Port{{Protocol: policy.TCP, Port: p}}}}}
			}
			if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, port(1111)); err != nil {
				t.Fatal(err)
			}
			if _, err := policy.Delete(context.Background(), other, n.b.ID); err != nil {
				t.Fatal(err)
			}
			if _, err := policy.Apply(context.Background(), other, n.b.ID, port(2222)); err != nil {
				t.Fatal(err)
			}
			changes, err := policy.Apply(context.Background(), n.dp, n.b.ID, port(again))
			if err != nil {
				t.Fatal(err)
			}
			if changes.Added+changes.Changed+changes.Removed == 0 {
				t.Errorf("applying %d over 2222: no change reported", again)
			}
			got, err := policy.Get(other, n.b.ID)
			if err != nil || got.Ingress[0].Ports[0].Port != again {
				t.Errorf("Get: %+v, %v; want port %d", got, err, again)
			}
			checks := []check{{"tcp", n.a, n.b, again, true}, {"tcp", n.a, n.b, 2222, false}}
			if again != 1111 {
				checks = append(checks, check{"tcp", n.a, n.b, 1111, false})
			}
			n.run(t, checks)
		})
	}
}
