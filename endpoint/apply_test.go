package endpoint_test

import (
	"context"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/testutil"
)

// Apply creates, leaves alone, updates in place or replaces, as the spec
// differs from what is there; the same spec twice changes nothing.
func TestApply(t *testing.T) {
	n := newNode(t)
	ctx := context.Background()
	peer := n.create(t, spec(2))
	s := spec(1)
	t.Cleanup(func() { endpoint.Delete(ctx, n.dp, s.ID) })

	apply := func(want endpoint.Change) *endpoint.Endpoint {
		t.Helper()
		ep, got, err := endpoint.Apply(ctx, n.dp, s)
		if err != nil {
			t.Fatalf("apply: %v", err)
		}
		if got != want {
			t.Errorf("apply: %s, want %s", got, want)
		}
		if !ping(t, peer, ep.IPv4) {
			t.Errorf("no ping after apply (%s)", got)
		}
		return ep
	}
	first := apply(endpoint.Created)
	if again := apply(endpoint.Unchanged); again.MAC.String() != first.MAC.String() || again.HostIfindex != first.HostIfindex {
		t.Errorf("an unchanged apply changed the endpoint: %+v, was %+v", again, first)
	}
	s.Identity, s.Labels = 3000, map[string]string{"app": "db"}
	if ep := apply(endpoint.Updated); ep.HostIfindex != first.HostIfindex || ep.Identity != 3000 {
		t.Errorf("an update replaced the interface or missed the identity: %+v", ep)
	}
	apply(endpoint.Unchanged)
	s.MTU = 1400
	if ep := apply(endpoint.Replaced); ep.MTU != 1400 || ep.MAC.String() != first.MAC.String() {
		t.Errorf("replaced endpoint: MTU %d MAC %s, want 1400 and the same MAC", ep.MTU, ep.MAC)
	}
	apply(endpoint.Unchanged)
}

// The status says what the kernel has: the host end up, the pair running,
// the program attached; a workload that sets its end down is not running.
func TestReadStatus(t *testing.T) {
	n := newNode(t)
	a := n.create(t, spec(1))
	st, err := endpoint.ReadStatus(n.dp, a.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !st.HostUp || !st.Running || !st.Attached {
		t.Errorf("status of a new endpoint: %+v, want up, running, attached", st)
	}
	testutil.OpenNetNS(t, a.NetNS).Do(t, func() error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return netlink.LinkSetDown(l)
	})
	// The kernel updates the operational state a moment later.
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := endpoint.ReadStatus(n.dp, a.ID)
		if err == nil && st.HostUp && !st.Running {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status with the workload's end down: %+v (%v), want up but not running", st, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
