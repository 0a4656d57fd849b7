package service_test

import (
	"context"
	"fmt"
	"log"
	"net/netip"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/service"
)

// Balance a ClusterIP over three backends with Maglev, one of them
// draining, with client affinity of three hours, as kube-proxy's
// sessionAffinity: ClientIP does.
func ExampleUpsert() {
	ctx := context.Background()
	dp, err := datapath.Open(ctx, datapath.Config{Name: "node-a", Cgroup: "/sys/fs/cgroup/workloads"})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close()

	changes, err := service.Upsert(ctx, dp, service.Service{
		Frontend: service.Frontend{Addr: netip.MustParseAddr("198.18.200.10"), Port: 80, Protocol: service.TCP},
		Backends: []service.Backend{
			{Addr: netip.MustParseAddr("198.18.1.7"), Port: 8080, Weight: 1},
			{Addr: netip.MustParseAddr("198.18.1.8"), Port: 8080, Weight: 1},
			{Addr: netip.MustParseAddr("198.18.1.9"), Port: 8080, Weight: 1, State: service.Terminating},
		},
		Algorithm: service.Maglev,
		Affinity:  3 * time.Hour,
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("added %d, changed %d, removed %d backends\n", len(changes.Added), len(changes.Changed), len(changes.Removed))
}

// A controller hands over every service it wants, at start and after each
// change; only the difference is written.
func ExampleSync() {
	ctx := context.Background()
	dp, err := datapath.Open(ctx, datapath.Config{Name: "node-a"})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close()

	var all []service.Service
	for i := range 100 {
		all = append(all, service.Service{
			Frontend: service.Frontend{Addr: netip.AddrFrom4([4]byte{198, 18, 200, byte(i)}), Port: 443, Protocol: service.TCP},
			Backends: []service.Backend{{Addr: netip.AddrFrom4([4]byte{198, 18, 1, byte(i)}), Port: 8443, Weight: 1}},
		})
	}
	changes, err := service.Sync(ctx, dp, "ingress-controller", all)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%d added, %d changed, %d removed, %d as they were\n",
		len(changes.Added), len(changes.Changed), len(changes.Removed), changes.Unchanged)
}

// How many flows, packets and bytes each backend of a service got.
func ExampleReadCounters() {
	dp, err := datapath.OpenReadOnly(context.Background(), datapath.Config{Name: "node-a"})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close()
	counters, err := service.ReadCounters(dp, service.Frontend{Addr: netip.MustParseAddr("198.18.200.10"), Port: 80, Protocol: service.TCP})
	if err != nil {
		log.Fatal(err)
	}
	for _, c := range counters {
		fmt.Printf("%s: %d flows, %d packets\n", c.Backend, c.Flows, c.Packets)
	}
}
