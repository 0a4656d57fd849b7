package service_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/service"
)

// crashSet is the services of a version, "old" or "new". From old to new,
// service 1 changes backends (keeps two, loses one, gains two), service 2
// goes, service 3 stays, service 4 is new, and service 5, too large for a
// ledger record (its blob), changes.
func crashSet(version string) []service.Service {
	fe := func(i byte) service.Frontend {
		return service.Frontend{Addr: netip.AddrFrom4([4]byte{198, 18, 200, i}), Port: 80, Protocol: service.TCP}
	}
	be := func(i ...byte) []service.Backend {
		var out []service.Backend
		for _, b := range i {
			out = append(out, service.Backend{Addr: netip.AddrFrom4([4]byte{198, 18, 1, b}), Port: 8080, Weight: 1})
		}
		return out
	}
	big := func(first int) []service.Backend {
		var out []service.Backend
		for i := range 200 {
			out = append(out, service.Backend{Addr: netip.AddrFrom4([4]byte{198, 19, byte((first + i) >> 8), byte(first + i)}), Port: 80, Weight: 1})
		}
		return out
	}
	if version == "old" {
		return []service.Service{
			{Frontend: fe(1), Backends: be(11, 12, 13)},
			{Frontend: fe(2), Backends: be(11)},
			{Frontend: fe(3), Backends: be(12)},
			{Frontend: fe(5), Backends: big(0), Algorithm: service.Maglev},
		}
	}
	return []service.Service{
		{Frontend: fe(1), Backends: be(11, 12, 14, 15)},
		{Frontend: fe(3), Backends: be(12)},
		{Frontend: fe(4), Backends: be(13)},
		{Frontend: fe(5), Backends: big(100), Algorithm: service.Maglev},
	}
}

// syncCrash, given "BPFFS|NETNS|POINT", syncs the new set and kills itself
// at the crash point POINT. It exits with 3 when it never got there.
func syncCrash(arg string) int {
	parts := strings.Split(arg, "|")
	dp, err := datapath.Open(context.Background(), datapath.Config{Name: "node", BPFFS: parts[0], NetNS: parts[1], MustExist: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	testutil.CrashAt(parts[2])
	if _, err := service.Sync(context.Background(), dp, "", crashSet("new")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 3
}

// A process killed at each crash point of a Sync leaves what Reconcile
// makes whole: every service is exactly its old version or its new one
// (old before the records flip, new after), in List and in the maps; a
// service that stays keeps its ID (its flows keep their reverse
// translation); no counter index is held twice; and the next Sync works.
func TestKilledSyncAtEachCrashPoint(t *testing.T) {
	n := newNode(t)
	bpffs := n.dp.PinDir()[:strings.LastIndexByte(n.dp.PinDir(), '/')]
	points := []struct {
		name string
		want string
	}{
		{"service/intent", "old"},
		{"service/counters", "old"},
		{"service/backends", "old"},
		{"service/tables", "old"},
		{"service/revnat", "old"},
		{"service/frontends", "old"},
		{"service/frontends/half", "old"},
		{"service/flip", "old"},
		{"service/cleanup", "new"},
		{"service/ready", "new"},
		{"service/done", "new"},
	}
	for _, pt := range points {
		if _, err := service.Sync(context.Background(), n.dp, "", crashSet("old")); err != nil {
			t.Fatal(err)
		}
		ids := serviceIDs(t, n.dp)
		testutil.RunKilled(t, "synccrash", bpffs+"|"+n.ns.Path+"|"+pt.name)
		repaired, err := n.dp.Reconcile(context.Background())
		if err != nil {
			t.Fatalf("%s: reconcile: %v", pt.name, err)
		}
		list, err := service.List(n.dp)
		if err != nil {
			t.Fatal(err)
		}
		want := crashSet(pt.want)
		if !sameServices(list, want) {
			t.Errorf("%s: List gives %d services, not the %s set", pt.name, len(list), pt.want)
		}
		checkMapsHoldExactly(t, n.dp, list, pt.name)
		for fe, id := range serviceIDs(t, n.dp) {
			if was, ok := ids[fe]; ok && was != id {
				t.Errorf("%s: the service of frontend %v had ID %d, now %d", pt.name, fe, was, id)
			}
		}
		recs, err := ledger.List(core.Of(n.dp).Objs.Ledger, ledger.KindService)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			if r.State != ledger.Ready {
				t.Errorf("%s: the record of service %d is %s", pt.name, r.ID, r.State)
			}
		}
		t.Logf("%s: Reconcile repaired %d objects; the services are the %s set", pt.name, repaired, pt.want)
	}
	if _, err := service.Sync(context.Background(), n.dp, "", crashSet("new")); err != nil {
		t.Fatal(err)
	}
	list, _ := service.List(n.dp)
	if !sameServices(list, crashSet("new")) {
		t.Error("the next Sync did not make the new set")
	}
	checkMapsHoldExactly(t, n.dp, list, "after")
}

// sameServices compares services by frontend and backend set.
func sameServices(got, want []service.Service) bool {
	if len(got) != len(want) {
		return false
	}
	byFrontend := map[service.Frontend][]netip.AddrPort{}
	for _, s := range got {
		for _, b := range s.Backends {
			byFrontend[s.Frontend] = append(byFrontend[s.Frontend], b.AddrPort())
		}
	}
	for _, s := range want {
		var bs []netip.AddrPort
		for _, b := range s.Backends {
			bs = append(bs, b.AddrPort())
		}
		slices.SortFunc(bs, netip.AddrPort.Compare)
		have := byFrontend[s.Frontend]
		slices.SortFunc(have, netip.AddrPort.Compare)
		if !slices.Equal(have, bs) {
			return false
		}
	}
	return true
}

// serviceIDs returns the service ID of each frontend in the maps.
func serviceIDs(t *testing.T, dp *datapath.Datapath) map[bpfobj.TypesLbFrontendKey]uint32 {
	t.Helper()
	out := map[bpfobj.TypesLbFrontendKey]uint32{}
	var k bpfobj.TypesLbFrontendKey
	var v bpfobj.TypesLbFrontend
	it := core.Of(dp).Objs.LbFrontends.Iterate()
	for it.Next(&k, &v) {
		out[k] = v.Service
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// checkMapsHoldExactly checks the service maps against the listed
// services: each frontend there, with its reverse NAT; the backends of its
// ID exactly its backends, each with a counter index of its own; its
// table whole, naming only its backends; and nothing else in any of them.
func checkMapsHoldExactly(t *testing.T, dp *datapath.Datapath, list []service.Service, what string) {
	t.Helper()
	st := core.Of(dp)
	frontends := map[uint32]bpfobj.TypesLbFrontend{}
	for _, s := range list {
		var v bpfobj.TypesLbFrontend
		if err := st.Objs.LbFrontends.Lookup(frontendKeyOf(s.Frontend), &v); err != nil {
			t.Errorf("%s: no frontend for %s: %v", what, s.Frontend, err)
			continue
		}
		frontends[v.Service] = v
		var rk bpfobj.TypesLbFrontendKey
		if err := st.Objs.LbRevnat.Lookup(v.Service, &rk); err != nil || rk != frontendKeyOf(s.Frontend) {
			t.Errorf("%s: reverse NAT of service %d: %v", what, v.Service, err)
		}
	}
	if n := count(t, st.Objs.LbFrontends); n != len(list) {
		t.Errorf("%s: %d frontends in the map, %d services", what, n, len(list))
	}
	if n := count(t, st.Objs.LbRevnat); n != len(list) {
		t.Errorf("%s: %d reverse NAT entries, %d services", what, n, len(list))
	}
	backends := map[uint32]map[netip.AddrPort]bool{}
	counters := map[uint32]uint32{}
	ids := map[uint32]bool{}
	var id uint32
	var b bpfobj.TypesLbBackend
	it := st.Objs.LbBackends.Iterate()
	for it.Next(&id, &b) {
		ids[id] = true
		if backends[b.Service] == nil {
			backends[b.Service] = map[netip.AddrPort]bool{}
		}
		ap := netip.AddrPortFrom(netip.AddrFrom4([4]byte(b.Addr[:4])), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&b.Port))[:]))
		backends[b.Service][ap] = true
		if other, ok := counters[b.Counter]; ok {
			t.Errorf("%s: counter index %d is held by backends %#x and %#x", what, b.Counter, other, id)
		}
		counters[b.Counter] = id
	}
	for _, s := range list {
		var v bpfobj.TypesLbFrontend
		st.Objs.LbFrontends.Lookup(frontendKeyOf(s.Frontend), &v)
		if len(backends[v.Service]) != len(s.Backends) {
			t.Errorf("%s: service %s has %d backends in the map, %d listed", what, s.Frontend, len(backends[v.Service]), len(s.Backends))
		}
		for _, be := range s.Backends {
			if !backends[v.Service][be.AddrPort()] {
				t.Errorf("%s: service %s lacks backend %s in the map", what, s.Frontend, be.AddrPort())
			}
		}
		delete(backends, v.Service)
	}
	for svc := range backends {
		t.Errorf("%s: backends of service %d, which is not listed", what, svc)
	}
	var sk bpfobj.TypesLbSlotKey
	var sb bpfobj.TypesLbSlotBlock
	it = st.Objs.LbSlots.Iterate()
	for it.Next(&sk, &sb) {
		v, ok := frontends[sk.Table/2]
		if !ok || v.Table != sk.Table {
			t.Errorf("%s: table block %d/%d, which no frontend uses", what, sk.Table, sk.Block)
			continue
		}
		for _, be := range sb.Backend {
			if be != 0 && !ids[be] {
				t.Errorf("%s: table %d names backend %#x, which is not in the map", what, sk.Table, be)
			}
		}
	}
}

// count returns how many entries a map has.
func count(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	n := 0
	key := make([]byte, m.KeySize())
	var cur any
	for {
		err := m.NextKey(cur, key)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return n
		}
		if err != nil {
			t.Fatal(err)
		}
		n++
		cur = slices.Clone(key)
	}
}

// frontendKeyOf is a frontend's lb_frontends key.
func frontendKeyOf(f service.Frontend) bpfobj.TypesLbFrontendKey {
	k := bpfobj.TypesLbFrontendKey{Proto: uint8(f.Protocol), Family: 4}
	if f.Addr.Is6() {
		k.Family = 6
		k.Addr = f.Addr.As16()
	} else {
		a := f.Addr.As4()
		copy(k.Addr[:], a[:])
	}
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&k.Port))[:], f.Port)
	return k
}
