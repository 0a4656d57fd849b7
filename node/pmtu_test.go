package node_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/clustertest"
	"github.com/sluicedp/sluice/internal/testutil"
)

// countBytes answers every TCP connection to addr inside ns, once the
// client has sent all, with how many bytes it read.
func countBytes(t *testing.T, ns *testutil.NetNS, addr netip.AddrPort) {
	clustertest.Serve(t, ns, addr, func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		c.Write([]byte(strconv.FormatInt(n, 10)))
	})
}

// sendBulk sends n bytes from ns to a countBytes server at ap and returns
// how many it counted.
func sendBulk(t *testing.T, ns *testutil.NetNS, ap netip.AddrPort, n int) (int, error) {
	t.Helper()
	conn, err := ns.DialTCP(t, ap, 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := conn.Write(make([]byte, n)); err != nil {
		return 0, err
	}
	conn.CloseWrite()
	got, err := io.ReadAll(conn)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(string(got))
}

// Endpoints whose MTU is larger than the tunnel carries (set so, rather
// than the node's derived one) still move data across nodes: what is too
// big for the tunnel is answered with ICMP "fragmentation needed" or
// ICMPv6 "packet too big", and TCP's path MTU discovery sends smaller
// segments. IPv4 and IPv6, over an underlay of 1400 bytes.
func TestPathMTU(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2, Endpoints: 1, UnderlayMTU: 1400})
	big := func(i int) *endpoint.Endpoint {
		s := clustertest.EndpointSpec(i, 5)
		s.MTU = 1500
		ep, err := endpoint.Create(context.Background(), c.Nodes[i].DP, s)
		if err != nil {
			t.Fatal(err)
		}
		return ep
	}
	src, dst := big(0), big(1)
	if got := c.Endpoint(0, 0).MTU; got != 1400-50 {
		t.Errorf("derived endpoint MTU %d, want %d", got, 1400-50)
	}
	payload := 1 << 20
	for _, addr := range []netip.Addr{dst.IPv4, dst.IPv6} {
		ap := netip.AddrPortFrom(addr, 7)
		countBytes(t, clustertest.NetNS(t, dst), ap)
		before := metric(t, c.Nodes[0].DP, datapath.ReasonFragNeeded, datapath.Egress)
		if n, err := sendBulk(t, clustertest.NetNS(t, src), ap, payload); err != nil || n != payload {
			t.Errorf("to %s: the receiver counted %d bytes (%v), want %d", ap, n, err, payload)
		}
		if after := metric(t, c.Nodes[0].DP, datapath.ReasonFragNeeded, datapath.Egress); after <= before {
			t.Errorf("to %s: FRAG_NEEDED stayed at %d: nothing was too big?", ap, after)
		}
	}
}
