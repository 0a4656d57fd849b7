package clustertest

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/testutil"
)

// Pair is two pods on two nodes, the shape cross-node benchmarks measure:
// Src on node 0 sends to DstAddr, the address of Dst on node 1.
type Pair struct {
	Src, Dst *testutil.NetNS // the pods' namespaces
	DstAddr  netip.Addr      // Dst's IPv4 address
}

// Pair is endpoint 0 of node 0 and endpoint 0 of node 1, as a Pair.
func (c *Cluster) Pair(t testing.TB) *Pair {
	t.Helper()
	return &Pair{
		Src:     NetNS(t, c.Endpoint(0, 0)),
		Dst:     NetNS(t, c.Endpoint(1, 0)),
		DstAddr: c.Endpoint(1, 0).IPv4,
	}
}

// The baseline's VXLAN: the IANA port, one VNI, an overlay subnet of its
// own, and what the encapsulation takes of the underlay's MTU (IPv4 outer
// headers: 20 + 8 + 8 + 14), as sluice takes it.
const (
	baselineVXLANPort     = 4789
	baselineVNI           = 42
	baselineVXLANOverhead = 50
)

// Baseline builds, without BPF, what sluice does for two pods on two
// nodes, for benchmarks to compare with: testutil.NewCluster's two nodes,
// a pod namespace behind each, plugged in by a veth pair, and kernel
// routes between the nodes' pod CIDRs. Everything goes when the test ends.
// IPv4 only.
//
// Node i's pod has 198.19.i.10/24 on "eth0", its default route via
// 198.19.i.1 on the node's end, "pod". Without vxlan, node i routes the
// other node's pod CIDR via that node's underlay address: Linux as a
// router, sluice's native routing done by the kernel. With vxlan, the
// nodes reach each other's pod CIDRs over a kernel VXLAN device "vxlan0"
// (UDP port 4789, VNI 42, one unicast remote, no outer UDP checksum
// over IPv4, as sluice sends, no learning) holding 198.18.200.(i+1)/24, and
// the pods' MTU is the underlay's less the 50 bytes VXLAN adds.
func Baseline(t testing.TB, vxlan bool) *Pair {
	t.Helper()
	testutil.Privileged(t)
	c := testutil.NewCluster(t, testutil.ClusterOptions{Nodes: 2})
	podMTU := 1500 // NewCluster's underlay
	if vxlan {
		podMTU -= baselineVXLANOverhead
	}
	var pods []*testutil.NetNS
	for i, n := range c.Nodes {
		pods = append(pods, baselinePod(t, n, i, podMTU))
	}
	for i, n := range c.Nodes {
		peer := c.Nodes[1-i]
		via := peer.IPv4
		if vxlan {
			via = overlayAddr(1 - i)
			baselineVXLAN(t, n, i, peer.IPv4, podMTU)
		}
		if err := baselineRoute(n.NS, peer.PodCIDRs[0], via); err != nil {
			t.Fatalf("%s: %v", n, err)
		}
	}
	return &Pair{Src: pods[0], Dst: pods[1], DstAddr: podAddr(1)}
}

// podAddr is the address of node i's pod, gatewayAddr the node's on the
// link to it, overlayAddr the node's on the baseline's VXLAN device.
func podAddr(i int) netip.Addr     { return netip.AddrFrom4([4]byte{198, 19, byte(i), 10}) }
func gatewayAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 19, byte(i), 1}) }
func overlayAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 200, byte(i + 1)}) }

// baselinePod makes node n's pod (n is node i): a namespace joined to the
// node by a veth pair of the MTU, "pod" in the node and "eth0" in the
// pod. Equivalent to:
//
//	ip -n NODE link add pod mtu MTU type veth peer name eth0 netns POD
//	ip -n NODE addr add 198.19.I.1/24 dev pod
//	ip -n POD addr add 198.19.I.10/24 dev eth0
//	ip -n POD neigh replace 198.19.I.1 lladdr MAC dev eth0 nud permanent
//	ip -n POD route replace default via 198.19.I.1 dev eth0 onlink
func baselinePod(t testing.TB, n *testutil.ClusterNode, i, mtu int) *testutil.NetNS {
	t.Helper()
	pod := testutil.NewNetNS(t)
	_, _, err := netdev.Veth(netdev.VethPair{NS: n.NS.Handle, Name: "pod", PeerNS: pod.Handle, PeerName: "eth0", MTU: mtu})
	if err != nil {
		t.Fatalf("%s: pod: %v", n, err)
	}
	n.NS.AddAddr(t, "pod", netip.PrefixFrom(gatewayAddr(i), 24).String())
	pod.AddAddr(t, "eth0", netip.PrefixFrom(podAddr(i), 24).String())
	host, err := netdev.Get(n.NS.Handle, "pod")
	if err == nil {
		err = netdev.DefaultRoute(pod.Handle, "eth0", gatewayAddr(i), host.MAC)
	}
	if err == nil {
		err = netdev.WaitRunning(n.NS.Handle, "pod", 5*time.Second)
	}
	if err == nil {
		err = netdev.WaitRunning(pod.Handle, "eth0", 5*time.Second)
	}
	if err != nil {
		t.Fatalf("%s: pod: %v", n, err)
	}
	return pod
}

// baselineVXLAN makes node n's VXLAN device to the node at remote (n is
// node i). Equivalent to:
//
//	ip -n NODE link add vxlan0 mtu MTU type vxlan id 42 dstport 4789 \
//		local 198.18.0.(I+1) remote REMOTE dev eth0 nolearning
//	ip -n NODE addr add 198.18.200.(I+1)/24 dev vxlan0
//	ip -n NODE link set vxlan0 up
func baselineVXLAN(t testing.TB, n *testutil.ClusterNode, i int, remote netip.Addr, mtu int) {
	t.Helper()
	h, err := netlink.NewHandleAt(n.NS.Handle)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	v := &netlink.Vxlan{
		LinkAttrs:    netlink.LinkAttrs{Name: "vxlan0", MTU: mtu},
		VxlanId:      baselineVNI,
		VtepDevIndex: n.Ifindex,
		SrcAddr:      n.IPv4.AsSlice(),
		Group:        remote.AsSlice(), // a unicast address: the one remote
		Port:         baselineVXLANPort,
	}
	if err := h.LinkAdd(v); err != nil {
		t.Fatalf("%s: add vxlan0: %v", n, err)
	}
	n.NS.AddAddr(t, "vxlan0", netip.PrefixFrom(overlayAddr(i), 24).String())
	// A VXLAN device has no carrier to wait for: its operational state
	// stays "unknown", and it sends as soon as it is up.
	if err := h.LinkSetUp(v); err != nil {
		t.Fatalf("%s: set vxlan0 up: %v", n, err)
	}
}

// baselineRoute routes prefix via the next hop via in ns. Equivalent to:
// `ip -n NS route replace PREFIX via VIA`. (netdev.ReplaceRoute would mark
// the route as sluice's.)
func baselineRoute(ns *testutil.NetNS, prefix netip.Prefix, via netip.Addr) error {
	h, err := netlink.NewHandleAt(ns.Handle)
	if err != nil {
		return err
	}
	defer h.Close()
	dst := &net.IPNet{IP: prefix.Addr().AsSlice(), Mask: net.CIDRMask(prefix.Bits(), prefix.Addr().BitLen())}
	if err := h.RouteReplace(&netlink.Route{Dst: dst, Gw: via.AsSlice()}); err != nil {
		return fmt.Errorf("route %s via %s: %w", prefix, via, err)
	}
	return nil
}
