package main

import (
	"bytes"
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/testutil"
)

func TestCommands(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"reasons"}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "6     POLICY_DENIED") {
		t.Errorf("reasons:\n%s", out.String())
	}
	if err := run(context.Background(), []string{"frobnicate"}, &out); err == nil {
		t.Error("an unknown command was accepted")
	}

	testutil.Privileged(t)
	bpffs := testutil.BPFFS(t)
	if err := run(context.Background(), []string{"-bpffs", bpffs, "metrics"}, &out); err == nil {
		t.Error("metrics with no datapath pinned succeeded")
	}

	node := testutil.NewNetNS(t)
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name: "node", NetNS: node.Path, BPFFS: bpffs,
		Node: datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Unload()
	a, err := endpoint.Create(context.Background(), dp, endpoint.Spec{ID: 1, IPv4: netip.MustParseAddr("198.18.1.10"), Identity: 1000, NetNS: testutil.Name("sluice-t-"), Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	defer endpoint.Delete(context.Background(), dp, a.ID)
	b, err := endpoint.Create(context.Background(), dp, endpoint.Spec{ID: 2, IPv4: netip.MustParseAddr("198.18.1.11"), Identity: 1001, NetNS: testutil.Name("sluice-t-")})
	if err != nil {
		t.Fatal(err)
	}
	defer endpoint.Delete(context.Background(), dp, b.ID)
	workload := testutil.OpenNetNS(t, a.NetNS)
	workload.AddAddr(t, "eth0", "198.18.1.99/32")

	// A spoofed ping while `sluice events` runs.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var events bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"-bpffs", bpffs, "events"}, &events) }()
	time.Sleep(300 * time.Millisecond)
	if testutil.Ping(t, workload.Handle, b.IPv4, testutil.PingOptions{Src: netip.MustParseAddr("198.18.1.99")}) != 0 {
		t.Error("a ping from a spoofed source got through")
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(events.String(), "drop SPOOFED_SOURCE_IP egress") || !strings.Contains(events.String(), "endpoint=1") {
		t.Errorf("events:\n%s", events.String())
	}

	for cmd, want := range map[string]string{
		"metrics":   "egress  SPOOFED_SOURCE_IP        1",
		"endpoints": "198.18.1.10",
		"lost":      "rate limited: 0",
	} {
		out.Reset()
		if err := run(context.Background(), []string{"-bpffs", bpffs, cmd}, &out); err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		if !strings.Contains(out.String(), want) {
			t.Errorf("%s: want %q in\n%s", cmd, want, out.String())
		}
	}
}
