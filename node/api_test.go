package node_test

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/clustertest"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/node"
)

// The tests here feed the node API bad input and check that each is
// refused with the error its doc comment names, and that a refusal
// changes nothing: the nodes (node.List), the maps (dp.Verify compares
// them with the ledger) and, routing natively, the kernel's routes.

// world is a datapath and its namespace, as these tests look at them.
type world struct {
	dp      *datapath.Datapath
	ns      *testutil.NetNS
	routing datapath.Routing
}

func clusterWorld(n *clustertest.Node) world {
	return world{dp: n.DP, ns: n.NS, routing: n.Config.Routing}
}

// snapshot is what a refused change must leave as it was.
type snapshot struct {
	nodes  []node.Node
	routes map[netip.Prefix]netip.Addr
}

func (w world) snapshot(t *testing.T) snapshot {
	t.Helper()
	nodes, err := node.List(w.dp)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	routes, err := netdev.Routes(w.ns.Handle)
	if err != nil {
		t.Fatalf("routes: %v", err)
	}
	return snapshot{nodes: nodes, routes: routes}
}

// noDrift fails the test when the maps differ from the ledger.
func (w world) noDrift(t *testing.T) {
	t.Helper()
	drift, err := w.dp.Verify(t.Context(), false)
	if err != nil {
		t.Errorf("Verify: %v", err)
	}
	for _, d := range drift {
		t.Errorf("Verify: drift: %s", d)
	}
}

// unchanged fails the test when the nodes or routes differ from before,
// or the maps from the ledger.
func (w world) unchanged(t *testing.T, before snapshot) {
	t.Helper()
	now := w.snapshot(t)
	if !slices.EqualFunc(before.nodes, now.nodes, sameNode) {
		t.Errorf("nodes changed:\n before %v\n now    %v", before.nodes, now.nodes)
	}
	if !maps.Equal(before.routes, now.routes) {
		t.Errorf("routes changed:\n before %v\n now    %v", before.routes, now.routes)
	}
	w.noDrift(t)
}

// expect fails the test unless the datapath's remote nodes are exactly
// want (in any order) with, routing natively, a route to each pod CIDR
// via the node's address of its family, and no drift.
func (w world) expect(t *testing.T, want ...node.Node) {
	t.Helper()
	want = slices.Clone(want)
	for i := range want {
		want[i] = normalized(want[i])
	}
	slices.SortFunc(want, func(a, b node.Node) int { return strings.Compare(a.Name, b.Name) })
	got := w.snapshot(t)
	if !slices.EqualFunc(got.nodes, want, sameNode) {
		t.Errorf("nodes:\n got  %v\n want %v", got.nodes, want)
	}
	routes := map[netip.Prefix]netip.Addr{}
	if w.routing == datapath.RoutingNative {
		for _, n := range want {
			for _, p := range n.PodCIDRs {
				for _, a := range n.Addresses {
					if a.Is4() == p.Addr().Is4() {
						routes[p] = a
					}
				}
			}
		}
	}
	if !maps.Equal(got.routes, routes) {
		t.Errorf("routes:\n got  %v\n want %v", got.routes, routes)
	}
	w.noDrift(t)
}

func sameNode(a, b node.Node) bool {
	return a.Name == b.Name && slices.Equal(a.Addresses, b.Addresses) && slices.Equal(a.PodCIDRs, b.PodCIDRs)
}

// normalized is n with its addresses and pod CIDRs sorted, as List
// returns it.
func normalized(n node.Node) node.Node {
	n.Addresses = slices.Clone(n.Addresses)
	n.PodCIDRs = slices.Clone(n.PodCIDRs)
	slices.SortFunc(n.Addresses, netip.Addr.Compare)
	slices.SortFunc(n.PodCIDRs, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return n
}

// remote is node i as testutil.NewCluster lays it out (the real nodes of
// a cluster, or made-up ones beyond them): 198.18.0.(i+1), fd00:1::(i+1),
// pods in 198.19.i.0/24 and fd00:10:0:i::/64.
func remote(i int) node.Node {
	return node.Node{
		Name:      fmt.Sprintf("node-%d", i),
		Addresses: []netip.Addr{netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}), netip.MustParseAddr(fmt.Sprintf("fd00:1::%x", i+1))},
		PodCIDRs: []netip.Prefix{
			netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(i), 0}), 24),
			netip.MustParsePrefix(fmt.Sprintf("fd00:10:0:%x::/64", i)),
		},
	}
}

// with returns a copy of n changed by edit.
func with(n node.Node, edit func(*node.Node)) node.Node {
	n.Addresses = slices.Clone(n.Addresses)
	n.PodCIDRs = slices.Clone(n.PodCIDRs)
	edit(&n)
	return n
}

func addrs(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, a := range s {
		out = append(out, netip.MustParseAddr(a))
	}
	return out
}

func prefixes(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range s {
		out = append(out, netip.MustParsePrefix(p))
	}
	return out
}

func errName(err error) string {
	for _, e := range []error{datapath.ErrInvalid, datapath.ErrExists, datapath.ErrNotFound, datapath.ErrMapFull} {
		if errors.Is(err, e) {
			return fmt.Sprintf("%q", e)
		}
	}
	return "an untyped error"
}

func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Errorf("%s: %v (%s), want %q", what, err, errName(err), want)
	}
}

// singleNode is a one-node cluster (testutil.NewCluster) with a datapath
// opened on node-0 with these limits and, besides the cluster's,
// extra cluster CIDRs.
func singleNode(t *testing.T, routing datapath.Routing, limits datapath.Limits, extra ...netip.Prefix) world {
	t.Helper()
	testutil.Privileged(t)
	c := testutil.NewCluster(t, testutil.ClusterOptions{Nodes: 1})
	cn := c.Nodes[0]
	dp, err := datapath.Open(t.Context(), datapath.Config{
		Name:  "node",
		NetNS: cn.NS.Path,
		BPFFS: cn.BPFFS,
		Node: datapath.Node{
			Name:         cn.Name,
			PodCIDRs:     cn.PodCIDRs,
			Routing:      routing,
			Addresses:    []netip.Addr{cn.IPv4, cn.IPv6},
			Devices:      []string{cn.Device},
			ClusterCIDRs: append(slices.Clone(c.ClusterCIDRs), extra...),
		},
		Limits: limits,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := dp.Unload(); err != nil {
			t.Errorf("unload: %v", err)
		}
	})
	return world{dp: dp, ns: cn.NS, routing: routing}
}

var routingModes = []datapath.Routing{datapath.RoutingVXLAN, datapath.RoutingNative}

// Every bad node is refused with the error Apply documents, and changes
// nothing. node-0's datapath knows node-1 and node-2; node-3 is new.
func TestApplyErrors(t *testing.T) {
	for _, mode := range routingModes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode, Nodes: 3, Endpoints: 1})
			w := clusterWorld(c.Nodes[0])
			w.expect(t, remote(1), remote(2))
			before := w.snapshot(t)
			n3 := remote(3)
			ep := c.Endpoint(0, 0) // 198.19.0.10, fd00:10::10

			cases := []struct {
				name string
				node node.Node
				want error
				// nativeOnly: the node is refused only routing natively;
				// over VXLAN it is a good node.
				nativeOnly bool
			}{
				{name: "no address", node: with(n3, func(n *node.Node) { n.Addresses = nil }), want: datapath.ErrInvalid},
				{name: "empty addresses", node: with(n3, func(n *node.Node) { n.Addresses = []netip.Addr{} }), want: datapath.ErrInvalid},
				{name: "zero address", node: with(n3, func(n *node.Node) { n.Addresses = []netip.Addr{{}} }), want: datapath.ErrInvalid},
				{name: "empty name", node: with(n3, func(n *node.Node) { n.Name = "" }), want: datapath.ErrInvalid},
				{name: "upper case and underscore", node: with(n3, func(n *node.Node) { n.Name = "Node_A" }), want: datapath.ErrInvalid},
				{name: "leading hyphen", node: with(n3, func(n *node.Node) { n.Name = "-a" }), want: datapath.ErrInvalid},
				{name: "trailing hyphen", node: with(n3, func(n *node.Node) { n.Name = "a-" }), want: datapath.ErrInvalid},
				{name: "trailing dot", node: with(n3, func(n *node.Node) { n.Name = "node." }), want: datapath.ErrInvalid},
				{name: "space in name", node: with(n3, func(n *node.Node) { n.Name = "node 3" }), want: datapath.ErrInvalid},
				{name: "64-char name", node: with(n3, func(n *node.Node) { n.Name = strings.Repeat("a", 64) }), want: datapath.ErrInvalid},
				{name: "local node's name", node: with(n3, func(n *node.Node) { n.Name = "node-0" }), want: datapath.ErrInvalid},
				{name: "local node's IPv4 address", node: with(n3, func(n *node.Node) { n.Addresses = addrs("198.18.0.1") }), want: datapath.ErrInvalid},
				{name: "local node's IPv6 address", node: with(n3, func(n *node.Node) { n.Addresses = addrs("198.18.0.4", "fd00:1::1") }), want: datapath.ErrInvalid},
				{name: "two IPv4 addresses", node: with(n3, func(n *node.Node) { n.Addresses = addrs("198.18.0.4", "198.18.0.5") }), want: datapath.ErrInvalid},
				{name: "two IPv6 addresses", node: with(n3, func(n *node.Node) { n.Addresses = addrs("fd00:1::4", "fd00:1::5") }), want: datapath.ErrInvalid},
				{name: "one address twice", node: with(n3, func(n *node.Node) { n.Addresses = addrs("198.18.0.4", "198.18.0.4") }), want: datapath.ErrInvalid},
				{name: "IPv4 multicast", node: with(n3, func(n *node.Node) { n.Addresses = addrs("224.0.0.5") }), want: datapath.ErrInvalid},
				{name: "IPv6 multicast", node: with(n3, func(n *node.Node) { n.Addresses = addrs("ff02::1") }), want: datapath.ErrInvalid},
				{name: "IPv4 loopback", node: with(n3, func(n *node.Node) { n.Addresses = addrs("127.0.0.1") }), want: datapath.ErrInvalid},
				{name: "IPv6 loopback", node: with(n3, func(n *node.Node) { n.Addresses = addrs("::1") }), want: datapath.ErrInvalid},
				{name: "IPv4 unspecified", node: with(n3, func(n *node.Node) { n.Addresses = addrs("0.0.0.0") }), want: datapath.ErrInvalid},
				{name: "IPv6 unspecified", node: with(n3, func(n *node.Node) { n.Addresses = addrs("::") }), want: datapath.ErrInvalid},
				{name: "IPv4 link-local", node: with(n3, func(n *node.Node) { n.Addresses = addrs("169.254.0.4") }), want: datapath.ErrInvalid},
				{name: "IPv6 link-local", node: with(n3, func(n *node.Node) { n.Addresses = addrs("fe80::4") }), want: datapath.ErrInvalid},
				{name: "broadcast", node: with(n3, func(n *node.Node) { n.Addresses = addrs("255.255.255.255") }), want: datapath.ErrInvalid},
				{name: "IPv4-mapped IPv6", node: with(n3, func(n *node.Node) { n.Addresses = addrs("::ffff:198.18.0.4") }), want: datapath.ErrInvalid},
				{name: "address with a zone", node: with(n3, func(n *node.Node) { n.Addresses = addrs("fd00:1::4%eth0") }), want: datapath.ErrInvalid},
				{name: "overlapping pod CIDRs", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("198.19.3.0/24", "198.19.3.128/25") }), want: datapath.ErrInvalid},
				{name: "one pod CIDR twice", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("fd00:10:0:3::/64", "fd00:10:0:3::/64") }), want: datapath.ErrInvalid},
				{name: "pod CIDR not a network address", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("198.19.3.1/24") }), want: datapath.ErrInvalid},
				{name: "zero pod CIDR", node: with(n3, func(n *node.Node) { n.PodCIDRs = []netip.Prefix{{}} }), want: datapath.ErrInvalid},
				{name: "IPv4-mapped pod CIDR", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("::ffff:198.19.3.0/120") }), want: datapath.ErrInvalid},
				{name: "pod CIDR inside the local node's", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("198.19.0.128/25") }), want: datapath.ErrInvalid},
				{name: "pod CIDR covering the local node's", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("fd00:10::/56") }), want: datapath.ErrInvalid},
				{name: "pod CIDR is the local node's", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("198.19.0.0/24") }), want: datapath.ErrInvalid},
				{name: "pod CIDR outside the cluster CIDRs", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("198.18.5.0/24") }), want: datapath.ErrInvalid},
				{name: "IPv6 pod CIDR outside the cluster CIDRs", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("fd00:20::/64") }), want: datapath.ErrInvalid},
				{name: "pod CIDR covering a cluster CIDR", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("198.18.0.0/15") }), want: datapath.ErrInvalid},
				{name: "another node's pod CIDR", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("198.19.1.0/24") }), want: datapath.ErrExists},
				{name: "inside another node's pod CIDR", node: with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("198.19.3.0/24", "fd00:10:0:2:8000::/65") }), want: datapath.ErrExists},
				{name: "another node's IPv4 address", node: with(n3, func(n *node.Node) { n.Addresses = addrs("198.18.0.2", "fd00:1::4") }), want: datapath.ErrExists},
				{name: "another node's IPv6 address", node: with(n3, func(n *node.Node) { n.Addresses = addrs("198.18.0.4", "fd00:1::3") }), want: datapath.ErrExists},
				// A local endpoint's address is in the ipcache already:
				// the node's address entry is refused after node_addrs
				// was written, which the transaction must take back.
				{name: "a local endpoint's address", node: with(n3, func(n *node.Node) { n.Addresses = []netip.Addr{ep.IPv4, n.Addresses[1]} }), want: datapath.ErrExists},
				// Changes of a known node that are refused keep it as it was.
				{name: "node-1 takes node-2's pod CIDR", node: with(remote(1), func(n *node.Node) { n.PodCIDRs = append(n.PodCIDRs, remote(2).PodCIDRs[0]) }), want: datapath.ErrExists},
				{name: "node-1 takes node-2's address", node: with(remote(1), func(n *node.Node) { n.Addresses[0] = remote(2).Addresses[0] }), want: datapath.ErrExists},
				{name: "node-1 loses its addresses", node: with(remote(1), func(n *node.Node) { n.Addresses = nil }), want: datapath.ErrInvalid},
				{name: "node-1 takes a local pod CIDR", node: with(remote(1), func(n *node.Node) { n.PodCIDRs = append(n.PodCIDRs, prefixes("198.19.0.0/25")...) }), want: datapath.ErrInvalid},
				{name: "node-1 takes the local address", node: with(remote(1), func(n *node.Node) { n.Addresses = addrs("198.18.0.1") }), want: datapath.ErrInvalid},
				{name: "IPv6 pod CIDR, IPv4 address only", node: with(n3, func(n *node.Node) { n.Addresses = n.Addresses[:1] }), want: datapath.ErrInvalid, nativeOnly: true},
				{name: "IPv4 pod CIDR, IPv6 address only", node: with(n3, func(n *node.Node) { n.Addresses = n.Addresses[1:] }), want: datapath.ErrInvalid, nativeOnly: true},
			}
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					ch, err := node.Apply(t.Context(), w.dp, tc.node)
					if tc.nativeOnly && mode != datapath.RoutingNative {
						// A good node over VXLAN: it is added, and
						// deleting it leaves all as before.
						if err != nil || !ch.Created {
							t.Fatalf("Apply(%v) over VXLAN: %+v, %v; want it created", tc.node, ch, err)
						}
						if err := node.Delete(t.Context(), w.dp, tc.node.Name); err != nil {
							t.Fatal(err)
						}
						w.unchanged(t, before)
						return
					}
					wantErr(t, fmt.Sprintf("Apply(%v)", tc.node), err, tc.want)
					if err == nil {
						t.Logf("Changes %+v", ch)
					} else if !ch.Unchanged() {
						t.Errorf("Apply failed with Changes %+v, want none", ch)
					}
					w.unchanged(t, before)
					if err == nil {
						// Put things back for the next case.
						if _, err := node.Sync(t.Context(), w.dp, []node.Node{remote(1), remote(2)}); err != nil {
							t.Fatal(err)
						}
					}
				})
			}

			t.Run("good names", func(t *testing.T) {
				for _, name := range []string{"a", "9", strings.Repeat("a", 63), "node.example-1.com", "0-0"} {
					if _, err := node.Apply(t.Context(), w.dp, with(n3, func(n *node.Node) { n.Name = name })); err != nil {
						t.Errorf("Apply of a node named %q: %v", name, err)
						continue
					}
					if err := node.Delete(t.Context(), w.dp, name); err != nil {
						t.Errorf("Delete(%q): %v", name, err)
					}
				}
				w.unchanged(t, before)
			})

			t.Run("unknown names", func(t *testing.T) {
				for _, name := range []string{"node-3", "node-0", "", "Node_A", "node-11"} {
					wantErr(t, fmt.Sprintf("Delete(%q)", name), node.Delete(t.Context(), w.dp, name), datapath.ErrNotFound)
					if n, err := node.Get(w.dp, name); !errors.Is(err, datapath.ErrNotFound) {
						t.Errorf("Get(%q) = %v, %v; want ErrNotFound", name, n, err)
					}
				}
				w.unchanged(t, before)
				// After a Delete, the name is unknown again.
				if err := node.Delete(t.Context(), w.dp, "node-2"); err != nil {
					t.Fatal(err)
				}
				wantErr(t, "Delete of a deleted node", node.Delete(t.Context(), w.dp, "node-2"), datapath.ErrNotFound)
				if _, err := node.Get(w.dp, "node-2"); !errors.Is(err, datapath.ErrNotFound) {
					t.Errorf("Get of a deleted node: %v, want ErrNotFound", err)
				}
				w.expect(t, remote(1))
			})
		})
	}

	// A single-node datapath (RoutingLocal) takes no nodes.
	t.Run("local", func(t *testing.T) {
		testutil.Privileged(t)
		ns := testutil.NewNetNS(t)
		dp, err := datapath.Open(t.Context(), datapath.Config{
			Name: "local", NetNS: ns.Path, BPFFS: testutil.BPFFS(t),
			Node: datapath.Node{PodCIDRs: prefixes("198.19.0.0/24", "fd00:10::/64")},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dp.Unload() })
		w := world{dp: dp, ns: ns, routing: datapath.RoutingLocal}
		before := w.snapshot(t)
		for _, n := range []node.Node{remote(1), with(remote(1), func(n *node.Node) { n.PodCIDRs = nil })} {
			_, err := node.Apply(t.Context(), dp, n)
			wantErr(t, fmt.Sprintf("Apply(%v) on a single-node datapath", n), err, datapath.ErrInvalid)
		}
		_, err = node.Sync(t.Context(), dp, []node.Node{remote(1)})
		wantErr(t, "Sync on a single-node datapath", err, datapath.ErrInvalid)
		wantErr(t, "Delete on a single-node datapath", node.Delete(t.Context(), dp, "node-1"), datapath.ErrNotFound)
		if len(before.nodes) != 0 {
			t.Errorf("a single-node datapath lists nodes %v", before.nodes)
		}
		w.unchanged(t, before)
	})
}

// Applying a node is idempotent, whatever the order of its addresses and
// pod CIDRs, and Changes says what each Apply changed.
func TestApplyIdempotent(t *testing.T) {
	for _, mode := range routingModes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode, Nodes: 2, Endpoints: 1, NoPeers: true})
			w := clusterWorld(c.Nodes[0])
			w.expect(t)
			n1 := remote(1)
			apply := func(n node.Node) node.Changes {
				t.Helper()
				arg := with(n, func(*node.Node) {})
				ch, err := node.Apply(t.Context(), w.dp, n)
				if err != nil {
					t.Fatalf("Apply(%v): %v", n, err)
				}
				if !sameNode(arg, n) {
					t.Errorf("Apply changed its argument to %v", n)
				}
				return ch
			}
			sameCIDRs := func(a, b []netip.Prefix) bool {
				return slices.Equal(normalized(node.Node{PodCIDRs: a}).PodCIDRs, normalized(node.Node{PodCIDRs: b}).PodCIDRs)
			}

			ch := apply(n1)
			if !ch.Created || ch.Addresses || !sameCIDRs(ch.AddedCIDRs, n1.PodCIDRs) || len(ch.RemovedCIDRs) != 0 {
				t.Errorf("first Apply: %+v, want Created with AddedCIDRs %v", ch, n1.PodCIDRs)
			}
			w.expect(t, n1)
			if ch := apply(n1); !ch.Unchanged() {
				t.Errorf("the same node again: %+v, want Unchanged", ch)
			}
			reversed := with(n1, func(n *node.Node) { slices.Reverse(n.Addresses); slices.Reverse(n.PodCIDRs) })
			if ch := apply(reversed); !ch.Unchanged() {
				t.Errorf("the same node in another order %v: %+v, want Unchanged", reversed, ch)
			}
			got, err := node.Get(w.dp, "node-1")
			if err != nil || !sameNode(got, normalized(n1)) {
				t.Errorf("Get: %v, %v; want %v", got, err, normalized(n1))
			}
			w.expect(t, n1)

			moved := with(n1, func(n *node.Node) { n.Addresses = addrs("fd00:1::12", "198.18.0.12") })
			if ch := apply(moved); ch.Created || !ch.Addresses || len(ch.AddedCIDRs)+len(ch.RemovedCIDRs) != 0 {
				t.Errorf("new addresses: %+v, want Addresses only", ch)
			}
			w.expect(t, moved)
			extra := netip.MustParsePrefix("198.19.21.0/24")
			grown := with(moved, func(n *node.Node) { n.PodCIDRs = append(n.PodCIDRs, extra) })
			if ch := apply(grown); ch.Created || ch.Addresses || !slices.Equal(ch.AddedCIDRs, []netip.Prefix{extra}) || len(ch.RemovedCIDRs) != 0 {
				t.Errorf("one more pod CIDR: %+v, want AddedCIDRs [%s]", ch, extra)
			}
			w.expect(t, grown)
			if ch := apply(moved); ch.Created || ch.Addresses || len(ch.AddedCIDRs) != 0 || !slices.Equal(ch.RemovedCIDRs, []netip.Prefix{extra}) {
				t.Errorf("one pod CIDR less: %+v, want RemovedCIDRs [%s]", ch, extra)
			}
			w.expect(t, moved)
			none := with(moved, func(n *node.Node) { n.PodCIDRs = nil })
			if ch := apply(none); !sameCIDRs(ch.RemovedCIDRs, moved.PodCIDRs) {
				t.Errorf("no pod CIDRs: %+v, want RemovedCIDRs %v", ch, moved.PodCIDRs)
			}
			w.expect(t, none)
			if ch := apply(none); !ch.Unchanged() {
				t.Errorf("a node with no pod CIDRs again: %+v, want Unchanged", ch)
			}
			if ch := apply(n1); ch.Created || !ch.Addresses || !sameCIDRs(ch.AddedCIDRs, n1.PodCIDRs) {
				t.Errorf("back to the start: %+v", ch)
			}
			w.expect(t, n1)
		})
	}
}

func sortedChanges(s node.SyncChanges) node.SyncChanges {
	for _, l := range [][]string{s.Added, s.Changed, s.Removed} {
		slices.Sort(l)
	}
	return s
}

func sameSyncChanges(a, b node.SyncChanges) bool {
	a, b = sortedChanges(a), sortedChanges(b)
	return slices.Equal(a.Added, b.Added) && slices.Equal(a.Changed, b.Changed) && slices.Equal(a.Removed, b.Removed) && a.Unchanged == b.Unchanged
}

// Sync refuses a set of nodes that is bad as a whole before it changes
// anything; a good set it makes exactly the datapath's nodes, in any
// order, and says what it changed.
func TestSync(t *testing.T) {
	for _, mode := range routingModes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode, Nodes: 3, Endpoints: 1})
			w := clusterWorld(c.Nodes[0])
			n1, n2, n3, n4 := remote(1), remote(2), remote(3), remote(4)
			w.expect(t, n1, n2)
			// reset makes the datapath's nodes exactly these, through a
			// Sync to none first (that always works).
			reset := func(t *testing.T, nodes ...node.Node) {
				t.Helper()
				if _, err := node.Sync(t.Context(), w.dp, nil); err != nil {
					t.Fatal(err)
				}
				if _, err := node.Sync(t.Context(), w.dp, nodes); err != nil {
					t.Fatal(err)
				}
				w.expect(t, nodes...)
			}
			sync := func(t *testing.T, nodes ...node.Node) (node.SyncChanges, error) {
				t.Helper()
				return node.Sync(t.Context(), w.dp, nodes)
			}

			t.Run("refused", func(t *testing.T) {
				ep := c.Endpoint(0, 0)
				for _, tc := range []struct {
					name  string
					nodes []node.Node
					want  error
				}{
					{"a name twice", []node.Node{n1, n2, n1}, datapath.ErrInvalid},
					{"a name twice, differently", []node.Node{n1, n2, n3, with(n3, func(n *node.Node) { n.Addresses = addrs("198.18.0.14") })}, datapath.ErrInvalid},
					{"two nodes with one pod CIDR", []node.Node{n1, n2, with(n3, func(n *node.Node) { n.PodCIDRs = n1.PodCIDRs[1:] })}, datapath.ErrExists},
					{"two nodes with overlapping pod CIDRs", []node.Node{n1, with(n2, func(n *node.Node) { n.PodCIDRs = append(n.PodCIDRs, prefixes("198.19.1.128/25")...) })}, datapath.ErrExists},
					{"two nodes with one address", []node.Node{n1, n2, with(n3, func(n *node.Node) { n.Addresses = n2.Addresses[1:] })}, datapath.ErrExists},
					{"a bad name", []node.Node{n1, n2, with(n3, func(n *node.Node) { n.Name = "Node_3" })}, datapath.ErrInvalid},
					{"only a bad node", []node.Node{with(n3, func(n *node.Node) { n.Addresses = nil })}, datapath.ErrInvalid},
					{"the local node", []node.Node{n1, n2, with(n3, func(n *node.Node) { n.Name = "node-0" })}, datapath.ErrInvalid},
					{"the local address", []node.Node{with(n1, func(n *node.Node) { n.Addresses = addrs("198.18.0.1") }), n2}, datapath.ErrInvalid},
					{"a local pod CIDR", []node.Node{n1, n2, with(n3, func(n *node.Node) { n.PodCIDRs = prefixes("198.19.0.0/24") })}, datapath.ErrInvalid},
					{"a local endpoint's address", []node.Node{n1, n2, with(n3, func(n *node.Node) { n.Addresses[0] = ep.IPv4 })}, datapath.ErrExists},
				} {
					t.Run(tc.name, func(t *testing.T) {
						before := w.snapshot(t)
						got, err := sync(t, tc.nodes...)
						wantErr(t, fmt.Sprintf("Sync(%v)", tc.nodes), err, tc.want)
						if len(got.Added)+len(got.Changed)+len(got.Removed) != 0 {
							t.Errorf("a refused Sync says it changed %+v", got)
						}
						w.unchanged(t, before)
						if err == nil {
							reset(t, n1, n2)
						}
					})
				}
			})

			t.Run("changes", func(t *testing.T) {
				reset(t, n1, n2)
				n2b := with(n2, func(n *node.Node) { n.PodCIDRs = append(n.PodCIDRs, prefixes("198.19.20.0/24")...) })
				for _, step := range []struct {
					nodes []node.Node
					want  node.SyncChanges
				}{
					{[]node.Node{n1, n2b, n3}, node.SyncChanges{Added: []string{"node-3"}, Changed: []string{"node-2"}, Unchanged: 1}},
					{[]node.Node{n3, n2b, n1}, node.SyncChanges{Unchanged: 3}},
					{[]node.Node{n1, n3}, node.SyncChanges{Removed: []string{"node-2"}, Unchanged: 2}},
					{[]node.Node{n4, n2}, node.SyncChanges{Added: []string{"node-2", "node-4"}, Removed: []string{"node-1", "node-3"}}},
					{[]node.Node{n4, n2}, node.SyncChanges{Unchanged: 2}},
					{nil, node.SyncChanges{Removed: []string{"node-2", "node-4"}}},
					{nil, node.SyncChanges{}},
					{[]node.Node{n1, n2}, node.SyncChanges{Added: []string{"node-1", "node-2"}}},
				} {
					got, err := sync(t, step.nodes...)
					if err != nil {
						t.Fatalf("Sync(%v): %v", step.nodes, err)
					}
					if !sameSyncChanges(got, step.want) {
						t.Errorf("Sync(%v) = %+v, want %+v", step.nodes, got, step.want)
					}
					w.expect(t, step.nodes...)
				}
			})

			// A pod CIDR or an address that goes from one node to another
			// in one Sync, in either order of the two.
			t.Run("moves", func(t *testing.T) {
				x := netip.MustParsePrefix("198.19.20.0/24")
				n1x := with(n1, func(n *node.Node) { n.PodCIDRs = append(n.PodCIDRs, x) })
				n2x := with(n2, func(n *node.Node) { n.PodCIDRs = append(n.PodCIDRs, x) })
				n1moved := with(n1, func(n *node.Node) { n.Addresses = addrs("198.18.0.12", "fd00:1::12") })
				n3took := with(n3, func(n *node.Node) { n.Addresses = n1.Addresses })
				for _, tc := range []struct {
					name     string
					from, to []node.Node
					want     node.SyncChanges
				}{
					{"pod CIDR, giver first", []node.Node{n1x, n2}, []node.Node{n1, n2x}, node.SyncChanges{Changed: []string{"node-1", "node-2"}}},
					{"pod CIDR, taker first", []node.Node{n1x, n2}, []node.Node{n2x, n1}, node.SyncChanges{Changed: []string{"node-1", "node-2"}}},
					{"pod CIDR to a new node, taker first", []node.Node{n1x, n2}, []node.Node{with(n3, func(n *node.Node) { n.PodCIDRs = append(n.PodCIDRs, x) }), n1, n2}, node.SyncChanges{Added: []string{"node-3"}, Changed: []string{"node-1"}, Unchanged: 1}},
					{"pod CIDR from a removed node", []node.Node{n1x, n2}, []node.Node{n2x}, node.SyncChanges{Changed: []string{"node-2"}, Removed: []string{"node-1"}}},
					{"address, taker first", []node.Node{n1, n2}, []node.Node{n3took, n1moved, n2}, node.SyncChanges{Added: []string{"node-3"}, Changed: []string{"node-1"}, Unchanged: 1}},
					{"address, giver first", []node.Node{n1, n2}, []node.Node{n1moved, n3took, n2}, node.SyncChanges{Added: []string{"node-3"}, Changed: []string{"node-1"}, Unchanged: 1}},
				} {
					t.Run(tc.name, func(t *testing.T) {
						reset(t, tc.from...)
						got, err := sync(t, tc.to...)
						if err != nil {
							t.Fatalf("Sync(%v): %v", tc.to, err)
						}
						if !sameSyncChanges(got, tc.want) {
							t.Errorf("Sync(%v) = %+v, want %+v", tc.to, got, tc.want)
						}
						w.expect(t, tc.to...)
					})
				}
			})

			// Sync makes the datapath's nodes exactly the set it is given,
			// when that set is good: also when pod CIDRs move along a
			// chain of nodes. Two nodes that trade theirs need two Syncs:
			// the one is refused with ErrExists, changing nothing.
			t.Run("chain and swap", func(t *testing.T) {
				p := func(s string) netip.Prefix { return netip.MustParsePrefix(s) }
				a, b, cc, d := p("198.19.21.0/24"), p("198.19.22.0/24"), p("198.19.23.0/24"), p("198.19.24.0/24")
				own := func(n node.Node, extra netip.Prefix) node.Node {
					return with(n, func(n *node.Node) { n.PodCIDRs = append(n.PodCIDRs, extra) })
				}
				for _, tc := range []struct {
					name     string
					from, to []node.Node
				}{
					// node-1 takes node-2's, node-2 node-3's, node-3 a new one.
					{"chain", []node.Node{own(n1, a), own(n2, b), own(n3, cc)}, []node.Node{own(n1, b), own(n2, cc), own(n3, d)}},
					{"swap", []node.Node{own(n1, a), own(n2, b)}, []node.Node{own(n1, b), own(n2, a)}},
				} {
					t.Run(tc.name, func(t *testing.T) {
						reset(t, tc.from...)
						before := w.snapshot(t)
						_, err := sync(t, tc.to...)
						if tc.name == "swap" {
							if !errors.Is(err, datapath.ErrExists) {
								t.Errorf("Sync(%v) from %v: %v, want ErrExists", tc.to, tc.from, err)
							}
							w.unchanged(t, before)
							return
						}
						if err != nil {
							t.Fatalf("Sync(%v) from %v: %v (%s)", tc.to, tc.from, err, errName(err))
						}
						w.expect(t, tc.to...)
					})
				}
			})

			// "On error, the nodes before the one that failed are
			// changed, that one and those after are not."
			t.Run("nodes after a failed one are not changed", func(t *testing.T) {
				reset(t, n1, n2)
				bad := with(n3, func(n *node.Node) { n.Addresses[0] = c.Endpoint(0, 0).IPv4 })
				_, err := sync(t, n1, n2, bad, n4)
				wantErr(t, "Sync with a node whose address is a local endpoint's", err, datapath.ErrExists)
				w.expect(t, n1, n2)
			})

			t.Run("keeps its argument", func(t *testing.T) {
				reset(t)
				arg := []node.Node{with(n1, func(n *node.Node) { slices.Reverse(n.Addresses); slices.Reverse(n.PodCIDRs) })}
				want := slices.Clone(arg)
				if _, err := sync(t, arg...); err != nil {
					t.Fatal(err)
				}
				if !sameNode(arg[0], want[0]) || &arg[0].Addresses[0] != &want[0].Addresses[0] {
					t.Errorf("Sync changed the slice it was given: %v, was %v", arg, want)
				}
				w.expect(t, n1)
			})
		})
	}
}

// bpffsEntries lists a bpffs mount (a fresh one holds the kernel's
// maps.debug and progs.debug).
func bpffsEntries(t *testing.T, bpffs string) []string {
	t.Helper()
	entries, err := os.ReadDir(bpffs)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// leftNothing fails the test when a refused Open left a datapath
// directory in bpffs (beyond the entries it had before), the VXLAN device
// or a tcx program on ifindex behind.
func leftNothing(t *testing.T, ns *testutil.NetNS, bpffs string, before []string, ifindex int) {
	t.Helper()
	for _, dev := range []string{datapath.TunnelDevice, datapath.WireGuardDevice} {
		if _, err := netdev.Get(ns.Handle, dev); !errors.Is(err, unix.ENODEV) {
			t.Errorf("after a failed Open, device %s: %v, want none", dev, err)
		}
	}
	if n := xfrmObjects(t, ns); n != 0 {
		t.Errorf("after a failed Open, %d xfrm states and policies", n)
	}
	if now := bpffsEntries(t, bpffs); !slices.Equal(now, before) {
		t.Errorf("after a failed Open, %s holds %v, before %v", bpffs, now, before)
	}
	// An unpinned tcx link is released by a kernel work item, soon after.
	deadline := time.Now().Add(2 * time.Second)
	for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
		for {
			var n int
			err := nsrun.Do(ns.Handle, func() error {
				res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: at})
				if err == nil {
					n = len(res.Programs)
				}
				return err
			})
			if err != nil && testutil.KernelAtLeast(6, 6) {
				t.Errorf("query %v programs: %v", at, err)
				break
			}
			if err != nil { // no tcx: the datapath attaches cls_bpf filters
				hook, dir := attach.Ingress, "in"
				if at == ebpf.AttachTCXEgress {
					hook, dir = attach.Egress, "out"
				}
				nsrun.Do(ns.Handle, func() error {
					on, err := attach.LegacyAttached(ifindex, hook, fmt.Sprintf("sluice/node/dev%d-%s", ifindex, dir))
					if on {
						n = 1
					}
					return err
				})
			}
			if n == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("after a failed Open, %d %v programs on ifindex %d", n, at, ifindex)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// unsupportedWithout is the error Open gives for a feature the kernel
// was built without option for (/proc/config.gz): ErrNotSupported; nil
// (Open works) where it has it, or does not say.
func unsupportedWithout(option string) error {
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		return nil
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return nil
	}
	b, _ := io.ReadAll(zr)
	if bytes.Contains(b, []byte("\n"+option+"=")) {
		return nil
	}
	return datapath.ErrNotSupported
}

// xfrmObjects counts the xfrm states and policies of ns.
func xfrmObjects(t *testing.T, ns *testutil.NetNS) int {
	t.Helper()
	h, err := netlink.NewHandleAt(ns.Handle, unix.NETLINK_XFRM)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	states, err := h.XfrmStateList(netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	policies, err := h.XfrmPolicyList(netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	return len(states) + len(policies)
}

// A bad local node is refused with the error Open documents, and a
// refused Open leaves neither pins nor a VXLAN device nor programs.
func TestOpenNodeErrors(t *testing.T) {
	testutil.Privileged(t)
	// Each case opens "node" on namespace A of a fresh testutil.Pair:
	// device veth0, 198.18.0.1/24 and fd00::1/64.
	base := func() datapath.Node {
		return datapath.Node{
			Name:         "node-a",
			PodCIDRs:     prefixes("198.19.0.0/24", "fd00:10::/64"),
			Routing:      datapath.RoutingVXLAN,
			Addresses:    addrs("198.18.0.1", "fd00::1"),
			Devices:      []string{"veth0"},
			ClusterCIDRs: prefixes("198.19.0.0/16", "fd00:10::/48"),
		}
	}
	cases := []struct {
		name string
		edit func(*datapath.Node)
		cfg  func(t *testing.T, cfg *datapath.Config)
		want error // nil: Open works
	}{
		{name: "the base config works", edit: func(*datapath.Node) {}},
		{name: "routing 7", edit: func(n *datapath.Node) { n.Routing = datapath.Routing(7) }, want: datapath.ErrInvalid},
		{name: "routing -1", edit: func(n *datapath.Node) { n.Routing = datapath.Routing(-1) }, want: datapath.ErrInvalid},
		{name: "MTU 1279", edit: func(n *datapath.Node) { n.MTU = 1279 }, want: datapath.ErrInvalid},
		{name: "MTU 65536", edit: func(n *datapath.Node) { n.MTU = 65536 }, want: datapath.ErrInvalid},
		{name: "MTU -1", edit: func(n *datapath.Node) { n.MTU = -1 }, want: datapath.ErrInvalid},
		{name: "RoutingLocal, MTU 1279", edit: func(n *datapath.Node) { *n = datapath.Node{PodCIDRs: n.PodCIDRs, MTU: 1279} }, want: datapath.ErrInvalid},
		{name: "no name", edit: func(n *datapath.Node) { n.Name = "" }, want: datapath.ErrInvalid},
		{name: "bad name", edit: func(n *datapath.Node) { n.Name = "Node_A" }, want: datapath.ErrInvalid},
		{name: "no address", edit: func(n *datapath.Node) { n.Addresses = nil }, want: datapath.ErrInvalid},
		{name: "two IPv4 addresses", edit: func(n *datapath.Node) { n.Addresses = addrs("198.18.0.1", "198.18.0.3") }, want: datapath.ErrInvalid},
		{name: "loopback address", edit: func(n *datapath.Node) { n.Addresses = addrs("127.0.0.1") }, want: datapath.ErrInvalid},
		{name: "no device", edit: func(n *datapath.Node) { n.Devices = nil }, want: datapath.ErrInvalid},
		{name: "empty device name", edit: func(n *datapath.Node) { n.Devices = []string{""} }, want: datapath.ErrInvalid},
		{name: "16-byte device name", edit: func(n *datapath.Node) { n.Devices = []string{"abcdefghijklmnop"} }, want: datapath.ErrInvalid},
		{name: "a device twice", edit: func(n *datapath.Node) { n.Devices = []string{"veth0", "veth0"} }, want: datapath.ErrInvalid},
		{name: "the tunnel device", edit: func(n *datapath.Node) { n.Devices = []string{datapath.TunnelDevice} }, want: datapath.ErrInvalid},
		{name: "a device that does not exist", edit: func(n *datapath.Node) { n.Devices = []string{"veth0", "nosuch0"} }, want: datapath.ErrNotFound},
		{name: "routing natively, a device that does not exist", edit: func(n *datapath.Node) { n.Routing = datapath.RoutingNative; n.Devices = []string{"nosuch0"} }, want: datapath.ErrNotFound},
		{name: "no cluster CIDRs", edit: func(n *datapath.Node) { n.ClusterCIDRs = nil }, want: datapath.ErrInvalid},
		{name: "overlapping cluster CIDRs", edit: func(n *datapath.Node) { n.ClusterCIDRs = append(n.ClusterCIDRs, prefixes("198.19.0.0/17")...) }, want: datapath.ErrInvalid},
		{name: "cluster CIDR not a network address", edit: func(n *datapath.Node) { n.ClusterCIDRs = prefixes("198.19.0.1/16", "fd00:10::/48") }, want: datapath.ErrInvalid},
		{name: "a pod CIDR outside the cluster CIDRs", edit: func(n *datapath.Node) { n.PodCIDRs = append(n.PodCIDRs, prefixes("198.18.5.0/24")...) }, want: datapath.ErrInvalid},
		{name: "a pod CIDR wider than its cluster CIDR", edit: func(n *datapath.Node) { n.ClusterCIDRs = prefixes("198.19.0.0/25", "fd00:10::/48") }, want: datapath.ErrInvalid},
		{name: "overlapping pod CIDRs", edit: func(n *datapath.Node) { n.PodCIDRs = append(n.PodCIDRs, prefixes("198.19.0.128/25")...) }, want: datapath.ErrInvalid},
		{name: "a /31 pod CIDR", edit: func(n *datapath.Node) { n.PodCIDRs = prefixes("198.19.0.0/31") }, want: datapath.ErrInvalid},
		{name: "RoutingLocal with a name", edit: func(n *datapath.Node) { *n = datapath.Node{Name: "node-a", PodCIDRs: n.PodCIDRs} }, want: datapath.ErrInvalid},
		{name: "RoutingLocal with addresses", edit: func(n *datapath.Node) { *n = datapath.Node{PodCIDRs: n.PodCIDRs, Addresses: n.Addresses} }, want: datapath.ErrInvalid},
		{name: "RoutingLocal with a device", edit: func(n *datapath.Node) { *n = datapath.Node{PodCIDRs: n.PodCIDRs, Devices: n.Devices} }, want: datapath.ErrInvalid},
		{name: "RoutingLocal with cluster CIDRs", edit: func(n *datapath.Node) { *n = datapath.Node{PodCIDRs: n.PodCIDRs, ClusterCIDRs: n.ClusterCIDRs} }, want: datapath.ErrInvalid},
		{name: "RoutingLocal with a tunnel port", edit: func(n *datapath.Node) { *n = datapath.Node{PodCIDRs: n.PodCIDRs, TunnelPort: 4789} }, want: datapath.ErrInvalid},
		{name: "RoutingLocal with encryption", edit: func(n *datapath.Node) { *n = datapath.Node{PodCIDRs: n.PodCIDRs, Encryption: datapath.EncryptionIPsec} }, want: datapath.ErrInvalid},
		{name: "encryption 3", edit: func(n *datapath.Node) { n.Encryption = datapath.Encryption(3) }, want: datapath.ErrInvalid},
		{name: "encryption -1", edit: func(n *datapath.Node) { n.Encryption = datapath.Encryption(-1) }, want: datapath.ErrInvalid},
		{name: "the WireGuard device", edit: func(n *datapath.Node) { n.Devices = []string{datapath.WireGuardDevice} }, want: datapath.ErrInvalid},
		// Works where the kernel has them (the VM's), and is refused as
		// unsupported, with nothing left, where it was built without.
		{name: "IPsec", edit: func(n *datapath.Node) { n.Encryption = datapath.EncryptionIPsec }, want: unsupportedWithout("CONFIG_INET_ESP")},
		{name: "WireGuard", edit: func(n *datapath.Node) { n.Encryption = datapath.EncryptionWireGuard }, want: unsupportedWithout("CONFIG_WIREGUARD")},
		// Refused only once the node is set up (VXLAN device made,
		// programs attached): all of that must go again.
		{name: "a cgroup that is not one", edit: func(*datapath.Node) {}, cfg: func(t *testing.T, cfg *datapath.Config) { cfg.Cgroup = t.TempDir() }, want: datapath.ErrInvalid},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := testutil.NewPair(t)
			bpffs := testutil.BPFFS(t)
			empty := bpffsEntries(t, bpffs)
			n := base()
			tc.edit(&n)
			cfg := datapath.Config{Name: "node", NetNS: p.A.Path, BPFFS: bpffs, Node: n, Limits: datapath.Limits{Conntrack: 4096}}
			if tc.cfg != nil {
				tc.cfg(t, &cfg)
			}
			dp, err := datapath.Open(t.Context(), cfg)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Open(%v): %v", n, err)
				}
				if _, err := netdev.Get(p.A.Handle, datapath.TunnelDevice); err != nil {
					t.Errorf("no VXLAN device: %v", err)
				}
				if err := dp.Unload(); err != nil {
					t.Fatal(err)
				}
				leftNothing(t, p.A, bpffs, empty, p.IfA)
				return
			}
			if err == nil {
				dp.Unload()
				t.Fatalf("Open(%v) worked, want %q", n, tc.want)
			}
			wantErr(t, fmt.Sprintf("Open(%v)", n), err, tc.want)
			leftNothing(t, p.A, bpffs, empty, p.IfA)
		})
	}

	// With MTU 0, the endpoints' MTU is the node device's less VXLAN's 50
	// bytes: below 1280 on a 1320-byte underlay.
	t.Run("derived MTU below 1280", func(t *testing.T) {
		c := testutil.NewCluster(t, testutil.ClusterOptions{Nodes: 1, UnderlayMTU: 1320})
		cn := c.Nodes[0]
		empty := bpffsEntries(t, cn.BPFFS)
		_, err := datapath.Open(t.Context(), datapath.Config{Name: "node", NetNS: cn.NS.Path, BPFFS: cn.BPFFS, Node: datapath.Node{
			Name: cn.Name, PodCIDRs: cn.PodCIDRs, Routing: datapath.RoutingVXLAN, Addresses: []netip.Addr{cn.IPv4},
			Devices: []string{cn.Device}, ClusterCIDRs: c.ClusterCIDRs,
		}})
		wantErr(t, "Open with a derived MTU of 1270", err, datapath.ErrInvalid)
		leftNothing(t, cn.NS, cn.BPFFS, empty, cn.Ifindex)
	})
}

// Re-opening a datapath with another node configuration is refused and
// changes nothing; with a zero one, or the same one in another order, it
// works and takes the recorded one.
func TestOpenNodeErrorsReopen(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2, Endpoints: 1})
	n0 := c.Nodes[0]
	w := clusterWorld(n0)
	w.expect(t, remote(1))
	before := w.snapshot(t)
	vxlan, err := netdev.Get(n0.NS.Handle, datapath.TunnelDevice)
	if err != nil {
		t.Fatal(err)
	}
	reopen := func(n datapath.Node) (*datapath.Datapath, error) {
		return datapath.Open(t.Context(), datapath.Config{Name: "node", NetNS: n0.NS.Path, BPFFS: n0.BPFFS, Node: n})
	}
	edit := func(f func(*datapath.Node)) datapath.Node {
		n := n0.Config
		n.PodCIDRs, n.Addresses = slices.Clone(n.PodCIDRs), slices.Clone(n.Addresses)
		n.Devices, n.ClusterCIDRs = slices.Clone(n.Devices), slices.Clone(n.ClusterCIDRs)
		f(&n)
		return n
	}
	for _, tc := range []struct {
		name string
		node datapath.Node
	}{
		{"another MTU", edit(func(n *datapath.Node) { n.MTU = 1400 })},
		{"another name", edit(func(n *datapath.Node) { n.Name = "node-9" })},
		{"another routing", edit(func(n *datapath.Node) { n.Routing = datapath.RoutingNative })},
		{"RoutingLocal", datapath.Node{PodCIDRs: n0.Config.PodCIDRs}},
		{"fewer addresses", edit(func(n *datapath.Node) { n.Addresses = n.Addresses[:1] })},
		{"another device", edit(func(n *datapath.Node) { n.Devices = []string{"lo"} })},
		{"other pod CIDRs", edit(func(n *datapath.Node) { n.PodCIDRs = n.PodCIDRs[:1] })},
		{"other cluster CIDRs", edit(func(n *datapath.Node) { n.ClusterCIDRs = append(n.ClusterCIDRs, prefixes("fd00:20::/48")...) })},
		{"another tunnel port", edit(func(n *datapath.Node) { n.TunnelPort = 4789 })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dp, err := reopen(tc.node)
			if err == nil {
				dp.Close()
			}
			wantErr(t, fmt.Sprintf("re-open with %v", tc.node), err, datapath.ErrInvalid)
			w.unchanged(t, before)
			if l, err := netdev.Get(n0.NS.Handle, datapath.TunnelDevice); err != nil || l.Index != vxlan.Index || l.MTU != vxlan.MTU {
				t.Errorf("VXLAN device now %+v, %v; was %+v", l, err, vxlan)
			}
		})
	}
	for _, tc := range []struct {
		name string
		node datapath.Node
	}{
		{"zero node", datapath.Node{}},
		{"the same node", n0.Config},
		{"the same node in another order", edit(func(n *datapath.Node) {
			slices.Reverse(n.Addresses)
			slices.Reverse(n.PodCIDRs)
			slices.Reverse(n.ClusterCIDRs)
		})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dp, err := reopen(tc.node)
			if err != nil {
				t.Fatalf("re-open with %v: %v", tc.node, err)
			}
			defer dp.Close()
			// The new handle sees the same nodes, and works.
			got := world{dp: dp, ns: n0.NS, routing: n0.Config.Routing}
			got.unchanged(t, before)
			if _, err := node.Apply(t.Context(), dp, remote(1)); err != nil {
				t.Errorf("Apply through the re-opened handle: %v", err)
			}
			_, err = node.Apply(t.Context(), dp, with(remote(2), func(n *node.Node) { n.PodCIDRs = n0.Config.PodCIDRs[:1] }))
			wantErr(t, "the re-opened handle takes a local pod CIDR", err, datapath.ErrInvalid)
			_, err = node.Apply(t.Context(), dp, with(remote(2), func(n *node.Node) { n.Name = n0.Config.Name }))
			wantErr(t, "the re-opened handle takes the local name", err, datapath.ErrInvalid)
			w.unchanged(t, before)
		})
	}
}

// Limits.Nodes bounds the remote nodes: the one too many is ErrMapFull
// and changes nothing; a change of a known node, or a Sync that removes
// one as it adds one, still fits.
func TestNodeLimit(t *testing.T) {
	w := singleNode(t, datapath.RoutingVXLAN, datapath.Limits{Nodes: 2, Conntrack: 4096})
	if l := w.dp.Limits(); l.Nodes != 2 {
		t.Fatalf("Limits().Nodes = %d, want 2", l.Nodes)
	}
	n1, n2, n3 := remote(1), remote(2), remote(3)
	for _, n := range []node.Node{n1, n2} {
		if _, err := node.Apply(t.Context(), w.dp, n); err != nil {
			t.Fatal(err)
		}
	}
	w.expect(t, n1, n2)
	before := w.snapshot(t)

	for _, tc := range []struct {
		name string
		do   func() error
	}{
		{"a third node", func() error { _, err := node.Apply(t.Context(), w.dp, n3); return err }},
		{"a third node without pod CIDRs", func() error {
			_, err := node.Apply(t.Context(), w.dp, with(n3, func(n *node.Node) { n.PodCIDRs = nil }))
			return err
		}},
		{"Sync of three nodes", func() error { _, err := node.Sync(t.Context(), w.dp, []node.Node{n1, n2, n3}); return err }},
	} {
		wantErr(t, tc.name, tc.do(), datapath.ErrMapFull)
		w.unchanged(t, before)
	}

	// A change of a known node is no new node.
	n1b := with(n1, func(n *node.Node) { n.PodCIDRs = append(n.PodCIDRs[:1], prefixes("198.19.21.0/24")...) })
	if _, err := node.Apply(t.Context(), w.dp, n1b); err != nil {
		t.Errorf("change the pod CIDRs of a node at the limit: %v", err)
	}
	w.expect(t, n1b, n2)
	// A Sync removes before it adds.
	got, err := node.Sync(t.Context(), w.dp, []node.Node{n3, n1})
	if err != nil {
		t.Fatalf("Sync that replaces node-2 by node-3: %v", err)
	}
	if want := (node.SyncChanges{Added: []string{"node-3"}, Changed: []string{"node-1"}, Removed: []string{"node-2"}}); !sameSyncChanges(got, want) {
		t.Errorf("Sync = %+v, want %+v", got, want)
	}
	w.expect(t, n1, n3)
	if err := node.Delete(t.Context(), w.dp, "node-3"); err != nil {
		t.Fatal(err)
	}
	if _, err := node.Apply(t.Context(), w.dp, n2); err != nil {
		t.Errorf("a second node after a Delete: %v", err)
	}
	w.expect(t, n1, n2)

	// Limits.Nodes nodes, each with two addresses (what Limits.Nodes
	// allows for), fill node_addrs: a new address is written before the
	// old one goes.
	t.Run("new addresses at the limit", func(t *testing.T) {
		before := w.snapshot(t)
		moved := with(n1, func(n *node.Node) { n.Addresses = addrs("198.18.0.12", "fd00:1::12") })
		if _, err := node.Apply(t.Context(), w.dp, moved); err != nil {
			t.Errorf("new addresses for a node at the limit: %v (%s)", err, errName(err))
			w.unchanged(t, before)
			return
		}
		w.expect(t, moved, n2)
	})
}

// A node with many pod CIDRs is applied, or refused with a typed error
// (ErrMapFull: no room for its entries) that changes nothing; a node that
// was applied can be changed and deleted.
func TestNodeManyPodCIDRs(t *testing.T) {
	for _, mode := range routingModes {
		t.Run(mode.String(), func(t *testing.T) {
			w := singleNode(t, mode, datapath.Limits{Nodes: 2, Conntrack: 4096})
			for _, count := range []int{4, 8, 12, 16, 24, 32, 300} {
				t.Run(fmt.Sprint(count), func(t *testing.T) {
					// /28s from 198.19.1.0 on: in the cluster, none the
					// local node's.
					n := with(remote(1), func(n *node.Node) {
						n.PodCIDRs = nil
						for i := range count {
							n.PodCIDRs = append(n.PodCIDRs, netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(1 + i/16), byte(i % 16 * 16)}), 28))
						}
					})
					before := w.snapshot(t)
					_, err := node.Apply(t.Context(), w.dp, n)
					if err != nil {
						if !errors.Is(err, datapath.ErrMapFull) && !errors.Is(err, datapath.ErrInvalid) {
							t.Errorf("a node with %d pod CIDRs: %v (%s), want it applied or ErrMapFull", count, err, errName(err))
						}
						w.unchanged(t, before)
						return
					}
					w.expect(t, n)
					moved := with(n, func(n *node.Node) { n.Addresses = addrs("198.18.0.12", "fd00:1::12") })
					if _, err := node.Apply(t.Context(), w.dp, moved); err != nil {
						t.Errorf("new addresses for a node with %d pod CIDRs: %v (%s)", count, err, errName(err))
						w.expect(t, n)
					} else {
						w.expect(t, moved)
					}
					if err := node.Delete(t.Context(), w.dp, n.Name); err != nil {
						t.Fatal(err)
					}
					w.expect(t)
				})
			}
		})
	}
}

// A remote node's pod CIDR may be a whole cluster CIDR that has no local
// pod CIDR in it; the node_cidrs entry of the cluster CIDR (which makes
// its addresses unreachable rather than the world's) must survive the
// node.
func TestPodCIDRIsClusterCIDR(t *testing.T) {
	extra := netip.MustParsePrefix("fd00:20::/48")
	w := singleNode(t, datapath.RoutingVXLAN, datapath.Limits{Conntrack: 4096}, extra)
	w.expect(t)
	before := w.snapshot(t)
	n := with(remote(1), func(n *node.Node) { n.PodCIDRs = []netip.Prefix{extra} })
	if _, err := node.Apply(t.Context(), w.dp, n); err != nil {
		wantErr(t, "a pod CIDR that is a cluster CIDR", err, datapath.ErrInvalid)
		w.unchanged(t, before)
		return
	}
	w.expect(t, n)
	if err := node.Delete(t.Context(), w.dp, n.Name); err != nil {
		t.Fatal(err)
	}
	w.unchanged(t, before)
}
