package policy

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/testutil"
)

func TestMain(m *testing.M) {
	testutil.Main(m, map[string]func(string) int{"applycrash": applyCrash})
}

// crashPolicy is the policy of a version, "old" or "new": 1000 rules each,
// where only the old allows TCP port 1111 from identity 1002 and only the
// new allows port 2222 and denies a CIDR no policy named before.
func crashPolicy(version string) Policy {
	base := uint16(20000)
	port := uint16(1111)
	var rules []Rule
	if version == "new" {
		base, port = 30000, 2222
		rules = append(rules, Rule{Action: Deny, Peers: []Peer{{CIDR: crashCIDR}}})
	}
	rules = append(rules, Rule{Peers: []Peer{{Identity: 1002}}, Ports: []Port{{Protocol: TCP, Port: port}}})
	for len(rules) < 1000 {
		rules = append(rules, Rule{Peers: []Peer{{Identity: 1003}}, Ports: []Port{{Protocol: TCP, Port: base + uint16(len(rules))}}})
	}
	return Policy{Ingress: rules}
}

var crashCIDR = netip.MustParsePrefix("198.18.77.0/24")

// applyCrash, given "BPFFS|NETNS|POINT", applies the new policy to endpoint
// 1 and kills itself at the crash point POINT. It exits with 3 when it
// never got there.
func applyCrash(arg string) int {
	parts := strings.Split(arg, "|")
	dp, err := datapath.Open(context.Background(), datapath.Config{Name: "node", BPFFS: parts[0], NetNS: parts[1], MustExist: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	testutil.CrashAt(parts[2])
	if _, err := Apply(context.Background(), dp, 1, crashPolicy("new")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 3
}

// A process killed at each crash point of a 1000-rule Apply leaves what
// Reconcile makes whole: Get returns the old policy or the new one, and the
// maps hold exactly its entries (no port of the other passes); the record
// is Ready, and only its blob slot is left; a CIDR identity is in the
// ipcache exactly when the policy names it. Then Apply and Delete work.
func TestKilledApplyAtEachCrashPoint(t *testing.T) {
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	bpffs := testutil.BPFFS(t)
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name: "node", NetNS: ns.Path, BPFFS: bpffs, Limits: datapath.Limits{Conntrack: 4096},
		Node: datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Unload()
	for i := range 2 {
		if _, err := endpoint.Create(context.Background(), dp, endpoint.Spec{
			ID: uint16(i + 1), IPv4: netip.AddrFrom4([4]byte{198, 18, 1, byte(11 + i)}),
			Identity: datapath.Identity(1001 + i), NetNS: testutil.Name("sluice-t-"),
		}); err != nil {
			t.Fatal(err)
		}
	}
	st := core.Of(dp)
	// Where each point leaves the policy: before the intent is recorded,
	// the old one; after, Reconcile finishes the change.
	points := []struct {
		name string
		want string
	}{
		{"policy/cidrs", "old"},
		{"policy/cidrs/recorded", "old"},
		{"policy/plan", "old"},
		{"policy/intent", "old"},
		{"policy/maps", "new"},
		{"policy/maps/half", "new"},
		{"policy/revoke", "new"},
		{"policy/commit", "new"},
		{"policy/cleanup", "new"},
		{"policy/done", "new"},
	}
	for _, pt := range points {
		if _, err := Apply(context.Background(), dp, 1, crashPolicy("old")); err != nil {
			t.Fatal(err)
		}
		testutil.RunKilled(t, "applycrash", bpffs+"|"+ns.Path+"|"+pt.name)
		repaired, err := dp.Reconcile(context.Background())
		if err != nil {
			t.Fatalf("%s: reconcile: %v", pt.name, err)
		}
		got, err := Get(dp, 1)
		if err != nil {
			t.Fatalf("%s: %v", pt.name, err)
		}
		if version := crashPolicy(pt.want); !equalPolicies(got, version) {
			t.Errorf("%s: Get returns a policy of %d rules, not the %s one", pt.name, len(got.Ingress), pt.want)
		}
		checkMapsHold(t, st, 1, got, pt.name)
		r, err := ledger.Get(st.Objs.Ledger, ledger.KindPolicy, 1)
		if err != nil || r.State != ledger.Ready {
			t.Errorf("%s: the record is %v (%v)", pt.name, r, err)
		}
		_, rec, _ := loadRecord(st, 1)
		if _, err := ledger.GetBlob(st.Objs.LedgerBlobs, ledger.KindPolicy, blobID(1, 1-rec.Slot)); !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Errorf("%s: the blob slot not in use is left: %v", pt.name, err)
		}
		_, byPrefix, err := cidrIdentities(st)
		if err != nil {
			t.Fatal(err)
		}
		_, inIpcache, err := ipcache.Lookup(st.Objs.Ipcache, crashCIDR)
		if err != nil {
			t.Fatal(err)
		}
		if named := pt.want == "new"; (byPrefix[crashCIDR] != nil) != named || inIpcache != named {
			t.Errorf("%s: the CIDR identity is recorded: %t, in the ipcache: %t; the policy names it: %t", pt.name, byPrefix[crashCIDR] != nil, inIpcache, named)
		}
		t.Logf("%s: Reconcile repaired %d objects; the policy is the %s one", pt.name, repaired, pt.want)
	}
	if _, err := Apply(context.Background(), dp, 1, crashPolicy("new")); err != nil {
		t.Fatal(err)
	}
	checkMapsHold(t, st, 1, crashPolicy("new"), "after")
	if _, err := Delete(context.Background(), dp, 1); err != nil {
		t.Fatal(err)
	}
	if have, err := current(st, 1); err != nil || len(have.Entries)+len(have.Meta) != 0 {
		t.Errorf("after Delete the maps hold %d entries (%v)", len(have.Entries)+len(have.Meta), err)
	}
}

// checkMapsHold checks that the maps hold exactly p's entries for the
// endpoint.
func checkMapsHold(t *testing.T, st *core.State, ep uint16, p Policy, what string) {
	t.Helper()
	c, err := Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	ids, _, err := cidrIdentities(st)
	if err != nil {
		t.Fatal(err)
	}
	want, err := c.Resolve(ep, ids)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	have, err := current(st, ep)
	if err != nil {
		t.Fatal(err)
	}
	add, remove := Diff(have, want)
	if len(add.Entries)+len(add.Meta)+len(remove.Entries)+len(remove.Meta) != 0 || !maps.Equal(have.Meta, want.Meta) {
		t.Errorf("%s: the maps lack %d entries and %d meta of the policy, and hold %d entries and %d meta it does not have",
			what, len(add.Entries), len(add.Meta), len(remove.Entries), len(remove.Meta))
	}
}

// equalPolicies compares two policies by their encoding.
func equalPolicies(a, b Policy) bool {
	x, err1 := encode(a)
	y, err2 := encode(b)
	return err1 == nil && err2 == nil && string(x) == string(y)
}
