package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/policy"
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
		"nodes":     "NAME  ADDRESSES  POD CIDRS",
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

// `sluice verify` finds each difference between the maps and the ledger,
// in every kind of object and in entries no object made; `verify -repair`
// mends them all, and only in the datapath's own namespace.
func TestVerify(t *testing.T) {
	testutil.Privileged(t)
	bpffs := testutil.BPFFS(t)
	node := testutil.NewNetNS(t)
	ctx := context.Background()
	dp, err := datapath.Open(ctx, datapath.Config{
		Name: "node", NetNS: node.Path, BPFFS: bpffs, Limits: datapath.Limits{Conntrack: 4096},
		Node: datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Unload()
	for id := range uint16(2) {
		if _, err := endpoint.Create(ctx, dp, endpoint.Spec{ID: id + 1, IPv4: netip.AddrFrom4([4]byte{198, 18, 1, byte(10 + id)}), Identity: datapath.Identity(1000 + id), NetNS: testutil.Name("sluice-t-")}); err != nil {
			t.Fatal(err)
		}
	}
	cidr := netip.MustParsePrefix("198.18.99.0/24")
	if _, err := policy.Apply(ctx, dp, 1, policy.Policy{Ingress: []policy.Rule{
		{Peers: []policy.Peer{{Identity: 1001}}, Ports: []policy.Port{{Protocol: policy.TCP, Port: 80}, {Protocol: policy.TCP, Port: 443}}},
		{Action: policy.Deny, Peers: []policy.Peer{{CIDR: cidr}}},
	}}); err != nil {
		t.Fatal(err)
	}
	fe := service.Frontend{Addr: netip.MustParseAddr("198.18.200.1"), Port: 80, Protocol: service.TCP}
	if _, err := service.Upsert(ctx, dp, service.Service{Frontend: fe, Backends: []service.Backend{{Addr: netip.MustParseAddr("198.18.1.11"), Port: 8080, Weight: 1}}}); err != nil {
		t.Fatal(err)
	}
	verify := func(args ...string) (string, error) {
		var out bytes.Buffer
		err := run(ctx, append([]string{"-bpffs", bpffs}, args...), &out, io.Discard)
		return out.String(), err
	}
	if out, err := verify("verify"); err != nil || !strings.Contains(out, "0 differences") {
		t.Fatalf("verify of a datapath as its ledger says: %v\n%s", err, out)
	}

	// Drift: an entry deleted, one changed, one no object made, in each
	// kind.
	objs := core.Of(dp).Objs
	var pk bpfobj.TypesPolicyKey
	var pv bpfobj.TypesPolicyEntry
	for it := objs.Policy.Iterate(); it.Next(&pk, &pv); {
		if pk.Endpoint == 1 {
			break
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(objs.Policy.Delete(&pk))
	pk.Endpoint = 9
	must(objs.Policy.Put(&pk, &pv))
	must(objs.Ipcache.Delete(ipcache.KeyBytes(cidr)))
	var ifindex uint32
	var info bpfobj.TypesEndpointInfo
	for it := objs.Endpoints.Iterate(); it.Next(&ifindex, &info); {
		if info.Id == 2 {
			break
		}
	}
	info.Identity = 4242
	must(objs.Endpoints.Put(ifindex, &info))
	var bid uint32
	var bv bpfobj.TypesLbBackend
	for it := objs.LbBackends.Iterate(); it.Next(&bid, &bv); {
	}
	bv.Weight = 7
	must(objs.LbBackends.Put(bid, &bv))
	var fk bpfobj.TypesLbFrontendKey
	var fv bpfobj.TypesLbFrontend
	for it := objs.LbFrontends.Iterate(); it.Next(&fk, &fv); {
	}
	fk.Port++
	must(objs.LbFrontends.Put(&fk, &fv))

	out, err := verify("verify")
	if err == nil {
		t.Errorf("verify found no difference:\n%s", out)
	}
	for _, want := range []string{
		"policy of endpoint 1: the maps lack or differ in 1 of its entries",
		"policy: 1 entries of endpoint 9, which has no policy",
		"CIDR identity of 198.18.99.0/24: not in the ipcache",
		"endpoint 2: its endpoint map entry is missing or differs",
		"service 198.18.200.1:80/tcp: missing or not as its record says: [backend 198.18.1.11:8080]",
		"a frontend no service has",
		"6 differences, 0 repaired",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("verify: want %q in\n%s", want, out)
		}
	}
	if out2, _ := verify("verify"); out2 != out {
		t.Errorf("verify without -repair changed something: first\n%s\nthen\n%s", out, out2)
	}

	// A repair only in the datapath's namespace: this process's is not.
	if _, err := verify("verify", "-repair"); !errors.Is(err, datapath.ErrInvalid) {
		t.Errorf("verify -repair from another namespace: %v, want ErrInvalid", err)
	}
	// Opening it read-write repairs what Reconcile repairs (the endpoint
	// map entry and the CIDR identity); verify -repair the rest.
	if out, err := verify("-netns", node.Path, "verify", "-repair"); err != nil || !strings.Contains(out, "4 differences, 4 repaired") {
		t.Errorf("verify -repair: %v\n%s", err, out)
	}
	if out, err := verify("verify"); err != nil || !strings.Contains(out, "0 differences") {
		t.Errorf("verify after the repair: %v\n%s", err, out)
	}

	// unload, in its namespace only, with no handle.
	if _, err := verify("unload"); !errors.Is(err, datapath.ErrInvalid) {
		t.Errorf("unload from another namespace: %v, want ErrInvalid", err)
	}
	if _, err := verify("-netns", node.Path, "unload"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dp.PinDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the pins are left after unload: %v", err)
	}
	if links, err := node.Exec("ip", "-o", "link", "show", "type", "veth"); err != nil || links != "" {
		t.Errorf("veths left after unload (%v): %s", err, links)
	}
}
