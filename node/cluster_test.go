package node_test

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/clustertest"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/node"
	"github.com/sluicedp/sluice/policy"
)

var modes = []datapath.Routing{datapath.RoutingVXLAN, datapath.RoutingNative}

// Pods reach pods on other nodes, TCP (a connection, and a bulk transfer)
// and ICMP echo, IPv4 and IPv6, in each routing mode.
func TestPodToPod(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode})
			for _, to := range [][2]int{{1, 0}, {2, 1}} {
				dst := c.Endpoint(to[0], to[1])
				dstNS := clustertest.NetNS(t, dst)
				src := clustertest.NetNS(t, c.Endpoint(0, 0))
				for _, addr := range []netip.Addr{dst.IPv4, dst.IPv6} {
					ap := netip.AddrPortFrom(addr, 7)
					clustertest.Echo(t, dstNS, ap)
					if err := clustertest.TCPRoundTrip(t, src, ap, []byte("hello across nodes"), 5*time.Second); err != nil {
						t.Errorf("TCP from node-0 to %s on node-%d: %v", ap, to[0], err)
					}
					if got := testutil.Ping(t, src.Handle, addr, testutil.PingOptions{Count: 2}); got == 0 {
						t.Errorf("ping from node-0 to %s on node-%d: no reply", addr, to[0])
					}
					// A bulk transfer: the veths hand on GSO packets of
					// many segments, each of which must fit.
					bulk := netip.AddrPortFrom(addr, 8)
					countBytes(t, dstNS, bulk)
					if n, err := sendBulk(t, src, bulk, 4<<20); err != nil || n != 4<<20 {
						t.Errorf("4 MiB from node-0 to %s on node-%d: %d bytes arrived (%v)", bulk, to[0], n, err)
					}
				}
			}
		})
	}
}

// policyEvents turns policy verdict events on and returns them.
func policyEvents(t *testing.T, dp *datapath.Datapath) <-chan datapath.Event {
	t.Helper()
	if err := dp.SetEventConfig(context.Background(), datapath.EventConfig{Drops: true, PolicyVerdicts: true}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	events, err := dp.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return events
}

// waitDenied waits for the denial of a flow to endpoint ep from the remote
// identity.
func waitDenied(t *testing.T, events <-chan datapath.Event, ep uint16, remote datapath.Identity) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case ev := <-events:
			pe, ok := ev.(*datapath.PolicyEvent)
			if ok && pe.Endpoint == uint32(ep) && pe.Direction == datapath.Ingress && pe.Verdict == datapath.VerdictDenied && pe.Remote == remote {
				return
			}
		case <-deadline:
			t.Fatalf("no denial of identity %s at endpoint %d", remote, ep)
		}
	}
}

// metric returns the packets counted for a reason and direction.
func metric(t testing.TB, dp *datapath.Datapath, r datapath.Reason, d datapath.Direction) uint64 {
	t.Helper()
	m, err := dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return m[datapath.MetricKey{Reason: r, Direction: d}].Packets
}

// A policy on one node decides by the identity of a pod on another: the
// allowed one connects, the other is denied, on the receiving node, with
// its own identity. Over VXLAN the receiving node was never told the
// sender's identity: it comes in the VNI. Routing natively, it comes from
// the ipcache.
func TestPolicyAcrossNodes(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode})
			recv := c.Nodes[1]
			b := c.Endpoint(1, 0)
			allowed, denied := c.Endpoint(0, 0), c.Endpoint(0, 1)
			if mode == datapath.RoutingNative {
				for j, ep := range []*endpoint.Endpoint{allowed, denied} {
					for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
						if err := policy.AssignIdentity(context.Background(), recv.DP, netip.PrefixFrom(a, a.BitLen()), clustertest.Identity(0, j)); err != nil {
							t.Fatal(err)
						}
					}
				}
			}
			p := policy.Policy{Ingress: []policy.Rule{{
				Peers: []policy.Peer{{Identity: clustertest.Identity(0, 0)}},
				Ports: []policy.Port{{Protocol: policy.TCP, Port: 7}},
			}}}
			if _, err := policy.Apply(context.Background(), recv.DP, b.ID, p); err != nil {
				t.Fatal(err)
			}
			events := policyEvents(t, recv.DP)
			bNS := clustertest.NetNS(t, b)
			for _, addr := range []netip.Addr{b.IPv4, b.IPv6} {
				ap := netip.AddrPortFrom(addr, 7)
				clustertest.Echo(t, bNS, ap)
				before := metric(t, recv.DP, datapath.ReasonPolicyDenied, datapath.Ingress)
				if err := clustertest.TCPRoundTrip(t, clustertest.NetNS(t, allowed), ap, []byte("allowed"), 5*time.Second); err != nil {
					t.Errorf("allowed identity to %s: %v", ap, err)
				}
				if err := clustertest.TCPRoundTrip(t, clustertest.NetNS(t, denied), ap, []byte("denied"), time.Second); err == nil {
					t.Errorf("denied identity to %s: connected", ap)
				}
				waitDenied(t, events, b.ID, clustertest.Identity(0, 1))
				if after := metric(t, recv.DP, datapath.ReasonPolicyDenied, datapath.Ingress); after <= before {
					t.Errorf("to %s: POLICY_DENIED on %s stayed at %d", ap, recv, after)
				}
			}
		})
	}
}

// A node reaches the pods of other nodes itself, and they reach it, IPv4
// and IPv6, in each routing mode: over VXLAN the node's own traffic goes
// into the tunnel (to-overlay) and the replies come back through it. The
// receiving node takes the sender for remote-node: its pod's policy
// allows the port it names for remote-node, and denies another, with the
// drop counted there.
func TestNodeToRemotePods(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode, Nodes: 2, Endpoints: 1})
			n0, recv := c.Nodes[0], c.Nodes[1]
			pod := c.Endpoint(1, 0)
			p := policy.Policy{Ingress: []policy.Rule{{
				Peers: []policy.Peer{{Reserved: policy.RemoteNode}},
				Ports: []policy.Port{{Protocol: policy.TCP, Port: 7}},
			}}}
			if _, err := policy.Apply(context.Background(), recv.DP, pod.ID, p); err != nil {
				t.Fatal(err)
			}
			events := policyEvents(t, recv.DP)
			podNS := clustertest.NetNS(t, pod)
			for _, fam := range []struct{ pod, node netip.Addr }{{pod.IPv4, n0.IPv4}, {pod.IPv6, n0.IPv6}} {
				allowed, denied := netip.AddrPortFrom(fam.pod, 7), netip.AddrPortFrom(fam.pod, 8)
				clustertest.Echo(t, podNS, allowed)
				clustertest.Echo(t, podNS, denied)
				if err := clustertest.TCPRoundTrip(t, n0.NS, allowed, []byte("from the node"), 5*time.Second); err != nil {
					t.Errorf("TCP from node-0 itself to %s: %v", allowed, err)
				}
				before := metric(t, recv.DP, datapath.ReasonPolicyDenied, datapath.Ingress)
				if err := clustertest.TCPRoundTrip(t, n0.NS, denied, []byte("from the node"), time.Second); err == nil {
					t.Errorf("TCP from node-0 itself to %s: connected, want denied", denied)
				}
				waitDenied(t, events, pod.ID, datapath.IdentityRemoteNode)
				if after := metric(t, recv.DP, datapath.ReasonPolicyDenied, datapath.Ingress); after <= before {
					t.Errorf("to %s: POLICY_DENIED on %s stayed at %d", denied, recv, after)
				}

				// The pod reaches node-0's own address.
				node := netip.AddrPortFrom(fam.node, 9)
				clustertest.Echo(t, n0.NS, node)
				if err := clustertest.TCPRoundTrip(t, podNS, node, []byte("to the node"), 5*time.Second); err != nil {
					t.Errorf("TCP from %s to node-0 at %s: %v", fam.pod, node, err)
				}
			}
		})
	}
}

// A node deleted takes its pods off the map: what is sent to them is
// dropped with a reason of its own, and comes back with the node.
func TestNodeDeleted(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode, Nodes: 2})
			src, dst := c.Nodes[0], c.Endpoint(1, 0)
			dstNS := clustertest.NetNS(t, dst)
			srcNS := clustertest.NetNS(t, c.Endpoint(0, 0))
			ap := netip.AddrPortFrom(dst.IPv4, 7)
			clustertest.Echo(t, dstNS, ap)
			if err := clustertest.TCPRoundTrip(t, srcNS, ap, []byte("before"), 5*time.Second); err != nil {
				t.Fatalf("before: %v", err)
			}
			if err := node.Delete(context.Background(), src.DP, "node-1"); err != nil {
				t.Fatal(err)
			}
			if _, err := node.Get(src.DP, "node-1"); !errors.Is(err, datapath.ErrNotFound) {
				t.Errorf("Get of a deleted node: %v, want ErrNotFound", err)
			}
			before := metric(t, src.DP, datapath.ReasonNodeUnreachable, datapath.Egress)
			if err := clustertest.TCPRoundTrip(t, srcNS, ap, []byte("gone"), time.Second); err == nil {
				t.Error("connected to a pod of a deleted node")
			}
			if after := metric(t, src.DP, datapath.ReasonNodeUnreachable, datapath.Egress); after <= before {
				t.Errorf("NODE_UNREACHABLE stayed at %d", after)
			}
			if mode == datapath.RoutingNative {
				routes, err := netdev.Routes(src.NS.Handle)
				if err != nil {
					t.Fatal(err)
				}
				if len(routes) != 0 {
					t.Errorf("routes left after the node went: %v", routes)
				}
			}
			if _, err := node.Apply(context.Background(), src.DP, c.Nodes[1].Object()); err != nil {
				t.Fatal(err)
			}
			if err := clustertest.TCPRoundTrip(t, srcNS, ap, []byte("back"), 5*time.Second); err != nil {
				t.Errorf("after the node came back: %v", err)
			}
			if drift, err := src.DP.Verify(context.Background(), false); err != nil || len(drift) != 0 {
				t.Errorf("Verify: %v, %v", drift, err)
			}
		})
	}
}
