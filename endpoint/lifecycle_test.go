package endpoint_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
)

func TestMain(m *testing.M) {
	testutil.Main(m, map[string]func(string) int{"churn": churn, "opcrash": opCrash})
}

// churnIDs are the endpoints the child makes and takes apart.
var churnIDs = []uint16{20, 21, 22}

func churnSpec(id uint16, prefix string) endpoint.Spec {
	s := spec(int(id))
	s.NetNS = fmt.Sprintf("%s-%d", prefix, id)
	return s
}

// churn, given "BPFFS|NETNS|PREFIX", creates and deletes endpoints on that
// datapath until it is killed or the datapath goes away. It says "ready"
// once the programs are loaded, so that a kill lands in the churn and not
// in a program load (slow on an emulated kernel).
func churn(arg string) int {
	f := strings.Split(arg, "|")
	ctx := context.Background()
	dp, err := datapath.Open(ctx, datapath.Config{Name: "node", BPFFS: f[0], NetNS: f[1], MustExist: true})
	if err == nil {
		_, err = core.Of(dp).EndpointPrograms()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	for {
		for _, id := range churnIDs {
			var err error
			if _, getErr := endpoint.Get(dp, id); getErr == nil {
				err = endpoint.Delete(ctx, dp, id)
			} else {
				_, err = endpoint.Create(ctx, dp, churnSpec(id, f[2]))
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 2
			}
		}
	}
}

// startChurn starts a churning child on n's datapath.
func startChurn(t *testing.T, n *node, bpffs, prefix string) *exec.Cmd {
	t.Helper()
	cmd, err := testutil.Child("churn", strings.Join([]string{bpffs, n.ns.Path, prefix}, "|"))
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("churn child: %q, %v", line, err)
	}
	return cmd
}

// A process killed at any point of Create or Delete leaves a ledger record
// that re-opening (or Reconcile) finishes: afterwards exactly the listed
// endpoints exist, each with its program and each reachable, and no device
// or namespace is left over; every ID can be created again.
func TestKilledMidway(t *testing.T) {
	prefix := testutil.Name("sl-c")
	t.Cleanup(func() { removeNamespaces(t, prefix) }) // after Unload
	n := newNodeAt(t, testutil.BPFFS(t))
	sentinel := n.create(t, spec(1))
	undone, listed := 0, 0

	for i := range 24 {
		child := startChurn(t, n, n.bpffs, prefix)
		time.Sleep(time.Duration(20+rand.IntN(100)) * time.Millisecond)
		child.Process.Kill()
		child.Wait()

		if i%2 == 0 {
			u, err := n.dp.Reconcile(context.Background())
			if err != nil {
				t.Fatalf("round %d: reconcile: %v", i, err)
			}
			undone += u
		} else {
			n.reopen(t)
		}
		listed += checkExactly(t, n, sentinel, prefix)
	}
	// The kills must land in the middle of work, not only between calls.
	t.Logf("Reconcile undid %d half-made endpoints; %d churned endpoints were listed after the kills", undone, listed)
	if undone == 0 {
		t.Error("no kill left half-made work: the test proves nothing")
	}
	// Every ID works again.
	for _, id := range churnIDs {
		if _, err := endpoint.Create(context.Background(), n.dp, churnSpec(id, prefix)); err != nil && !errors.Is(err, datapath.ErrExists) {
			t.Errorf("create endpoint %d after the kills: %v", id, err)
		}
	}
}

// checkExactly checks that the listed endpoints are all there is: each has
// its host device and program and answers the sentinel's pings, and no
// other veth or namespace of the churn exists.
// It returns how many endpoints besides the sentinel there are.
func checkExactly(t *testing.T, n *node, sentinel *endpoint.Endpoint, prefix string) int {
	t.Helper()
	eps, err := endpoint.List(n.dp)
	if err != nil {
		t.Fatal(err)
	}
	listed := map[int]bool{}
	for _, ep := range eps {
		listed[ep.HostIfindex] = true
		n.ns.Do(t, func() error {
			if testutil.KernelAtLeast(6, 6) {
				res, err := link.QueryPrograms(link.QueryOptions{Target: ep.HostIfindex, Attach: ebpf.AttachTCXIngress})
				if err != nil || len(res.Programs) == 0 {
					t.Errorf("endpoint %d has no program (%v)", ep.ID, err)
				}
			}
			return nil
		})
		if ep.ID != sentinel.ID && !ping(t, sentinel, ep.IPv4) {
			t.Errorf("endpoint %d does not answer", ep.ID)
		}
	}
	n.ns.Do(t, func() error {
		links, err := netlink.LinkList()
		for _, l := range links {
			if l.Type() == "veth" && !listed[l.Attrs().Index] {
				t.Errorf("veth %s is left over", l.Attrs().Name)
			}
		}
		return err
	})
	names, _ := filepath.Glob(filepath.Join("/run/netns", prefix+"-*"))
	for _, name := range names {
		found := false
		for _, ep := range eps {
			found = found || filepath.Base(name) == ep.NetNS
		}
		if !found {
			t.Errorf("namespace %s is left over", name)
		}
	}
	return len(eps) - 1
}

// removeNamespaces deletes what a failed test may have left of the churn.
func removeNamespaces(t *testing.T, prefix string) {
	names, _ := filepath.Glob(filepath.Join("/run/netns", prefix+"-*"))
	for _, name := range names {
		t.Errorf("namespace %s was left behind", name)
		unmountRemove(name)
	}
}

// A program that imports only the datapath package unloads everything the
// endpoint package made: the ledger, not the code in the binary, says what
// there is to undo.
func TestUnloadFromLeanBinary(t *testing.T) {
	prog := testutil.Program(t, "unload")
	bpffs := testutil.BPFFS(t)
	n := newNodeAt(t, bpffs)
	a, b := create(t, n.dp, spec(1)), create(t, n.dp, spec(2))
	if err := n.dp.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(prog, "-bpffs", bpffs, "-name", "node", "-netns", n.ns.Path).CombinedOutput()
	if err != nil {
		t.Fatalf("unload: %v: %s", err, out)
	}
	n.unloaded = true
	for _, ep := range []*endpoint.Endpoint{a, b} {
		if _, err := os.Stat(filepath.Join("/run/netns", ep.NetNS)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("endpoint %d: its namespace is still there", ep.ID)
			unmountRemove(filepath.Join("/run/netns", ep.NetNS))
		}
	}
	n.ns.Do(t, func() error {
		links, err := netlink.LinkList()
		for _, l := range links {
			if l.Type() == "veth" {
				t.Errorf("veth %s is still there", l.Attrs().Name)
			}
		}
		return err
	})
}

// Unload holds the datapath's lock from the start: endpoints created
// meanwhile, from this process or another, are either undone with the rest
// or refused, never left behind; nothing deadlocks.
func TestUnloadWhileCreating(t *testing.T) {
	prefix := testutil.Name("sl-u")
	t.Cleanup(func() { removeNamespaces(t, prefix) })
	bpffs := testutil.BPFFS(t)
	n := newNodeAt(t, bpffs)
	child := startChurn(t, n, bpffs, prefix)

	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := 30 + 10*g; ; id++ {
				select {
				case <-stop:
					return
				default:
				}
				s := spec(id % 250)
				s.NetNS = fmt.Sprintf("%s-%d", prefix, id)
				if _, err := endpoint.Create(context.Background(), n.dp, s); errors.Is(err, os.ErrClosed) || errors.Is(err, os.ErrNotExist) {
					return
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- n.dp.Unload() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("unload: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Unload did not return within 60s")
	}
	n.unloaded = true
	close(stop)
	wg.Wait()
	if err := child.Wait(); err == nil {
		t.Error("the other process went on creating endpoints after Unload")
	}
	n.ns.Do(t, func() error {
		links, err := netlink.LinkList()
		for _, l := range links {
			if l.Type() == "veth" {
				t.Errorf("veth %s left behind", l.Attrs().Name)
			}
		}
		return err
	})
}

// Close may come while other calls run: they finish or fail with an error
// matching os.ErrClosed, and nothing touches a closed handle.
func TestCloseWhileReading(t *testing.T) {
	n := newNode(t)
	a := n.create(t, spec(1))
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				_, err1 := endpoint.List(n.dp)
				_, err2 := endpoint.ReadCounters(n.dp, a.ID)
				_, err3 := n.dp.Metrics()
				_, err4 := endpoint.Get(n.dp, a.ID)
				for _, err := range []error{err1, err2, err3, err4} {
					if err != nil && !errors.Is(err, os.ErrClosed) {
						t.Errorf("a call racing Close: %v", err)
					}
				}
				if err1 != nil {
					return
				}
			}
		}()
	}
	time.Sleep(50 * time.Millisecond)
	if err := n.dp.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if _, err := endpoint.Create(context.Background(), n.dp, spec(2)); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Create after Close: %v, want os.ErrClosed", err)
	}
	n.reopen(t)
}

// Re-opening with no pod CIDRs takes the recorded ones.
func TestReopenTakesPodCIDRs(t *testing.T) {
	bpffs := testutil.BPFFS(t)
	n := newNodeAt(t, bpffs)
	n.dp.Close()
	dp, err := datapath.Open(context.Background(), datapath.Config{Name: "node", NetNS: n.ns.Path, BPFFS: bpffs})
	if err != nil {
		t.Fatal(err)
	}
	n.dp = dp
	create(t, dp, spec(1)) // needs the pod CIDRs for its gateway
}

func unmountRemove(path string) { nsrun.DeleteNamed(filepath.Base(path)) }

// create creates an endpoint for a test that takes the datapath apart
// itself; it deletes the endpoint at the end only if the datapath is still
// there.
func create(t *testing.T, dp *datapath.Datapath, s endpoint.Spec) *endpoint.Endpoint {
	t.Helper()
	ep, err := endpoint.Create(context.Background(), dp, s)
	if err != nil {
		t.Fatalf("create endpoint %d: %v", s.ID, err)
	}
	t.Cleanup(func() {
		err := endpoint.Delete(context.Background(), dp, s.ID)
		if err != nil && !errors.Is(err, os.ErrClosed) && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("delete endpoint %d: %v", s.ID, err)
		}
	})
	return ep
}

// Open loads maps only; the endpoint programs are loaded by the first call
// that needs them, so a program the kernel refuses cannot fail Open for a
// user who never needs it.
func TestProgramsLoadedWhenNeeded(t *testing.T) {
	n := newNode(t)
	if core.Of(n.dp).Objs.FromEndpoint != nil {
		t.Error("Open loaded the endpoint programs")
	}
	n.create(t, spec(1))
	if core.Of(n.dp).Objs.FromEndpoint == nil {
		t.Error("Create did not load the endpoint programs")
	}
}

// Config.Limits sizes the maps of a new datapath: the endpoint over the
// limit is refused with ErrMapFull and leaves nothing; a re-open keeps the
// pinned sizes.
func TestLimits(t *testing.T) {
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	cfg := datapath.Config{
		Name: "node", NetNS: ns.Path, BPFFS: testutil.BPFFS(t),
		Node:   datapath.Node{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}},
		Limits: datapath.Limits{Endpoints: 2},
	}
	if _, err := datapath.Open(context.Background(), datapath.Config{Name: "x", Limits: datapath.Limits{Endpoints: 70000}}); !errors.Is(err, datapath.ErrInvalid) {
		t.Errorf("a limit of 70000 endpoints: %v, want ErrInvalid", err)
	}
	dp, err := datapath.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { dp.Unload() }()
	create(t, dp, spec(1))
	create(t, dp, spec(2))
	if _, err := endpoint.Create(context.Background(), dp, spec(3)); !errors.Is(err, datapath.ErrMapFull) {
		t.Errorf("a third endpoint with room for 2: %v, want ErrMapFull", err)
	}
	dp.Close()
	cfg.Limits = datapath.Limits{Endpoints: 100}
	if dp, err = datapath.Open(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := endpoint.Create(context.Background(), dp, spec(3)); !errors.Is(err, datapath.ErrMapFull) {
		t.Errorf("after a re-open with a higher limit: %v, want ErrMapFull (the pinned maps keep their size)", err)
	}
	if eps, _ := endpoint.List(dp); len(eps) != 2 {
		t.Errorf("%d endpoints listed, want 2", len(eps))
	}
}

// A read-only handle lists and counts, loads no program, and refuses every
// change; the event ring is the one thing it may consume.
func TestOpenReadOnly(t *testing.T) {
	bpffs := testutil.BPFFS(t)
	n := newNodeAt(t, bpffs)
	a := n.create(t, spec(1))
	ro, err := datapath.OpenReadOnly(context.Background(), datapath.Config{Name: "node", BPFFS: bpffs})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if eps, err := endpoint.List(ro); err != nil || len(eps) != 1 || eps[0].ID != a.ID {
		t.Errorf("List on a read-only handle: %v %v", eps, err)
	}
	if _, err := ro.Metrics(); err != nil {
		t.Error(err)
	}
	if _, err := endpoint.ReadCounters(ro, a.ID); err != nil {
		t.Error(err)
	}
	if core.Of(ro).Objs.FromEndpoint != nil {
		t.Error("a read-only handle loaded a program")
	}
	for what, err := range map[string]error{
		"Create":         func() error { _, err := endpoint.Create(context.Background(), ro, spec(2)); return err }(),
		"Delete":         endpoint.Delete(context.Background(), ro, a.ID),
		"SetEventConfig": ro.SetEventConfig(context.Background(), datapath.DefaultEventConfig()),
		"ReadStatus":     func() error { _, err := endpoint.ReadStatus(ro, a.ID); return err }(),
	} {
		if !errors.Is(err, os.ErrPermission) {
			t.Errorf("%s on a read-only handle: %v, want os.ErrPermission", what, err)
		}
	}
	evs, err := ro.Events(context.Background())
	if err != nil {
		t.Errorf("events on a read-only handle: %v", err)
	}
	ro.Close()
	for range evs {
	}
	if _, err := endpoint.Get(n.dp, a.ID); err != nil {
		t.Errorf("the endpoint after the read-only handle: %v", err)
	}
	if _, err := datapath.OpenReadOnly(context.Background(), datapath.Config{Name: "none", BPFFS: bpffs}); !errors.Is(err, datapath.ErrNotFound) {
		t.Errorf("read-only open of no datapath: %v, want ErrNotFound", err)
	}
}
