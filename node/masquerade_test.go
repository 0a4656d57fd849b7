package node_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/clustertest"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/testutil"
)

// serveSeen answers every TCP connection to addr inside ns with the
// address the connection came from.
func serveSeen(t *testing.T, ns *testutil.NetNS, addr netip.AddrPort) {
	clustertest.Serve(t, ns, addr, func(c net.Conn) {
		c.Write([]byte(c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().String()))
	})
}

// echoSeen answers every UDP datagram to addr inside ns with the address
// it came from.
func echoSeen(t *testing.T, ns *testutil.NetNS, addr netip.AddrPort) {
	c := ns.ListenUDP(t, addr)
	go func() {
		buf := make([]byte, 1500)
		for {
			_, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort([]byte(from.Addr().Unmap().String()), from)
		}
	}()
}

// seenTCP connects from ns to addr and returns what the server answered.
func seenTCP(t *testing.T, ns *testutil.NetNS, addr netip.AddrPort) string {
	t.Helper()
	c, err := ns.DialTCP(t, addr, 5*time.Second)
	if err != nil {
		t.Fatalf("connect to %s: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read from %s: %v", addr, err)
	}
	return string(b)
}

// askUDP sends a datagram from ns to addr, three times at most (one may
// meet a neighbour not yet resolved), and returns the first answer, or
// the error of the last read: ECONNREFUSED when an ICMP port unreachable
// came back.
func askUDP(t *testing.T, ns *testutil.NetNS, addr netip.AddrPort) (string, error) {
	t.Helper()
	var c *net.UDPConn
	ns.Do(t, func() (err error) {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(addr))
		return err
	})
	defer c.Close()
	buf := make([]byte, 100)
	var err error
	for range 3 {
		c.Write([]byte("who am I"))
		c.SetReadDeadline(time.Now().Add(time.Second))
		var n int
		if n, err = c.Read(buf); err == nil {
			return string(buf[:n]), nil
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			break
		}
	}
	return "", err
}

// seenUDP sends a datagram from ns to addr and returns the answer.
func seenUDP(t *testing.T, ns *testutil.NetNS, addr netip.AddrPort) string {
	t.Helper()
	got, err := askUDP(t, ns, addr)
	if err != nil {
		t.Fatalf("no answer from %s: %v", addr, err)
	}
	return got
}

// refusedUDP reports whether a datagram from ns to addr, where nobody
// listens, was refused: the ICMP error made it back to the socket.
func refusedUDP(t *testing.T, ns *testutil.NetNS, addr netip.AddrPort) bool {
	t.Helper()
	_, err := askUDP(t, ns, addr)
	return errors.Is(err, syscall.ECONNREFUSED)
}

// What a pod sends outside the cluster leaves with its node's address,
// and the replies come back to it: TCP, UDP and ICMP echo, IPv4 and IPv6,
// in each routing mode, and so do ICMP errors about its flows. What it sends to another node's pod or to another
// node keeps its own address, and so do its replies to a connection the
// world opened to it.
func TestMasquerade(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode, Nodes: 2})
			n0 := c.Nodes[0]
			ep := c.Endpoint(0, 0)
			epNS := clustertest.NetNS(t, ep)
			for _, tc := range []struct{ dst, node, pod netip.Addr }{
				{c.InternetIPv4, n0.IPv4, ep.IPv4},
				{c.InternetIPv6, n0.IPv6, ep.IPv6},
			} {
				serveSeen(t, c.Internet, netip.AddrPortFrom(tc.dst, 7))
				echoSeen(t, c.Internet, netip.AddrPortFrom(tc.dst, 9))
				if got := seenTCP(t, epNS, netip.AddrPortFrom(tc.dst, 7)); got != tc.node.String() {
					t.Errorf("TCP to %s came from %s, want the node's %s", tc.dst, got, tc.node)
				}
				if got := seenUDP(t, epNS, netip.AddrPortFrom(tc.dst, 9)); got != tc.node.String() {
					t.Errorf("UDP to %s came from %s, want the node's %s", tc.dst, got, tc.node)
				}
				if testutil.Ping(t, epNS.Handle, tc.dst, testutil.PingOptions{Count: 2}) == 0 {
					t.Errorf("ping %s: no reply", tc.dst)
				}
				// The world's ICMP error about a masqueraded flow comes
				// back to the pod, quoting what the pod sent.
				if !refusedUDP(t, epNS, netip.AddrPortFrom(tc.dst, 19)) {
					t.Errorf("UDP to %s, where nobody listens: no port unreachable reached the pod", tc.dst)
				}
				peer := c.Endpoint(1, 0)
				peerAddr := peer.IPv4
				if tc.dst.Is6() {
					peerAddr = peer.IPv6
				}
				serveSeen(t, clustertest.NetNS(t, peer), netip.AddrPortFrom(peerAddr, 7))
				if got := seenTCP(t, epNS, netip.AddrPortFrom(peerAddr, 7)); got != tc.pod.String() {
					t.Errorf("TCP to the pod %s came from %s, want the pod's own %s", peerAddr, got, tc.pod)
				}
				// Another node's own address is inside the cluster too.
				n1 := c.Nodes[1]
				n1Addr := n1.IPv4
				if tc.dst.Is6() {
					n1Addr = n1.IPv6
				}
				serveSeen(t, n1.NS, netip.AddrPortFrom(n1Addr, 7))
				if got := seenTCP(t, epNS, netip.AddrPortFrom(n1Addr, 7)); got != tc.pod.String() {
					t.Errorf("TCP to node-1 at %s came from %s, want the pod's own %s", n1Addr, got, tc.pod)
				}
				// A connection the world opens to the pod itself (routed
				// to it through the node) is answered from the pod's own
				// address, not masqueraded.
				if _, err := c.Internet.Exec("ip", "route", "replace", netip.PrefixFrom(tc.pod, tc.pod.BitLen()).String(), "via", tc.node.String()); err != nil {
					t.Fatal(err)
				}
				serveSeen(t, epNS, netip.AddrPortFrom(tc.pod, 7))
				if got := seenTCP(t, c.Internet, netip.AddrPortFrom(tc.pod, 7)); got != tc.dst.String() {
					t.Errorf("TCP from the world to the pod: the pod saw %s, want %s", got, tc.dst)
				}
			}
			if drops := metric(t, n0.DP, datapath.ReasonMalformed, datapath.Egress) + metric(t, n0.DP, datapath.ReasonMalformed, datapath.Ingress); drops != 0 {
				t.Errorf("%d packets dropped as malformed", drops)
			}
			if _, err := n0.DP.CollectFlows(context.Background()); err != nil {
				t.Error(err)
			}
		})
	}
}

// udpFrames are n UDP datagrams from endpoint ep to dst:9, each from
// another source port: n flows.
func udpFrames(ep *endpoint.Endpoint, dst netip.Addr, n int) [][]byte {
	var out [][]byte
	for i := range n {
		out = append(out, packet.Build(&packet.Ethernet{Src: ep.MAC, Dst: ep.HostMAC},
			&packet.IPv4{Src: ep.IPv4, Dst: dst}, &packet.UDP{SrcPort: uint16(1024 + i), DstPort: 9}, packet.Payload("x")))
	}
	return out
}

// A full masquerading map, and a destination every port of the node is
// taken towards, drop new flows with reasons of their own; what is
// translated stays within the node's ports.
func TestMasqueradeLimits(t *testing.T) {
	t.Run("map full", func(t *testing.T) {
		c := clustertest.New(t, clustertest.Options{Nodes: 1, Endpoints: 1, Limits: datapath.Limits{Conntrack: 1024}})
		n0, ep := c.Nodes[0], c.Endpoint(0, 0)
		resolveNeighbour(t, c)
		sendPaced(t, clustertest.NetNS(t, ep), udpFrames(ep, c.InternetIPv4, 600))
		if got := waitMetric(t, n0.DP, datapath.ReasonSNATMapFull, datapath.Egress, 600-512); got < 600-512 {
			t.Errorf("SNAT_MAP_FULL counted %d of 600 flows into a map of 512, want at least %d; counters: %v", got, 600-512, counters(t, n0.DP))
		}
		checkTranslations(t, n0.DP)
	})
	t.Run("ports taken", func(t *testing.T) {
		c := clustertest.New(t, clustertest.Options{Nodes: 1, Endpoints: 1, Limits: datapath.Limits{Conntrack: 16384}})
		n0, ep := c.Nodes[0], c.Endpoint(0, 0)
		resolveNeighbour(t, c)
		const flows = 5000 // more than the 4536 ports of 61000-65535
		sendPaced(t, clustertest.NetNS(t, ep), udpFrames(ep, c.InternetIPv4, flows))
		noPort := waitMetric(t, n0.DP, datapath.ReasonSNATNoPort, datapath.Egress, flows-4536)
		if noPort < flows-4536 {
			t.Errorf("SNAT_NO_PORT counted %d of %d flows towards one destination, want at least %d; counters: %v", noPort, flows, flows-4536, counters(t, n0.DP))
		}
		if n := checkTranslations(t, n0.DP); n > 4536+1 { // the ports, and resolveNeighbour's flow
			t.Errorf("%d flows translated towards one destination: more than the node's ports", n)
		}
		if full := metric(t, n0.DP, datapath.ReasonSNATMapFull, datapath.Egress); full != 0 {
			t.Errorf("SNAT_MAP_FULL %d: the map had room", full)
		}
	})
}

// sendPaced sends frames from the endpoint's eth0 a few at a time: a burst
// could overrun a queue of the node's stack before the frames reach the
// node device.
func sendPaced(t *testing.T, ns *testutil.NetNS, frames [][]byte) {
	t.Helper()
	for len(frames) > 0 {
		n := min(len(frames), 50)
		ns.SendFrames(t, "eth0", frames[:n]...)
		frames = frames[n:]
		time.Sleep(time.Millisecond)
	}
}

// resolveNeighbour has the node learn the Internet's MAC, with one flow to
// another port than the tests', so that no frame of theirs waits for it
// (the kernel queues only a few before tc egress sees them).
func resolveNeighbour(t *testing.T, c *clustertest.Cluster) {
	t.Helper()
	echoSeen(t, c.Internet, netip.AddrPortFrom(c.InternetIPv4, 10))
	seenUDP(t, clustertest.NetNS(t, c.Endpoint(0, 0)), netip.AddrPortFrom(c.InternetIPv4, 10))
}

// waitMetric waits until the counter of a reason reaches want (frames
// sent are processed as they are sent, but leave some margin) and
// returns it.
func waitMetric(t *testing.T, dp *datapath.Datapath, r datapath.Reason, d datapath.Direction, want uint64) uint64 {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := metric(t, dp, r, d)
		if got >= want || time.Now().After(deadline) {
			return got
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// counters are the datapath's counters that are not zero, for messages.
func counters(t *testing.T, dp *datapath.Datapath) map[string]uint64 {
	t.Helper()
	m, err := dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint64{}
	for k, v := range m {
		if v.Packets > 0 {
			out[k.Direction.String()+" "+k.Reason.String()] = v.Packets
		}
	}
	return out
}

// checkTranslations checks the masquerading map: each translation has
// its two sides, each naming the other, and no two flows have the same
// port of the node towards the same destination. It returns how many
// flows are translated.
func checkTranslations(t *testing.T, dp *datapath.Datapath) int {
	t.Helper()
	m := core.Of(dp).Objs.Snat
	var k bpfobj.TypesSnatKey
	var v bpfobj.TypesSnatEntry
	outs := map[bpfobj.TypesSnatKey]bpfobj.TypesSnatEntry{}
	ins := 0
	for it := m.Iterate(); it.Next(&k, &v); {
		if k.Dir == uint8(bpfobj.TypesSnatDirSNAT_OUT) {
			outs[k] = v
		} else {
			ins++
		}
	}
	if ins != len(outs) {
		t.Errorf("%d translations out, %d back", len(outs), ins)
	}
	for out, e := range outs {
		in := bpfobj.TypesSnatKey{Family: out.Family, Proto: out.Proto, Dir: uint8(bpfobj.TypesSnatDirSNAT_IN),
			Sport: out.Dport, Dport: e.Port, Saddr: out.Daddr, Daddr: e.Addr}
		var back bpfobj.TypesSnatEntry
		if err := m.Lookup(&in, &back); err != nil || back.Addr != out.Saddr || back.Port != out.Sport {
			t.Errorf("the reply side of %+v is %+v (%v), not the pod's", out, back, err)
			return len(outs)
		}
	}
	return len(outs)
}
