package policy

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/gob"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
)

// record is an endpoint's policy as the ledger keeps it. The policy
// itself, encoded, is a blob (a policy of many rules does not fit a
// record), in one of two slots: the live policy stays in its slot, whole,
// while an Apply writes the next one into the other, so that the record
// names the live policy until the maps hold the new one.
type record struct {
	Version    int            `json:"version"`
	Generation uint64         `json:"generation"`         // new at every change, never one used before (newGeneration)
	Prefixes   []netip.Prefix `json:"prefixes,omitempty"` // the CIDR identities the live policy holds
	Slot       uint32         `json:"slot,omitempty"`     // the blob slot of the live policy
	NoLive     bool           `json:"no_live,omitempty"`  // no live policy: the first Apply is under way
	// Target is, while the record is Creating, what the maps are being
	// made into: Reconcile finishes the change, or takes it back.
	Target *target `json:"target,omitempty"`
}

// target is the policy an unfinished change makes live.
type target struct {
	Slot     uint32         `json:"slot"`
	Prefixes []netip.Prefix `json:"prefixes,omitempty"`
	Delete   bool           `json:"delete,omitempty"` // no policy: the change is a Delete
}

const recordVersion = 1

// blobID is the blob of an endpoint's policy in a slot (0 or 1).
func blobID(endpoint uint16, slot uint32) uint32 { return uint32(endpoint) | slot<<16 }

// loadRecord returns the ledger record of the endpoint's policy and what
// it holds, or nils when there is none.
func loadRecord(st *core.State, endpoint uint16) (*ledger.Record, *record, error) {
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindPolicy, uint32(endpoint))
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("policy of endpoint %d: %w: %w", endpoint, datapath.ErrIncompatible, err)
	}
	var rec record
	if err := json.Unmarshal(r.Object, &rec); err != nil || rec.Version != recordVersion {
		return nil, nil, fmt.Errorf("policy of endpoint %d: %w: unreadable record", endpoint, datapath.ErrIncompatible)
	}
	return r, &rec, nil
}

// liveDoc returns the live policy's encoding, or nil when it has none.
func liveDoc(st *core.State, endpoint uint16, rec *record) ([]byte, error) {
	if rec == nil || rec.NoLive {
		return nil, nil
	}
	doc, err := ledger.GetBlob(st.Objs.LedgerBlobs, ledger.KindPolicy, blobID(endpoint, rec.Slot))
	if err != nil {
		return nil, fmt.Errorf("policy of endpoint %d: %w: %w", endpoint, datapath.ErrIncompatible, err)
	}
	return doc, nil
}

// putRecord writes the ledger record of an endpoint's policy. Its sweeps
// are what undoing it (with its endpoint) removes; its Records, both blob
// slots.
func putRecord(st *core.State, endpoint uint16, state ledger.State, rec *record) error {
	rec.Version = recordVersion
	obj, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	id := uint32(endpoint)
	r := &ledger.Record{Kind: ledger.KindPolicy, ID: id, State: state, Object: obj}
	r.Made.Sweeps = sweeps(endpoint)
	r.Made.Records = []ledger.Ref{{Kind: ledger.KindPolicy, ID: blobID(endpoint, 1)}}
	if err := ledger.Put(st.Objs.Ledger, r); err != nil {
		if errors.Is(err, ledger.ErrTooLarge) {
			return fmt.Errorf("policy of endpoint %d: %w: %w", endpoint, datapath.ErrInvalid, err)
		}
		return core.MapError(err, datapath.ErrMapFull, fmt.Sprintf("policy of endpoint %d", endpoint))
	}
	return nil
}

// putDoc writes a policy's encoding into a blob slot; old, when not nil,
// is what the slot holds now.
func putDoc(st *core.State, endpoint uint16, slot uint32, doc, old []byte) error {
	err := ledger.PutBlob(st.Objs.LedgerBlobs, ledger.KindPolicy, blobID(endpoint, slot), doc, old)
	if err != nil {
		return core.MapError(err, datapath.ErrMapFull, fmt.Sprintf("policy of endpoint %d", endpoint))
	}
	return nil
}

// deleteDoc removes a blob slot.
func deleteDoc(st *core.State, endpoint uint16, slot uint32) error {
	return ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindPolicy, blobID(endpoint, slot))
}

// newGeneration returns a generation for a policy record: random, so that
// it never repeats one a handle may still remember, even after the record
// was deleted with its policy or its endpoint (a count would start again
// at 1 there, and a handle that applied generation 1 would trust its stale
// memo of the entries).
func newGeneration() uint64 {
	var b [8]byte
	rand.Read(b[:])
	return binary.NativeEndian.Uint64(b[:]) | 1
}

// docVersion starts a stored policy: the version of its encoding, gob (a
// tenth of the size of JSON for a policy of many rules, and faster).
// Version 1 lost an empty direction (a policy with no rule: deny all) to
// gob, which writes no empty slice; version 2 says which directions have a
// policy.
const docVersion = 2

// storedPolicy is a policy as version 2 stores it.
type storedPolicy struct {
	Policy          Policy
	Ingress, Egress bool // the direction has a policy
}

func encode(p Policy) ([]byte, error) {
	buf := bytes.NewBuffer([]byte{docVersion})
	s := storedPolicy{Policy: p, Ingress: p.Ingress != nil, Egress: p.Egress != nil}
	if err := gob.NewEncoder(buf).Encode(s); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func decode(doc []byte) (Policy, error) {
	if len(doc) > 0 && doc[0] == 1 {
		var p Policy
		err := gob.NewDecoder(bytes.NewReader(doc[1:])).Decode(&p)
		return p, err
	}
	if len(doc) == 0 || doc[0] != docVersion {
		return Policy{}, fmt.Errorf("stored policy of another version")
	}
	var s storedPolicy
	if err := gob.NewDecoder(bytes.NewReader(doc[1:])).Decode(&s); err != nil {
		return Policy{}, err
	}
	if s.Ingress && s.Policy.Ingress == nil {
		s.Policy.Ingress = []Rule{}
	}
	if s.Egress && s.Policy.Egress == nil {
		s.Policy.Egress = []Rule{}
	}
	return s.Policy, nil
}

// sweeps name the endpoint's entries in the policy maps, by map.
func sweeps(endpoint uint16) []ledger.Sweep {
	id := uint32(endpoint)
	return []ledger.Sweep{
		{Map: "policy", Offset: int(unsafe.Offsetof(bpfobj.TypesPolicyKey{}.Endpoint)), Size: 2, Value: id},
		{Map: "policy_meta", Offset: int(unsafe.Offsetof(bpfobj.TypesPolicyMetaKey{}.Endpoint)), Size: 2, Value: id},
		counterSweep(endpoint),
	}
}

// counterSweep names the endpoint's per-rule counters.
func counterSweep(endpoint uint16) ledger.Sweep {
	return ledger.Sweep{Map: "policy_counters", Offset: int(unsafe.Offsetof(bpfobj.TypesPolicyCounterKey{}.Endpoint)), Size: 2, Value: uint32(endpoint)}
}
