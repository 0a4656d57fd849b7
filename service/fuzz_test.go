package service_test

import (
	"net/netip"
	"testing"

	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/service"
)

// fuzzTables are the Maglev table sizes FuzzTranslate picks from: small
// primes, each at least the 16 backends a service may have here.
var fuzzTables = []int{251, 17, 61, 1021}

// fuzzService is the Maglev service FuzzTranslate's input describes: 1 to
// 16 backends, backend i with weight weights>>4i & 15 (the first one 1 when
// all are 0) on port 8000+i of endpoint a, endpoint b or an address off
// the node, in turn.
func fuzzService(n *node, v6 bool, proto service.Protocol, count uint8, weights uint64, table uint8) service.Service {
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
		svc.Backends = append(svc.Backends, service.Backend{Addr: addr, Port: uint16(8000 + i), Weight: w})
	}
	if !weighted {
		svc.Backends[0].Weight = 1
	}
	return svc
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
// the Go reference picks (Compile's table, FlowHash), from the client as it
// was, with valid checksums (a UDP checksum of 0 over IPv4 stays 0). One
// datapath serves every input; the conntrack map is emptied before each
// frame, so each is a new flow.
//
//	go test -run '^$' -fuzz FuzzTranslate -fuzztime 2000x ./service
func FuzzTranslate(f *testing.F) {
	n := newNode(f)
	prog := fromEndpoint(f, n)

	// sport, udp, v6, backends-1, weights (4 bits each), table, payload, UDP checksum 0
	f.Add(uint16(40000), false, false, uint8(0), uint64(1), uint8(0), uint16(0), false)
	f.Add(uint16(40001), true, false, uint8(9), uint64(0x1111111111), uint8(0), uint16(5), false)
	f.Add(uint16(40002), true, false, uint8(9), uint64(0x1111111111), uint8(0), uint16(5), true)
	f.Add(uint16(40003), false, true, uint8(9), uint64(0x123456789a), uint8(1), uint16(64), false)
	f.Add(uint16(40004), true, true, uint8(15), uint64(0xfedcba9876543210), uint8(2), uint16(1), false)
	f.Add(uint16(65535), false, false, uint8(15), uint64(0xf0f0f0f0f0f0f0f0), uint8(3), uint16(1400), false)
	f.Add(uint16(1), true, true, uint8(3), uint64(0), uint8(0), uint16(1399), false)
	f.Add(uint16(0), true, false, uint8(2), uint64(0x100), uint8(1), uint16(2), true)

	f.Fuzz(func(t *testing.T, sport uint16, udp, v6 bool, count uint8, weights uint64, table uint8, payload uint16, noSum bool) {
		proto := service.TCP
		if udp {
			proto = service.UDP
		}
		svc := fuzzService(n, v6, proto, count, weights, table)
		upsert(t, n.dp, svc)
		client := netip.AddrPortFrom(addrOf(n.client, v6), sport)
		fe := netip.AddrPortFrom(svc.Frontend.Addr, svc.Frontend.Port)
		want := maglevChoice(t, svc, client)
		noSum = noSum && udp && !v6

		clearConntrack(t, n.dp)
		r := runFrom(t, n, prog, n.client, flowFrame(n.client, proto, client, fe, packet.SYN, int(payload)%1401, noSum))
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
