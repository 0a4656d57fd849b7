package node_test

import (
	"context"
	"log"
	"net/netip"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/node"
)

// Two nodes over VXLAN: each opens its datapath as a node of the cluster
// and is told about the other. Run the same on node-b with the names and
// addresses swapped.
func Example() {
	ctx := context.Background()
	dp, err := datapath.Open(ctx, datapath.Config{
		Name: "node-a",
		Node: datapath.Node{
			Name:         "node-a",
			PodCIDRs:     []netip.Prefix{netip.MustParsePrefix("198.19.0.0/24")},
			Routing:      datapath.RoutingVXLAN,
			Addresses:    []netip.Addr{netip.MustParseAddr("198.18.0.1")},
			Devices:      []string{"eth0"},
			ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("198.19.0.0/16")},
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close()

	changes, err := node.Apply(ctx, dp, node.Node{
		Name:      "node-b",
		Addresses: []netip.Addr{netip.MustParseAddr("198.18.0.2")},
		PodCIDRs:  []netip.Prefix{netip.MustParsePrefix("198.19.1.0/24")},
	})
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("node-b: created %t", changes.Created)
}
