package service_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/service"
)

// The fallback to terminating backends that still serve (KEP-1669): the
// tests of this file follow a service through the same four steps. While
// it has a ready backend, the terminating ones get no new flow; with none
// ready, new flows go to the TerminatingServing ones (in proportion to
// their weight), never to a Terminating (not serving), Quarantined or
// Maintenance one, nor to one of weight 0; with none of those either, a
// new flow has no backend; when a ready backend comes back, new flows go
// to it again, and the flows of the terminating ones stay where they are.

// TestStatesMatchDatapath: service.State is stored in lb_backends as it
// is: each value is its lb_backend_state twin.
func TestStatesMatchDatapath(t *testing.T) {
	for s, want := range map[service.State]bpfobj.TypesLbBackendState{
		service.Active:             bpfobj.TypesLbBackendStateLB_ACTIVE,
		service.Terminating:        bpfobj.TypesLbBackendStateLB_TERMINATING,
		service.Quarantined:        bpfobj.TypesLbBackendStateLB_QUARANTINED,
		service.Maintenance:        bpfobj.TypesLbBackendStateLB_MAINTENANCE,
		service.TerminatingServing: bpfobj.TypesLbBackendStateLB_TERMINATING_SERVING,
	} {
		if uint32(s) != uint32(want) {
			t.Errorf("state %v is %d, lb_backend_state says %d", s, s, want)
		}
	}
}

// TestCompileFallback: the selection table holds the ready backends, or,
// with none, the terminating ones that serve and have a weight, as many
// slots each as their weight says; the frontend says which (LB_F_FALLBACK).
// A Maglev table must be large enough for the backends that are in it.
func TestCompileFallback(t *testing.T) {
	be := func(i int, w uint16, s service.State) service.Backend {
		return service.Backend{Addr: netip.AddrFrom4([4]byte{198, 18, 1, byte(i)}), Port: 80, Weight: w, State: s}
	}
	others := []service.Backend{
		be(10, 1, service.Terminating), be(11, 1, service.Quarantined), be(12, 1, service.Maintenance),
		be(13, 0, service.TerminatingServing), be(14, 0, service.Active),
	}
	fallback := uint32(bpfobj.TypesLbFlagLB_F_FALLBACK)
	for _, c := range []struct {
		name     string
		backends []service.Backend
		want     map[int]int // backend (its last address byte) → slots
		fallback bool
	}{
		{"ready", []service.Backend{be(1, 1, service.Active), be(2, 2, service.Active), be(3, 5, service.TerminatingServing)}, map[int]int{1: 1, 2: 2}, false},
		{"none ready", []service.Backend{be(3, 1, service.TerminatingServing), be(4, 3, service.TerminatingServing)}, map[int]int{3: 1, 4: 3}, true},
		{"none serving", nil, map[int]int{}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			svc := service.Service{
				Frontend: service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP},
				Backends: append(append([]service.Backend(nil), others...), c.backends...),
			}
			if err := svc.Validate(); err != nil {
				t.Fatal(err)
			}
			nums := make([]uint16, len(svc.Backends))
			for i := range nums {
				nums[i] = uint16(i + 1)
			}
			e := service.Compile(&svc, 1, 0, nums, make([]uint32, len(nums)))
			byID := map[uint32]int{}
			for i, id := range e.IDs {
				byID[id] = int(svc.Backends[i].Addr.As4()[3])
			}
			got := map[int]int{}
			for _, id := range e.Slots {
				got[byID[id]]++
			}
			if fmt.Sprint(got) != fmt.Sprint(c.want) || e.Frontend.Slots != uint32(len(e.Slots)) {
				t.Errorf("slots per backend %v (frontend says %d), want %v", got, e.Frontend.Slots, c.want)
			}
			if (e.Frontend.Flags&fallback != 0) != c.fallback {
				t.Errorf("frontend flags %#x: fallback %v, want %v", e.Frontend.Flags, !c.fallback, c.fallback)
			}

			// Maglev: the table takes the same backends.
			svc.Algorithm, svc.MaglevSize = service.Maglev, 17
			e = service.Compile(&svc, 1, 0, nums, make([]uint32, len(nums)))
			got = map[int]int{}
			for _, id := range e.Slots {
				got[byID[id]]++
			}
			for b := range got {
				if _, ok := c.want[b]; !ok {
					t.Errorf("maglev: backend %d has a slot", b)
				}
			}
			if len(got) != len(c.want) || (e.Frontend.Flags&fallback != 0) != c.fallback {
				t.Errorf("maglev: slots per backend %v, flags %#x; want the backends of %v", got, e.Frontend.Flags, c.want)
			}
		})
	}

	// A table of 3 slots holds 2 ready backends, whatever the serving
	// ones are; without those, the 4 serving ones do not fit.
	svc := service.Service{
		Frontend:  service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP},
		Algorithm: service.Maglev, MaglevSize: 3,
		Backends: []service.Backend{be(1, 1, service.Active), be(2, 1, service.Active),
			be(3, 1, service.TerminatingServing), be(4, 1, service.TerminatingServing), be(5, 1, service.TerminatingServing), be(6, 1, service.TerminatingServing)},
	}
	if err := svc.Validate(); err != nil {
		t.Errorf("2 ready backends in 3 slots: %v", err)
	}
	svc.Backends[0].State, svc.Backends[1].State = service.Maintenance, service.Quarantined
	if err := svc.Validate(); !errors.Is(err, datapath.ErrInvalid) {
		t.Errorf("4 serving backends, none ready, in 3 slots: %v, want ErrInvalid", err)
	}
	svc.Backends[5].State = 5
	if err := svc.Validate(); !errors.Is(err, datapath.ErrInvalid) {
		t.Errorf("state 5: %v, want ErrInvalid", err)
	}
}

// Ports of the backends of the fallback tests, all on endpoint a: what
// answers, or where a packet goes, tells them apart.
const (
	portReady       = 8080 // active, while it is
	portServing1    = 8081 // terminating, serving, weight 1
	portServing3    = 8082 // terminating, serving, weight 3
	portServing0    = 8083 // terminating, serving, weight 0
	portTerminating = 8084 // terminating, not serving
	portMaintenance = 8085
	portQuarantined = 8086
)

// fallbackService is the service of the fallback tests, with its ready
// backend in state ready.
func fallbackService(n *node, fe service.Frontend, ready service.State, reach service.Reach) service.Service {
	v6 := fe.Addr.Is6()
	be := func(port, w uint16, s service.State) service.Backend {
		return service.Backend{Addr: addrOf(n.a, v6), Port: port, Weight: w, State: s}
	}
	return service.Service{
		Frontend: fe,
		Backends: []service.Backend{
			be(portReady, 1, ready),
			be(portServing1, 1, service.TerminatingServing),
			be(portServing3, 3, service.TerminatingServing),
			be(portServing0, 0, service.TerminatingServing),
			be(portTerminating, 1, service.Terminating),
			be(portMaintenance, 1, service.Maintenance),
			be(portQuarantined, 1, service.Quarantined),
		},
		Reach: reach,
	}
}

// setState gives the backends of svc on the ports their new state.
func setState(svc *service.Service, s service.State, ports ...uint16) {
	for i := range svc.Backends {
		for _, p := range ports {
			if svc.Backends[i].Port == p {
				svc.Backends[i].State = s
			}
		}
	}
}

// TestProgTerminatingFallback runs from-endpoint on crafted frames, TCP and
// UDP over IPv4 and IPv6, through the four steps (see the top of the file).
// A TCP SYN on a tracked tuple keeps a serving terminating backend while
// the service falls back to it (a retransmitted SYN), and chooses again
// once a ready backend is back (a port reused by a new connection).
func TestProgTerminatingFallback(t *testing.T) {
	n := newNode(t)
	prog := fromEndpoint(t, n)
	for i, v6 := range []bool{false, true} {
		for j, proto := range []service.Protocol{service.TCP, service.UDP} {
			t.Run(fmt.Sprintf("ipv6=%v/%v", v6, proto), func(t *testing.T) {
				fe := service.Frontend{Addr: frontendAddr(v6), Port: uint16(80 + 2*i + j), Protocol: proto}
				dst := netip.AddrPortFrom(fe.Addr, fe.Port)
				client := addrOf(n.client, v6)
				svc := fallbackService(n, fe, service.Active, service.TCOnly)
				upsert(t, n.dp, svc)

				// send sends a packet of the flow from sport and returns
				// the backend port it went to, 0 when it was dropped.
				send := func(sport uint16, flags uint8) uint16 {
					t.Helper()
					r := runFrom(t, n, prog, n.client, flowFrame(n.client, proto, netip.AddrPortFrom(client, sport), dst, flags, 5, false))
					if r.Verdict == progtest.TCActShot {
						return 0
					}
					got, err := parseL4(r.Packet)
					if err != nil || r.Verdict != progtest.TCActRedirect || got.Dst.Addr() != addrOf(n.a, v6) {
						t.Fatalf("from port %d: verdict %d, out to %v (%v); want a backend on endpoint a", sport, r.Verdict, got.Dst, err)
					}
					return got.Dst.Port()
				}
				// reply answers the flow from sport from its backend:
				// the flow is established.
				reply := func(sport, port uint16) {
					t.Helper()
					be := netip.AddrPortFrom(addrOf(n.a, v6), port)
					r := runFrom(t, n, prog, n.a, flowFrame(n.a, proto, be, netip.AddrPortFrom(client, sport), packet.SYN|packet.ACK, 5, false))
					if got, err := parseL4(r.Packet); r.Verdict != progtest.TCActRedirect || err != nil || got.Src != dst {
						t.Fatalf("reply from %v: verdict %d, from %v (%v); want from %v", be, r.Verdict, got.Src, err, dst)
					}
				}
				next := uint16(20000)
				// newFlows opens k new flows and counts them by backend port.
				newFlows := func(k int) map[uint16]int {
					t.Helper()
					got := map[uint16]int{}
					for range k {
						next++
						got[send(next, packet.SYN)]++
					}
					return got
				}

				// 1. A ready backend: it gets every new flow.
				if got := newFlows(16); got[portReady] != 16 {
					t.Fatalf("with a ready backend, new flows went to %v", got)
				}
				ready := next
				reply(ready, portReady)

				// 2. None ready: the serving ones get new flows, 1 to 3.
				setState(&svc, service.Maintenance, portReady)
				upsert(t, n.dp, svc)
				got := newFlows(64)
				if got[portServing1]+got[portServing3] != 64 || got[portServing1] == 0 || got[portServing3] <= got[portServing1] {
					t.Fatalf("with no ready backend, new flows went to %v; want all to %d and %d, about 1 to 3", got, portServing1, portServing3)
				}
				serving := next
				servingPort := send(serving, packet.ACK)
				reply(serving, servingPort)
				if p := send(ready, packet.ACK); p != portReady {
					t.Errorf("the flow of the backend in maintenance went to %d", p)
				}
				if proto == service.TCP {
					for range 20 {
						if p := send(serving, packet.SYN); p != servingPort {
							t.Fatalf("a SYN again on a flow of serving backend %d went to %d", servingPort, p)
						}
					}
				}

				// 3. None serving either: no backend.
				setState(&svc, service.Terminating, portServing1, portServing3)
				upsert(t, n.dp, svc)
				before := dropped(t, n.dp, datapath.ReasonNoBackend)
				if got := newFlows(8); got[0] != 8 {
					t.Errorf("with no backend ready or serving, new flows went to %v", got)
				}
				if after := dropped(t, n.dp, datapath.ReasonNoBackend); after != before+8 {
					t.Errorf("NO_BACKEND drops %d, then %d; want 8 more", before, after)
				}
				if p := send(serving, packet.ACK); p != servingPort {
					t.Errorf("the flow of terminating backend %d went to %d", servingPort, p)
				}

				// 4. Serving again, and the ready backend is back: new
				// flows go to it, the flows of the others stay.
				setState(&svc, service.TerminatingServing, portServing1, portServing3)
				setState(&svc, service.Active, portReady)
				upsert(t, n.dp, svc)
				if got := newFlows(16); got[portReady] != 16 {
					t.Errorf("with the ready backend back, new flows went to %v", got)
				}
				for range 3 {
					if p := send(serving, packet.ACK); p != servingPort {
						t.Fatalf("the flow of serving backend %d went to %d", servingPort, p)
					}
				}
				if proto == service.TCP {
					if p := send(serving, packet.SYN); p != portReady {
						t.Errorf("a SYN on the tuple of a flow of serving backend %d went to %d, want the ready one", servingPort, p)
					}
				}
			})
		}
	}
}

// TestProgFallbackAffinity: client affinity holds among the serving
// terminating backends while the service falls back to them, and gives way
// to a ready backend when one is back.
func TestProgFallbackAffinity(t *testing.T) {
	n := newNode(t)
	prog := fromEndpoint(t, n)
	for i, v6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipv6=%v", v6), func(t *testing.T) {
			fe := service.Frontend{Addr: frontendAddr(v6), Port: uint16(90 + i), Protocol: service.UDP}
			dst := netip.AddrPortFrom(fe.Addr, fe.Port)
			svc := fallbackService(n, fe, service.Maintenance, service.TCOnly)
			setState(&svc, service.Terminating, portServing3)
			svc.Backends = append(svc.Backends, service.Backend{Addr: addrOf(n.a, v6), Port: 8087, Weight: 1, State: service.TerminatingServing})
			svc.Affinity = time.Hour
			upsert(t, n.dp, svc)
			next := uint16(30000)
			// flows opens 20 new flows from the client, one after the
			// other, and returns the backend ports they went to.
			flows := func() map[uint16]int {
				t.Helper()
				got := map[uint16]int{}
				for range 20 {
					next++
					r := runFrom(t, n, prog, n.client, flowFrame(n.client, service.UDP, netip.AddrPortFrom(addrOf(n.client, v6), next), dst, 0, 5, false))
					p, err := parseL4(r.Packet)
					if err != nil || r.Verdict != progtest.TCActRedirect {
						t.Fatalf("flow from %d: verdict %d, %v", next, r.Verdict, err)
					}
					got[p.Dst.Port()]++
				}
				return got
			}
			// Two serving backends of weight 1 each: 20 flows on one of
			// them without affinity happen twice in a million runs.
			got := flows()
			if len(got) != 1 || got[portReady] != 0 {
				t.Fatalf("with no ready backend, a client's flows went to %v; want all to one serving backend", got)
			}
			setState(&svc, service.Active, portReady)
			upsert(t, n.dp, svc)
			if got := flows(); got[portReady] != 20 {
				t.Fatalf("with a ready backend, a client's flows went to %v", got)
			}
			setState(&svc, service.Maintenance, portReady)
			upsert(t, n.dp, svc)
			if got := flows(); len(got) != 1 || got[portReady] != 0 {
				t.Fatalf("with no ready backend again, a client's flows went to %v", got)
			}
		})
	}
}

// TestTerminatingFallbackTCP: real TCP connections through from-endpoint.
// With no ready backend, connections go to the serving terminating one;
// when a ready one is back, new connections go to it and the open one
// stays.
func TestTerminatingFallbackTCP(t *testing.T) {
	n := newNode(t)
	for i, v6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipv6=%v", v6), func(t *testing.T) {
			serve(t, n.a, v6, portReady, portServing1, portServing3, portTerminating, portMaintenance, portQuarantined)
			fe := service.Frontend{Addr: frontendAddr(v6), Port: uint16(80 + i), Protocol: service.TCP}
			dst := netip.AddrPortFrom(fe.Addr, fe.Port)
			svc := fallbackService(n, fe, service.Quarantined, service.TCOnly)
			setState(&svc, service.Terminating, portServing3)
			upsert(t, n.dp, svc)
			var c net.Conn
			if err := inNS(n.client, func() (err error) {
				c, err = net.DialTimeout("tcp", dst.String(), wait)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if p := askOn(t, c); p != portServing1 {
				t.Fatalf("with no ready backend, connected to %d; want the serving one, %d", p, portServing1)
			}
			for range 5 {
				answer, from, err := askTCP(n.client, dst, wait)
				if err != nil || from != dst || portOf(t, answer) != portServing1 {
					t.Fatalf("with no ready backend, a new connection: %q from %v, %v", answer, from, err)
				}
			}
			setState(&svc, service.Active, portReady)
			upsert(t, n.dp, svc)
			for range 3 {
				if p := askOn(t, c); p != portServing1 {
					t.Fatalf("the open connection went to %d", p)
				}
			}
			for range 5 {
				answer, _, err := askTCP(n.client, dst, wait)
				if err != nil || portOf(t, answer) != portReady {
					t.Fatalf("with the ready backend back, a new connection: %q, %v", answer, err)
				}
			}
		})
	}
}

// TestTerminatingFallbackSocket: the four steps at the socket level, TCP
// and UDP over IPv4 and IPv6, for processes in the datapath's cgroup: with
// no backend ready or serving, connect and send fail with EPERM.
func TestTerminatingFallbackSocket(t *testing.T) {
	cgroup := testutil.Cgroup(t)
	n := newNodeWith(t, datapath.Config{Cgroup: cgroup})
	for i, v6 := range []bool{false, true} {
		serve(t, n.a, v6, portReady, portServing1, portServing3, portTerminating, portMaintenance, portQuarantined)
		for j, tcp := range []bool{true, false} {
			fe := service.Frontend{Addr: frontendAddr(v6), Port: uint16(80 + 2*i + j), Protocol: service.UDP}
			if tcp {
				fe.Protocol = service.TCP
			}
			t.Run(fmt.Sprintf("ipv6=%v/%v", v6, fe.Protocol), func(t *testing.T) {
				dst := netip.AddrPortFrom(fe.Addr, fe.Port)
				svc := fallbackService(n, fe, service.Active, service.SocketOnly)
				setState(&svc, service.Terminating, portServing3)
				ask := func(step string, want uint16) {
					t.Helper()
					a := askFrom(t, cgroup, question{NetNS: n.client.NetNS, TCP: tcp, To: dst})
					if a.Err != "" || a.From != dst || portOf(t, a.Reply) != want {
						t.Fatalf("%s: %+v; want an answer of %d from %v", step, a, want, dst)
					}
				}
				upsert(t, n.dp, svc)
				ask("with a ready backend", portReady)
				setState(&svc, service.Maintenance, portReady)
				upsert(t, n.dp, svc)
				ask("with no ready backend", portServing1)
				ask("with no ready backend, again", portServing1)
				setState(&svc, service.Terminating, portServing1)
				upsert(t, n.dp, svc)
				if a := askFrom(t, cgroup, question{NetNS: n.client.NetNS, TCP: tcp, To: dst}); !strings.Contains(a.Err, "operation not permitted") {
					t.Fatalf("with no backend ready or serving: %+v; want EPERM", a)
				}
				setState(&svc, service.TerminatingServing, portServing1)
				setState(&svc, service.Active, portReady)
				upsert(t, n.dp, svc)
				ask("with the ready backend back", portReady)
			})
		}
	}
}
