package datapath_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/sluicedp/sluice/datapath"
)

// Open a datapath, print what it drops for ten seconds, and leave it running.
func ExampleOpen() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	dp, err := datapath.Open(ctx, datapath.Config{Name: "node-a", NetNS: "node-a"})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close() // the datapath keeps running; Unload removes it

	events, err := dp.Events(ctx)
	if err != nil {
		log.Fatal(err)
	}
	for ev := range events {
		fmt.Println(ev)
	}
}

// Read the drop counters.
func ExampleDatapath_Metrics() {
	dp, err := datapath.Open(context.Background(), datapath.Config{Name: "node-a"})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close()

	metrics, err := dp.Metrics()
	if err != nil {
		log.Fatal(err)
	}
	for key, v := range metrics {
		if key.Reason != datapath.ReasonForwarded {
			fmt.Printf("%s %s: %d packets (%s)\n", key.Direction, key.Reason, v.Packets, key.Reason.Doc())
		}
	}
}

// Remove expired flows every minute for as long as the program runs: a
// library has no daemon, so the program that embeds the datapath runs the
// collector.
func ExampleDatapath_CollectFlowsEvery() {
	dp, err := datapath.Open(context.Background(), datapath.Config{Name: "node-a"})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close() // ends the collector too

	go dp.CollectFlowsEvery(context.Background(), time.Minute, func(err error) {
		log.Printf("collect flows: %v", err)
	})
	// ... the program's own work
}

// Compare the maps with what the ledger says they hold, and mend what
// differs: after a writer was killed, or a map was edited by hand. The
// packages whose objects Verify checks must be in the program.
func ExampleDatapath_Verify() {
	dp, err := datapath.Open(context.Background(), datapath.Config{Name: "node-a", NetNS: "node-a"})
	if err != nil {
		log.Fatal(err)
	}
	defer dp.Close()

	drift, err := dp.Verify(context.Background(), true)
	if err != nil {
		log.Fatal(err)
	}
	for _, d := range drift {
		fmt.Println(d) // "policy of endpoint 3: ... (repaired)"
	}
}

// Remove a datapath that Open refuses (an unreadable ledger record, a pin
// that is not what it should be), with no handle.
func ExampleUnloadPinned() {
	err := datapath.UnloadPinned(context.Background(), datapath.Config{Name: "node-a", NetNS: "node-a"})
	if err != nil {
		log.Fatal(err)
	}
}
