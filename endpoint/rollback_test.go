package endpoint

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/testutil"
)

// A Create that fails half-way, when the ipcache is full, undoes all it made:
// the namespace, the veth pair, the counters and endpoint map entries.
func TestCreateRollsBackWhenMapFull(t *testing.T) {
	testutil.Privileged(t)
	nodeNS := testutil.NewNetNS(t)
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name: "node", NetNS: nodeNS.Path, BPFFS: testutil.BPFFS(t),
		Node: datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Unload()
	st := core.Of(dp)

	// Fill the ipcache (65536 entries) with the hosts of 198.19.0.0/16.
	for i := range 1 << 16 {
		a := netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)})
		k := ipcache.Key(netip.PrefixFrom(a, 32))
		if err := st.Objs.Ipcache.Put(&k, &bpfobj.TypesIpcacheValue{Identity: 2}); err != nil {
			t.Fatalf("fill the ipcache: entry %d: %v", i, err)
		}
	}

	spec := Spec{ID: 1, IPv4: netip.MustParseAddr("198.18.1.10"), Identity: 1000, NetNS: testutil.Name("sluice-t-")}
	if _, err = Create(context.Background(), dp, spec); err == nil {
		Delete(context.Background(), dp, spec.ID)
	}
	if !errors.Is(err, datapath.ErrMapFull) {
		t.Fatalf("Create with a full ipcache: %v, want ErrMapFull", err)
	}
	if _, err := os.Stat(filepath.Join("/run/netns", spec.NetNS)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the namespace Create made is still there: %v", err)
	}
	h, _ := netns.GetFromPath(nodeNS.Path)
	defer h.Close()
	if _, err := netdev.Get(h, "sl-ep1"); err == nil {
		t.Error("the veth Create made is still there")
	}
	for name, n := range map[string]func() (int, error){
		"endpoints": func() (int, error) {
			return count(st.Objs.Endpoints.Iterate(), new(uint32), new(bpfobj.TypesEndpointInfo))
		},
		"counters": func() (int, error) {
			return count(st.Objs.EpCounters.Iterate(), new(uint32), new([]bpfobj.TypesEndpointCounters))
		},
		"ledger": func() (int, error) {
			recs, err := ledger.List(st.Objs.Ledger, ledger.KindEndpoint)
			return len(recs), err
		},
	} {
		if got, err := n(); err != nil || got != 0 {
			t.Errorf("%s map has %d entries (%v), want 0", name, got, err)
		}
	}
}

func count(it interface {
	Next(k, v any) bool
	Err() error
}, k, v any) (int, error) {
	n := 0
	for it.Next(k, v) {
		n++
	}
	return n, it.Err()
}

// An address another writer holds in the ipcache (an identity given to it)
// is refused, and the failed Create neither overwrites nor removes that
// entry.
func TestCreateLeavesOthersIPCacheEntry(t *testing.T) {
	w := newProgWorld(t)
	st := core.Of(w.dp)
	a := netip.MustParseAddr("198.18.1.60")
	p := netip.PrefixFrom(a, 32)
	if err := ipcache.Put(st.Objs.Ipcache, p, ipcache.Entry{Identity: 4242}, ipcache.Identity); err != nil {
		t.Fatal(err)
	}
	s := Spec{ID: 60, IPv4: a, Identity: 1000, NetNS: testutil.Name("sluice-t-")}
	if _, err := Create(context.Background(), w.dp, s); !errors.Is(err, datapath.ErrExists) {
		Delete(context.Background(), w.dp, s.ID)
		t.Fatalf("Create over another writer's address: %v, want ErrExists", err)
	}
	if e, ok, err := ipcache.Lookup(st.Objs.Ipcache, p); err != nil || !ok || e.Identity != 4242 {
		t.Errorf("the other writer's entry after the refused Create: %+v %v %v", e, ok, err)
	}
}
