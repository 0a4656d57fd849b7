package endpoint_test

import (
	"context"
	"fmt"
	"log"
	"net/netip"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
)

// Connect a workload in the namespace "web-1" (created if missing) to the
// node's datapath.
func ExampleCreate() {
	ctx := context.Background()
	dp, err := datapath.Open(ctx, datapath.Config{
		Name: "node-a",
		Node: datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close()

	ep, err := endpoint.Create(ctx, dp, endpoint.Spec{
		ID:       7,
		IPv4:     netip.MustParseAddr("198.18.1.7"),
		Identity: 1001,
		Labels:   map[string]string{"app": "web"},
		NetNS:    "web-1",
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("endpoint %d: %s via %s on %s\n", ep.ID, ep.IPv4, ep.Gateway4, ep.HostIfName)
}

// Read what an endpoint sent and received.
func ExampleReadCounters() {
	dp, err := datapath.Open(context.Background(), datapath.Config{Name: "node-a"})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close()

	c, err := endpoint.ReadCounters(dp, 7)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("out %d packets, in %d packets\n", c.PacketsOut, c.PacketsIn)
}

// Make endpoint 7 be as a controller wants it, whatever there is: run it
// again with the same spec and nothing changes.
func ExampleApply() {
	ctx := context.Background()
	dp, err := datapath.Open(ctx, datapath.Config{Name: "node-a"})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close()

	ep, change, err := endpoint.Apply(ctx, dp, endpoint.Spec{
		ID:       7,
		IPv4:     netip.MustParseAddr("198.18.1.7"),
		Identity: 1001,
		NetNS:    "web-1",
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("endpoint %d: %s\n", ep.ID, change) // created, unchanged, updated or replaced
}
