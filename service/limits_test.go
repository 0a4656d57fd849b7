package service_test

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/service"
)

// Limits.ServiceSlots holds ServiceSlots/16,384 Maglev services of the
// default table size, one fewer with room to change them (a change writes
// the new table beside the old one); Limits.Services holds that many
// services. Up to the limits services are accepted, past them refused
// with ErrMapFull, and the services in place stay as they were.
func TestServiceLimits(t *testing.T) {
	const maglevs = 3
	n := newNodeWith(t, datapath.Config{Limits: datapath.Limits{
		Conntrack: 4096, Services: maglevs + 2, Backends: 16, ServiceSlots: maglevs * 16384,
	}})
	if got := n.dp.Limits(); got.Services != maglevs+2 || got.ServiceSlots != maglevs*16384 {
		t.Fatalf("Limits() = %+v", got)
	}
	ctx := context.Background()
	svc := func(i int, alg service.Algorithm, backends ...netip.Addr) service.Service {
		s := service.Service{
			Frontend:  service.Frontend{Addr: netip.AddrFrom4([4]byte{198, 18, 200, byte(i)}), Port: 80, Protocol: service.TCP},
			Algorithm: alg,
		}
		for _, b := range backends {
			s.Backends = append(s.Backends, service.Backend{Addr: b, Port: 8080, Weight: 1})
		}
		return s
	}
	a, b := n.a.IPv4, n.b.IPv4
	for i := 1; i < maglevs; i++ {
		if _, err := service.Upsert(ctx, n.dp, svc(i, service.Maglev, a)); err != nil {
			t.Fatalf("Maglev service %d of %d: %v", i, maglevs, err)
		}
	}
	// With a table's room free, any of them changes.
	if _, err := service.Upsert(ctx, n.dp, svc(1, service.Maglev, a, b)); err != nil {
		t.Fatalf("a change of a Maglev service, with room for one: %v", err)
	}
	if _, err := service.Upsert(ctx, n.dp, svc(maglevs, service.Maglev, a)); err != nil {
		t.Fatalf("Maglev service %d of %d: %v", maglevs, maglevs, err)
	}
	if _, err := service.Upsert(ctx, n.dp, svc(1, service.Maglev, a)); !errors.Is(err, datapath.ErrMapFull) {
		t.Errorf("a change of a Maglev service with no room for its new table: %v, want ErrMapFull", err)
	}
	if _, err := service.Upsert(ctx, n.dp, svc(maglevs+1, service.Maglev, a)); !errors.Is(err, datapath.ErrMapFull) {
		t.Errorf("Maglev service %d with room for %d: %v, want ErrMapFull", maglevs+1, maglevs, err)
	}
	all, err := service.List(n.dp)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != maglevs {
		t.Errorf("%d services listed, want %d", len(all), maglevs)
	}
	for _, s := range all {
		if s.Frontend == svc(1, 0).Frontend && len(s.Backends) != 2 {
			t.Errorf("the refused change changed service 1: %+v", s)
		}
	}

	// Random services take a block of slots each: the Services limit
	// decides.
	if err := service.Delete(ctx, n.dp, svc(maglevs, 0).Frontend); err != nil {
		t.Fatal(err)
	}
	for i := maglevs; i < maglevs+3; i++ {
		if _, err := service.Upsert(ctx, n.dp, svc(i, service.Random, a, b)); err != nil {
			t.Fatalf("service %d of %d: %v", i, maglevs+2, err)
		}
	}
	if _, err := service.Upsert(ctx, n.dp, svc(maglevs+3, service.Random, a)); !errors.Is(err, datapath.ErrMapFull) {
		t.Errorf("service %d with room for %d: %v, want ErrMapFull", maglevs+3, maglevs+2, err)
	}
}
