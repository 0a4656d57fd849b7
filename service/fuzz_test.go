package service_test

import (
	"net/netip"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/service"
)

// fuzzTables are the Maglev table sizes FuzzTranslate picks from: small
// primes, each at least the 16 backends a service may have here.
var fuzzTables = []int{251, 17, 61, 1021}

// fuzzService is the Maglev service FuzzTranslate's input describes: 1 to
// 16 backends, backend i with weight weights>>4i & 15 (the first one 1 when
// all are 0) and state (states>>3i & 7) % 5 on port 8000+i of endpoint a,
// endpoint b or an address off the node, in turn.
func fuzzService(n *node, v6 bool, proto service.Protocol, count uint8, weights, states uint64, table uint8) service.Service {
	svc := service.Service{
		Frontend:   service.Frontend{Addr: frontendAddr(v6), Port: 80, Protocol: proto},
		Algorithm:  service.Maglev,
		MaglevSize: fuzzTables[int(table)%len(fuzzTables)],
		Reach:      service.TCOnly,
	}
	weighted := false
	for i := range int(count)%16 + 1 {
		var addr netip.Addr
		switch i % 3 {
		case 0:
			addr = addrOf(n.a, v6)
		case 1:
			addr = addrOf(n.b, v6)
		default:
			addr = netip.AddrFrom4([4]byte{198, 18, 3, byte(i)})
			if v6 {
				addr = netip.AddrFrom16([16]byte{0xfd, 0, 0, 3, 15: byte(i)})
			}
		}
		w := uint16(weights >> (4 * i) & 15)
		weighted = weighted || w > 0
		state := service.State((states >> (3 * i) & 7) % 5)
		svc.Backends = append(svc.Backends, service.Backend{Addr: addr, Port: uint16(8000 + i), Weight: w, State: state})
	}
	if !weighted {
		svc.Backends[0].Weight = 1
	}
	return svc
}

// fuzzChoice is the Go reference of where a new flow from client to svc
// goes, written from the rules of State and not from Compile's code: the
// backends that take new flows are the ready ones (Active, with a weight),
// or, when there are none, the TerminatingServing ones with a weight; the
// flow goes where the Maglev table of a service made of those alone, all
// active, sends it. ok is false when there are none: the flow has no
// backend.
func fuzzChoice(t testing.TB, svc service.Service, client netip.AddrPort) (to netip.AddrPort, ok bool) {
	t.Helper()
	take := func(s service.State) []service.Backend {
		var out []service.Backend
		for _, b := range svc.Backends {
			if b.State == s && b.Weight > 0 {
				b.State = service.Active
				out = append(out, b)
			}
		}
		return out
	}
	alone := svc
	if alone.Backends = take(service.Active); len(alone.Backends) == 0 {
		alone.Backends = take(service.TerminatingServing)
	}
	if len(alone.Backends) == 0 {
		return netip.AddrPort{}, false
	}
	return maglevChoice(t, alone, client), true
}

// maglevChoice is where svc's Maglev table, as Compile makes it, sends a
// new flow from client: slot FlowHash % table size.
func maglevChoice(t testing.TB, svc service.Service, client netip.AddrPort) netip.AddrPort {
	t.Helper()
	nums := make([]uint16, len(svc.Backends))
	for i := range nums {
		nums[i] = uint16(i + 1)
	}
	e := service.Compile(&svc, 1, 0, nums, make([]uint32, len(nums)))
	if len(e.Slots) != svc.MaglevSize || e.Frontend.Slots != uint32(svc.MaglevSize) {
		t.Fatalf("Compile made %d slots (frontend says %d), want %d", len(e.Slots), e.Frontend.Slots, svc.MaglevSize)
	}
	id := e.Slots[service.FlowHash(client.Addr(), client.Port(), svc.Frontend.Protocol)%uint32(len(e.Slots))]
	for i, x := range e.IDs {
		if x == id {
			return svc.Backends[i].AddrPort()
		}
	}
	t.Fatalf("slot holds backend ID %#x, which no backend has", id)
	return netip.AddrPort{}
}

// FuzzTranslate: a new flow from the client to a Maglev frontend translated
// at tc goes, through from-endpoint under BPF_PROG_TEST_RUN, to the backend
// the Go reference picks (fuzzChoice: the backends' states, Compile's table
// of those that take new flows, FlowHash), from the client as it was, with
// valid checksums (a UDP checksum of 0 over IPv4 stays 0); with no such
// backend it is dropped as NO_BACKEND. One
// datapath serves every input; the conntrack map is emptied before each
// frame, so each is a new flow.
//
//	go test -run '^$' -fuzz FuzzTranslate -fuzztime 2000x ./service
func FuzzTranslate(f *testing.F) {
	n := newNode(f)
	prog := fromEndpoint(f, n)

	// States, 3 bits each (mod 5), of backends 0, 1, 2, ...
	const (
		allActive      = 0
		terminating    = 0x249249249249 // every one Terminating (1)
		serving        = 0x924924924924 // every one TerminatingServing (4)
		mixedReady     = 0o4321043210   // active, terminating, quarantined, maintenance, serving, ...
		mixedFallback  = 0o4321443214   // serving, terminating, quarantined, maintenance, serving, serving, ...
		servingNoReady = 0o3214         // serving, terminating, quarantined, maintenance
	)
	// sport, udp, v6, backends-1, weights (4 bits each), states, table, payload, UDP checksum 0
	f.Add(uint16(40000), false, false, uint8(0), uint64(1), uint64(allActive), uint8(0), uint16(0), false)
	f.Add(uint16(40001), true, false, uint8(9), uint64(0x1111111111), uint64(allActive), uint8(0), uint16(5), false)
	f.Add(uint16(40002), true, false, uint8(9), uint64(0x1111111111), uint64(mixedReady), uint8(0), uint16(5), true)
	f.Add(uint16(40003), false, true, uint8(9), uint64(0x123456789a), uint64(mixedFallback), uint8(1), uint16(64), false)
	f.Add(uint16(40004), true, true, uint8(15), uint64(0xfedcba9876543210), uint64(serving), uint8(2), uint16(1), false)
	f.Add(uint16(65535), false, false, uint8(15), uint64(0xf0f0f0f0f0f0f0f0), uint64(mixedFallback), uint8(3), uint16(1400), false)
	f.Add(uint16(1), true, true, uint8(3), uint64(0), uint64(servingNoReady), uint8(0), uint16(1399), false)
	f.Add(uint16(0), true, false, uint8(2), uint64(0x100), uint64(terminating), uint8(1), uint16(2), true)
	f.Add(uint16(2), false, false, uint8(3), uint64(0x1110), uint64(servingNoReady), uint8(0), uint16(7), false)

	f.Fuzz(func(t *testing.T, sport uint16, udp, v6 bool, count uint8, weights, states uint64, table uint8, payload uint16, noSum bool) {
		proto := service.TCP
		if udp {
			proto = service.UDP
		}
		svc := fuzzService(n, v6, proto, count, weights, states, table)
		upsert(t, n.dp, svc)
		client := netip.AddrPortFrom(addrOf(n.client, v6), sport)
		fe := netip.AddrPortFrom(svc.Frontend.Addr, svc.Frontend.Port)
		want, ok := fuzzChoice(t, svc, client)
		noSum = noSum && udp && !v6

		clearConntrack(t, n.dp)
		before := dropped(t, n.dp, datapath.ReasonNoBackend)
		r := runFrom(t, n, prog, n.client, flowFrame(n.client, proto, client, fe, packet.SYN, int(payload)%1401, noSum))
		if !ok {
			if after := dropped(t, n.dp, datapath.ReasonNoBackend); r.Verdict != progtest.TCActShot || after != before+1 {
				t.Fatalf("%v %v -> %v, no backend takes it (%v): verdict %d, NO_BACKEND drops %d then %d; want %d, one more",
					proto, client, fe, svc.Backends, r.Verdict, before, after, progtest.TCActShot)
			}
			return
		}
		verdict := uint32(progtest.TCActOK) // to the stack: a backend off the node
		if want.Addr() == addrOf(n.a, v6) || want.Addr() == addrOf(n.b, v6) {
			verdict = progtest.TCActRedirect
		}
		if r.Verdict != verdict {
			t.Fatalf("%v %v -> %v: verdict %d, want %d (to %v)", proto, client, fe, r.Verdict, verdict, want)
		}
		got, err := parseL4(r.Packet)
		if err != nil {
			t.Fatalf("%v %v -> %v, out to %v: %v", proto, client, fe, want, err)
		}
		if got.Src != client || got.Dst != want || got.Proto != proto {
			t.Fatalf("%v %v -> %v came out %v %v -> %v, want to %v", proto, client, fe, got.Proto, got.Src, got.Dst, want)
		}
		if noSum && got.Sum != 0 {
			t.Fatalf("UDP checksum %#04x, want 0 as it came in", got.Sum)
		}
	})
}
