package datapath

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
)

// pinSnapshot describes a pin directory: each entry, a map by its ID and
// contents digest of the few one-entry maps Open might write (the stamp,
// the event settings), a directory as one, and the links in links/.
func pinSnapshot(t *testing.T, dir string) string {
	t.Helper()
	var out []string
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		if e.IsDir() {
			sub, _ := os.ReadDir(path)
			var names []string
			for _, s := range sub {
				names = append(names, s.Name())
			}
			out = append(out, fmt.Sprintf("%s/ %v", e.Name(), names))
			continue
		}
		m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			out = append(out, fmt.Sprintf("%s: %v", e.Name(), err))
			continue
		}
		info, _ := m.Info()
		id, _ := info.ID()
		s := fmt.Sprintf("%s: map %d", e.Name(), id)
		if m.Type() == ebpf.Array && m.MaxEntries() == 1 {
			v := make([]byte, m.ValueSize())
			m.Lookup(uint32(0), v)
			s += fmt.Sprintf(" %x", v)
		}
		m.Close()
		out = append(out, s)
	}
	slices.Sort(out)
	return strings.Join(out, "\n")
}

// A directory where a map's pin belongs is ErrIncompatible, in a new pin
// directory and in that of a datapath that runs, and the refused Open
// removes and changes nothing: not the directory, not a pin, not the
// stamp or the event settings, and the attached program goes on.
func TestOpenRefusesDirectoryForMap(t *testing.T) {
	testutil.Privileged(t)
	bpffs := testutil.BPFFS(t)

	// A new datapath.
	ns := testutil.NewNetNS(t)
	if err := os.MkdirAll(filepath.Join(bpffs, "new", "conntrack"), 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := Open(context.Background(), Config{Name: "new", NetNS: ns.Path, BPFFS: bpffs, Limits: Limits{Conntrack: 4096}})
	if !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "conntrack") {
		t.Errorf("Open with a directory for conntrack: %v, want ErrIncompatible naming conntrack", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(bpffs, "new")); len(entries) != 2 { // conntrack/ and links/
		t.Errorf("the refused Open left %v", entries)
	}
	if fi, err := os.Stat(filepath.Join(bpffs, "new", "conntrack")); err != nil || !fi.IsDir() {
		t.Errorf("the refused Open removed the directory it found: %v", err)
	}
	if err := UnloadPinned(context.Background(), Config{Name: "new", NetNS: ns.Path, BPFFS: bpffs}); err != nil || exists(filepath.Join(bpffs, "new")) {
		t.Errorf("UnloadPinned of what the refused Open found: %v", err)
	}

	// One that runs.
	p := testutil.NewPair(t)
	cfg := Config{Name: "pair", NetNS: p.B.Path, BPFFS: bpffs}
	dp := open(t, cfg)
	custom := EventConfig{Traces: true, RatePerCPU: 7, Burst: 3}
	if err := dp.SetEventConfig(context.Background(), custom); err != nil {
		t.Fatal(err)
	}
	probe := loadProbe(t, dp)
	if err := dp.st.AttachTC(p.IfB, attach.Ingress, probe.ProbeTc, "veth1-ingress"); err != nil {
		t.Fatal(err)
	}
	dir := dp.PinDir()
	aside := filepath.Join(bpffs, "aside")
	if err := os.Mkdir(aside, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"conntrack", "metrics", "policy", "ledger", "event_config", "layout"} {
		pin := filepath.Join(dir, name)
		if err := os.Rename(pin, filepath.Join(aside, name)); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(pin, 0o700); err != nil {
			t.Fatal(err)
		}
		before := pinSnapshot(t, dir)
		_, err := Open(context.Background(), cfg)
		if !errors.Is(err, ErrIncompatible) || errors.Is(err, os.ErrPermission) {
			t.Errorf("Open with a directory for %s: %v, want ErrIncompatible", name, err)
		}
		if after := pinSnapshot(t, dir); after != before {
			t.Errorf("the Open refused for a directory as %s changed the pins:\n%s\nwant\n%s", name, after, before)
		}
		if err := os.Remove(pin); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(aside, name), pin); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := dp.Metrics()
	if !p.Ping(1) {
		t.Error("no ping through the probe after the refused Opens")
	}
	after, _ := dp.Metrics()
	if key := (MetricKey{ReasonForwarded, Ingress}); after[key].Packets <= before[key].Packets {
		t.Error("the probe no longer counts packets")
	}
	if got, err := dp.EventConfig(); err != nil || got != custom {
		t.Errorf("event config %+v (%v), want %+v", got, err, custom)
	}
	// And the datapath opens again once the pins are right.
	again, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	again.Close()

	// UnloadPinned removes a datapath Open refuses, whole.
	made := madeNetNS(t, dp, 3)
	if err := dp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "conntrack"), filepath.Join(aside, "conntrack")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "conntrack"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := UnloadPinned(context.Background(), cfg); err != nil {
		t.Errorf("UnloadPinned of a datapath with a directory for conntrack: %v", err)
	}
	if exists(dir) || exists(filepath.Join("/run/netns", made)) {
		t.Error("UnloadPinned left the pins or a namespace a record names")
	}
}

// putRaw writes raw bytes as the ledger record of kind and id.
func putRaw(t *testing.T, m *ebpf.Map, kind ledger.Kind, id uint32, raw string) {
	t.Helper()
	var v bpfobj.TypesLedgerRecord
	copy(v.Data[:], raw)
	k := bpfobj.TypesLedgerKey{Kind: uint32(kind), Id: id}
	if err := m.Update(&k, &v, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
}

// madeNetNS records, as endpoint id, a named namespace made for it, as an
// endpoint does, and returns its name; it is deleted when the test ends
// if the code under test did not.
func madeNetNS(t *testing.T, dp *Datapath, id uint32) string {
	t.Helper()
	name := testutil.Name("sluice-t-")
	h, err := nsrun.New(name)
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
	t.Cleanup(func() { nsrun.DeleteNamed(name) })
	r := &ledger.Record{Kind: ledger.KindEndpoint, ID: id, State: ledger.Ready, Made: ledger.Made{NetNS: name}}
	if err := ledger.Put(dp.st.Objs.Ledger, r); err != nil {
		t.Fatal(err)
	}
	return name
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// One ledger record that cannot be read makes Open fail with
// ErrIncompatible naming it, changing nothing; UnloadPinned then removes
// the datapath, undoing what the readable records made, skipping and
// naming the unreadable one. Unload of an open handle does the same.
func TestUnreadableLedgerRecord(t *testing.T) {
	testutil.Privileged(t)
	p := testutil.NewPair(t)
	bpffs := testutil.BPFFS(t)
	cfg := Config{Name: "pair", NetNS: p.B.Path, BPFFS: bpffs, Limits: Limits{Conntrack: 4096}}
	dp, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { UnloadPinned(context.Background(), cfg) }) // if the test fails before it does
	probe := loadProbe(t, dp)
	if err := dp.st.AttachTC(p.IfB, attach.Ingress, probe.ProbeTc, "veth1-ingress"); err != nil {
		t.Fatal(err)
	}
	made := madeNetNS(t, dp, 3)
	dir := dp.PinDir()
	if err := dp.Close(); err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, "ledger"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	putRaw(t, m, ledger.KindEndpoint, 7, "\x01\x02garbage")
	putRaw(t, m, ledger.KindService, 9, `{"version":99}`)

	before := pinSnapshot(t, dir)
	_, err = Open(context.Background(), cfg)
	if !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "endpoint 7") || !strings.Contains(err.Error(), "service 9") {
		t.Errorf("Open with unreadable ledger records: %v, want ErrIncompatible naming endpoint 7 and service 9", err)
	}
	if after := pinSnapshot(t, dir); after != before {
		t.Errorf("the refused Open changed the pins:\n%s\nwant\n%s", after, before)
	}
	if !exists(filepath.Join("/run/netns", made)) {
		t.Error("the refused Open deleted a namespace a record names")
	}

	// Refusals that change nothing.
	other := testutil.NewNetNS(t)
	wrong := cfg
	wrong.NetNS = other.Path
	if err := UnloadPinned(context.Background(), wrong); !errors.Is(err, ErrInvalid) {
		t.Errorf("UnloadPinned in another namespace: %v, want ErrInvalid", err)
	}
	missing := cfg
	missing.Name = "nothing"
	if err := UnloadPinned(context.Background(), missing); !errors.Is(err, ErrNotFound) {
		t.Errorf("UnloadPinned of nothing: %v, want ErrNotFound", err)
	}
	if after := pinSnapshot(t, dir); after != before {
		t.Errorf("a refused UnloadPinned changed the pins:\n%s\nwant\n%s", after, before)
	}

	// A service's record names map entries alone: skipping it loses
	// nothing, and is not reported.
	err = UnloadPinned(context.Background(), cfg)
	if !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "endpoint 7") || strings.Contains(err.Error(), "service 9") {
		t.Errorf("UnloadPinned: %v, want ErrIncompatible naming endpoint 7 alone", err)
	}
	if exists(dir) {
		t.Error("UnloadPinned left the pins")
	}
	if exists(filepath.Join("/run/netns", made)) {
		t.Error("UnloadPinned left the namespace a readable record names")
	}
	// A new datapath of the name starts empty; its Unload goes past an
	// unreadable record too.
	dp2, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	made = madeNetNS(t, dp2, 4)
	putRaw(t, dp2.st.Objs.Ledger, ledger.KindEndpoint, 7, "{")
	err = dp2.Unload()
	if !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "endpoint 7") {
		t.Errorf("Unload: %v, want ErrIncompatible naming endpoint 7", err)
	}
	if exists(dir) || exists(filepath.Join("/run/netns", made)) {
		t.Error("Unload past an unreadable record left the pins or a namespace")
	}
}

// UnloadPinned refuses pins of another layout version, and a directory of
// another tool's pins with the name, and changes nothing.
func TestUnloadPinnedRefuses(t *testing.T) {
	dp := open(t, Config{})
	dir := dp.PinDir()
	if err := dp.st.Objs.Layout.Put(uint32(0), &bpfobj.TypesLayoutStamp{Version: LayoutVersion + 1}); err != nil {
		t.Fatal(err)
	}
	before := pinSnapshot(t, dir)
	cfg := Config{Name: dp.Name(), BPFFS: filepath.Dir(dir)}
	if err := UnloadPinned(context.Background(), cfg); !errors.Is(err, ErrIncompatible) {
		t.Errorf("UnloadPinned of another layout: %v, want ErrIncompatible", err)
	}
	if after := pinSnapshot(t, dir); after != before {
		t.Errorf("the refused UnloadPinned changed the pins:\n%s\nwant\n%s", after, before)
	}
	if err := dp.st.Objs.Layout.Put(uint32(0), &bpfobj.TypesLayoutStamp{Version: LayoutVersion}); err != nil {
		t.Fatal(err)
	}

	foreign := filepath.Join(filepath.Dir(dir), "tc")
	if err := os.MkdirAll(filepath.Join(foreign, "globals"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := UnloadPinned(context.Background(), Config{Name: "tc", BPFFS: filepath.Dir(dir)}); !errors.Is(err, ErrNotFound) {
		t.Errorf("UnloadPinned of another tool's directory: %v, want ErrNotFound", err)
	}
	if !exists(filepath.Join(foreign, "globals")) {
		t.Error("UnloadPinned removed another tool's pins")
	}
}

// A datapath whose stamp is 0 (as an Open that failed before stamping
// leaves it) keeps the event settings someone set, and, when its ledger
// holds objects, is not made afresh: a missing map is ErrIncompatible. A
// datapath whose first Open did not finish gets the default settings.
func TestUnstampedDatapath(t *testing.T) {
	testutil.Privileged(t)
	bpffs := testutil.BPFFS(t)
	ns := testutil.NewNetNS(t)
	cfg := Config{Name: "node", NetNS: ns.Path, BPFFS: bpffs, Limits: Limits{Conntrack: 4096}}
	dp := open(t, cfg)
	custom := EventConfig{Traces: true, PolicyVerdicts: true, RatePerCPU: 7, Burst: 3}
	if err := dp.SetEventConfig(context.Background(), custom); err != nil {
		t.Fatal(err)
	}
	unstamp := func() {
		t.Helper()
		if err := dp.st.Objs.Layout.Put(uint32(0), &bpfobj.TypesLayoutStamp{}); err != nil {
			t.Fatal(err)
		}
	}
	reopen := func() EventConfig {
		t.Helper()
		again, err := Open(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer again.Close()
		ev, err := again.EventConfig()
		if err != nil {
			t.Fatal(err)
		}
		return ev
	}
	unstamp()
	if got := reopen(); got != custom {
		t.Errorf("re-open of an unstamped datapath: event config %+v, want the one set, %+v", got, custom)
	}

	// With an object in the ledger, a missing map is not made anew.
	madeNetNS(t, dp, 3)
	unstamp()
	pin := filepath.Join(dp.PinDir(), "policy")
	if err := os.Rename(pin, filepath.Join(bpffs, "policy-aside")); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(context.Background(), cfg); !errors.Is(err, ErrIncompatible) {
		t.Errorf("re-open of an unstamped datapath with state and no policy map: %v, want ErrIncompatible", err)
	}
	if exists(pin) {
		t.Error("the refused Open made a new policy map")
	}
	if err := os.Rename(filepath.Join(bpffs, "policy-aside"), pin); err != nil {
		t.Fatal(err)
	}
	if got := reopen(); got != custom {
		t.Errorf("re-open of an unstamped datapath with state: event config %+v, want %+v", got, custom)
	}

	// What a first Open killed before it stamped leaves: no settings, no
	// object. The next Open finishes it, with the default settings.
	if err := ledger.Delete(dp.st.Objs.Ledger, ledger.KindEndpoint, 3); err != nil {
		t.Fatal(err)
	}
	unstamp()
	if err := dp.st.Objs.EventConfig.Put(uint32(0), &bpfobj.TypesEventSettings{}); err != nil {
		t.Fatal(err)
	}
	if got := reopen(); got != DefaultEventConfig() {
		t.Errorf("re-open of an unfinished datapath: event config %+v, want the default %+v", got, DefaultEventConfig())
	}
}
