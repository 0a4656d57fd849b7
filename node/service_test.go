package node_test

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/clustertest"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/service"
)

// serveName answers every connection to addr inside ns with name.
func serveName(t *testing.T, ns *testutil.NetNS, addr netip.AddrPort, name string) {
	clustertest.Serve(t, ns, addr, func(c net.Conn) { c.Write([]byte(name)) })
}

// A ClusterIP with a backend on each node is reached from every node, and
// every backend answers: translated on the client's node, the flow
// crosses to the backend's node and its replies come back through the
// client's node, which translates them back.
func TestServiceAcrossNodes(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode})
			for _, fe := range []netip.Addr{netip.MustParseAddr("198.18.200.1"), netip.MustParseAddr("fd00:200::1")} {
				svc := service.Service{Frontend: service.Frontend{Addr: fe, Port: 80, Protocol: service.TCP}}
				for _, n := range c.Nodes {
					ep := n.Endpoints[0]
					addr := ep.IPv4
					if fe.Is6() {
						addr = ep.IPv6
					}
					serveName(t, clustertest.NetNS(t, ep), netip.AddrPortFrom(addr, 8080), n.Name)
					svc.Backends = append(svc.Backends, service.Backend{Addr: addr, Port: 8080, Weight: 1})
				}
				for _, n := range c.Nodes {
					if _, err := service.Upsert(context.Background(), n.DP, svc); err != nil {
						t.Fatal(err)
					}
				}
				answered := map[string]int{}
				for i := range c.Nodes {
					client := clustertest.NetNS(t, c.Endpoint(i, 1))
					for range 12 {
						conn, err := client.DialTCP(t, netip.AddrPortFrom(fe, 80), 5*time.Second)
						if err != nil {
							t.Fatalf("from node-%d to %s: %v", i, fe, err)
						}
						conn.SetDeadline(time.Now().Add(5 * time.Second))
						b, err := io.ReadAll(conn)
						if err != nil {
							t.Fatalf("from node-%d to %s: %v", i, fe, err)
						}
						answered[string(b)]++
						conn.Close()
					}
				}
				for _, n := range c.Nodes {
					if answered[n.Name] == 0 {
						t.Errorf("%s: the backend on %s never answered (answers: %v)", fe, n, answered)
					}
				}
			}
			for _, n := range c.Nodes {
				if drift, err := n.DP.Verify(context.Background(), false); err != nil || len(drift) != 0 {
					t.Errorf("%s: Verify: %v, %v", n, drift, err)
				}
				if m := metric(t, n.DP, datapath.ReasonNoConnection, datapath.Ingress); m != 0 {
					t.Errorf("%s: %d segments of no connection", n, m)
				}
			}
		})
	}
}
