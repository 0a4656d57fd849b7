package service

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
)

// record is a service as the ledger keeps it (KindService, its ID): the
// service, and what it holds in the maps. A service with many backends
// does not fit a ledger record: then its service and numbers are a blob
// (Blobbed), as JSON of a record with only those, in one of two slots, so
// that the next version's blob is written whole before the record names
// it.
//
// A record that is Creating holds the version a killed change leaves the
// service at: the old one until the new one is live in the maps, then
// the new one. Reconcile makes the maps that version (repairServices).
// Gone is a service that has no such version (a new one not live yet, a
// deleted one whose frontend is gone): Reconcile removes it whole.
type record struct {
	Version  int      `json:"v"`
	Service  *Service `json:"service,omitempty"`
	Numbers  []uint16 `json:"numbers,omitempty"`  // its backends' numbers, in Service.Backends order
	Counters []uint32 `json:"counters,omitempty"` // and their counter indexes
	Half     uint32   `json:"half"`               // its selection table in use
	Slots    uint32   `json:"slots"`              // how many slots that table has
	Next     uint16   `json:"next"`               // the last backend number given
	Blobbed  bool     `json:"blobbed,omitempty"`
	Slot     uint32   `json:"slot,omitempty"` // the blob's slot, when Blobbed
	Gone     bool     `json:"gone,omitempty"`
}

const recordVersion = 1

// sharedRecord is the record of ID 0: what all services share.
type sharedRecord struct {
	Version int `json:"v"`
	// Generation is new, at random, at every change: a handle's memo is
	// valid while it is the same. Random, not counted, so that a record
	// removed (by Reconcile) and made again cannot repeat a value.
	Generation uint64 `json:"generation"`
	Next       uint16 `json:"next"` // the last service ID given
}

// installed is one service as it is in the maps.
type installed struct {
	id  uint16
	svc Service
	rec record
}

// index is every service of a datapath, as this handle last read or wrote
// them: valid while the shared record has the same generation.
type index struct {
	shared     sharedRecord
	byFrontend map[Frontend]*installed
	byID       map[uint16]*installed // and the IDs of Gone records, with no service
	backends   int                   // entries in lb_backends
	slots      int                   // entries in lb_slots
	counters   map[uint32]bool       // counter indexes given to backends
	next       uint32                // where the search for a free counter index starts
	unready    int                   // records a killed change left (not Ready)
}

type indexKey struct{}

// loadIndex returns the datapath's services: the memo when nobody changed
// them since, else read from the ledger. The caller holds the lock and
// stores the index back with saveIndex after a change.
func loadIndex(st *core.State) (*index, error) {
	var shared sharedRecord
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindService, 0)
	switch {
	case err == nil:
		if err := json.Unmarshal(r.Object, &shared); err != nil {
			return nil, fmt.Errorf("services: %w: %w", datapath.ErrIncompatible, err)
		}
	case !errors.Is(err, ebpf.ErrKeyNotExist):
		return nil, fmt.Errorf("services: %w", err)
	}
	if v, ok := st.Memo.Load(indexKey{}); ok && v.(*index).shared.Generation == shared.Generation {
		return v.(*index), nil
	}
	idx := &index{shared: shared, byFrontend: map[Frontend]*installed{}, byID: map[uint16]*installed{}, counters: map[uint32]bool{}}
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindService)
	if err != nil {
		return nil, fmt.Errorf("services: %w: %w", datapath.ErrIncompatible, err)
	}
	for _, r := range recs {
		if r.ID == 0 || r.ID > 0xffff {
			continue
		}
		in, err := decodeRecord(st, r)
		if err != nil {
			return nil, err
		}
		if r.State != ledger.Ready {
			idx.unready++
		}
		if in.rec.Gone {
			idx.byID[in.id] = in // its ID is taken until Reconcile removes it
			continue
		}
		idx.add(in)
	}
	return idx, nil
}

// decodeRecord reads the service a record holds, from its blob when it has
// one; a Gone record holds none.
func decodeRecord(st *core.State, r *ledger.Record) (*installed, error) {
	in := &installed{id: uint16(r.ID)}
	if err := json.Unmarshal(r.Object, &in.rec); err != nil || in.rec.Version != recordVersion {
		return nil, fmt.Errorf("service %d: %w: unreadable record", r.ID, datapath.ErrIncompatible)
	}
	if in.rec.Gone {
		return in, nil
	}
	if in.rec.Blobbed {
		var big record
		doc, err := ledger.GetBlob(st.Objs.LedgerBlobs, ledger.KindService, blobID(in.id, in.rec.Slot))
		if err == nil {
			err = json.Unmarshal(doc, &big)
		}
		if err == nil && big.Service == nil {
			err = errors.New("blob without a service")
		}
		if err != nil {
			return nil, fmt.Errorf("service %d: %w: %w", r.ID, datapath.ErrIncompatible, err)
		}
		in.rec.Service, in.rec.Numbers, in.rec.Counters = big.Service, big.Numbers, big.Counters
	}
	if in.rec.Service == nil || len(in.rec.Numbers) != len(in.rec.Service.Backends) || len(in.rec.Counters) != len(in.rec.Numbers) {
		return nil, fmt.Errorf("service %d: %w: a record without its service", r.ID, datapath.ErrIncompatible)
	}
	in.svc = *in.rec.Service
	in.rec.Service = nil // in.svc is the service
	return in, nil
}

// blobID is the blob of a service's record in a slot (0 or 1).
func blobID(id uint16, slot uint32) uint32 { return uint32(id) | slot<<16 }

func (idx *index) add(in *installed) {
	idx.byFrontend[in.svc.Frontend] = in
	idx.byID[in.id] = in
	idx.backends += len(in.svc.Backends)
	idx.slots += blocks(int(in.rec.Slots))
	for _, c := range in.rec.Counters {
		idx.counters[c] = true
	}
}

func (idx *index) remove(in *installed) {
	delete(idx.byFrontend, in.svc.Frontend)
	delete(idx.byID, in.id)
	idx.backends -= len(in.svc.Backends)
	idx.slots -= blocks(int(in.rec.Slots))
	for _, c := range in.rec.Counters {
		delete(idx.counters, c)
	}
}

// newCounter gives a counter index no backend holds, below size, or false
// when every one is taken. The index may have been another backend's,
// whose counts it still has: it is zeroed before use (change.dirty).
func (idx *index) newCounter(size uint32) (uint32, bool) {
	if uint32(len(idx.counters)) >= size {
		return 0, false
	}
	for {
		c := idx.next % size
		idx.next = c + 1
		if !idx.counters[c] {
			idx.counters[c] = true
			return c, true
		}
	}
}

// newID gives an unused service ID, after the last one given.
func (idx *index) newID() (uint16, bool) {
	for range 0xffff {
		idx.shared.Next++
		if idx.shared.Next == 0 {
			idx.shared.Next = 1
		}
		if idx.byID[idx.shared.Next] == nil {
			return idx.shared.Next, true
		}
	}
	return 0, false
}

// assign gives the backends of svc their numbers and counter indexes: a
// backend the service had keeps its own, a new one gets a number after the
// last given and a free counter index below size (false: none is free);
// dirty are the indexes it gives, to zero.
func (idx *index) assign(old *installed, svc *Service, size uint32) (nums []uint16, counters, dirty []uint32, next uint16, ok bool) {
	type kept struct {
		number  uint16
		counter uint32
	}
	have := map[netip.AddrPort]kept{}
	used := map[uint16]bool{}
	if old != nil {
		next = old.rec.Next
		for i, b := range old.svc.Backends {
			have[b.AddrPort()] = kept{old.rec.Numbers[i], old.rec.Counters[i]}
			used[old.rec.Numbers[i]] = true
		}
	}
	nums = make([]uint16, len(svc.Backends))
	counters = make([]uint32, len(svc.Backends))
	for i, b := range svc.Backends {
		if k, ok := have[b.AddrPort()]; ok {
			nums[i], counters[i] = k.number, k.counter
			continue
		}
		for {
			next++
			if next != 0 && !used[next] {
				break
			}
		}
		used[next] = true
		nums[i] = next
		if counters[i], ok = idx.newCounter(size); !ok {
			return nil, nil, nil, 0, false
		}
		dirty = append(dirty, counters[i])
	}
	return nums, counters, dirty, next, true
}

// serviceOffset is where, in the bytes of a backend ID (a native-order
// u32), the service's half is.
var serviceOffset = func() int {
	if binary.NativeEndian.Uint16([]byte{1, 0}) == 1 {
		return 2 // little endian: the high half last
	}
	return 0
}()

// bytesOf is the bytes of a map key as the map has them.
func bytesOf(v any) []byte {
	b, err := binary.Append(nil, binary.NativeEndian, v)
	if err != nil {
		panic(err)
	}
	return b
}

// A record names at most maxNamed backends and table blocks one by one,
// and keeps madeRoom bytes for them; more are named by sweeps.
const (
	maxNamed = 14
	madeRoom = 1000
)

// ledgerRecord is the ledger's record of service id in state, holding the
// version holds (or, with gone, none) and naming the entries of holds and
// of also, so that Reconcile can make the maps that version, or undo the
// service whole: its frontend, its backends and its selection tables.
// Affinities are left to age out: one is used only for a backend of its
// own service that takes new flows. A blob, when the version needs one, is returned to
// be written into slot holds.rec.Slot before the record.
func ledgerRecord(id uint16, holds, also *installed, state ledger.State, gone bool) (*ledger.Record, []byte, error) {
	rec := record{Version: recordVersion, Gone: gone}
	var blob []byte
	if !gone {
		rec = holds.rec
		rec.Version, rec.Blobbed, rec.Gone = recordVersion, false, false
		svc := holds.svc
		rec.Service = &svc
		obj, err := json.Marshal(rec)
		if err != nil {
			return nil, nil, err
		}
		if len(obj) > len(bpfobj.TypesLedgerRecord{}.Data)-madeRoom {
			if blob, err = json.Marshal(record{Version: recordVersion, Service: &svc, Numbers: rec.Numbers, Counters: rec.Counters}); err != nil {
				return nil, nil, err
			}
			rec.Service, rec.Numbers, rec.Counters, rec.Blobbed = nil, nil, nil, true
		}
	}
	obj, err := json.Marshal(rec)
	if err != nil {
		return nil, nil, err
	}
	key := frontendKey(holds.svc.Frontend)
	id32 := uint32(id)
	r := &ledger.Record{
		Kind:   ledger.KindService,
		ID:     id32,
		State:  state,
		Object: obj,
		Made: ledger.Made{
			Entries: []ledger.Entry{
				{Map: bpfobj.EndpointMapLbFrontends, Key: bytesOf(&key)},
				{Map: bpfobj.EndpointMapLbRevnat, Key: bytesOf(&id32)},
			},
			// Both blob slots.
			Records: []ledger.Ref{{Kind: ledger.KindService, ID: blobID(id, 0)}, {Kind: ledger.KindService, ID: blobID(id, 1)}},
		},
	}
	// Few entries are named one by one: undoing them is a lookup each,
	// where a sweep walks the whole map (for each of thousands of
	// services a killed Sync left).
	var ids []uint32
	var tables []bpfobj.TypesLbSlotKey
	for _, x := range []*installed{holds, also} {
		if x == nil {
			continue
		}
		for _, n := range x.rec.Numbers {
			if b := backendID(id, n); !slices.Contains(ids, b) {
				ids = append(ids, b)
			}
		}
		for block := range blocks(int(x.rec.Slots)) {
			if k := (bpfobj.TypesLbSlotKey{Table: 2*id32 + x.rec.Half, Block: uint32(block)}); !slices.Contains(tables, k) {
				tables = append(tables, k)
			}
		}
	}
	if len(ids)+len(tables) <= maxNamed {
		for i := range ids {
			r.Made.Entries = append(r.Made.Entries, ledger.Entry{Map: bpfobj.EndpointMapLbBackends, Key: bytesOf(&ids[i])})
		}
		for i := range tables {
			r.Made.Entries = append(r.Made.Entries, ledger.Entry{Map: bpfobj.EndpointMapLbSlots, Key: bytesOf(&tables[i])})
		}
	} else {
		r.Made.Sweeps = []ledger.Sweep{
			{Map: bpfobj.EndpointMapLbBackends, Offset: serviceOffset, Size: 2, Value: id32},
			{Map: bpfobj.EndpointMapLbSlots, Offset: 0, Size: 4, Value: 2 * id32},
			{Map: bpfobj.EndpointMapLbSlots, Offset: 0, Size: 4, Value: 2*id32 + 1},
		}
	}
	return r, blob, nil
}
