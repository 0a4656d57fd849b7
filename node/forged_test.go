package node_test

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/clustertest"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/testutil"
)

// vxlan is a VXLAN frame to node n's tunnel port from the underlay address
// src (as the Internet namespace can forge it: the underlay is one
// link), carrying inner with the VNI vni.
func vxlan(from net.HardwareAddr, n *clustertest.Node, src netip.Addr, vni uint32, inner []byte) []byte {
	return vxlanTOS(from, n, src, vni, 0, inner)
}

// vxlanTOS is vxlan with the outer IPv4 header's TOS byte.
func vxlanTOS(from net.HardwareAddr, n *clustertest.Node, src netip.Addr, vni uint32, tos uint8, inner []byte) []byte {
	h := make([]byte, 8)
	h[0] = 0x08 // a valid VNI follows
	binary.BigEndian.PutUint32(h[4:], vni<<8)
	return packet.Build(&packet.Ethernet{Src: from, Dst: n.MAC}, &packet.IPv4{Src: src, Dst: n.IPv4, TOS: tos},
		&packet.UDP{SrcPort: 40000, DstPort: datapath.DefaultTunnelPort}, packet.Payload(append(h, inner...)))
}

// udp4 is an IPv4 UDP datagram to port 9 in an Ethernet frame.
func udp4(src, dst netip.Addr) []byte {
	return udp4TOS(src, dst, 0)
}

// udp4TOS is udp4 with the IPv4 header's TOS byte.
func udp4TOS(src, dst netip.Addr, tos uint8) []byte {
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	return packet.Build(&packet.Ethernet{Src: mac, Dst: mac}, &packet.IPv4{Src: src, Dst: dst, TOS: tos},
		&packet.UDP{SrcPort: 1000, DstPort: 9}, packet.Payload("forged"))
}

// unreachable4 is an ICMP port unreachable from src to dst quoting a UDP
// datagram from qsrc to qdst, in an Ethernet frame.
func unreachable4(src, dst, qsrc, qdst netip.Addr) []byte {
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	quoted := packet.Build(&packet.IPv4{Src: qsrc, Dst: qdst}, &packet.UDP{SrcPort: 41000, DstPort: 53})
	return packet.Build(&packet.Ethernet{Src: mac, Dst: mac}, &packet.IPv4{Src: src, Dst: dst},
		&packet.ICMP{Type: 3, Code: 3}, packet.Payload(quoted))
}

// Frames forged on the underlay are each dropped with a reason of their
// own, and counted; the genuine frames among them, sent the same way, are
// delivered (so the others were dropped for what they forged). From-netdev
// decapsulates the plain VXLAN frames to local endpoints itself and makes
// the same checks; the rest it leaves to the kernel's VXLAN device
// (decapsulating: it counts them received) and from-overlay.
func TestForgedFrames(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{})
	n0, n1 := c.Nodes[0], c.Nodes[1]
	dst := c.Endpoint(0, 0)
	rx := clustertest.NetNS(t, dst).ListenUDP(t, netip.AddrPortFrom(dst.IPv4, 9))
	l, err := netdev.Get(c.Internet.Handle, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	internetMAC := l.MAC
	pod1 := c.Endpoint(1, 0).IPv4 // node-1's pod
	pod2 := c.Endpoint(2, 0).IPv4 // node-2's pod
	id1 := uint32(clustertest.Identity(1, 0))

	for _, tc := range []struct {
		name   string
		frame  []byte
		reason datapath.Reason // ReasonForwarded: delivered
		kernel bool            // decapsulated by the VXLAN device
	}{
		{"VXLAN from an address that is no node's", vxlan(internetMAC, n0, c.InternetIPv4, id1, udp4(pod1, dst.IPv4)), datapath.ReasonUnknownNode, true},
		{"VNI with the world's identity", vxlan(internetMAC, n0, n1.IPv4, uint32(datapath.IdentityWorld), udp4(pod1, dst.IPv4)), datapath.ReasonTunnelIdentity, true},
		{"VNI with no identity", vxlan(internetMAC, n0, n1.IPv4, 0, udp4(pod1, dst.IPv4)), datapath.ReasonTunnelIdentity, true},
		{"VNI with a reserved identity", vxlan(internetMAC, n0, n1.IPv4, 255, udp4(pod1, dst.IPv4)), datapath.ReasonTunnelIdentity, true},
		{"inner source of another node's pod", vxlan(internetMAC, n0, n1.IPv4, id1, udp4(pod2, dst.IPv4)), datapath.ReasonSpoofedNodeSource, false},
		{"inner source of a local pod", vxlan(internetMAC, n0, n1.IPv4, id1, udp4(c.Endpoint(0, 1).IPv4, dst.IPv4)), datapath.ReasonSpoofedNodeSource, false},
		{"inner source outside the cluster", vxlan(internetMAC, n0, n1.IPv4, id1, udp4(c.InternetIPv4, dst.IPv4)), datapath.ReasonSpoofedNodeSource, false},
		{"VXLAN to an address no endpoint has", vxlan(internetMAC, n0, n1.IPv4, id1, udp4(pod1, netip.MustParseAddr("198.19.0.99"))), datapath.ReasonNoLocalEndpoint, true},
		{"a local pod's address on the node device", packet.Build(&packet.Ethernet{Src: internetMAC, Dst: n0.MAC},
			&packet.IPv4{Src: c.Endpoint(0, 1).IPv4, Dst: dst.IPv4}, &packet.UDP{SrcPort: 1000, DstPort: 9}, packet.Payload("forged")), datapath.ReasonSpoofedNodeSource, false},
		{"another node's pod on the node device, over VXLAN", packet.Build(&packet.Ethernet{Src: internetMAC, Dst: n0.MAC},
			&packet.IPv4{Src: pod1, Dst: dst.IPv4}, &packet.UDP{SrcPort: 1000, DstPort: 9}, packet.Payload("forged")), datapath.ReasonSpoofedNodeSource, false},
		{"ICMP error quoting a flow between other nodes' pods", vxlan(internetMAC, n0, n1.IPv4, id1, unreachable4(pod1, dst.IPv4, pod2, pod1)), datapath.ReasonICMPUnrelated, false},
		{"ICMP error quoting a flow the destination never had", vxlan(internetMAC, n0, n1.IPv4, id1, unreachable4(pod1, dst.IPv4, dst.IPv4, pod2)), datapath.ReasonICMPUnrelated, false},
		{"genuine: node-1's pod over VXLAN from node-1", vxlan(internetMAC, n0, n1.IPv4, id1, udp4(pod1, dst.IPv4)), datapath.ReasonForwarded, false},
		{"genuine, congestion marked on the way (ECN CE)", vxlanTOS(internetMAC, n0, n1.IPv4, id1, 0x03, udp4TOS(pod1, dst.IPv4, 0x01)), datapath.ReasonForwarded, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := metric(t, n0.DP, tc.reason, datapath.Ingress)
			decapsulated := tunnelReceived(t, n0)
			c.Internet.SendFrames(t, "eth0", tc.frame)
			got := testutil.Receive(rx, 1, map[bool]time.Duration{true: 2 * time.Second, false: 200 * time.Millisecond}[tc.reason == datapath.ReasonForwarded])
			if delivered := len(got) > 0; delivered != (tc.reason == datapath.ReasonForwarded) {
				t.Errorf("delivered: %t", delivered)
			}
			if after := metric(t, n0.DP, tc.reason, datapath.Ingress); after <= before {
				t.Errorf("%s stayed at %d", tc.reason, after)
			}
			if kernel := tunnelReceived(t, n0) > decapsulated; kernel != tc.kernel {
				t.Errorf("decapsulated by the VXLAN device: %t, want %t", kernel, tc.kernel)
			}
		})
	}
	// A reserved bit set is the kernel's VXLAN device's to refuse, which it
	// does before sluice sees the packet: from-netdev must not take it.
	// Frames to another host's MAC (the underlay bridge floods one it does
	// not know) are never the node's: the stack drops them, and so must
	// from-netdev's own deliveries.
	reserved := vxlan(internetMAC, n0, n1.IPv4, id1, udp4(pod1, dst.IPv4))
	reserved[len(reserved)-len(udp4(pod1, dst.IPv4))-1] = 1 // the byte after the VNI
	otherHost := vxlan(internetMAC, n0, n1.IPv4, id1, udp4(pod1, dst.IPv4))
	copy(otherHost, net.HardwareAddr{0x02, 0, 0, 0, 0x99, 0x99})
	plainOtherHost := packet.Build(&packet.Ethernet{Src: internetMAC, Dst: net.HardwareAddr{0x02, 0, 0, 0, 0x99, 0x99}},
		&packet.IPv4{Src: c.InternetIPv4, Dst: dst.IPv4}, &packet.UDP{SrcPort: 1000, DstPort: 9}, packet.Payload("flooded"))
	for name, frame := range map[string][]byte{
		"genuine but for a reserved bit of the VXLAN header": reserved,
		"genuine VXLAN but to another host's MAC":            otherHost,
		"from the world but to another host's MAC":           plainOtherHost,
	} {
		t.Run(name, func(t *testing.T) {
			c.Internet.SendFrames(t, "eth0", frame)
			if got := testutil.Receive(rx, 1, 200*time.Millisecond); len(got) > 0 {
				t.Error("delivered")
			}
		})
	}
}

// tunnelReceived is what node n's VXLAN device has decapsulated.
func tunnelReceived(t *testing.T, n *clustertest.Node) uint64 {
	t.Helper()
	l, err := netdev.Get(n.NS.Handle, datapath.TunnelDevice)
	if err != nil {
		t.Fatal(err)
	}
	return l.RxPackets
}
