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
	"github.com/sluicedp/sluice/internal/txn"
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
// flow keeps its backend unless that backend was removed. A UDP socket
// the socket programs connected to a removed backend is closed, on Linux
// 6.5 and later (its next receive fails with ECONNABORTED, and it connects
// again); on older kernels it keeps sending to the address it has.
// Writing the same service again changes nothing. Bad input is
// ErrInvalid, another owner's frontend ErrExists, and more than the maps
// hold ErrMapFull; in each case the service is as it was.
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
	idx, err := loadSettled(st)
	if err != nil {
		return Changes{}, err
	}
	old := idx.byFrontend[svc.Frontend]
	if old != nil && equal(&old.svc, &svc) {
		return Changes{}, nil
	}
	if err := checkOwner(old, svc.Owner); err != nil {
		return Changes{}, err
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
// reverse translation after. It names the service, so it removes it
// whatever its owner. Deleting a service that is not there is ErrNotFound.
func Delete(ctx context.Context, dp *datapath.Datapath, fe Frontend) error {
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return err
	}
	defer unlock()
	idx, err := loadSettled(st)
	if err != nil {
		return err
	}
	old := idx.byFrontend[fe]
	if old == nil {
		return fmt.Errorf("service %s: %w", fe, datapath.ErrNotFound)
	}
	return apply(st, idx, []*change{{old: old}})
}

// Sync makes all the services of an owner: each one given is upserted,
// and each one the owner has and all does not name is deleted. Services
// of other owners are not touched, and all may not name their frontends
// (ErrExists). Only the difference is written, with batch map operations,
// in the order Upsert writes: a controller hands over its whole desired
// state, at start and after every change, and nothing that is right
// already is rewritten. Each service of all is the owner's: its Owner is
// set to owner, and another one there is ErrInvalid. Bad input (an invalid
// service, a frontend twice) is ErrInvalid and changes nothing; so do
// ErrExists and ErrMapFull.
func Sync(ctx context.Context, dp *datapath.Datapath, owner string, all []Service) (SyncChanges, error) {
	if len(owner) > maxOwner {
		return SyncChanges{}, fmt.Errorf("owner of %d bytes: at most %d: %w", len(owner), maxOwner, datapath.ErrInvalid)
	}
	want := make([]Service, len(all))
	seen := make(map[Frontend]bool, len(all))
	for i := range all {
		if all[i].Owner != "" && all[i].Owner != owner {
			return SyncChanges{}, fmt.Errorf("service %s: owner %q in a Sync of owner %q: %w", all[i].Frontend, all[i].Owner, owner, datapath.ErrInvalid)
		}
		if err := all[i].Validate(); err != nil {
			return SyncChanges{}, err
		}
		if seen[all[i].Frontend] {
			return SyncChanges{}, fmt.Errorf("service %s twice: %w", all[i].Frontend, datapath.ErrInvalid)
		}
		seen[all[i].Frontend] = true
		want[i] = normalize(all[i])
		want[i].Owner = owner
	}
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return SyncChanges{}, err
	}
	defer unlock()
	idx, err := loadSettled(st)
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
		if err := checkOwner(old, owner); err != nil {
			st.Memo.Delete(indexKey{}) // plan reserves IDs in the index
			return SyncChanges{}, err
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
		if !seen[fe] && in.svc.Owner == owner {
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

// checkOwner fails with ErrExists when the service there is another
// owner's.
func checkOwner(there *installed, owner string) error {
	if there != nil && there.svc.Owner != owner {
		return fmt.Errorf("service %s is owner %q's, not %q's: %w", there.svc.Frontend, there.svc.Owner, owner, datapath.ErrExists)
	}
	return nil
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
	return countersOf(st, in)
}

// ReadAllCounters returns the counters of every backend of every service,
// by frontend: ReadCounters of each, in one pass.
func ReadAllCounters(dp *datapath.Datapath) (map[Frontend][]BackendCounters, error) {
	st, idx, release, err := readIndex(dp)
	if err != nil {
		return nil, err
	}
	defer release()
	out := make(map[Frontend][]BackendCounters, len(idx.byFrontend))
	for fe, in := range idx.byFrontend {
		if out[fe], err = countersOf(st, in); err != nil {
			return nil, fmt.Errorf("service %s: %w", fe, err)
		}
	}
	return out, nil
}

// countersOf reads the counters of an installed service's backends.
func countersOf(st *core.State, in *installed) ([]BackendCounters, error) {
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
		a.Affinity == b.Affinity && a.Reach == b.Reach && a.NoBackend == b.NoBackend && a.Owner == b.Owner &&
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

// apply makes the changes, in batches, as one transaction (internal/txn)
// of these phases:
//
//   - intent: the shared record with a new generation (every handle's memo
//     is stale from here), and each service's record, Creating, holding its
//     old version and naming the entries of both (undo: the records as
//     they were);
//   - counters, backends, tables, revnat: the new backends, selection
//     tables and reverse NAT, beside the old ones (undo: deleted, the old
//     values written back);
//   - frontends: each frontend flips to its new table at once, or goes
//     (undo: the old frontends written back);
//   - flip: each record holds the new version: the change is made;
//   - cleanup: what the old versions had and the new ones do not, deleted;
//   - ready: the records Ready, naming only their own entries.
//
// A process killed at any point leaves records that Reconcile, or the
// next change, makes the maps agree with: the old version before flip,
// the new one after (repairServices).
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
	for _, ch := range chs {
		if ch.new != nil && ch.old != nil {
			ch.new.rec.Slot = 1 - ch.old.rec.Slot // the old blob stays whole
		}
	}
	b := batchesOf(chs)
	var frontendsWere []bpfobj.TypesLbFrontend
	err = txn.Run("service",
		txn.Phase{
			Name: "intent",
			Do: func() error {
				idx.shared.Generation = rand.Uint64() // not a count: see sharedRecord
				if err := putShared(st, idx.shared); err != nil {
					return err
				}
				return putRecords(st, chs, ledger.Creating, false)
			},
			Undo: func() error { return restoreRecords(st, chs) },
		},
		txn.Phase{
			Name: "counters",
			// A counter index a new backend gets may have been
			// another's.
			Do: func() error {
				if len(b.counters) == 0 {
					return nil
				}
				zero := make([]bpfobj.TypesLbBackendCounters, len(b.counters)*ebpf.MustPossibleCPU())
				_, err := st.Objs.LbCounters.BatchUpdate(b.counters, zero, nil)
				return mapError(err, "zero backend counters")
			},
		},
		txn.Phase{
			Name: "backends",
			Do: func() error {
				return mapError(batchUpdate(st.Objs.LbBackends, b.backendKeys, b.backendVals), "write backends")
			},
			Undo: func() error {
				return errors.Join(batchDelete(st.Objs.LbBackends, b.addedBackends), batchUpdate(st.Objs.LbBackends, b.changedBackends, b.changedWere))
			},
		},
		txn.Phase{
			Name: "tables",
			Do: func() error {
				return mapError(batchUpdate(st.Objs.LbSlots, b.slotKeys, b.slotVals), "write selection tables")
			},
			Undo: func() error { return batchDelete(st.Objs.LbSlots, b.slotKeys) },
		},
		txn.Phase{
			Name: "revnat",
			Do: func() error {
				return mapError(batchUpdate(st.Objs.LbRevnat, b.revnatKeys, b.revnatVals), "write reverse NAT")
			},
			Undo: func() error { return batchDelete(st.Objs.LbRevnat, b.revnatKeys) },
		},
		txn.Phase{
			Name: "frontends",
			Do: func() error {
				frontendsWere = b.frontendsWere()
				if err := batchUpdate(st.Objs.LbFrontends, b.frontendKeys, b.frontendVals); err != nil {
					return mapError(err, "write frontends")
				}
				txn.Crash("service/frontends/half")
				return batchDelete(st.Objs.LbFrontends, b.goneFrontends)
			},
			Undo: func() error {
				return errors.Join(
					batchDelete(st.Objs.LbFrontends, b.addedFrontends),
					batchUpdate(st.Objs.LbFrontends, b.changedFrontends, frontendsWere),
				)
			},
		},
		txn.Phase{
			Name: "flip",
			Do:   func() error { return putRecords(st, chs, ledger.Creating, true) },
		},
		txn.Phase{
			Name:  "cleanup",
			After: true,
			Do: func() error {
				return errors.Join(batchDelete(st.Objs.LbSlots, b.oldSlots), batchDelete(st.Objs.LbBackends, b.oldBackends), batchDelete(st.Objs.LbRevnat, b.oldRevnat))
			},
		},
		txn.Phase{
			Name:  "ready",
			After: true,
			Do: func() error {
				var errs []error
				for _, ch := range chs {
					if ch.new == nil {
						// Gone: its frontend, and now all the rest.
						errs = append(errs, ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindService, blobID(ch.old.id, 0)),
							ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindService, blobID(ch.old.id, 1)),
							ledger.Delete(st.Objs.Ledger, ledger.KindService, uint32(ch.old.id)))
					} else if ch.old != nil && ch.old.rec.Blobbed {
						errs = append(errs, ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindService, blobID(ch.old.id, ch.old.rec.Slot)))
					}
				}
				return errors.Join(append(errs, putRecords(st, chs, ledger.Ready, true))...)
			},
		},
	)
	if err != nil {
		return fmt.Errorf("services: %w", err)
	}
	for _, ch := range chs {
		if ch.old != nil {
			idx.remove(ch.old)
		}
		if ch.new != nil {
			idx.add(ch.new)
		}
	}
	st.Memo.Store(indexKey{}, idx)
	// Connected UDP sockets that the socket programs sent to a backend
	// that left would keep sending to it: close them. The change is made
	// whatever comes of it; before Linux 6.5 (ErrNotSupported) the sockets
	// stay, and fail once the backend is gone.
	var leaving []core.SocketTarget
	for _, ch := range chs {
		if ch.old != nil {
			var now *Service
			if ch.new != nil {
				now = &ch.new.svc
			}
			leaving = append(leaving, socketTargets(&ch.old.svc, now)...)
		}
	}
	if len(leaving) > 0 {
		st.DestroySockets(leaving)
	}
	return nil
}

// mapError turns a full map into ErrMapFull.
func mapError(err error, what string) error {
	if err == nil {
		return nil
	}
	return core.MapError(err, datapath.ErrMapFull, what)
}

// putShared writes the record all services share.
func putShared(st *core.State, shared sharedRecord) error {
	shared.Version = recordVersion
	obj, err := json.Marshal(shared)
	if err != nil {
		return err
	}
	return mapError(ledger.Put(st.Objs.Ledger, &ledger.Record{Kind: ledger.KindService, ID: 0, State: ledger.Ready, Object: obj}), "services")
}

// putRecords writes the records of the changes, in state: holding the old
// versions, or, with flipped, the new ones (a service deleted: gone). A
// Creating record names the entries of both versions, a Ready one its
// own.
func putRecords(st *core.State, chs []*change, state ledger.State, flipped bool) error {
	records := make([]*ledger.Record, 0, len(chs))
	for _, ch := range chs {
		holds, also := ch.old, ch.new
		if flipped {
			holds, also = ch.new, ch.old
		}
		if state == ledger.Ready {
			also = nil
			if holds == nil {
				continue // deleted with its blobs
			}
		}
		named := holds
		if named == nil {
			named = also
		}
		r, blob, err := ledgerRecord(named.id, named, also, state, holds == nil)
		if err != nil {
			return err
		}
		// The old version's blob is in place already; the new one's is
		// written at the flip, into the slot the old one does not use.
		if blob != nil && flipped && state == ledger.Creating {
			if err := ledger.PutBlob(st.Objs.LedgerBlobs, ledger.KindService, blobID(named.id, named.rec.Slot), blob, nil); err != nil {
				return mapError(err, fmt.Sprintf("record of service %s", named.svc.Frontend))
			}
		}
		records = append(records, r)
	}
	return mapError(ledger.PutBatch(st.Objs.Ledger, records), "service records")
}

// restoreRecords puts back the records the changes had before: the old
// version, Ready, or none for a new service.
func restoreRecords(st *core.State, chs []*change) error {
	var errs []error
	for _, ch := range chs {
		if ch.old == nil {
			errs = append(errs,
				ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindService, blobID(ch.new.id, ch.new.rec.Slot)),
				ledger.Delete(st.Objs.Ledger, ledger.KindService, uint32(ch.new.id)))
			continue
		}
		if ch.new != nil && ch.new.rec.Slot != ch.old.rec.Slot {
			errs = append(errs, ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindService, blobID(ch.new.id, ch.new.rec.Slot)))
		}
		r, _, err := ledgerRecord(ch.old.id, ch.old, nil, ledger.Ready, false)
		if err == nil {
			err = ledger.Put(st.Objs.Ledger, r)
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// batches are the map writes of an apply.
type batches struct {
	counters               []uint32 // counter indexes to zero
	backendKeys            []uint32
	backendVals            []bpfobj.TypesLbBackend
	addedBackends          []uint32 // of backendKeys, those that are new
	changedBackends        []uint32 // and those written over
	changedWere            []bpfobj.TypesLbBackend
	slotKeys               []bpfobj.TypesLbSlotKey
	slotVals               []bpfobj.TypesLbSlotBlock
	revnatKeys             []uint32
	revnatVals             []bpfobj.TypesLbFrontendKey
	frontendKeys           []bpfobj.TypesLbFrontendKey
	frontendVals           []bpfobj.TypesLbFrontend
	addedFrontends         []bpfobj.TypesLbFrontendKey // of frontendKeys, those that are new
	changedFrontends       []bpfobj.TypesLbFrontendKey // those written over, and the deleted
	changedOld             []*installed                // whose old versions these are
	goneFrontends          []bpfobj.TypesLbFrontendKey
	oldSlots               []bpfobj.TypesLbSlotKey // what the old versions had and the new do not
	oldBackends, oldRevnat []uint32
}

// frontendsWere is the old versions' frontend values, to write back.
func (b *batches) frontendsWere() []bpfobj.TypesLbFrontend {
	out := make([]bpfobj.TypesLbFrontend, len(b.changedOld))
	for i, in := range b.changedOld {
		out[i] = Compile(&in.svc, in.id, in.rec.Half, in.rec.Numbers, in.rec.Counters).Frontend
	}
	return out
}

// slotBlocks is a service's selection table as lb_slots entries.
func slotBlocks(e *Entries) ([]bpfobj.TypesLbSlotKey, []bpfobj.TypesLbSlotBlock) {
	var keys []bpfobj.TypesLbSlotKey
	var vals []bpfobj.TypesLbSlotBlock
	for slot, id := range e.Slots {
		if slot%slotBlock == 0 {
			keys = append(keys, bpfobj.TypesLbSlotKey{Table: e.Frontend.Table, Block: uint32(slot / slotBlock)})
			vals = append(vals, bpfobj.TypesLbSlotBlock{})
		}
		vals[len(vals)-1].Backend[slot%slotBlock] = id
	}
	return keys, vals
}

// batchesOf computes the map writes of the changes.
func batchesOf(chs []*change) *batches {
	b := &batches{}
	for _, ch := range chs {
		b.counters = append(b.counters, ch.dirty...)
		if ch.old != nil {
			b.changedFrontends = append(b.changedFrontends, frontendKey(ch.old.svc.Frontend))
			b.changedOld = append(b.changedOld, ch.old)
			table := 2*uint32(ch.old.id) + ch.old.rec.Half
			for block := range blocks(int(ch.old.rec.Slots)) {
				b.oldSlots = append(b.oldSlots, bpfobj.TypesLbSlotKey{Table: table, Block: uint32(block)})
			}
			keep := map[uint32]bool{}
			if ch.new != nil {
				for _, id := range ch.entries.IDs {
					keep[id] = true
				}
			} else {
				b.oldRevnat = append(b.oldRevnat, uint32(ch.old.id))
				b.goneFrontends = append(b.goneFrontends, frontendKey(ch.old.svc.Frontend))
			}
			for _, n := range ch.old.rec.Numbers {
				if id := backendID(ch.old.id, n); !keep[id] {
					b.oldBackends = append(b.oldBackends, id)
				}
			}
		}
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
			b.backendKeys = append(b.backendKeys, id)
			b.backendVals = append(b.backendVals, v)
			if ok {
				b.changedBackends = append(b.changedBackends, id)
				b.changedWere = append(b.changedWere, o)
			} else {
				b.addedBackends = append(b.addedBackends, id)
			}
		}
		keys, vals := slotBlocks(&ch.entries)
		b.slotKeys, b.slotVals = append(b.slotKeys, keys...), append(b.slotVals, vals...)
		if ch.old == nil {
			b.revnatKeys = append(b.revnatKeys, uint32(ch.new.id))
			b.revnatVals = append(b.revnatVals, ch.entries.Key)
			b.addedFrontends = append(b.addedFrontends, ch.entries.Key)
		}
		b.frontendKeys = append(b.frontendKeys, ch.entries.Key)
		b.frontendVals = append(b.frontendVals, ch.entries.Frontend)
	}
	return b
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

// backendValue is backend b's lb_backends value, as service id's, counted
// at counter.
func backendValue(b Backend, id uint16, counter uint32) bpfobj.TypesLbBackend {
	return bpfobj.TypesLbBackend{
		Addr:    bpfobj.Addr16(b.Addr),
		Port:    bpfobj.NetworkOrder(b.Port),
		Family:  bpfobj.Family(b.Addr),
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
