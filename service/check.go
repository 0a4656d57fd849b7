package service

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
)

func init() { core.RegisterCheck(ledger.KindService, checkServices) }

// checkServices compares the service maps with the services: each ready
// service's frontend, reverse NAT, backends and selection table with what
// its record compiles to, and every entry of those maps that no service
// has. A repair writes the service again (settle) and deletes the rest.
func checkServices(st *core.State, repair bool) ([]core.Drift, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindService)
	if err != nil {
		return nil, fmt.Errorf("services: %w: %w", datapath.ErrIncompatible, err)
	}
	var drift []core.Drift
	frontends := map[bpfobj.TypesLbFrontendKey]bool{}
	revnat := map[uint32]bool{}
	backends := map[uint32]bool{}
	tables := map[bpfobj.TypesLbSlotKey]bool{}
	for _, r := range recs {
		if r.ID == 0 || r.ID > 0xffff {
			continue
		}
		in, err := decodeRecord(st, r)
		if err != nil {
			drift = append(drift, core.Drift{Object: fmt.Sprintf("service %d", r.ID), What: err.Error()})
			continue
		}
		if r.State != ledger.Ready || in.rec.Gone {
			// What its record names is its own until Reconcile
			// settles it.
			drift = append(drift, core.Drift{Object: fmt.Sprintf("service %d", r.ID), What: "being changed by a process that was killed: Reconcile finishes the change"})
			for _, e := range r.Made.Entries {
				markNamed(e, frontends, revnat, backends, tables)
			}
			if len(r.Made.Sweeps) > 0 {
				revnat[r.ID] = true
				markService(st, uint16(r.ID), backends, tables)
			}
			continue
		}
		object := "service " + in.svc.Frontend.String()
		e := Compile(&in.svc, in.id, in.rec.Half, in.rec.Numbers, in.rec.Counters)
		slotKeys, slotVals := slotBlocks(&e)
		frontends[e.Key], revnat[uint32(in.id)] = true, true
		var what []string
		var fv bpfobj.TypesLbFrontend
		if err := st.Objs.LbFrontends.Lookup(&e.Key, &fv); err != nil || fv != e.Frontend {
			what = append(what, "its frontend")
		}
		var rk bpfobj.TypesLbFrontendKey
		if err := st.Objs.LbRevnat.Lookup(uint32(in.id), &rk); err != nil || rk != e.Key {
			what = append(what, "its reverse NAT")
		}
		for i, id := range e.IDs {
			backends[id] = true
			var v bpfobj.TypesLbBackend
			if err := st.Objs.LbBackends.Lookup(id, &v); err != nil || v != e.Backends[i] {
				what = append(what, fmt.Sprintf("backend %s", in.svc.Backends[i].AddrPort()))
			}
		}
		for i, k := range slotKeys {
			tables[k] = true
			var v bpfobj.TypesLbSlotBlock
			if err := st.Objs.LbSlots.Lookup(&k, &v); err != nil || v != slotVals[i] {
				what = append(what, fmt.Sprintf("block %d of its table", k.Block))
			}
		}
		if len(what) == 0 {
			continue
		}
		d := core.Drift{Object: object, What: fmt.Sprintf("missing or not as its record says: %v", what)}
		if repair {
			if err := settle(st, in, r); err != nil {
				return drift, err
			}
			d.Repaired = true
		}
		drift = append(drift, d)
	}
	strays := []struct {
		name  string
		owned func(key []byte) bool
		what  string
	}{
		{bpfobj.EndpointMapLbFrontends, func(k []byte) bool { return frontends[bytesTo[bpfobj.TypesLbFrontendKey](k)] }, "a frontend"},
		{bpfobj.EndpointMapLbRevnat, func(k []byte) bool { return revnat[bytesTo[uint32](k)] }, "a reverse NAT entry"},
		{bpfobj.EndpointMapLbBackends, func(k []byte) bool { return backends[bytesTo[uint32](k)] }, "a backend"},
		{bpfobj.EndpointMapLbSlots, func(k []byte) bool { return tables[bytesTo[bpfobj.TypesLbSlotKey](k)] }, "a selection table block"},
	}
	for _, s := range strays {
		m := st.Map(s.name)
		var keys [][]byte
		key := make([]byte, m.KeySize())
		var cur any
		for {
			err := m.NextKey(cur, key)
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				break
			}
			if err != nil {
				return drift, fmt.Errorf("read %s: %w", s.name, err)
			}
			k := append([]byte(nil), key...)
			if !s.owned(k) {
				keys = append(keys, k)
			}
			cur = k
		}
		for _, k := range keys {
			d := core.Drift{Object: s.name, What: s.what + " no service has"}
			if repair {
				if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
					return drift, err
				}
				d.Repaired = true
			}
			drift = append(drift, d)
		}
	}
	return drift, nil
}

// markNamed marks an entry a record names as owned.
func markNamed(e ledger.Entry, frontends map[bpfobj.TypesLbFrontendKey]bool, revnat, backends map[uint32]bool, tables map[bpfobj.TypesLbSlotKey]bool) {
	switch e.Map {
	case bpfobj.EndpointMapLbFrontends:
		frontends[bytesTo[bpfobj.TypesLbFrontendKey](e.Key)] = true
	case bpfobj.EndpointMapLbRevnat:
		revnat[bytesTo[uint32](e.Key)] = true
	case bpfobj.EndpointMapLbBackends:
		backends[bytesTo[uint32](e.Key)] = true
	case bpfobj.EndpointMapLbSlots:
		tables[bytesTo[bpfobj.TypesLbSlotKey](e.Key)] = true
	}
}

// markService marks every backend and table block of a service ID as
// owned: those its record names by sweeps.
func markService(st *core.State, id uint16, backends map[uint32]bool, tables map[bpfobj.TypesLbSlotKey]bool) {
	var b uint32
	var bv bpfobj.TypesLbBackend
	it := st.Objs.LbBackends.Iterate()
	for it.Next(&b, &bv) {
		if b>>16 == uint32(id) {
			backends[b] = true
		}
	}
	var k bpfobj.TypesLbSlotKey
	var kv bpfobj.TypesLbSlotBlock
	it = st.Objs.LbSlots.Iterate()
	for it.Next(&k, &kv) {
		if k.Table/2 == uint32(id) {
			tables[k] = true
		}
	}
}

// bytesTo reads a map key from its bytes.
func bytesTo[T any](b []byte) T {
	var v T
	binary.Decode(b, binary.NativeEndian, &v)
	return v
}
