package node_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/clustertest"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/internal/xfrm"
	"github.com/sluicedp/sluice/node"
)

func TestMain(m *testing.M) {
	testutil.Main(m, map[string]func(string) int{"nodecrash": nodeCrash})
}

// crashOp is what the crashing child is told (as JSON): which datapath to
// open, the IPsec key set to give it, or the node to apply or the name of
// the node to delete, and where to kill itself.
type crashOp struct {
	BPFFS, NetNS string
	Point        string
	Keys         *node.IPsecKeys
	Apply        *node.Node // nil (and no Keys): Delete
	Delete       string
}

// nodeCrash, given a crashOp, sets the keys, or applies or deletes a
// node, and kills itself at the crash point. It exits with 3 when it
// never got there.
func nodeCrash(arg string) int {
	var op crashOp
	if err := json.Unmarshal([]byte(arg), &op); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx := context.Background()
	dp, err := datapath.Open(ctx, datapath.Config{Name: "node", BPFFS: op.BPFFS, NetNS: op.NetNS, MustExist: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	testutil.CrashAt(op.Point)
	switch {
	case op.Keys != nil:
		_, err = node.SetIPsecKeys(ctx, dp, *op.Keys)
	case op.Apply != nil:
		_, err = node.Apply(ctx, dp, *op.Apply)
	default:
		err = node.Delete(ctx, dp, op.Delete)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 3
}

// The crash test's node versions. Version A of node-1 is the cluster's own
// (clustertest.Node.Object); B moves its IPv4 address and adds a pod CIDR;
// node-x is a node the datapath does not know.
var (
	addrB = netip.MustParseAddr("198.18.0.77")
	cidrB = netip.MustParsePrefix("198.19.200.0/24")
	nodeX = node.Node{
		Name:      "node-x",
		Addresses: []netip.Addr{netip.MustParseAddr("198.18.0.88")},
		PodCIDRs:  []netip.Prefix{netip.MustParsePrefix("198.19.201.0/24")},
	}
)

func versionB(a node.Node) node.Node {
	b := node.Node{Name: a.Name, PodCIDRs: append(slices.Clone(a.PodCIDRs), cidrB)}
	for _, x := range a.Addresses {
		if x.Is4() {
			x = addrB
		}
		b.Addresses = append(b.Addresses, x)
	}
	return b
}

// A process killed at each crash point of Apply (changing node-1 from
// version A to B, or adding node-x) and of Delete (of node-1) leaves what
// Reconcile makes whole, in either routing mode: each node is exactly one
// whole version (the old one when the kill came before anything was
// written, else the new one: a change half-made rolls forward, a delete
// begun is finished), and node_cidrs, node_addrs, the ipcache and the
// routes hold exactly what the ledger says (Verify finds no drift).
func TestKilledAtEachCrashPoint(t *testing.T) {
	applyPoints := []string{"node/intent", "node/maps", "node/maps/half", "node/routes", "node/cleanup", "node/ready", "node/done"}
	type point struct {
		op, point string
		done      bool // Reconcile leaves the new version (B, node-x, node-1 gone)
		repaired  int  // what Reconcile counts: a record left not Ready
	}
	var points []point
	for _, op := range []string{"change", "create"} {
		for _, p := range applyPoints {
			// Crash runs before each phase: at node/intent nothing is
			// written yet; from node/maps on, the record names the new
			// version, which Reconcile finishes until it is Ready.
			written := p != "node/intent"
			committed := p == "node/done"
			points = append(points, point{op, p, written, b2i(written && !committed)})
		}
	}
	points = append(points,
		point{"delete", "node delete/intent", false, 0},
		point{"delete", "node delete/take apart", true, 1},
		point{"delete", "node delete/done", true, 0},
	)

	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode, Nodes: 2, Endpoints: 1, NoPeers: true})
			local := c.Nodes[0]
			a := c.Nodes[1].Object()
			b := versionB(a)
			ctx := context.Background()
			for _, pt := range points {
				name := pt.op + "_at_" + strings.ReplaceAll(pt.point, "/", "_")
				t.Run(name, func(t *testing.T) {
					resetNodes(t, local.DP, a)
					op := crashOp{BPFFS: local.BPFFS, NetNS: local.NS.Path, Point: pt.point}
					before, after := []node.Node{a}, []node.Node{b}
					switch pt.op {
					case "change":
						op.Apply = &b
					case "create":
						op.Apply = &nodeX
						after = []node.Node{a, nodeX}
					case "delete":
						op.Delete = a.Name
						after = nil
					}
					repaired := killAndReconcile(t, local, op)
					want := before
					if pt.done {
						want = after
					}
					checkNodes(t, local.DP, want, a.Name, nodeX.Name)
					if repaired != pt.repaired {
						t.Errorf("Reconcile repaired %d objects, want %d", repaired, pt.repaired)
					}
					drift, err := local.DP.Verify(ctx, false)
					if err != nil || len(drift) > 0 {
						t.Errorf("the maps and routes differ from the ledger (%v): %v", err, drift)
					}
					t.Logf("%s: Reconcile repaired %d, left %v", pt.point, repaired, want)
				})
			}
		})
	}
}

// killAndReconcile runs op in a child killed at its crash point, then
// Reconciles the node's datapath and returns what it repaired.
func killAndReconcile(t *testing.T, n *clustertest.Node, op crashOp) int {
	t.Helper()
	arg, err := json.Marshal(op)
	if err != nil {
		t.Fatal(err)
	}
	testutil.RunKilled(t, "nodecrash", string(arg))
	repaired, err := n.DP.Reconcile(context.Background())
	if err != nil {
		t.Fatalf("reconcile: %v", err)
	}
	return repaired
}

// resetNodes makes node-1 version a the datapath's only remote node, with
// nothing else in the node maps, as each crash point starts from: a point
// that failed leaves nothing to the next.
func resetNodes(t *testing.T, dp *datapath.Datapath, a node.Node) {
	t.Helper()
	ctx := context.Background()
	if _, err := dp.Verify(ctx, true); err != nil {
		t.Fatalf("reset: verify: %v", err)
	}
	if _, err := node.Sync(ctx, dp, []node.Node{a}); err != nil {
		t.Fatalf("reset: %v", err)
	}
	if drift, err := dp.Verify(ctx, false); err != nil || len(drift) > 0 {
		t.Fatalf("reset: drift before the child runs (%v): %v", err, drift)
	}
}

// checkNodes checks that List is exactly want and Get agrees for each of
// names: the node of want, or ErrNotFound.
func checkNodes(t *testing.T, dp *datapath.Datapath, want []node.Node, names ...string) {
	t.Helper()
	list, err := node.List(dp)
	if err != nil {
		t.Fatal(err)
	}
	want = slices.Clone(want)
	for i := range want {
		want[i] = sorted(want[i])
	}
	slices.SortFunc(want, func(x, y node.Node) int { return strings.Compare(x.Name, y.Name) })
	if fmt.Sprint(list) != fmt.Sprint(want) {
		t.Errorf("List: %v, want exactly %v", list, want)
	}
	for _, name := range names {
		got, err := node.Get(dp, name)
		i := slices.IndexFunc(want, func(n node.Node) bool { return n.Name == name })
		switch {
		case i < 0 && !errors.Is(err, datapath.ErrNotFound):
			t.Errorf("Get %s: %v, %v; want ErrNotFound", name, got, err)
		case i >= 0 && err != nil:
			t.Errorf("Get %s: %v; want %v", name, err, want[i])
		case i >= 0 && got.String() != want[i].String():
			t.Errorf("Get %s: %v; want %v", name, got, want[i])
		}
	}
}

// sorted is n with its addresses and pod CIDRs in the order List gives.
func sorted(n node.Node) node.Node {
	n.Addresses = slices.Clone(n.Addresses)
	n.PodCIDRs = slices.Clone(n.PodCIDRs)
	slices.SortFunc(n.Addresses, netip.Addr.Compare)
	slices.SortFunc(n.PodCIDRs, func(p, q netip.Prefix) int {
		if c := p.Addr().Compare(q.Addr()); c != 0 {
			return c
		}
		return p.Bits() - q.Bits()
	})
	return n
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// A process killed at each crash point of SetIPsecKeys (from key 1 to key
// 2 in one call: install, switch, remove) and of creating and deleting a
// node with IPsec on leaves what Reconcile makes whole: the key set is
// exactly the old or the new one, as a second handle sees it too, and the
// xfrm states and policies are exactly what the ledger says (Verify finds
// no drift, and the OUT states are one per node and key).
func TestKilledInIPsecChanges(t *testing.T) {
	requireEncryption(t, datapath.EncryptionIPsec)
	c := clustertest.New(t, clustertest.Options{Nodes: 2, Endpoints: 1, NoPeers: true, Encryption: datapath.EncryptionIPsec})
	local := c.Nodes[0]
	a := c.Nodes[1].Object()
	ctx := context.Background()
	one, two := clustertest.IPsecKeys(), node.IPsecKeys{Keys: []node.IPsecKey{clustertest.IPsecKey(2)}, Current: 2}
	type point struct {
		point    string
		keys     bool // SetIPsecKeys(two); else create node-x, or delete node-1
		delete   bool
		done     bool // Reconcile leaves the new version
		repaired int
	}
	var points []point
	for _, p := range []string{"intent", "install", "switch", "cleanup", "ready", "done"} {
		points = append(points, point{"ipsec keys/" + p, true, false, p != "intent", b2i(p != "intent" && p != "done")})
	}
	for _, p := range []string{"intent", "encrypt", "maps", "routes", "cleanup", "ready", "done"} {
		points = append(points, point{"node/" + p, false, false, p != "intent", b2i(p != "intent" && p != "done")})
	}
	points = append(points,
		point{"node delete/intent", false, true, false, 0},
		point{"node delete/take apart", false, true, true, 1},
	)
	for _, pt := range points {
		t.Run(strings.ReplaceAll(pt.point, "/", "_"), func(t *testing.T) {
			if _, err := node.SetIPsecKeys(ctx, local.DP, one); err != nil {
				t.Fatalf("reset keys: %v", err)
			}
			resetNodes(t, local.DP, a)
			op := crashOp{BPFFS: local.BPFFS, NetNS: local.NS.Path, Point: pt.point}
			wantKeys, wantNodes := one, []node.Node{a}
			switch {
			case pt.keys:
				op.Keys = &two
				if pt.done {
					wantKeys = two
				}
			case pt.delete:
				op.Delete = a.Name
				if pt.done {
					wantNodes = nil
				}
			default:
				op.Apply = &nodeX
				if pt.done {
					wantNodes = []node.Node{a, nodeX}
				}
			}
			repaired := killAndReconcile(t, local, op)
			if repaired != pt.repaired {
				t.Errorf("Reconcile repaired %d objects, want %d", repaired, pt.repaired)
			}
			checkNodes(t, local.DP, wantNodes, a.Name, nodeX.Name)
			second, err := datapath.Open(ctx, datapath.Config{Name: "node", BPFFS: local.BPFFS, NetNS: local.NS.Path, MustExist: true})
			if err != nil {
				t.Fatal(err)
			}
			defer second.Close()
			for _, dp := range []*datapath.Datapath{local.DP, second} {
				current, installed, err := node.IPsecSPIs(dp)
				if err != nil || current != wantKeys.Current || !slices.Equal(installed, []uint8{wantKeys.Current}) {
					t.Errorf("IPsecSPIs = %d %v, %v; want %d [%[4]d]", current, installed, err, wantKeys.Current)
				}
			}
			sas, err := xfrm.Installed(local.NS.Handle)
			if err != nil {
				t.Fatal(err)
			}
			peers := map[uint16]bool{}
			for _, sa := range sas {
				peers[sa.Peer.Node] = true
				if sa.SPI != wantKeys.Current {
					t.Errorf("an OUT state of key %d: %+v", sa.SPI, sa.Peer)
				}
			}
			if len(peers) != len(wantNodes) {
				t.Errorf("OUT states towards %d nodes, want %d: %+v", len(peers), len(wantNodes), sas)
			}
			drift, err := local.DP.Verify(ctx, false)
			if err != nil || len(drift) > 0 {
				t.Errorf("the maps, routes and xfrm states differ from the ledger (%v): %v", err, drift)
			}
		})
	}
}

// A change over one a killed process left half-made (no Reconcile in
// between) removes what both older versions had: A's address, which the
// killed change to B was replacing, goes with the change to C.
func TestApplyOverHalfMadeChange(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2, Endpoints: 1, NoPeers: true})
	local := c.Nodes[0]
	a := c.Nodes[1].Object()
	b := versionB(a)
	resetNodes(t, local.DP, a)
	arg, err := json.Marshal(crashOp{BPFFS: local.BPFFS, NetNS: local.NS.Path, Point: "node/routes", Apply: &b})
	if err != nil {
		t.Fatal(err)
	}
	testutil.RunKilled(t, "nodecrash", string(arg))
	cv := a
	cv.Addresses = []netip.Addr{netip.MustParseAddr("198.18.0.99")}
	if _, err := node.Apply(context.Background(), local.DP, cv); err != nil {
		t.Fatal(err)
	}
	checkNodes(t, local.DP, []node.Node{cv}, a.Name)
	if drift, err := local.DP.Verify(context.Background(), false); err != nil || len(drift) > 0 {
		t.Errorf("drift after the change (%v): %v", err, drift)
	}
}
