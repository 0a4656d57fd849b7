package service_test

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/service"
)

// Two controllers share a datapath: each Sync changes only its owner's
// services, a frontend of another owner is refused, and an owner whose
// informer has not synced (an empty set) removes only its own.
func TestSyncOwners(t *testing.T) {
	n := newNode(t)
	ctx := context.Background()
	svc := func(i byte) service.Service {
		return service.Service{
			Frontend: service.Frontend{Addr: netip.AddrFrom4([4]byte{198, 18, 200, i}), Port: 80, Protocol: service.TCP},
			Backends: []service.Backend{{Addr: n.a.IPv4, Port: 8080, Weight: 1}},
		}
	}
	if _, err := service.Sync(ctx, n.dp, "a", []service.Service{svc(1), svc(2)}); err != nil {
		t.Fatal(err)
	}
	if _, err := service.Sync(ctx, n.dp, "b", []service.Service{svc(3)}); err != nil {
		t.Fatal(err)
	}
	owners := func() map[byte]string {
		list, err := service.List(n.dp)
		if err != nil {
			t.Fatal(err)
		}
		out := map[byte]string{}
		for _, s := range list {
			out[s.Frontend.Addr.As4()[3]] = s.Owner
		}
		return out
	}
	if got := owners(); len(got) != 3 || got[1] != "a" || got[3] != "b" {
		t.Fatalf("services by owner: %v", got)
	}
	// Another owner's frontend: refused, nothing changed.
	if _, err := service.Sync(ctx, n.dp, "a", []service.Service{svc(1), svc(3)}); !errors.Is(err, datapath.ErrExists) {
		t.Errorf("a Sync naming another owner's frontend: %v, want ErrExists", err)
	}
	s3 := svc(3)
	s3.Owner = "a"
	if _, err := service.Upsert(ctx, n.dp, s3); !errors.Is(err, datapath.ErrExists) {
		t.Errorf("an Upsert of another owner's frontend: %v, want ErrExists", err)
	}
	s3.Owner = "c"
	if _, err := service.Sync(ctx, n.dp, "b", []service.Service{s3}); !errors.Is(err, datapath.ErrInvalid) {
		t.Errorf("a Sync of owner b given a service of owner c: %v, want ErrInvalid", err)
	}
	// Owner a's empty set removes a's services only.
	sc, err := service.Sync(ctx, n.dp, "a", nil)
	if err != nil || len(sc.Removed) != 2 {
		t.Fatalf("an empty Sync of owner a: %+v, %v", sc, err)
	}
	if got := owners(); len(got) != 1 || got[3] != "b" {
		t.Errorf("after owner a's empty Sync: %v, want only b's service", got)
	}
	// The services made without an owner are the empty owner's.
	if _, err := service.Upsert(ctx, n.dp, svc(4)); err != nil {
		t.Fatal(err)
	}
	if _, err := service.Sync(ctx, n.dp, "", nil); err != nil {
		t.Fatal(err)
	}
	if got := owners(); len(got) != 1 || got[3] != "b" {
		t.Errorf("after the empty owner's empty Sync: %v", got)
	}
}
