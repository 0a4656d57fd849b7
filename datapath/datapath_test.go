package datapath

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/bpftest"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
)

// open opens a datapath on a private bpffs and unloads it when the test ends.
func open(t *testing.T, cfg Config) *Datapath {
	t.Helper()
	testutil.Privileged(t)
	if cfg.Name == "" {
		cfg.Name = "test"
	}
	if cfg.BPFFS == "" {
		cfg.BPFFS = testutil.BPFFS(t)
	}
	if cfg.Limits.Conntrack == 0 {
		cfg.Limits.Conntrack = 4096 // small, quick to make
	}
	dp, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A test that closed it unloads what it opened again, if anything.
		if err := dp.Unload(); err != nil && !errors.Is(err, os.ErrClosed) {
			t.Error(err)
		}
	})
	return dp
}

// loadProbe loads the test programs wired to dp's maps.
func loadProbe(t *testing.T, dp *Datapath) *bpftest.ProbeObjects {
	t.Helper()
	var objs bpftest.ProbeObjects
	spec, err := bpftest.LoadProbe()
	if err != nil {
		t.Fatal(err)
	}
	maps := map[string]*ebpf.Map{} // the datapath's, by name
	for name := range spec.Maps {
		maps[name] = dp.st.Map(name)
	}
	err = bpftest.LoadProbeObjects(&objs, &ebpf.CollectionOptions{MapReplacements: maps})
	if err != nil {
		t.Fatalf("load probe: %+v", err)
	}
	t.Cleanup(func() { objs.Close() })
	return &objs
}

var testFrame = packet.Build(
	&packet.Ethernet{Src: net.HardwareAddr{2, 0, 0, 0, 0, 1}, Dst: net.HardwareAddr{2, 0, 0, 0, 0, 2}},
	&packet.IPv4{Src: netip.MustParseAddr("198.18.0.1"), Dst: netip.MustParseAddr("198.18.0.2")},
	&packet.TCP{SrcPort: 40000, DstPort: 80, Flags: packet.SYN},
)

// runProbe runs the probe program, which reads the mark as
// reason | direction << 8 | endpoint << 16.
func runProbe(t *testing.T, prog *ebpf.Program, reason Reason, dir Direction, endpoint uint16) uint32 {
	t.Helper()
	ctx := progtest.SKB{Mark: uint32(reason) | uint32(dir)<<8 | uint32(endpoint)<<16}
	r, err := progtest.Run(prog, testFrame, &ctx)
	if err != nil {
		t.Fatal(err)
	}
	return r.Verdict
}

func TestConfigErrors(t *testing.T) {
	for _, cfg := range []Config{
		{Name: ""},
		{Name: "Upper"},
		{Name: "-lead"},
		{Name: strings.Repeat("a", 65)},
		{Name: "ok", TCAttach: 7},
		{Name: "ok", Events: &EventConfig{Drops: true, RatePerCPU: 10}},
	} {
		if _, err := Open(context.Background(), cfg); !errors.Is(err, ErrInvalid) {
			t.Errorf("Open(%+v) = %v, want ErrInvalid", cfg, err)
		}
	}
	testutil.Privileged(t)
	bpffs := testutil.BPFFS(t)
	_, err := Open(context.Background(), Config{Name: "x", BPFFS: bpffs, NetNS: "sluice-no-such-ns"})
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("Open with a missing netns = %v, want ErrNotFound", err)
	}
	_, err = Open(context.Background(), Config{Name: "x", BPFFS: bpffs, MustExist: true})
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("Open with MustExist of a datapath that is not there = %v, want ErrNotFound", err)
	}
	if _, err := os.Stat(filepath.Join(bpffs, "x")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed Open left pins behind: %v", err)
	}
}

func TestReopenKeepsState(t *testing.T) {
	dp := open(t, Config{Events: &EventConfig{Drops: true, Traces: true}})
	probe := loadProbe(t, dp)
	if v := runProbe(t, probe.ProbeTc, ReasonPolicyDenied, Egress, 7); v != progtest.TCActShot {
		t.Fatalf("verdict %d, want TC_ACT_SHOT", v)
	}
	if err := dp.Close(); err != nil {
		t.Fatal(err)
	}

	if err := dp.Unload(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Unload of a closed datapath: %v, want os.ErrClosed", err)
	}
	again, err := Open(context.Background(), Config{Name: dp.Name(), BPFFS: filepath.Dir(dp.PinDir())})
	if err != nil {
		t.Fatal(err)
	}
	defer again.Unload()
	m, err := again.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	if got := m[MetricKey{ReasonPolicyDenied, Egress}]; got.Packets != 1 || got.Bytes != uint64(len(testFrame)) {
		t.Errorf("after re-open: %+v, want 1 packet of %d bytes", got, len(testFrame))
	}
	cfg, err := again.EventConfig()
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Traces || cfg.RatePerCPU != 0 {
		t.Errorf("re-open without Events changed the event config: %+v", cfg)
	}
}

func TestIncompatibleLayout(t *testing.T) {
	dp := open(t, Config{})
	stamp := bpfobj.TypesLayoutStamp{Version: LayoutVersion + 1}
	if err := dp.st.Objs.Layout.Put(uint32(0), &stamp); err != nil {
		t.Fatal(err)
	}
	_, err := Open(context.Background(), Config{Name: dp.Name(), BPFFS: filepath.Dir(dp.PinDir())})
	if !errors.Is(err, ErrIncompatible) {
		t.Fatalf("Open over another layout = %v, want ErrIncompatible", err)
	}
	var got bpfobj.TypesLayoutStamp
	if err := dp.st.Objs.Layout.Lookup(uint32(0), &got); err != nil || got.Version != LayoutVersion+1 {
		t.Errorf("the refused Open touched the stamp: %+v, %v", got, err)
	}
}

func TestEvents(t *testing.T) {
	dp := open(t, Config{Events: &EventConfig{Drops: true, Traces: true}})
	probe := loadProbe(t, dp)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	events, err := dp.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dp.Events(ctx); !errors.Is(err, ErrExists) {
		t.Errorf("second reader: %v, want ErrExists", err)
	}

	runProbe(t, probe.ProbeTc, ReasonSpoofedSourceIP, Egress, 42)
	runProbe(t, probe.ProbeTc, ReasonForwarded, Ingress, 3)

	drop, ok := (<-events).(*DropEvent)
	if !ok || drop.Reason != ReasonSpoofedSourceIP || drop.Direction != Egress || drop.Endpoint != 42 ||
		drop.Length != uint32(len(testFrame)) || string(drop.Head) != string(testFrame) {
		t.Errorf("got %#v, want a drop event for the test frame", drop)
	}
	want := "drop SPOOFED_SOURCE_IP egress ifindex=1 endpoint=42 len=54: 198.18.0.1:40000 > 198.18.0.2:80 TCP [S]"
	if drop != nil && drop.String() != want {
		t.Errorf("String() = %q\nwant       %q", drop.String(), want)
	}
	if tr, ok := (<-events).(*TraceEvent); !ok || tr.Point != TraceFromEndpoint || tr.Endpoint != 3 {
		t.Errorf("got %#v, want a FROM_ENDPOINT trace", tr)
	}

	m, err := dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	if m[MetricKey{ReasonSpoofedSourceIP, Egress}].Packets != 1 || m[MetricKey{ReasonForwarded, Ingress}].Packets != 1 || len(m) != 2 {
		t.Errorf("metrics = %v", m)
	}

	cancel()
	for range events {
	}
	if _, err := dp.Events(context.Background()); err != nil {
		t.Errorf("a new reader after the first ended: %v", err)
	}
}

func TestEventsSwitchAndRateLimit(t *testing.T) {
	dp := open(t, Config{Events: &EventConfig{Drops: false}})
	probe := loadProbe(t, dp)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	events, err := dp.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}

	runProbe(t, probe.ProbeTc, ReasonMalformed, Ingress, 0)
	// Rate 1/s with a burst of 3: of 10 drops in a burst on one CPU, 3 are
	// sent. (The limiter is per CPU, so the runs stay on CPU 0.)
	if err := dp.SetEventConfig(context.Background(), EventConfig{Drops: true, RatePerCPU: 1, Burst: 3}); err != nil {
		t.Fatal(err)
	}
	onCPU0(t, func() error {
		for range 10 {
			if _, err := progtest.Run(probe.ProbeTc, testFrame, &progtest.SKB{Mark: uint32(ReasonPolicyDenied)}); err != nil {
				return err
			}
		}
		return nil
	})

	var drops, limited uint64
	for drops+limited < 10 {
		switch ev := (<-events).(type) {
		case *DropEvent:
			if ev.Reason != ReasonPolicyDenied {
				t.Fatalf("event %v while drop events were off", ev)
			}
			drops++
		case *LostEvent:
			limited += ev.RateLimited
		case nil:
			t.Fatalf("events closed after %d drops, %d rate-limited", drops, limited)
		}
	}
	if drops > 3 || drops+limited != 10 {
		t.Errorf("%d sent and %d rate-limited of 10, want at most 3 sent and the rest lost", drops, limited)
	}
	m, _ := dp.Metrics()
	if m[MetricKey{ReasonPolicyDenied, Ingress}].Packets != 10 || m[MetricKey{ReasonMalformed, Ingress}].Packets != 1 {
		t.Errorf("counters must count every drop, events on or off: %v", m)
	}
	if err := dp.SetEventConfig(context.Background(), EventConfig{RatePerCPU: 5}); !errors.Is(err, ErrInvalid) {
		t.Errorf("rate without burst: %v, want ErrInvalid", err)
	}
}

// The Go list of reasons names every value of the C enum, and no other.
func TestReasonsMatchBPF(t *testing.T) {
	spec, err := bpfobj.LoadTypes()
	if err != nil {
		t.Fatal(err)
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("drop_reason", &enum); err != nil {
		t.Fatal(err)
	}
	inC := map[Reason]string{}
	for _, v := range enum.Values {
		if v.Name == "REASON_MAX" {
			continue
		}
		inC[Reason(v.Value)] = strings.TrimPrefix(v.Name, "REASON_")
	}
	for _, r := range Reasons() {
		if inC[r] != r.String() {
			t.Errorf("Go names reason %d %s, C names it %q", r, r, inC[r])
		}
		if r.Doc() == "" {
			t.Errorf("reason %s has no doc", r)
		}
		delete(inC, r)
	}
	for v, name := range inC {
		t.Errorf("C reason %d (%s) has no Go name", v, name)
	}
}

// Real traffic through a datapath program attached with each tc mode; Unload
// detaches it.
func TestAttachAndUnload(t *testing.T) {
	for _, mode := range []AttachMode{AttachTCX, AttachLegacy} {
		t.Run(mode.String(), func(t *testing.T) {
			testutil.Privileged(t)
			p := testutil.NewPair(t)
			dp, err := Open(context.Background(), Config{Name: "pair", NetNS: p.B.Path, BPFFS: testutil.BPFFS(t), TCAttach: mode})
			if err != nil {
				t.Fatal(err)
			}
			probe := loadProbe(t, dp)
			err = dp.st.AttachTC(p.IfB, attach.Ingress, probe.ProbeTc, "veth1-ingress")
			if mode == AttachTCX && errors.Is(err, ebpf.ErrNotSupported) {
				dp.Unload()
				testutil.RequireSince(t, "tcx", 6, 6, err)
			}
			if err != nil {
				t.Fatal(err)
			}
			if !p.Ping(3) {
				t.Fatal("no ping through the probe program")
			}
			m, err := dp.Metrics()
			if err != nil {
				t.Fatal(err)
			}
			if got := m[MetricKey{ReasonForwarded, Ingress}].Packets; got < 3 {
				t.Errorf("forwarded counter %d after 3 pings", got)
			}
			noPrograms := func(when string) {
				t.Helper()
				p.B.Do(t, func() error {
					if !testutil.KernelAtLeast(6, 6) {
						return nil // no tcx to ask
					}
					res, err := link.QueryPrograms(link.QueryOptions{Target: p.IfB, Attach: ebpf.AttachTCXIngress})
					if err == nil && len(res.Programs) != 0 {
						t.Errorf("tcx programs left %s: %v", when, res.Programs)
					}
					return err
				})
				p.B.Do(t, func() error {
					filters, err := netlink.FilterList(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: p.IfB}}, netlink.HANDLE_MIN_INGRESS)
					for _, f := range filters {
						if bf, ok := f.(*netlink.BpfFilter); ok && strings.Contains(bf.Name, "sluice") {
							t.Errorf("legacy filter %s left %s", bf.Name, when)
						}
					}
					if errors.Is(err, unix.EINVAL) { // no clsact qdisc: no filters
						return nil
					}
					return err
				})
			}
			if err := dp.st.DetachTC(p.IfB, attach.Ingress, "veth1-ingress"); err != nil {
				t.Fatal(err)
			}
			noPrograms("after detach")
			if err := dp.st.AttachTC(p.IfB, attach.Ingress, probe.ProbeTc, "veth1-ingress"); err != nil {
				t.Fatal(err)
			}

			pins := dp.PinDir()
			if err := dp.Unload(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(pins); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("pins left after Unload: %v", err)
			}
			noPrograms("after Unload")
			if !p.Ping(1) {
				t.Fatal("no ping after Unload")
			}
		})
	}
}

// Close ends a running Events reader before it releases the maps.
func TestCloseEndsEvents(t *testing.T) {
	dp := open(t, Config{})
	events, err := dp.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case _, ok := <-events:
		if ok {
			t.Error("an event after Close")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the events channel stayed open after Close")
	}
}

// With nobody reading, the ring buffer fills; what does not fit is counted.
func TestRingFullCounted(t *testing.T) {
	dp := open(t, Config{Events: &EventConfig{Drops: true}}) // no rate limit
	probe := loadProbe(t, dp)
	// 1 MiB of ring holds fewer than 8000 records of 160 bytes and a header.
	const n = 8000
	for range n {
		runProbe(t, probe.ProbeTc, ReasonMalformed, Ingress, 0)
	}
	lost, err := dp.Lost()
	if err != nil {
		t.Fatal(err)
	}
	if lost.RingFull == 0 || lost.RingFull >= n || lost.RateLimited != 0 {
		t.Errorf("lost %+v after %d drops into a 1 MiB ring", lost, n)
	}
	m, _ := dp.Metrics()
	if got := m[MetricKey{ReasonMalformed, Ingress}].Packets; got != n {
		t.Errorf("counted %d drops, want %d", got, n)
	}
}

// onCPU0 runs fn on a thread bound to CPU 0; the thread is retired after.
func onCPU0(t *testing.T, fn func() error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with its affinity
		var set unix.CPUSet
		set.Set(0)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// The ring buffer is sized at the first Open for every CPU's burst and
// 100 ms of its rate; a later config that could overflow it is refused.
func TestRingSizedForRate(t *testing.T) {
	big := EventConfig{Drops: true, RatePerCPU: 100_000, Burst: 10_000}
	dp := open(t, Config{Events: &big})
	if got, need := uint64(dp.st.Objs.Events.MaxEntries()), uint64(cpus())*(10_000+10_000)*recordBytes; got < need {
		t.Errorf("ring of %d bytes for %+v on %d CPUs, want at least %d", got, big, cpus(), need)
	}

	small := open(t, Config{Name: "small"})
	if got, want := uint64(small.st.Objs.Events.MaxEntries()), ringBytes(DefaultEventConfig(), cpus()); got != want {
		t.Errorf("ring of %d bytes for the default config, want %d", got, want)
	}
	if err := small.SetEventConfig(context.Background(), big); !errors.Is(err, ErrInvalid) {
		t.Errorf("a config the ring cannot hold: %v, want ErrInvalid", err)
	}
	if err := small.SetEventConfig(context.Background(), DefaultEventConfig()); err != nil {
		t.Error(err)
	}
}
