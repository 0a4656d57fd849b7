package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/service"
)

func TestCommands(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"reasons"}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "6     POLICY_DENIED") {
		t.Errorf("reasons:\n%s", out.String())
	}
	if err := run(context.Background(), []string{"frobnicate"}, &out, io.Discard); err == nil {
		t.Error("an unknown command was accepted")
	}

	testutil.Privileged(t)
	bpffs := testutil.BPFFS(t)
	if err := run(context.Background(), []string{"-bpffs", bpffs, "metrics"}, &out, io.Discard); err == nil {
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
	var events, errs bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"-bpffs", bpffs, "events"}, &events, &errs) }()
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
	if errs.Len() != 0 {
		t.Errorf("events wrote errors:\n%s", errs.String())
	}

	// While another reader holds the events, `sluice events` fails at once.
	holdCtx, release := context.WithCancel(context.Background())
	defer release()
	held, err := dp.Events(holdCtx)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err = run(ctx, []string{"-bpffs", bpffs, "events"}, io.Discard, io.Discard)
	if !errors.Is(err, datapath.ErrExists) || !strings.Contains(err.Error(), "another process is reading this datapath's events") {
		t.Errorf("events while another reader runs: %v", err)
	}
	release()
	for range held {
	}

	// A ping that gets through leaves a tracked flow.
	if testutil.Ping(t, workload.Handle, b.IPv4, testutil.PingOptions{}) == 0 {
		t.Error("no reply from endpoint 2")
	}
	if _, err := service.Upsert(context.Background(), dp, service.Service{
		Frontend: service.Frontend{Addr: netip.MustParseAddr("198.18.200.1"), Port: 80, Protocol: service.TCP},
		Backends: []service.Backend{{Addr: b.IPv4, Port: 8080, Weight: 1}},
	}); err != nil {
		t.Fatal(err)
	}
	for cmd, want := range map[string]string{
		"services":  "198.18.200.1:80/tcp  random     both   0s        198.18.1.",
		"metrics":   "egress  SPOOFED_SOURCE_IP        1",
		"endpoints": "198.18.1.10",
		"flows":     "198.18.1.10:",
		"lost":      "rate limited: 0",
	} {
		out.Reset()
		if err := run(context.Background(), []string{"-bpffs", bpffs, cmd}, &out, io.Discard); err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		if !strings.Contains(out.String(), want) {
			t.Errorf("%s: want %q in\n%s", cmd, want, out.String())
		}
	}
}

// The reader's errors go to stderr; one that ends the stream is returned,
// and the others make the command fail when the stream ends.
func TestPrintEvents(t *testing.T) {
	feed := func(evs ...datapath.Event) <-chan datapath.Event {
		c := make(chan datapath.Event, len(evs))
		for _, ev := range evs {
			c <- ev
		}
		close(c)
		return c
	}
	drop := &datapath.DropEvent{Reason: datapath.ReasonPolicyDenied}
	undecodable := &datapath.ErrorEvent{Err: fmt.Errorf("decode event: record version 9: %w", datapath.ErrIncompatible)}
	broken := &datapath.ErrorEvent{Err: errors.New("read events: broken"), Ended: true}

	var out, errs bytes.Buffer
	err := printEvents(feed(undecodable, drop), &out, &errs)
	if err == nil || !strings.Contains(out.String(), "drop POLICY_DENIED") || errs.String() != "sluice: "+undecodable.Err.Error()+"\n" {
		t.Errorf("an undecodable record: returned %v, printed %q and %q to stderr", err, out.String(), errs.String())
	}
	if err := printEvents(feed(drop, broken), io.Discard, io.Discard); err != broken.Err {
		t.Errorf("a stream that broke: returned %v, want %v", err, broken.Err)
	}
	if err := printEvents(feed(drop), io.Discard, io.Discard); err != nil {
		t.Errorf("a stream that ended: %v", err)
	}
}
