package endpoint_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/testutil"
)

// crashID is the endpoint the crashing child creates, updates or deletes.
const crashID = 30

// opCrash, given "BPFFS|NETNS|PREFIX|OP|POINT", creates, updates (to
// identity 4242) or deletes endpoint crashID and kills itself at the crash
// point POINT. It exits with 3 when it never got there.
func opCrash(arg string) int {
	f := strings.Split(arg, "|")
	ctx := context.Background()
	dp, err := datapath.Open(ctx, datapath.Config{Name: "node", BPFFS: f[0], NetNS: f[1], MustExist: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	testutil.CrashAt(f[4])
	switch f[3] {
	case "create":
		_, err = endpoint.Create(ctx, dp, churnSpec(crashID, f[2]))
	case "update":
		_, err = endpoint.Update(ctx, dp, crashID, endpoint.Changes{Identity: 4242})
	case "delete":
		err = endpoint.Delete(ctx, dp, crashID)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 3
}

// A process killed at each crash point of Create, Update and Delete
// leaves what Reconcile (or re-opening) makes whole: the endpoint exists,
// working, with its old or new identity in its record and in the maps
// alike, or it does not exist and nothing of it is left.
func TestKilledAtEachCrashPoint(t *testing.T) {
	prefix := testutil.Name("sl-k")
	t.Cleanup(func() { removeNamespaces(t, prefix) }) // after Unload
	n := newNodeAt(t, testutil.BPFFS(t))
	sentinel := n.create(t, spec(1))
	ctx := context.Background()
	points := []struct {
		op, point string
		exists    bool
		identity  datapath.Identity
	}{
		{"create", "endpoint/intent", false, 0},
		{"create", "endpoint/devices", false, 0},
		{"create", "endpoint/record", false, 0},
		{"create", "endpoint/attach", false, 0},
		{"create", "endpoint/register", false, 0},
		{"create", "endpoint/up", false, 0},
		{"create", "endpoint/ready", false, 0},
		{"create", "endpoint/done", true, 1030},
		{"update", "endpoint update/maps", true, 1030},
		{"update", "endpoint update/record", true, 1030},
		{"update", "endpoint update/done", true, 4242},
		{"delete", "endpoint delete/intent", true, 4242},
		{"delete", "endpoint delete/stop", false, 0},
		{"delete", "endpoint delete/take apart", false, 0},
		{"delete", "endpoint delete/done", false, 0},
	}
	for i, pt := range points {
		if _, err := endpoint.Get(n.dp, crashID); pt.op == "delete" && err != nil {
			if _, err := endpoint.Create(ctx, n.dp, churnSpec(crashID, prefix)); err != nil {
				t.Fatal(err)
			}
		}
		testutil.RunKilled(t, "opcrash", strings.Join([]string{n.bpffs, n.ns.Path, prefix, pt.op, pt.point}, "|"))
		if i%2 == 0 {
			if _, err := n.dp.Reconcile(ctx); err != nil {
				t.Fatalf("%s: reconcile: %v", pt.point, err)
			}
		} else {
			n.reopen(t)
		}
		ep, err := endpoint.Get(n.dp, crashID)
		switch {
		case pt.exists && err != nil:
			t.Fatalf("%s: %v, want the endpoint", pt.point, err)
		case !pt.exists && !errors.Is(err, datapath.ErrNotFound):
			t.Fatalf("%s: Get: %v, want ErrNotFound", pt.point, err)
		case pt.exists && ep.Identity != pt.identity:
			t.Errorf("%s: identity %d, want %d", pt.point, ep.Identity, pt.identity)
		}
		drift, err := n.dp.Verify(ctx, false)
		if err != nil || len(drift) > 0 {
			t.Errorf("%s: the maps and the ledger differ (%v): %v", pt.point, err, drift)
		}
		checkExactly(t, n, sentinel, prefix)
		t.Logf("%s: after Reconcile the endpoint exists: %t, identity %d", pt.point, pt.exists, pt.identity)
	}
}
