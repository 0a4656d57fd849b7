package ipcache_test

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/testutil"
)

func newIPCache(t *testing.T) *ebpf.Map {
	t.Helper()
	testutil.Privileged(t)
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		t.Fatal(err)
	}
	ms := spec.Maps[bpfobj.EndpointMapIpcache].Copy()
	ms.Pinning = ebpf.PinNone
	m, err := ebpf.NewMap(ms)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// One writer per prefix: another source can neither replace nor remove it.
func TestOwnership(t *testing.T) {
	m := newIPCache(t)
	p := netip.MustParsePrefix("198.18.1.10/32")
	if err := ipcache.Put(m, p, ipcache.Entry{Identity: 1000, Ifindex: 7}, ipcache.Endpoint); err != nil {
		t.Fatal(err)
	}
	if err := ipcache.Put(m, p, ipcache.Entry{Identity: 9}, ipcache.Identity); !errors.Is(err, ipcache.ErrOwned) {
		t.Errorf("another source's Put: %v, want ErrOwned", err)
	}
	if err := ipcache.DeleteKey(m, ipcache.KeyBytes(p), ipcache.Node); err != nil {
		t.Error(err)
	}
	e, ok, err := ipcache.Lookup(m, p)
	if err != nil || !ok || e.Identity != 1000 || ipcache.Source(e.Source) != ipcache.Endpoint {
		t.Fatalf("entry after another source's writes: %+v %v %v", e, ok, err)
	}
	if err := ipcache.Put(m, p, ipcache.Entry{Identity: 1001, Ifindex: 7}, ipcache.Endpoint); err != nil {
		t.Errorf("its own source's replace: %v", err)
	}
	if e, _, _ := ipcache.Lookup(m, p); e.Identity != 1001 {
		t.Errorf("identity %d after the replace, want 1001", e.Identity)
	}
	// A covering prefix of another source is no conflict.
	if err := ipcache.Put(m, netip.MustParsePrefix("198.18.0.0/15"), ipcache.Entry{Identity: 5}, ipcache.Node); err != nil {
		t.Errorf("a covering prefix: %v", err)
	}
	if err := ipcache.DeleteKey(m, ipcache.KeyBytes(p), ipcache.Endpoint); err != nil {
		t.Error(err)
	}
	if _, ok, _ := ipcache.Lookup(m, p); ok {
		t.Error("its own source's delete left the entry")
	}
}
