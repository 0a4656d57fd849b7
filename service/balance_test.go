package service_test

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/service"
)

// ports10 are the ports of ten backends on one endpoint.
var ports10 = []uint16{9001, 9002, 9003, 9004, 9005, 9006, 9007, 9008, 9009, 9010}

// spread sends one UDP flow from each source port and returns the backend
// port that answered each.
func spread(t *testing.T, n *node, fe netip.AddrPort, sports []uint16) map[uint16]uint16 {
	t.Helper()
	var mu sync.Mutex
	got := map[uint16]uint16{}
	var failed error
	parallel(len(sports), func(i int) {
		answer, from, err := askUDP(n.client, sports[i], fe, wait)
		mu.Lock()
		defer mu.Unlock()
		if err != nil || from != fe {
			failed = fmt.Errorf("flow from port %d: %q from %v, %v", sports[i], answer, from, err)
			return
		}
		got[sports[i]] = portOf(t, answer)
	})
	if failed != nil {
		t.Fatal(failed)
	}
	return got
}

func sourcePorts(first, count int) []uint16 {
	out := make([]uint16, count)
	for i := range out {
		out[i] = uint16(first + i)
	}
	return out
}

// TestRandomDistribution: 1000 flows over 10 equal backends pass a
// chi-square test of uniformity, and the backends' flow counters agree.
func TestRandomDistribution(t *testing.T) {
	n := newNode(t)
	serve(t, n.a, false, ports10...)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.UDP}
	upsert(t, n.dp, service.Service{Frontend: fe, Backends: backends(n.a, false, ports10...), Reach: service.TCOnly})
	got := spread(t, n, netip.AddrPortFrom(fe.Addr, fe.Port), sourcePorts(20000, 1000))
	count := map[uint16]int{}
	for _, p := range got {
		count[p]++
	}
	// 9 degrees of freedom: 27.88 is exceeded by chance once in 1000 runs.
	expected := float64(len(got)) / 10
	chi := 0.0
	for _, p := range ports10 {
		d := float64(count[p]) - expected
		chi += d * d / expected
	}
	t.Logf("flows per backend %v, chi-square %.2f", count, chi)
	if chi > 27.88 {
		t.Errorf("chi-square %.2f over 27.88: not uniform: %v", chi, count)
	}
	counters, err := service.ReadCounters(n.dp, fe)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range counters {
		if c.Flows != uint64(count[c.Backend.Port()]) || c.Packets != c.Flows {
			t.Errorf("backend %v: counters %+v, answered %d flows", c.Backend, c, count[c.Backend.Port()])
		}
	}
	all, err := service.ReadAllCounters(n.dp)
	if err != nil || len(all) != 1 || !slices.Equal(all[fe], counters) {
		t.Errorf("ReadAllCounters: %v, %v; want only %s with %v", all, err, fe, counters)
	}
}

// TestMaglev: every flow goes where the Maglev table says (FlowHash), the
// same flow always to the same backend, and after one of ten backends is
// removed fewer than 20% of new flows move.
func TestMaglev(t *testing.T) {
	n := newNode(t)
	serve(t, n.a, false, ports10...)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.UDP}
	svc := service.Service{Frontend: fe, Backends: backends(n.a, false, ports10...), Algorithm: service.Maglev, MaglevSize: 1021, Reach: service.TCOnly}
	upsert(t, n.dp, svc)
	sports := sourcePorts(21000, 400)
	before := spread(t, n, netip.AddrPortFrom(fe.Addr, fe.Port), sports)
	want := reference(t, svc, n.client.IPv4, sports)
	for sp, p := range before {
		if want[sp] != p {
			t.Fatalf("flow from port %d went to %d, the table says %d", sp, p, want[sp])
		}
	}
	again := spread(t, n, netip.AddrPortFrom(fe.Addr, fe.Port), sports)
	for sp := range before {
		if again[sp] != before[sp] {
			t.Fatalf("flow from port %d went to %d, then %d", sp, before[sp], again[sp])
		}
	}

	svc.Backends = backends(n.a, false, append(ports10[:4:4], ports10[5:]...)...)
	upsert(t, n.dp, svc)
	fresh := sourcePorts(22000, 400)
	was := reference(t, service.Service{Frontend: fe, Backends: backends(n.a, false, ports10...), Algorithm: service.Maglev, MaglevSize: 1021}, n.client.IPv4, fresh)
	now := spread(t, n, netip.AddrPortFrom(fe.Addr, fe.Port), fresh)
	moved := 0
	for sp, p := range now {
		if was[sp] != ports10[4] && was[sp] != p {
			moved++
		}
		if p == ports10[4] {
			t.Fatalf("flow from port %d went to the removed backend", sp)
		}
	}
	t.Logf("%d of %d flows of the remaining backends moved", moved, len(now))
	if moved*5 >= len(now) {
		t.Errorf("%d of %d flows moved", moved, len(now))
	}
	// The flows of the first round whose backend stayed keep it: their
	// conntrack entries hold it.
	kept := spread(t, n, netip.AddrPortFrom(fe.Addr, fe.Port), sports)
	for sp, p := range before {
		if p != ports10[4] && kept[sp] != p {
			t.Errorf("flow from port %d moved from %d to %d", sp, p, kept[sp])
		}
	}
}

// reference is where the Maglev table of svc sends the UDP flow from each
// source port of client.
func reference(t *testing.T, svc service.Service, client netip.Addr, sports []uint16) map[uint16]uint16 {
	t.Helper()
	nums := make([]uint16, len(svc.Backends))
	byID := map[uint32]uint16{}
	for i := range nums {
		nums[i] = uint16(i + 1)
	}
	e := service.Compile(&svc, 1, 0, nums, make([]uint32, len(nums)))
	for i, id := range e.IDs {
		byID[id] = svc.Backends[i].Port
	}
	out := map[uint16]uint16{}
	for _, sp := range sports {
		h := service.FlowHash(client, sp, service.UDP)
		out[sp] = byID[e.Slots[h%uint32(len(e.Slots))]]
	}
	return out
}

// TestAffinity: a client's flows stick to one backend while its affinity
// lasts, and choose anew once it is over. The affinity is long, so that
// no round outlasts it on a slow machine; it is made to be over by aging
// the client's entry, not by waiting.
func TestAffinity(t *testing.T) {
	n := newNode(t)
	serve(t, n.a, false, ports10...)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.UDP}
	upsert(t, n.dp, service.Service{Frontend: fe, Backends: backends(n.a, false, ports10...), Affinity: time.Hour, Reach: service.TCOnly})
	affinity := core.Of(n.dp).Map(bpfobj.EndpointMapLbAffinity)
	var first []uint16
	for round := range 8 {
		// The first flow alone: flows that start at the same time may
		// each choose before any has written the affinity.
		got := spread(t, n, netip.AddrPortFrom(fe.Addr, fe.Port), sourcePorts(23000+100*round, 1))
		maps.Copy(got, spread(t, n, netip.AddrPortFrom(fe.Addr, fe.Port), sourcePorts(23001+100*round, 19)))
		var p uint16
		for _, q := range got {
			if p != 0 && q != p {
				t.Fatalf("round %d: flows of one client went to %d and %d", round, p, q)
			}
			p = q
		}
		first = append(first, p)
		// Over: the client's entry is two hours old.
		var k bpfobj.TypesLbAffinityKey
		var v bpfobj.TypesLbAffinityEntry
		it := affinity.Iterate()
		for it.Next(&k, &v) {
			v.Last -= uint64(2 * time.Hour)
			if err := affinity.Put(&k, &v); err != nil {
				t.Fatal(err)
			}
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
	}
	// After each timeout the choice is new: eight times the same backend
	// of ten happens once in ten million runs.
	if !slices.ContainsFunc(first, func(p uint16) bool { return p != first[0] }) {
		t.Errorf("every round went to %d: affinity never timed out", first[0])
	}
}

// TestDrain: a terminating backend keeps its established TCP connection and
// UDP flow and gets no new ones; a backend set change leaves an
// established UDP flow on its backend.
func TestDrain(t *testing.T) {
	n := newNode(t)
	serve(t, n.a, false, 9001, 9002)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.UDP}
	svc := service.Service{Frontend: fe, Backends: backends(n.a, false, 9001), Reach: service.TCOnly}
	upsert(t, n.dp, svc)
	dst := netip.AddrPortFrom(fe.Addr, fe.Port)
	if answer, _, err := askUDP(n.client, 30000, dst, wait); err != nil || portOf(t, answer) != 9001 {
		t.Fatalf("first flow: %q, %v", answer, err)
	}
	// A second backend joins: the flow stays.
	svc.Backends = backends(n.a, false, 9001, 9002)
	upsert(t, n.dp, svc)
	for range 5 {
		if answer, _, err := askUDP(n.client, 30000, dst, wait); err != nil || portOf(t, answer) != 9001 {
			t.Fatalf("after a backend joined: %q, %v", answer, err)
		}
	}
	// The first drains: its flow stays, new flows go to the second.
	svc.Backends[0].State = service.Terminating
	upsert(t, n.dp, svc)
	if answer, _, err := askUDP(n.client, 30000, dst, wait); err != nil || portOf(t, answer) != 9001 {
		t.Fatalf("draining flow: %q, %v", answer, err)
	}
	got := spread(t, n, dst, sourcePorts(31000, 20))
	for sp, p := range got {
		if p != 9002 {
			t.Errorf("new flow from %d went to the terminating backend", sp)
		}
	}
	// Removed: its flow goes to the other.
	svc.Backends = svc.Backends[1:]
	upsert(t, n.dp, svc)
	if answer, _, err := askUDP(n.client, 30000, dst, wait); err != nil || portOf(t, answer) != 9002 {
		t.Fatalf("flow of a removed backend: %q, %v", answer, err)
	}
}

var _ = context.Background

// TestDrainTCP: an established TCP connection to a terminating backend
// goes on; new connections go to the active one.
func TestDrainTCP(t *testing.T) {
	n := newNode(t)
	serve(t, n.a, false, 9001, 9002)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP}
	dst := netip.AddrPortFrom(fe.Addr, fe.Port)
	svc := service.Service{Frontend: fe, Backends: backends(n.a, false, 9001), Reach: service.TCOnly}
	upsert(t, n.dp, svc)
	var c net.Conn
	if err := inNS(n.client, func() (err error) {
		c, err = net.DialTimeout("tcp", dst.String(), wait)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if p := askOn(t, c); p != 9001 {
		t.Fatalf("connected to %d", p)
	}
	svc.Backends = backends(n.a, false, 9001, 9002)
	svc.Backends[0].State = service.Terminating
	upsert(t, n.dp, svc)
	for range 3 {
		if p := askOn(t, c); p != 9001 {
			t.Fatalf("the draining connection went to %d", p)
		}
	}
	for range 5 {
		answer, _, err := askTCP(n.client, dst, wait)
		if err != nil || portOf(t, answer) != 9002 {
			t.Fatalf("a new connection: %q, %v", answer, err)
		}
	}
}

// askOn sends a message on an open connection to an echo server and
// returns the port of the backend that answered.
func askOn(t *testing.T, c net.Conn) uint16 {
	t.Helper()
	c.SetDeadline(time.Now().Add(wait))
	buf := make([]byte, 64)
	if _, err := c.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	k, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return portOf(t, string(buf[:k]))
}

// TestCountersStartAtZero: a backend that gets a counter index another
// backend had starts from zero.
func TestCountersStartAtZero(t *testing.T) {
	n := newNodeWith(t, datapath.Config{Limits: datapath.Limits{Backends: 2}})
	serve(t, n.a, false, 9001, 9002)
	dst := netip.AddrPortFrom(fe4, 80)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.UDP}
	for _, port := range []uint16{9001, 9002, 9001, 9002} { // two indexes, each given twice
		upsert(t, n.dp, service.Service{Frontend: fe, Backends: backends(n.a, false, port), Reach: service.TCOnly})
		if c := counters(t, n.dp, fe); c.Flows != 0 || c.Packets != 0 {
			t.Fatalf("backend %d starts at %+v", port, c)
		}
		spread(t, n, dst, sourcePorts(int(port)*2, 3))
		if c := counters(t, n.dp, fe); c.Flows != 3 || c.Packets != 3 {
			t.Fatalf("backend %d after three flows: %+v", port, c)
		}
		if err := service.Delete(t.Context(), n.dp, fe); err != nil {
			t.Fatal(err)
		}
	}
}
