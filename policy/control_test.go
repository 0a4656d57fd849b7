package policy

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
)

// controlNode is a datapath with two endpoints, 1 (identity 1001) and 2
// (identity 1002), and the handle's config, to open more handles.
type controlNode struct {
	dp  *datapath.Datapath
	cfg datapath.Config
	eps [2]*endpoint.Endpoint
}

func newControlNode(t *testing.T, limits datapath.Limits) *controlNode {
	t.Helper()
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	limits.Conntrack = 4096
	cfg := datapath.Config{
		Name: "node", NetNS: ns.Path, BPFFS: testutil.BPFFS(t), Limits: limits,
		Node: datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}},
	}
	dp, err := datapath.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Unload() })
	n := &controlNode{dp: dp, cfg: cfg}
	for i := range n.eps {
		if n.eps[i], err = endpoint.Create(context.Background(), dp, endpoint.Spec{
			ID: uint16(i + 1), IPv4: netip.AddrFrom4([4]byte{198, 18, 1, byte(11 + i)}),
			Identity: datapath.Identity(1001 + i), NetNS: testutil.Name("sluice-t-"),
		}); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// syn sends a TCP SYN from endpoint 2 to endpoint 1's port through the
// from-endpoint program, and reports whether it was delivered.
func (n *controlNode) syn(t *testing.T, sport, port uint16) bool {
	t.Helper()
	st := core.Of(n.dp)
	progs, err := st.EndpointPrograms()
	if err != nil {
		t.Fatal(err)
	}
	from, to := n.eps[1], n.eps[0]
	frame := packet.Build(&packet.Ethernet{Src: from.MAC, Dst: from.HostMAC}, &packet.IPv4{Src: from.IPv4, Dst: to.IPv4},
		&packet.TCP{SrcPort: sport, DstPort: port, Flags: packet.SYN})
	var r progtest.Result
	if err := nsrun.Do(st.NS, func() (err error) {
		r, err = progtest.Run(progs.FromEndpoint, frame, &progtest.SKB{Ifindex: uint32(from.HostIfindex)})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return r.Verdict == progtest.TCActRedirect
}

// rawRecord returns the bytes of the policy's ledger record.
func rawRecord(t *testing.T, st *core.State, ep uint16) string {
	t.Helper()
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindPolicy, uint32(ep))
	if err != nil {
		t.Fatal(err)
	}
	return string(r.Object)
}

// An Apply of the policy the endpoint has writes nothing, from any handle:
// the record keeps its generation and the per-rule counters keep their
// counts (a controller's periodic re-apply erased them).
func TestApplyThatChangesNothingWritesNothing(t *testing.T) {
	n := newControlNode(t, datapath.Limits{})
	ctx := context.Background()
	p := Policy{Ingress: []Rule{{Peers: []Peer{{Identity: 1002}}, Ports: []Port{{Protocol: TCP, Port: 80}}}}}
	if _, err := Apply(ctx, n.dp, 1, p); err != nil {
		t.Fatal(err)
	}
	if !n.syn(t, 40000, 80) || n.syn(t, 40001, 81) {
		t.Fatal("the policy is not enforced")
	}
	st := core.Of(n.dp)
	before := rawRecord(t, st, 1)
	other, err := datapath.Open(ctx, datapath.Config{Name: n.cfg.Name, NetNS: n.cfg.NetNS, BPFFS: n.cfg.BPFFS, MustExist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	for _, dp := range []*datapath.Datapath{other, n.dp, other} {
		c, err := Apply(ctx, dp, 1, p)
		if err != nil {
			t.Fatal(err)
		}
		if c != (Changes{}) {
			t.Errorf("applying the same policy again changed %+v", c)
		}
	}
	if after := rawRecord(t, st, 1); after != before {
		t.Errorf("the record was written:\n%s\n%s", before, after)
	}
	c, err := ReadCounters(n.dp, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Ingress) != 1 || c.Ingress[0] != 1 {
		t.Errorf("counters after re-applying: %v, want the one flow counted", c.Ingress)
	}
}

// A direction with a policy of no rule (deny all) is stored as such: Get
// returns it, and applying it again is no change.
func TestEmptyDirectionIsKept(t *testing.T) {
	n := newControlNode(t, datapath.Limits{})
	ctx := context.Background()
	p := Policy{Ingress: []Rule{}}
	if _, err := Apply(ctx, n.dp, 1, p); err != nil {
		t.Fatal(err)
	}
	got, err := Get(n.dp, 1)
	if err != nil {
		t.Fatal(err)
	}
	if got.Ingress == nil || got.Egress != nil {
		t.Errorf("Get: ingress %v (nil: %t), egress %v (nil: %t); want a policy of no rule in ingress only", got.Ingress, got.Ingress == nil, got.Egress, got.Egress == nil)
	}
	if n.syn(t, 40000, 80) {
		t.Error("a SYN passed a policy with no rule")
	}
	// Egress gets a policy of no rule: a change, though the stored
	// policy of gob's version 1 would have been the same.
	c, err := Apply(ctx, n.dp, 1, Policy{Ingress: []Rule{}, Egress: []Rule{}})
	if err != nil || c == (Changes{}) {
		t.Errorf("a first egress policy: %+v, %v", c, err)
	}
}

// An Apply refused for room changes nothing: the room check counts every
// endpoint's entries, so it refuses before writing; Get returns the policy
// the maps hold; the stored policy does not grow.
func TestFailedApplyChangesNothing(t *testing.T) {
	n := newControlNode(t, datapath.Limits{PolicyEntries: 64})
	ctx := context.Background()
	ports := func(first, count int) Policy {
		var r []Rule
		for i := range count {
			r = append(r, Rule{Peers: []Peer{{Identity: 1002}}, Ports: []Port{{Protocol: TCP, Port: uint16(first + i)}}})
		}
		return Policy{Ingress: r}
	}
	if _, err := Apply(ctx, n.dp, 2, ports(1000, 40)); err != nil {
		t.Fatal(err)
	}
	old := ports(80, 1)
	if _, err := Apply(ctx, n.dp, 1, old); err != nil {
		t.Fatal(err)
	}
	st := core.Of(n.dp)
	before := rawRecord(t, st, 1)
	chunks := func() int {
		n := 0
		for _, slot := range []uint32{0, 1} {
			doc, err := ledger.GetBlob(st.Objs.LedgerBlobs, ledger.KindPolicy, blobID(1, slot))
			if err == nil {
				n += len(doc)
			}
		}
		return n
	}
	stored := chunks()
	// 30 entries for endpoint 1: room for it alone, not beside endpoint
	// 2's 40.
	if _, err := Apply(ctx, n.dp, 1, ports(2000, 30)); !errors.Is(err, datapath.ErrMapFull) {
		t.Fatalf("an Apply past the policy map's room: %v, want ErrMapFull", err)
	}
	got, err := Get(n.dp, 1)
	if err != nil || !equalPolicies(got, old) {
		t.Errorf("Get after the refused Apply: %d rules (%v), want the old policy", len(got.Ingress), err)
	}
	checkMapsHold(t, st, 1, old, "after the refused Apply")
	checkMapsHold(t, st, 2, ports(1000, 40), "endpoint 2 after the refused Apply")
	if after := rawRecord(t, st, 1); after != before {
		t.Errorf("the record changed:\n%s\n%s", before, after)
	}
	if now := chunks(); now != stored {
		t.Errorf("the stored policy went from %d bytes to %d", stored, now)
	}
	if !n.syn(t, 40000, 80) {
		t.Error("the old policy no longer lets port 80 through")
	}
}

// ReadCounters and ReadAllCounters agree, rule by rule, from any handle,
// and follow the live policy: an Apply that changes it starts its rules'
// counts over, with as many rules as it has.
func TestReadAllCounters(t *testing.T) {
	n := newControlNode(t, datapath.Limits{})
	ctx := context.Background()
	web := Rule{Peers: []Peer{{Identity: 1002}}, Ports: []Port{{Protocol: TCP, Port: 80}}}
	ssh := Rule{Peers: []Peer{{Identity: 1002}}, Ports: []Port{{Protocol: TCP, Port: 22}}}
	other, err := datapath.OpenReadOnly(ctx, datapath.Config{Name: n.cfg.Name, BPFFS: n.cfg.BPFFS, MustExist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	check := func(want []uint64) {
		t.Helper()
		for _, dp := range []*datapath.Datapath{n.dp, other} {
			one, err := ReadCounters(dp, 1)
			if err != nil {
				t.Fatal(err)
			}
			all, err := ReadAllCounters(dp)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(one.Ingress, want) || len(one.Egress) != 0 {
				t.Errorf("ReadCounters: %+v, want ingress %v", one, want)
			}
			if len(all) != 1 || !slices.Equal(all[1].Ingress, want) || len(all[1].Egress) != 0 {
				t.Errorf("ReadAllCounters: %+v, want endpoint 1 only, ingress %v", all, want)
			}
		}
	}
	if _, err := Apply(ctx, n.dp, 1, Policy{Ingress: []Rule{web, ssh}}); err != nil {
		t.Fatal(err)
	}
	if !n.syn(t, 40000, 80) || !n.syn(t, 40001, 22) || !n.syn(t, 40002, 22) {
		t.Fatal("the policy is not enforced")
	}
	check([]uint64{1, 2})
	if _, err := Apply(ctx, n.dp, 1, Policy{Ingress: []Rule{web}}); err != nil {
		t.Fatal(err)
	}
	check([]uint64{0})
	if !n.syn(t, 40003, 80) || n.syn(t, 40004, 22) {
		t.Fatal("the new policy is not enforced")
	}
	check([]uint64{1})
	if _, err := Apply(ctx, n.dp, 1, Policy{Ingress: []Rule{web, ssh, web}}); err != nil {
		t.Fatal(err)
	}
	check([]uint64{0, 0, 0})
	if !n.syn(t, 40005, 22) {
		t.Fatal("the new policy is not enforced")
	}
	check([]uint64{0, 1, 0})
	if _, err := Delete(ctx, n.dp, 1); err != nil {
		t.Fatal(err)
	}
	if all, err := ReadAllCounters(other); err != nil || len(all) != 0 {
		t.Errorf("after Delete: %v, %v; want none", all, err)
	}
	if _, err := ReadCounters(other, 1); !errors.Is(err, datapath.ErrNotFound) {
		t.Errorf("ReadCounters after Delete: %v, want ErrNotFound", err)
	}
}
