package service_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/service"
)

// dump is every entry of the service maps and the ledger, as text.
func dump(t testing.TB, dp *datapath.Datapath) string {
	t.Helper()
	st := core.Of(dp)
	var out []string
	for _, name := range []string{bpfobj.EndpointMapLbFrontends, bpfobj.EndpointMapLbRevnat, bpfobj.EndpointMapLbBackends,
		bpfobj.EndpointMapLbSlots, bpfobj.EndpointMapLedger, bpfobj.EndpointMapLedgerBlobs} {
		m := st.Map(name)
		k := make([]byte, m.KeySize())
		v := make([]byte, m.ValueSize())
		it := m.Iterate()
		for it.Next(&k, &v) {
			out = append(out, fmt.Sprintf("%s %x %x", name, k, bytes.TrimRight(v, "\x00")))
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(out)
	return strings.Join(out, "\n")
}

// TestBadInput: every kind of bad service is ErrInvalid and leaves the maps
// exactly as they were.
func TestBadInput(t *testing.T) {
	n := newNode(t)
	good := service.Service{
		Frontend: service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP},
		Backends: backends(n.a, false, 8080, 8081),
	}
	upsert(t, n.dp, good)
	before := dump(t, n.dp)
	b4 := backends(n.a, false, 8080)
	mod := func(f func(s *service.Service)) service.Service {
		s := good
		s.Backends = slices.Clone(good.Backends)
		f(&s)
		return s
	}
	cases := map[string]service.Service{
		"unspecified frontend":   mod(func(s *service.Service) { s.Frontend.Addr = netip.IPv4Unspecified() }),
		"no frontend address":    mod(func(s *service.Service) { s.Frontend.Addr = netip.Addr{} }),
		"port 0":                 mod(func(s *service.Service) { s.Frontend.Port = 0 }),
		"protocol":               mod(func(s *service.Service) { s.Frontend.Protocol = 132 }),
		"other family":           mod(func(s *service.Service) { s.Backends = backends(n.a, true, 8080) }),
		"weights 0":              mod(func(s *service.Service) { s.Backends[0].Weight, s.Backends[1].Weight = 0, 0 }),
		"backend twice":          mod(func(s *service.Service) { s.Backends = append(b4, b4...) }),
		"backend port 0":         mod(func(s *service.Service) { s.Backends[0].Port = 0 }),
		"unknown state":          mod(func(s *service.Service) { s.Backends[0].State = 9 }),
		"unknown algorithm":      mod(func(s *service.Service) { s.Algorithm = 7 }),
		"unknown reach":          mod(func(s *service.Service) { s.Reach = 7 }),
		"table not prime":        mod(func(s *service.Service) { s.Algorithm, s.MaglevSize = service.Maglev, 1000 }),
		"table too small":        mod(func(s *service.Service) { s.Algorithm, s.MaglevSize = service.Maglev, 1 }),
		"size for random":        mod(func(s *service.Service) { s.MaglevSize = 1021 }),
		"affinity not seconds":   mod(func(s *service.Service) { s.Affinity = 1500 * time.Millisecond }),
		"affinity over a day":    mod(func(s *service.Service) { s.Affinity = 25 * time.Hour }),
		"too many backends":      mod(func(s *service.Service) { s.Backends = manyBackends(service.MaxBackends + 1) }),
		"table smaller than set": mod(func(s *service.Service) { s.Algorithm, s.MaglevSize, s.Backends = service.Maglev, 3, manyBackends(5) }),
	}
	for name, s := range cases {
		if _, err := service.Upsert(context.Background(), n.dp, s); !errors.Is(err, datapath.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
		if _, err := service.Sync(context.Background(), n.dp, "", []service.Service{good, s}); !errors.Is(err, datapath.ErrInvalid) {
			t.Errorf("%s: Sync: %v, want ErrInvalid", name, err)
		}
	}
	if _, err := service.Sync(context.Background(), n.dp, "", []service.Service{good, good}); !errors.Is(err, datapath.ErrInvalid) {
		t.Errorf("a frontend twice: Sync: %v, want ErrInvalid", err)
	}
	if after := dump(t, n.dp); after != before {
		t.Errorf("bad input changed the maps:\nbefore\n%s\nafter\n%s", before, after)
	}
	got, err := service.Get(n.dp, good.Frontend)
	if err != nil || len(got.Backends) != 2 {
		t.Errorf("Get: %+v, %v", got, err)
	}
}

func manyBackends(k int) []service.Backend {
	out := make([]service.Backend, k)
	for i := range out {
		out[i] = service.Backend{Addr: netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)}), Port: 80, Weight: 1}
	}
	return out
}

// TestMapFull: more backends than the datapath holds is ErrMapFull, and
// the maps are as they were.
func TestMapFull(t *testing.T) {
	n := newNodeWith(t, datapath.Config{Limits: datapath.Limits{Backends: 8}})
	good := service.Service{Frontend: service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP}, Backends: manyBackends(4)}
	upsert(t, n.dp, good)
	before := dump(t, n.dp)
	big := good
	big.Backends = manyBackends(10) // the 4 it has and 6 more
	if _, err := service.Upsert(context.Background(), n.dp, big); !errors.Is(err, datapath.ErrMapFull) {
		t.Errorf("Upsert: %v, want ErrMapFull", err)
	}
	if after := dump(t, n.dp); after != before {
		t.Errorf("a full map changed the maps:\nbefore\n%s\nafter\n%s", before, after)
	}
}

// TestUpsertSyncDelete: what each call returns and leaves.
func TestUpsertSyncDelete(t *testing.T) {
	n := newNode(t)
	ctx := context.Background()
	s1 := service.Service{Frontend: service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP}, Backends: manyBackends(3)}
	c, err := service.Upsert(ctx, n.dp, s1)
	if err != nil || !c.Created || len(c.Added) != 3 {
		t.Fatalf("create: %+v, %v", c, err)
	}
	before := dump(t, n.dp)
	if c, err := service.Upsert(ctx, n.dp, s1); err != nil || !c.Unchanged() {
		t.Fatalf("same again: %+v, %v", c, err)
	}
	if after := dump(t, n.dp); after != before {
		t.Error("writing the same service changed the maps")
	}
	s2 := s1
	s2.Backends = append(manyBackends(4)[1:], service.Backend{Addr: manyBackends(1)[0].Addr, Port: 80, Weight: 5})
	c, err = service.Upsert(ctx, n.dp, s2)
	if err != nil || c.Created || len(c.Added) != 1 || len(c.Changed) != 1 || len(c.Removed) != 0 {
		t.Fatalf("change: %+v, %v", c, err)
	}
	got, err := service.Get(n.dp, s1.Frontend)
	if err != nil || len(got.Backends) != 4 || got.Backends[0].Weight != 5 {
		t.Fatalf("Get: %+v, %v", got, err)
	}

	s3 := service.Service{Frontend: service.Frontend{Addr: fe6, Port: 443, Protocol: service.UDP}, Backends: []service.Backend{{Addr: netip.MustParseAddr("fd00:1::12"), Port: 8443, Weight: 1}}, Algorithm: service.Maglev}
	sc, err := service.Sync(ctx, n.dp, "", []service.Service{s2, s3})
	if err != nil || len(sc.Added) != 1 || sc.Unchanged != 1 || len(sc.Changed)+len(sc.Removed) != 0 {
		t.Fatalf("Sync: %+v, %v", sc, err)
	}
	before = dump(t, n.dp)
	if sc, err := service.Sync(ctx, n.dp, "", []service.Service{s3, s2}); err != nil || sc.Unchanged != 2 {
		t.Fatalf("Sync again: %+v, %v", sc, err)
	}
	if after := dump(t, n.dp); after != before {
		t.Error("Sync of the same set changed the maps")
	}
	list, err := service.List(n.dp)
	if err != nil || len(list) != 2 || list[0].Frontend != s2.Frontend {
		t.Fatalf("List: %+v, %v", list, err)
	}
	if sc, err := service.Sync(ctx, n.dp, "", []service.Service{s3}); err != nil || len(sc.Removed) != 1 {
		t.Fatalf("Sync removing: %+v, %v", sc, err)
	}
	if _, err := service.Get(n.dp, s1.Frontend); !errors.Is(err, datapath.ErrNotFound) {
		t.Errorf("Get of a removed service: %v", err)
	}
	if err := service.Delete(ctx, n.dp, s3.Frontend); err != nil {
		t.Fatal(err)
	}
	if err := service.Delete(ctx, n.dp, s3.Frontend); !errors.Is(err, datapath.ErrNotFound) {
		t.Errorf("Delete twice: %v", err)
	}
	// Nothing is left but the services' shared record.
	for _, line := range strings.Split(dump(t, n.dp), "\n") {
		if strings.HasPrefix(line, "lb_") {
			t.Errorf("left after Delete: %s", line)
		}
	}
	// Another handle sees the same.
	dp2, err := datapath.Open(ctx, datapath.Config{Name: "node", NetNS: n.ns.Path, BPFFS: n.dp.PinDir()[:strings.LastIndexByte(n.dp.PinDir(), '/')]})
	if err != nil {
		t.Fatal(err)
	}
	defer dp2.Close()
	upsert(t, dp2, s1)
	if got, err := service.Get(n.dp, s1.Frontend); err != nil || len(got.Backends) != 3 {
		t.Errorf("a service another handle made: %+v, %v", got, err)
	}
}

var _ = ebpf.ErrKeyNotExist

// TestLargeService: a service whose record does not fit a ledger record
// keeps it in a blob, and another handle reads it back.
func TestLargeService(t *testing.T) {
	n := newNode(t)
	ctx := context.Background()
	s := service.Service{Frontend: service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP}, Backends: manyBackends(1000), Algorithm: service.Maglev}
	upsert(t, n.dp, s)
	dp2, err := datapath.Open(ctx, datapath.Config{Name: "node", NetNS: n.ns.Path, BPFFS: n.dp.PinDir()[:strings.LastIndexByte(n.dp.PinDir(), '/')]})
	if err != nil {
		t.Fatal(err)
	}
	defer dp2.Close()
	got, err := service.Get(dp2, s.Frontend)
	if err != nil || len(got.Backends) != 1000 {
		t.Fatalf("Get from another handle: %d backends, %v", len(got.Backends), err)
	}
	s.Backends = s.Backends[:999]
	if c, err := service.Upsert(ctx, dp2, s); err != nil || len(c.Removed) != 1 {
		t.Fatalf("Upsert from another handle: %+v, %v", c, err)
	}
	if err := service.Delete(ctx, n.dp, s.Frontend); err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(dump(t, n.dp), "\n") {
		if strings.HasPrefix(line, "lb_") || strings.HasPrefix(line, "ledger_blobs") {
			t.Errorf("left after Delete: %.80s", line)
		}
	}
}

// TestServiceShrinks: a service that no longer needs a blob is read back
// from its record.
func TestServiceShrinks(t *testing.T) {
	n := newNode(t)
	s := service.Service{Frontend: service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP}, Backends: manyBackends(500)}
	upsert(t, n.dp, s)
	s.Backends = s.Backends[:3]
	upsert(t, n.dp, s)
	dp2, err := datapath.Open(context.Background(), datapath.Config{Name: "node", NetNS: n.ns.Path, BPFFS: n.dp.PinDir()[:strings.LastIndexByte(n.dp.PinDir(), '/')]})
	if err != nil {
		t.Fatal(err)
	}
	defer dp2.Close()
	if got, err := service.Get(dp2, s.Frontend); err != nil || len(got.Backends) != 3 {
		t.Fatalf("Get from another handle: %d backends, %v", len(got.Backends), err)
	}
}

// TestNearlyFull: a change that keeps most backends fits where the old and
// the new set together would not: kept backends are the same entries.
func TestNearlyFull(t *testing.T) {
	n := newNodeWith(t, datapath.Config{Limits: datapath.Limits{Backends: 8}})
	s := service.Service{Frontend: service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP}, Backends: manyBackends(7)}
	upsert(t, n.dp, s)
	s.Backends = manyBackends(8)
	upsert(t, n.dp, s)
	if got, err := service.Get(n.dp, s.Frontend); err != nil || len(got.Backends) != 8 {
		t.Fatalf("Get: %d backends, %v", len(got.Backends), err)
	}
}
