package maglevbench

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	cmtypes "github.com/cilium/cilium/pkg/clustermesh/types"
	"github.com/cilium/cilium/pkg/loadbalancer"
	"github.com/cilium/cilium/pkg/maglev"
	"github.com/cilium/hive/hivetest"

	"github.com/sluicedp/sluice/service"
)

const backendPort = 8080

var (
	tableSizes    = []int{16381, 65537}
	backendCounts = []int{100, 1000}
)

// backendAddrs returns n distinct backends, 198.18.0.1:8080 onwards, all in
// 198.18.0.0/15 (the benchmarking range).
func backendAddrs(n int) []netip.AddrPort {
	if n > 1<<17-2 {
		panic("too many backends for 198.18.0.0/15")
	}
	base := uint32(198)<<24 | uint32(18)<<16
	addrs := make([]netip.AddrPort, n)
	for i := range addrs {
		a := base + uint32(i) + 1
		ip := netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)})
		addrs[i] = netip.AddrPortFrom(ip, backendPort)
	}
	return addrs
}

// sluiceBackends is sluice's input: the key is the address and port.
func sluiceBackends(addrs []netip.AddrPort) []service.MaglevBackend {
	bs := make([]service.MaglevBackend, len(addrs))
	for i, a := range addrs {
		bs[i] = service.MaglevBackend{Key: a.String(), Weight: 1}
	}
	return bs
}

// ciliumBackends is Cilium's input, as its BPF reconciler
// (pkg/loadbalancer/reconciler.computeMaglevTable) makes it: a backend ID,
// the L3n4Addr (TCP, external scope) and the weight. IDs start at 1.
func ciliumBackends(addrs []netip.AddrPort) []maglev.BackendInfo {
	bs := make([]maglev.BackendInfo, len(addrs))
	for i, a := range addrs {
		bs[i] = maglev.BackendInfo{
			ID:     loadbalancer.BackendID(i + 1),
			Addr:   loadbalancer.NewL3n4Addr(loadbalancer.TCP, cmtypes.AddrClusterFrom(a.Addr(), 0), a.Port(), loadbalancer.ScopeExternal),
			Weight: 1,
		}
	}
	return bs
}

// newCiliumMaglev builds a Maglev the way Cilium's hive does: a Config
// from the user config (default hash seed), then New with a lifecycle that
// starts it (its worker pool) and stops it when tb ends.
//
// Cilium's --bpf-lb-maglev-table-size accepts only a fixed list of primes
// (16381 is on it, 65537 is not: it offers 65521), and ToConfig checks
// that. The computation takes any prime, so the size is set after the
// check: the seeds are the ones ToConfig derives.
func newCiliumMaglev(tb testing.TB, m int) *maglev.Maglev {
	tb.Helper()
	cfg, err := maglev.UserConfig{
		TableSize: maglev.DefaultTableSize,
		HashSeed:  maglev.DefaultHashSeed,
	}.ToConfig()
	if err != nil {
		tb.Fatal(err)
	}
	cfg.TableSize = uint(m)
	return maglev.New(cfg, hivetest.Lifecycle(tb))
}

func BenchmarkBuild(b *testing.B) {
	for _, m := range tableSizes {
		for _, n := range backendCounts {
			addrs := backendAddrs(n)
			b.Run(fmt.Sprintf("M=%d/backends=%d/sluice", m, n), func(b *testing.B) {
				backends := sluiceBackends(addrs)
				b.ReportAllocs()
				for b.Loop() {
					table, err := service.MaglevTable(backends, m)
					if err != nil {
						b.Fatal(err)
					}
					if len(table) != m {
						b.Fatalf("table of %d slots, want %d", len(table), m)
					}
				}
			})
			b.Run(fmt.Sprintf("M=%d/backends=%d/cilium", m, n), func(b *testing.B) {
				backends := ciliumBackends(addrs)
				ml := newCiliumMaglev(b, m)
				// The agent keeps one Maglev for its life, and it keeps
				// its permutation buffer (backends*M uint64s) from call
				// to call: build once untimed so the loop measures the
				// steady state, not that first allocation.
				ml.GetLookupTable(slices.Values(backends))
				b.ReportAllocs()
				for b.Loop() {
					table := ml.GetLookupTable(slices.Values(backends))
					if len(table) != m {
						b.Fatalf("table of %d slots, want %d", len(table), m)
					}
				}
			})
		}
	}
}

// The disruption case: 100 backends, M=16381, the 50th removed.
const (
	disruptM        = 16381
	disruptBackends = 100
	disruptRemove   = 49
)

// disruption is the outcome of removing one backend: the slots whose
// backend (by key) changed, of which those that had the removed backend
// (they must move) and the rest (churn among the survivors).
type disruption struct {
	slots, moved, ofRemoved int
}

func (d disruption) fraction() float64 { return float64(d.moved) / float64(d.slots) }

func compare(before, after []string, removed string) disruption {
	d := disruption{slots: len(before)}
	for s := range before {
		if before[s] != after[s] {
			d.moved++
			if before[s] == removed {
				d.ofRemoved++
			}
		}
	}
	return d
}

func without[T any](s []T, i int) []T {
	return append(slices.Clone(s[:i]), s[i+1:]...)
}

// sluiceKeys maps a sluice table (slot -> index) to keys.
func sluiceKeys(table []uint32, backends []service.MaglevBackend) []string {
	keys := make([]string, len(table))
	for s, i := range table {
		keys[s] = backends[i].Key
	}
	return keys
}

// ciliumKeys maps a Cilium table (slot -> backend ID) to keys.
func ciliumKeys(tb testing.TB, table []loadbalancer.BackendID, byID map[loadbalancer.BackendID]string) []string {
	keys := make([]string, len(table))
	for s, id := range table {
		k, ok := byID[id]
		if !ok {
			tb.Fatalf("slot %d: backend ID %d not in the input", s, id)
		}
		keys[s] = k
	}
	return keys
}

// sluiceDisruption builds before, and after the removal, rebuilding the
// after table rounds times.
func sluiceDisruption(tb testing.TB, rounds func() bool) disruption {
	addrs := backendAddrs(disruptBackends)
	all := sluiceBackends(addrs)
	fewer := without(all, disruptRemove)
	t0, err := service.MaglevTable(all, disruptM)
	if err != nil {
		tb.Fatal(err)
	}
	before := sluiceKeys(t0, all)
	var d disruption
	for rounds() {
		t1, err := service.MaglevTable(fewer, disruptM)
		if err != nil {
			tb.Fatal(err)
		}
		d = compare(before, sluiceKeys(t1, fewer), addrs[disruptRemove].String())
	}
	return d
}

func ciliumDisruption(tb testing.TB, rounds func() bool) disruption {
	addrs := backendAddrs(disruptBackends)
	all := ciliumBackends(addrs)
	fewer := without(all, disruptRemove)
	byID := make(map[loadbalancer.BackendID]string, len(all))
	for i, b := range all {
		byID[b.ID] = addrs[i].String()
	}
	ml := newCiliumMaglev(tb, disruptM)
	before := ciliumKeys(tb, ml.GetLookupTable(slices.Values(all)), byID)
	var d disruption
	for rounds() {
		after := ciliumKeys(tb, ml.GetLookupTable(slices.Values(fewer)), byID)
		d = compare(before, after, addrs[disruptRemove].String())
	}
	return d
}

func once() func() bool {
	done := false
	return func() bool {
		r := !done
		done = true
		return r
	}
}

func TestDisruption(t *testing.T) {
	for _, impl := range []struct {
		name string
		run  func(testing.TB, func() bool) disruption
	}{
		{"sluice", sluiceDisruption},
		{"cilium", ciliumDisruption},
	} {
		d := impl.run(t, once())
		t.Logf("%s: M=%d, %d backends, backend %d removed: %d of %d slots moved (%.4f%%): %d had the removed backend, %d moved between survivors",
			impl.name, disruptM, disruptBackends, disruptRemove+1, d.moved, d.slots, 100*d.fraction(), d.ofRemoved, d.moved-d.ofRemoved)
		// The removed backend's slots must all move, so at least those.
		if d.ofRemoved == 0 || d.moved < d.ofRemoved {
			t.Errorf("%s: implausible: %+v", impl.name, d)
		}
	}
}

func BenchmarkDisruption(b *testing.B) {
	b.Run("sluice", func(b *testing.B) {
		b.ReportAllocs()
		d := sluiceDisruption(b, b.Loop)
		b.ReportMetric(100*d.fraction(), "moved%")
	})
	b.Run("cilium", func(b *testing.B) {
		b.ReportAllocs()
		d := ciliumDisruption(b, b.Loop)
		b.ReportMetric(100*d.fraction(), "moved%")
	})
}
