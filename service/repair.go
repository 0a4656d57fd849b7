package service

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
)

func init() { core.RegisterRepair(ledger.KindService, repairServices) }

// repairServices finishes each change of a service that a killed process
// left (a record that is not Ready): the maps are made the version the
// record holds, the old one or the new one, keeping its ID and its
// backends' numbers, so that its established flows keep their backends and
// reverse translation; a Gone record's service is removed whole. Then the
// generation moves: every handle's memo is stale. It returns how many
// services it repaired.
func repairServices(st *core.State) (int, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindService)
	if err != nil {
		return 0, fmt.Errorf("services: %w: %w", datapath.ErrIncompatible, err)
	}
	n := 0
	for _, r := range recs {
		if r.ID == 0 || r.State == ledger.Ready {
			continue
		}
		in, err := decodeRecord(st, r)
		if err != nil {
			return n, err
		}
		if in.rec.Gone {
			err = st.Undo(r)
		} else {
			err = settle(st, in, r)
		}
		if err != nil {
			return n, fmt.Errorf("service %d: %w", r.ID, err)
		}
		n++
	}
	if n == 0 {
		return 0, nil
	}
	st.Memo.Delete(indexKey{})
	var shared sharedRecord
	if r, err := ledger.Get(st.Objs.Ledger, ledger.KindService, 0); err == nil {
		json.Unmarshal(r.Object, &shared)
	} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
		return n, err
	}
	shared.Generation = rand.Uint64()
	return n, putShared(st, shared)
}

// settle makes the maps service in, as its record r holds it: all its
// entries written, and every other entry r names deleted.
func settle(st *core.State, in *installed, r *ledger.Record) error {
	e := Compile(&in.svc, in.id, in.rec.Half, in.rec.Numbers, in.rec.Counters)
	slotKeys, slotVals := slotBlocks(&e)
	id := uint32(in.id)
	keep := map[string]bool{}
	for i := range e.IDs {
		keep[bpfobj.EndpointMapLbBackends+string(bytesOf(&e.IDs[i]))] = true
	}
	for i := range slotKeys {
		keep[bpfobj.EndpointMapLbSlots+string(bytesOf(&slotKeys[i]))] = true
	}
	if err := errors.Join(
		mapError(batchUpdate(st.Objs.LbBackends, e.IDs, e.Backends), "write backends"),
		mapError(batchUpdate(st.Objs.LbSlots, slotKeys, slotVals), "write selection table"),
		mapError(st.Objs.LbRevnat.Put(&id, &e.Key), "write reverse NAT"),
		mapError(st.Objs.LbFrontends.Put(&e.Key, &e.Frontend), "write frontend"),
	); err != nil {
		return err
	}
	for _, en := range r.Made.Entries {
		if (en.Map == bpfobj.EndpointMapLbBackends || en.Map == bpfobj.EndpointMapLbSlots) && !keep[en.Map+string(en.Key)] {
			if err := st.Map(en.Map).Delete(en.Key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return err
			}
		}
	}
	for _, sw := range r.Made.Sweeps {
		if err := st.SweepExcept(sw, func(k []byte) bool { return keep[sw.Map+string(k)] }); err != nil {
			return err
		}
	}
	ready, _, err := ledgerRecord(in.id, in, nil, ledger.Ready, false)
	if err != nil {
		return err
	}
	if err := ledger.Put(st.Objs.Ledger, ready); err != nil {
		return err
	}
	// The blob slot the version does not use.
	for _, slot := range []uint32{0, 1} {
		if !in.rec.Blobbed || slot != in.rec.Slot {
			if err := ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindService, blobID(in.id, slot)); err != nil {
				return err
			}
		}
	}
	return nil
}

// loadSettled is loadIndex for a change: a change a killed process left is
// finished first (repairServices), so that a change starts from services
// that are each one version.
func loadSettled(st *core.State) (*index, error) {
	idx, err := loadIndex(st)
	if err != nil || idx.unready == 0 {
		return idx, err
	}
	if _, err := repairServices(st); err != nil {
		return nil, err
	}
	return loadIndex(st)
}
