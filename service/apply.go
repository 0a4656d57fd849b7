package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
)

// Changes says what Upsert did to a service's backend set.
type Changes struct {
	Created bool      // the service is new
	Added   []Backend // backends it did not have
	Changed []Backend // backends whose weight or state changed (as they are now)
	Removed []Backend // backends it no longer has (as they were)
}

// Unchanged reports whether the Upsert wrote nothing.
func (c Changes) Unchanged() bool {
	return !c.Created && len(c.Added)+len(c.Changed)+len(c.Removed) == 0
}

// SyncChanges says what Sync did, by frontend.
type SyncChanges struct {
	Added     []Frontend
	Changed   []Frontend
	Removed   []Frontend
	Unchanged int
}

// Upsert makes svc the service of its frontend, creating it or replacing
// what it was: its backend set afterwards is svc.Backends. The new backends
// and selection table are written before the frontend points at them and
// the old ones go after, so no packet sees a half-written service and a
// flow keeps its backend unless that backend was removed. Writing the same
// service again changes nothing. Bad input is ErrInvalid, and more than
// the maps hold ErrMapFull; either way the service is as it was.
func Upsert(ctx context.Context, dp *datapath.Datapath, svc Service) (Changes, error) {
	if err := svc.Validate(); err != nil {
		return Changes{}, err
	}
	svc = normalize(svc)
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return Changes{}, err
	}
	defer unlock()
	idx, err := loadIndex(st)
	if err != nil {
		return Changes{}, err
	}
	old := idx.byFrontend[svc.Frontend]
	if old != nil && equal(&old.svc, &svc) {
		return Changes{}, nil
	}
	ch, err := plan(idx, old, &svc, st.Objs.LbCounters.MaxEntries())
	if err != nil {
		st.Memo.Delete(indexKey{}) // plan reserves IDs in the index
		return Changes{}, err
	}
	if err := apply(st, idx, []*change{ch}); err != nil {
		return Changes{}, err
	}
	return backendChanges(old, svc), nil
}

// Delete removes the service of a frontend: its frontend first, so that no
// new flow reaches it, then its backends and table. A flow it had gets no
// reverse translation after. Deleting a service that is not there is
// ErrNotFound.
func Delete(ctx context.Context, dp *datapath.Datapath, fe Frontend) error {
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return err
	}
	defer unlock()
	idx, err := loadIndex(st)
	if err != nil {
		return err
	}
	old := idx.byFrontend[fe]
	if old == nil {
		return fmt.Errorf("service %s: %w", fe, datapath.ErrNotFound)
	}
	return apply(st, idx, []*change{{old: old}})
}

// Sync makes all the datapath's services: each one given is upserted,
// each one the datapath has and all does not name is deleted. Only the
// difference is written, with batch map operations, in the order Upsert
// writes: a controller hands over its whole desired state, at start and
// after every change, and nothing that is right already is rewritten. Bad
// input (an invalid service, a frontend twice) is ErrInvalid and changes
// nothing; so does ErrMapFull.
func Sync(ctx context.Context, dp *datapath.Datapath, all []Service) (SyncChanges, error) {
	want := make([]Service, len(all))
	seen := make(map[Frontend]bool, len(all))
	for i := range all {
		if err := all[i].Validate(); err != nil {
			return SyncChanges{}, err
		}
		if seen[all[i].Frontend] {
			return SyncChanges{}, fmt.Errorf("service %s twice: %w", all[i].Frontend, datapath.ErrInvalid)
		}
		seen[all[i].Frontend] = true
		want[i] = normalize(all[i])
	}
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return SyncChanges{}, err
	}
	defer unlock()
	idx, err := loadIndex(st)
	if err != nil {
		return SyncChanges{}, err
	}
	var out SyncChanges
	var chs []*change
	for i := range want {
		old := idx.byFrontend[want[i].Frontend]
		if old != nil && equal(&old.svc, &want[i]) {
			out.Unchanged++
			continue
		}
		ch, err := plan(idx, old, &want[i], st.Objs.LbCounters.MaxEntries())
		if err != nil {
			st.Memo.Delete(indexKey{}) // plan reserves IDs in the index
			return SyncChanges{}, err
		}
		chs = append(chs, ch)
		if old == nil {
			out.Added = append(out.Added, want[i].Frontend)
		} else {
			out.Changed = append(out.Changed, want[i].Frontend)
		}
	}
	for fe, in := range idx.byFrontend {
		if !seen[fe] {
			chs = append(chs, &change{old: in})
			out.Removed = append(out.Removed, fe)
		}
	}
	if len(chs) == 0 {
		return out, nil
	}
	if err := apply(st, idx, chs); err != nil {
		return SyncChanges{}, err
	}
	for _, l := range [][]Frontend{out.Added, out.Changed, out.Removed} {
		slices.SortFunc(l, compareFrontends)
	}
	return out, nil
}

// Get returns the service of a frontend, or ErrNotFound. Its backends are
// sorted by address and port.
func Get(dp *datapath.Datapath, fe Frontend) (Service, error) {
	_, idx, release, err := readIndex(dp)
	if err != nil {
		return Service{}, err
	}
	defer release()
	in := idx.byFrontend[fe]
	if in == nil {
		return Service{}, fmt.Errorf("service %s: %w", fe, datapath.ErrNotFound)
	}
	return clone(in.svc), nil
}

// List returns every service of the datapath, sorted by frontend.
func List(dp *datapath.Datapath) ([]Service, error) {
	_, idx, release, err := readIndex(dp)
	if err != nil {
		return nil, err
	}
	defer release()
	out := make([]Service, 0, len(idx.byFrontend))
	for _, in := range idx.byFrontend {
		out = append(out, clone(in.svc))
	}
	slices.SortFunc(out, func(a, b Service) int { return compareFrontends(a.Frontend, b.Frontend) })
	return out, nil
}

// BackendCounters are a backend's counters since it joined its service:
// packets and bytes translated to it per packet (the tc level), and new
// flows sent to it at either level (a socket-level connection is one).
type BackendCounters struct {
	Backend netip.AddrPort
	Packets uint64
	Bytes   uint64
	Flows   uint64
}

// ReadCounters returns the counters of every backend of a service, in the
// order Get gives its backends.
func ReadCounters(dp *datapath.Datapath, fe Frontend) ([]BackendCounters, error) {
	st, idx, release, err := readIndex(dp)
	if err != nil {
		return nil, err
	}
	defer release()
	in := idx.byFrontend[fe]
	if in == nil {
		return nil, fmt.Errorf("service %s: %w", fe, datapath.ErrNotFound)
	}
	out := make([]BackendCounters, len(in.svc.Backends))
	for i, b := range in.svc.Backends {
		out[i].Backend = b.AddrPort()
		var per []bpfobj.TypesLbBackendCounters
		if err := st.Objs.LbCounters.Lookup(in.rec.Counters[i], &per); err != nil {
			return nil, fmt.Errorf("counters of %s: %w", b.AddrPort(), err)
		}
		for _, c := range per {
			out[i].Packets += c.Packets
			out[i].Bytes += c.Bytes
			out[i].Flows += c.Flows
		}
	}
	return out, nil
}

// readIndex is loadIndex for a reader. Changes update the index in place,
// so a reader holds the lock; a read-only handle changes nothing and needs
// none.
func readIndex(dp *datapath.Datapath) (*core.State, *index, func(), error) {
	// Readers share the lock: they exclude only a change half-made.
	st := core.Of(dp)
	release, err := st.ReadLock(context.Background())
	if err != nil {
		return nil, nil, nil, err
	}
	idx, err := loadIndex(st)
	if err != nil {
		release()
		return nil, nil, nil, err
	}
	return st, idx, release, nil
}

func normalize(s Service) Service {
	s = clone(s)
	slices.SortFunc(s.Backends, func(a, b Backend) int { return a.AddrPort().Compare(b.AddrPort()) })
	if s.Backends == nil {
		s.Backends = []Backend{}
	}
	return s
}

// equal reports whether two normalized services are the same.
func equal(a, b *Service) bool {
	return a.Frontend == b.Frontend && a.Algorithm == b.Algorithm && a.MaglevSize == b.MaglevSize &&
		a.Affinity == b.Affinity && a.Reach == b.Reach && a.NoBackend == b.NoBackend &&
		slices.Equal(a.Backends, b.Backends)
}

func clone(s Service) Service {
	s.Backends = slices.Clone(s.Backends)
	return s
}

func compareFrontends(a, b Frontend) int {
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c
	}
	if a.Port != b.Port {
		return int(a.Port) - int(b.Port)
	}
	return int(a.Protocol) - int(b.Protocol)
}

func backendChanges(old *installed, svc Service) Changes {
	var c Changes
	was := map[netip.AddrPort]Backend{}
	if old == nil {
		c.Created = true
	} else {
		for _, b := range old.svc.Backends {
			was[b.AddrPort()] = b
		}
	}
	for _, b := range svc.Backends {
		o, ok := was[b.AddrPort()]
		switch {
		case !ok:
			c.Added = append(c.Added, b)
		case o != b:
			c.Changed = append(c.Changed, b)
		}
		delete(was, b.AddrPort())
	}
	for _, b := range old.backendsOrNil() {
		if _, ok := was[b.AddrPort()]; ok {
			c.Removed = append(c.Removed, b)
		}
	}
	return c
}

func (in *installed) backendsOrNil() []Backend {
	if in == nil {
		return nil
	}
	return in.svc.Backends
}

// change is one service's part of an apply: old is what the maps hold
// (nil: a new service), new what they will (nil: delete it).
type change struct {
	old, new *installed
	entries  Entries
	dirty    []uint32 // counter indexes of new backends that others used: zeroed first
}

// plan makes the change that turns old into svc: the service keeps its ID
// and its backends their numbers and counters (of which the datapath has
// counters), and the new table goes in the half not in use.
func plan(idx *index, old *installed, svc *Service, counters uint32) (*change, error) {
	in := &installed{svc: *svc}
	if old != nil {
		in.id = old.id
		in.rec.Half = 1 - old.rec.Half
	} else {
		id, ok := idx.newID()
		if !ok {
			return nil, fmt.Errorf("service %s: every service ID is taken: %w", svc.Frontend, datapath.ErrMapFull)
		}
		in.id = id
	}
	var ok bool
	var dirty []uint32
	in.rec.Numbers, in.rec.Counters, dirty, in.rec.Next, ok = idx.assign(old, svc, counters)
	if !ok {
		return nil, fmt.Errorf("service %s: %d backends, the datapath holds %d: %w", svc.Frontend, idx.backends+len(svc.Backends), counters, datapath.ErrMapFull)
	}
	e := Compile(svc, in.id, in.rec.Half, in.rec.Numbers, in.rec.Counters)
	in.rec.Slots = uint32(len(e.Slots))
	// A new service whose ID this plan took is not in the index yet: the
	// next newID must not give it again.
	if old == nil {
		idx.byID[in.id] = in
	}
	return &change{old: old, new: in, entries: e, dirty: dirty}, nil
}

// apply makes the changes, in batches, in this order: ledger records
// (naming what will be written, so a killed process's half-done work is
// undone whole), the new backends and tables, the frontends (each flips to
// its new table at once), then what the old ones had and no longer need,
// then the records as ready. A failure before the frontends flip takes
// back what was written.
func apply(st *core.State, idx *index, chs []*change) (err error) {
	// IDs planned for new services were reserved in the index; they
	// are released if this fails.
	defer func() {
		if err != nil {
			st.Memo.Delete(indexKey{})
		}
	}()
	if err := checkRoom(st, idx, chs); err != nil {
		return err
	}
	var (
		records []*ledger.Record
		undo    []func()
	)
	rollback := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	// 1. Records, as creating.
	for _, ch := range chs {
		in, old := ch.new, ch.old
		if in == nil {
			in, old = ch.old, nil
		}
		r, blob, err := ledgerRecord(in, old, ledger.Creating)
		if err != nil {
			return err
		}
		if blob != nil {
			if err := ledger.PutBlob(st.Objs.LedgerBlobs, ledger.KindService, uint32(in.id), blob, nil); err != nil {
				return err
			}
		}
		records = append(records, r)
	}
	if err := ledger.PutBatch(st.Objs.Ledger, records); err != nil {
		return err
	}
	undo = append(undo, func() { restoreRecords(st, chs) })

	// 2. Backends, tables and reverse NAT.
	var (
		bKeys    []uint32
		bVals    []bpfobj.TypesLbBackend
		bOld     []bpfobj.TypesLbBackend
		bOldKeys []uint32
		bNewKeys []uint32
		sKeys    []bpfobj.TypesLbSlotKey
		sVals    []bpfobj.TypesLbSlotBlock
		rKeys    []uint32
		rVals    []bpfobj.TypesLbFrontendKey
		fKeys    []bpfobj.TypesLbFrontendKey
		fVals    []bpfobj.TypesLbFrontend
	)
	for _, ch := range chs {
		if ch.new == nil {
			continue
		}
		was := map[uint32]bpfobj.TypesLbBackend{}
		if ch.old != nil {
			for i, v := range backendValues(ch.old) {
				was[backendID(ch.old.id, ch.old.rec.Numbers[i])] = v
			}
		}
		for i, v := range ch.entries.Backends {
			id := ch.entries.IDs[i]
			o, ok := was[id]
			if ok && o == v {
				continue
			}
			bKeys = append(bKeys, id)
			bVals = append(bVals, v)
			if ok {
				bOldKeys = append(bOldKeys, id)
				bOld = append(bOld, o)
			} else {
				bNewKeys = append(bNewKeys, id)
			}
		}
		for slot, id := range ch.entries.Slots {
			if slot%slotBlock == 0 {
				sKeys = append(sKeys, bpfobj.TypesLbSlotKey{Table: ch.entries.Frontend.Table, Block: uint32(slot / slotBlock)})
				sVals = append(sVals, bpfobj.TypesLbSlotBlock{})
			}
			sVals[len(sVals)-1].Backend[slot%slotBlock] = id
		}
		if ch.old == nil {
			rKeys = append(rKeys, uint32(ch.new.id))
			rVals = append(rVals, ch.entries.Key)
		}
		fKeys = append(fKeys, ch.entries.Key)
		fVals = append(fVals, ch.entries.Frontend)
	}
	full := func(err error, what string) error {
		rollback()
		return core.MapError(err, datapath.ErrMapFull, what)
	}
	// A counter index a new backend gets may have been another's.
	var fresh []uint32
	for _, ch := range chs {
		fresh = append(fresh, ch.dirty...)
	}
	if len(fresh) > 0 {
		zero := make([]bpfobj.TypesLbBackendCounters, len(fresh)*ebpf.MustPossibleCPU())
		if _, err := st.Objs.LbCounters.BatchUpdate(fresh, zero, nil); err != nil {
			return full(err, "zero backend counters")
		}
	}
	if err := batchUpdate(st.Objs.LbBackends, bKeys, bVals); err != nil {
		return full(err, "write backends")
	}
	undo = append(undo, func() {
		batchDelete(st.Objs.LbBackends, bNewKeys)
		batchUpdate(st.Objs.LbBackends, bOldKeys, bOld)
	})
	if err := batchUpdate(st.Objs.LbSlots, sKeys, sVals); err != nil {
		return full(err, "write selection tables")
	}
	undo = append(undo, func() { batchDelete(st.Objs.LbSlots, sKeys) })
	if err := batchUpdate(st.Objs.LbRevnat, rKeys, rVals); err != nil {
		return full(err, "write reverse NAT")
	}
	undo = append(undo, func() { batchDelete(st.Objs.LbRevnat, rKeys) })

	// 3. The frontends flip, or go.
	if err := batchUpdate(st.Objs.LbFrontends, fKeys, fVals); err != nil {
		return full(err, "write frontends")
	}
	var dKeys []bpfobj.TypesLbFrontendKey
	for _, ch := range chs {
		if ch.new == nil {
			dKeys = append(dKeys, frontendKey(ch.old.svc.Frontend))
		}
	}
	if err := batchDelete(st.Objs.LbFrontends, dKeys); err != nil {
		return fmt.Errorf("delete frontends: %w", err)
	}

	// 4. What the old services held and the new ones do not.
	var (
		oldSlots    []bpfobj.TypesLbSlotKey
		oldBackends []uint32
		oldRevnat   []uint32
		ready       []*ledger.Record
	)
	for _, ch := range chs {
		if ch.old != nil {
			table := 2*uint32(ch.old.id) + ch.old.rec.Half
			for block := range blocks(int(ch.old.rec.Slots)) {
				oldSlots = append(oldSlots, bpfobj.TypesLbSlotKey{Table: table, Block: uint32(block)})
			}
			keep := map[uint32]bool{}
			if ch.new != nil {
				for _, id := range ch.entries.IDs {
					keep[id] = true
				}
			} else {
				oldRevnat = append(oldRevnat, uint32(ch.old.id))
			}
			for _, n := range ch.old.rec.Numbers {
				if id := backendID(ch.old.id, n); !keep[id] {
					oldBackends = append(oldBackends, id)
				}
			}
		}
	}
	var errs []error
	errs = append(errs, batchDelete(st.Objs.LbSlots, oldSlots), batchDelete(st.Objs.LbBackends, oldBackends), batchDelete(st.Objs.LbRevnat, oldRevnat))

	// 5. Records: ready, or gone.
	for i, ch := range chs {
		if ch.old != nil {
			idx.remove(ch.old)
		}
		if ch.new == nil {
			errs = append(errs, ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindService, uint32(ch.old.id)),
				ledger.Delete(st.Objs.Ledger, ledger.KindService, uint32(ch.old.id)))
			continue
		}
		idx.add(ch.new)
		r := *records[i] // as written in step 1, but ready
		r.State = ledger.Ready
		ready = append(ready, &r)
	}
	errs = append(errs, ledger.PutBatch(st.Objs.Ledger, ready))
	idx.shared.Generation = rand.Uint64() // not a count: see sharedRecord
	idx.shared.Version = recordVersion
	obj, _ := json.Marshal(idx.shared)
	errs = append(errs, ledger.Put(st.Objs.Ledger, &ledger.Record{Kind: ledger.KindService, ID: 0, State: ledger.Ready, Object: obj}))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("services: %w", err)
	}
	st.Memo.Store(indexKey{}, idx)
	return nil
}

// slotBlock is how many slots one lb_slots entry holds (LB_SLOT_BLOCK).
const slotBlock = len(bpfobj.TypesLbSlotBlock{}.Backend)

// blocks is how many lb_slots entries a table of n slots takes.
func blocks(n int) int { return (n + slotBlock - 1) / slotBlock }

// checkRoom fails with ErrMapFull when the maps cannot hold the changes at
// their peak, when old and new tables are both written.
func checkRoom(st *core.State, idx *index, chs []*change) error {
	frontends, backends, slots := len(idx.byFrontend), idx.backends, idx.slots
	for _, ch := range chs {
		if ch.new == nil {
			continue
		}
		if ch.old == nil {
			frontends++
		}
		// A backend it keeps is the same entry; a new one is added
		// before the removed ones go.
		backends += len(ch.new.svc.Backends)
		if ch.old != nil {
			backends -= kept(ch.old, ch.new)
		}
		slots += blocks(len(ch.entries.Slots))
	}
	for _, c := range []struct {
		m    *ebpf.Map
		n    int
		what string
	}{
		{st.Objs.LbFrontends, frontends, "services"},
		{st.Objs.LbBackends, backends, "backends"},
		{st.Objs.LbSlots, slots, "blocks of selection slots"},
	} {
		if c.n > int(c.m.MaxEntries()) {
			return fmt.Errorf("%d %s, the datapath holds %d: %w", c.n, c.what, c.m.MaxEntries(), datapath.ErrMapFull)
		}
	}
	return nil
}

// kept is how many backends of old the new service keeps.
func kept(old, new *installed) int {
	n := 0
	for _, b := range new.rec.Numbers {
		if slices.Contains(old.rec.Numbers, b) {
			n++
		}
	}
	return n
}

// restoreRecords puts back the records the changes had before.
func restoreRecords(st *core.State, chs []*change) {
	for _, ch := range chs {
		if ch.old == nil {
			ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindService, uint32(ch.new.id))
			ledger.Delete(st.Objs.Ledger, ledger.KindService, uint32(ch.new.id))
			continue
		}
		if r, blob, err := ledgerRecord(ch.old, nil, ledger.Ready); err == nil {
			if blob != nil {
				ledger.PutBlob(st.Objs.LedgerBlobs, ledger.KindService, uint32(ch.old.id), blob, nil)
			}
			ledger.Put(st.Objs.Ledger, r)
		}
	}
}

// backendValue is backend b's lb_backends value, as service id's, counted
// at counter.
func backendValue(b Backend, id uint16, counter uint32) bpfobj.TypesLbBackend {
	return bpfobj.TypesLbBackend{
		Addr:    addr16(b.Addr),
		Port:    htons(b.Port),
		Family:  family(b.Addr),
		State:   uint8(b.State),
		Weight:  b.Weight,
		Service: uint32(id),
		Counter: counter,
	}
}

// backendValues is the lb_backends values of an installed service.
func backendValues(in *installed) []bpfobj.TypesLbBackend {
	out := make([]bpfobj.TypesLbBackend, len(in.svc.Backends))
	for i, b := range in.svc.Backends {
		out[i] = backendValue(b, in.id, in.rec.Counters[i])
	}
	return out
}

func batchUpdate[K, V any](m *ebpf.Map, keys []K, vals []V) error {
	if len(keys) == 0 {
		return nil
	}
	_, err := m.BatchUpdate(keys, vals, nil)
	return err
}

func batchDelete[K any](m *ebpf.Map, keys []K) error {
	if len(keys) == 0 {
		return nil
	}
	_, err := m.BatchDelete(keys, nil)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		// Some were gone already: delete the rest one by one.
		for _, k := range keys {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return err
			}
		}
		return nil
	}
	return err
}
