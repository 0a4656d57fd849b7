package service

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/sluicedp/sluice/internal/core"
)

func TestSocketTargets(t *testing.T) {
	fe := Frontend{Addr: netip.MustParseAddr("198.18.200.1"), Port: 53, Protocol: UDP}
	be := func(last byte, state State, weight uint16) Backend {
		return Backend{Addr: netip.AddrFrom4([4]byte{198, 18, 1, last}), Port: 53, State: state, Weight: weight}
	}
	target := func(last byte) core.SocketTarget {
		return core.SocketTarget{Frontend: netip.MustParseAddrPort("198.18.200.1:53"), Backend: netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 1, last}), 53)}
	}
	svc := func(backends ...Backend) *Service { return &Service{Frontend: fe, Backends: backends} }
	for _, c := range []struct {
		name     string
		old, new *Service
		want     []core.SocketTarget
	}{
		{"new service", nil, svc(be(1, Active, 1)), nil},
		{"unchanged", svc(be(1, Active, 1)), svc(be(1, Active, 1)), nil},
		{"removed", svc(be(1, Active, 1), be(2, Active, 1)), svc(be(2, Active, 1)), []core.SocketTarget{target(1)}},
		{"deleted", svc(be(1, Active, 1), be(2, Maintenance, 1)), nil, []core.SocketTarget{target(1), target(2)}},
		{"removed, took no flows", svc(be(1, Terminating, 1), be(2, Active, 1)), svc(be(2, Active, 1)), []core.SocketTarget{target(1)}},
		{"terminating", svc(be(1, Active, 1), be(2, Active, 1)), svc(be(1, Terminating, 1), be(2, Active, 1)), nil},
		{"quarantined", svc(be(1, Active, 1)), svc(be(1, Quarantined, 1)), nil},
		{"weight 0", svc(be(1, Active, 1), be(2, Active, 1)), svc(be(1, Active, 0), be(2, Active, 1)), nil},
		{"weight changed", svc(be(1, Active, 1)), svc(be(1, Active, 5)), nil},
		{"back to active", svc(be(1, Quarantined, 1)), svc(be(1, Active, 1)), nil},
		{"falls back", svc(be(1, Active, 1), be(2, TerminatingServing, 1)), svc(be(1, Quarantined, 1), be(2, TerminatingServing, 1)), nil},
		{"ready again", svc(be(1, Quarantined, 1), be(2, TerminatingServing, 1)), svc(be(1, Active, 1), be(2, TerminatingServing, 1)), nil},
		{"TCP", &Service{Frontend: Frontend{Addr: fe.Addr, Port: 53, Protocol: TCP}, Backends: []Backend{be(1, Active, 1)}}, nil, nil},
		{"per packet only", &Service{Frontend: fe, Backends: []Backend{be(1, Active, 1)}, Reach: TCOnly}, nil, nil},
	} {
		if got := socketTargets(c.old, c.new); !slices.Equal(got, c.want) {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}
