package datapath

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/testutil"
)

// A refused Open leaves the pins of a datapath that runs as they were: a
// map of another shape (with no layout stamp to say so first), a missing
// map, or a program pinned where a map belongs are ErrIncompatible, and the
// attached programs keep running.
func TestFailedOpenKeepsPins(t *testing.T) {
	testutil.Privileged(t)
	p := testutil.NewPair(t)
	bpffs := testutil.BPFFS(t)
	cfg := Config{Name: "pair", NetNS: p.B.Path, BPFFS: bpffs}
	dp := open(t, cfg)
	probe := loadProbe(t, dp)
	if err := dp.st.AttachTC(p.IfB, attach.Ingress, probe.ProbeTc, "veth1-ingress"); err != nil {
		t.Fatal(err)
	}
	dir := dp.PinDir()
	stamp := func(v uint32) {
		t.Helper()
		if err := dp.st.Objs.Layout.Put(uint32(0), &bpfobj.TypesLayoutStamp{Version: v}); err != nil {
			t.Fatal(err)
		}
	}
	// replace pins obj at dir/name instead of what is there.
	replace := func(name string, obj interface{ Pin(string) error }) {
		t.Helper()
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
		if err := obj.Pin(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	links, _ := os.ReadDir(filepath.Join(dir, "links")) // a tcx link; none in legacy mode
	stillRuns := func(when string) {
		t.Helper()
		if now, err := os.ReadDir(filepath.Join(dir, "links")); err != nil || len(now) != len(links) {
			t.Errorf("%s: link pins %v, before %v (%v)", when, now, links, err)
		}
		before, _ := dp.Metrics()
		if !p.Ping(1) {
			t.Errorf("%s: no ping through the probe", when)
		}
		after, _ := dp.Metrics()
		key := MetricKey{ReasonForwarded, Ingress}
		if after[key].Packets <= before[key].Packets {
			t.Errorf("%s: the probe no longer counts packets", when)
		}
	}

	// A metrics map of another value size, and no stamp.
	other, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: 512})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	metrics := dp.st.Objs.Metrics
	replace("metrics", other)
	stamp(0)
	if _, err := Open(context.Background(), cfg); !errors.Is(err, ErrIncompatible) {
		t.Errorf("Open over an incompatible map: %v, want ErrIncompatible", err)
	}
	stillRuns("after an Open refused an incompatible map")
	replace("metrics", metrics)
	stamp(LayoutVersion)

	// A missing ledger.
	ledgerPin := filepath.Join(dir, "ledger")
	if err := os.Remove(ledgerPin); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(context.Background(), cfg); !errors.Is(err, ErrIncompatible) {
		t.Errorf("Open with the ledger missing: %v, want ErrIncompatible", err)
	}
	if _, err := os.Stat(ledgerPin); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused Open made a new ledger: %v", err)
	}
	stillRuns("after an Open refused a missing map")

	// A program where the ledger belongs.
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	if err := prog.Pin(ledgerPin); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(context.Background(), cfg); !errors.Is(err, ErrIncompatible) {
		t.Errorf("Open with a program pinned as the ledger: %v, want ErrIncompatible", err)
	}
	stillRuns("after an Open refused a program as a map")
	os.Remove(ledgerPin)
	if err := dp.st.Objs.Ledger.Pin(ledgerPin); err != nil {
		t.Fatal(err)
	}
}

// Re-opening checks what it re-opens: the namespace and the pod CIDRs of
// the first Open; none given means the recorded ones.
func TestReopenChecksNode(t *testing.T) {
	testutil.Privileged(t)
	a, b := testutil.NewNetNS(t), testutil.NewNetNS(t)
	bpffs := testutil.BPFFS(t)
	cidrs := []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}
	dp := open(t, Config{Name: "node", NetNS: a.Path, BPFFS: bpffs, Node: Node{PodCIDRs: cidrs}})
	if err := dp.Close(); err != nil {
		t.Fatal(err)
	}
	reopen := func(cfg Config) error {
		cfg.Name, cfg.BPFFS = "node", bpffs
		again, err := Open(context.Background(), cfg)
		if err == nil {
			again.Close()
		}
		return err
	}
	if err := reopen(Config{NetNS: b.Path, Node: Node{PodCIDRs: cidrs}}); !errors.Is(err, ErrInvalid) {
		t.Errorf("re-open in another namespace: %v, want ErrInvalid", err)
	}
	other := []netip.Prefix{netip.MustParsePrefix("198.18.2.0/24")}
	if err := reopen(Config{NetNS: a.Path, Node: Node{PodCIDRs: other}}); !errors.Is(err, ErrInvalid) {
		t.Errorf("re-open with other pod CIDRs: %v, want ErrInvalid", err)
	}
	again, err := Open(context.Background(), Config{Name: "node", NetNS: a.Path, BPFFS: bpffs})
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if !samePrefixes(again.st.PodCIDRs, cidrs) {
		t.Errorf("re-open with no pod CIDRs has %v, want the recorded %v", again.st.PodCIDRs, cidrs)
	}
}

// An empty NetNS means the namespace of the thread that opens, fixed from
// then on, not whichever thread makes a later call.
func TestEmptyNetNSIsFixedAtOpen(t *testing.T) {
	testutil.Privileged(t)
	a := testutil.NewNetNS(t)
	bpffs := testutil.BPFFS(t)
	opened := make(chan error, 1)
	var dp *Datapath
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies in a's namespace
		if err := netns.Set(a.Handle); err != nil {
			opened <- err
			return
		}
		var err error
		dp, err = Open(context.Background(), Config{Name: "node", BPFFS: bpffs})
		opened <- err
	}()
	if err := <-opened; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Unload() })
	// This goroutine's thread is in the test's own namespace; the datapath
	// is a's: re-opening with a's path is the same datapath.
	again, err := Open(context.Background(), Config{Name: "node", BPFFS: bpffs, NetNS: a.Path})
	if err != nil {
		t.Fatalf("re-open with the namespace of the first Open: %v", err)
	}
	again.Close()
}
