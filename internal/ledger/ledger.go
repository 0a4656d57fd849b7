// Package ledger keeps, in a pinned map, a record of every object sluice
// made and of what making it created: network namespaces, devices, links
// and map entries. Any process can read it, so teardown and recovery are
// driven by data, not by which packages a binary imports: Unload undoes
// every record, and Open undoes the records of work a killed process left
// half-done.
//
// An object writes its record, in state Creating and naming everything it
// is about to make, before it makes anything; it sets state Ready once
// everything works, and Deleting before it takes anything apart. A record
// that is not Ready after its process is gone is undone whole.
package ledger

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/bpfobj"
)

// Version is the version of Record this build writes and reads.
const Version = 1

// Kind says which object package a record belongs to.
type Kind uint32

const (
	// KindEndpoint records an endpoint (package endpoint).
	KindEndpoint Kind = 1
	// KindDatapath records the datapath itself (ID 0): what its first Open
	// was given.
	KindDatapath Kind = 2
	// KindPolicy records the policy of the endpoint with the same ID
	// (package policy).
	KindPolicy Kind = 3
	// KindCIDR records an identity given to a CIDR peer of policies (ID:
	// the identity's offset in the CIDR identity range).
	KindCIDR Kind = 4
	// KindService records a service by its ID (package service); ID 0
	// holds what all services share (the generation of the set).
	KindService Kind = 5
	// KindDevice records a device the node-facing programs are attached
	// to (the datapath's Open): a node device by its ifindex, the VXLAN
	// device the datapath made as ID 0.
	KindDevice Kind = 6
	// KindNode records a remote node by its ID, from 1 (package node).
	KindNode Kind = 7
)

// State is where an object is in its life.
type State string

const (
	Creating State = "creating"
	Ready    State = "ready"
	Deleting State = "deleting"
)

// Record is one object's entry.
type Record struct {
	Version int    `json:"version"`
	Kind    Kind   `json:"kind"`
	ID      uint32 `json:"id"`
	State   State  `json:"state"`
	Made    Made   `json:"made"`
	// Object is the object package's own, versioned description of it.
	Object json.RawMessage `json:"object,omitempty"`
}

// Made is what making an object created, and so what undoing it removes.
type Made struct {
	// NetNS is a named network namespace (under /run/netns) made for it.
	NetNS string `json:"netns,omitempty"`
	// Device is a device in the datapath's namespace: deleted when Owned,
	// and stripped of the datapath's programs either way.
	Device *Device `json:"device,omitempty"`
	// Links are the tc attachments (pinned links and legacy filters) on
	// Device.
	Links []Link `json:"links,omitempty"`
	// Entries are map entries it wrote.
	Entries []Entry `json:"entries,omitempty"`
	// Sweeps remove every entry of a map whose key (or value) holds a
	// value, for entries too many to list (an endpoint's policy entries,
	// its tracked flows).
	Sweeps []Sweep `json:"sweeps,omitempty"`
	// Records are other records that go with this one (an endpoint's
	// policy), removed with it, their blobs included.
	Records []Ref `json:"records,omitempty"`
	// Routes are routes in the datapath's namespace (a remote node's pod
	// CIDRs via its address).
	Routes []Route `json:"routes,omitempty"`
}

// Route is a route to Prefix via the next hop Via.
type Route struct {
	Prefix netip.Prefix `json:"prefix"`
	Via    netip.Addr   `json:"via"`
}

// Sweep names the entries of a map whose key (or, with InValue, value)
// has, at byte Offset, the unsigned integer Value of Size bytes (2 or 4),
// in native byte order.
type Sweep struct {
	Map     string `json:"map"`
	InValue bool   `json:"in_value,omitempty"`
	Offset  int    `json:"offset"`
	Size    int    `json:"size"`
	Value   uint32 `json:"value"`
}

// Matches reports whether a raw key (or value, with InValue) has the
// sweep's value.
func (s Sweep) Matches(key []byte) bool {
	if s.Offset < 0 || s.Offset+s.Size > len(key) {
		return false
	}
	switch s.Size {
	case 2:
		return uint32(binary.NativeEndian.Uint16(key[s.Offset:])) == s.Value
	case 4:
		return binary.NativeEndian.Uint32(key[s.Offset:]) == s.Value
	}
	return false
}

// Ref names a record.
type Ref struct {
	Kind Kind   `json:"kind"`
	ID   uint32 `json:"id"`
}

// Device names a network device. Ifindex is 0 until it exists.
type Device struct {
	Name    string `json:"name"`
	Ifindex int    `json:"ifindex,omitempty"`
	Owned   bool   `json:"owned"`
}

// Link is a tc attachment by its key, on the device's ingress or egress,
// of the program of that name (an upgrade attaches the new build's).
type Link struct {
	Key     string `json:"key"`
	Egress  bool   `json:"egress,omitempty"`
	Program string `json:"program,omitempty"`
}

// Entry is a key of one of the datapath's maps, by map name. Source, when
// set, is the writer an ipcache entry must still have to be removed (see
// internal/ipcache).
type Entry struct {
	Map    string `json:"map"`
	Key    []byte `json:"key"`
	Source uint8  `json:"source,omitempty"`
}

// ErrCorrupt reports a record that cannot be read: not JSON, or of another
// version.
var ErrCorrupt = errors.New("ledger record unreadable")

func key(kind Kind, id uint32) bpfobj.TypesLedgerKey {
	return bpfobj.TypesLedgerKey{Kind: uint32(kind), Id: id}
}

// encode is json.Marshal of r, with Object put in as it is: encoding/json
// would parse and compact it again, which for many records is most of the
// time spent. Object is JSON its package made.
func encode(r *Record) ([]byte, error) {
	made, err := json.Marshal(r.Made)
	if err != nil {
		return nil, err
	}
	state, _ := json.Marshal(r.State)
	b := fmt.Appendf(nil, `{"version":%d,"kind":%d,"id":%d,"state":%s,"made":%s`, r.Version, r.Kind, r.ID, state, made)
	if len(r.Object) > 0 {
		b = append(append(b, `,"object":`...), r.Object...)
	}
	return append(b, '}'), nil
}

// Put writes r, replacing its previous version.
func Put(m *ebpf.Map, r *Record) error {
	r.Version = Version
	b, err := encode(r)
	if err != nil {
		return err
	}
	var v bpfobj.TypesLedgerRecord
	if len(b) > len(v.Data) {
		return fmt.Errorf("%w: the record of %v %d takes %d bytes, at most %d fit", ErrTooLarge, r.Kind, r.ID, len(b), len(v.Data))
	}
	copy(v.Data[:], b)
	k := key(r.Kind, r.ID)
	if err := m.Update(&k, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write ledger record of %v %d: %w", r.Kind, r.ID, err)
	}
	return nil
}

// PutBatch writes many records with one batch operation: what Put does for
// each, in fewer system calls.
func PutBatch(m *ebpf.Map, rs []*Record) error {
	if len(rs) == 0 {
		return nil
	}
	keys := make([]bpfobj.TypesLedgerKey, len(rs))
	vals := make([]bpfobj.TypesLedgerRecord, len(rs))
	for i, r := range rs {
		r.Version = Version
		b, err := encode(r)
		if err != nil {
			return err
		}
		if len(b) > len(vals[i].Data) {
			return fmt.Errorf("%w: the record of %v %d takes %d bytes, at most %d fit", ErrTooLarge, r.Kind, r.ID, len(b), len(vals[i].Data))
		}
		copy(vals[i].Data[:], b)
		keys[i] = key(r.Kind, r.ID)
	}
	if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
		return fmt.Errorf("write %d ledger records: %w", len(rs), err)
	}
	return nil
}

// ErrTooLarge reports a record over the map's value size.
var ErrTooLarge = errors.New("ledger record too large")

// Get returns the record of an object, or an error matching
// ebpf.ErrKeyNotExist.
func Get(m *ebpf.Map, kind Kind, id uint32) (*Record, error) {
	k := key(kind, id)
	var v bpfobj.TypesLedgerRecord
	if err := m.Lookup(&k, &v); err != nil {
		return nil, fmt.Errorf("read ledger record of %v %d: %w", kind, id, err)
	}
	return decode(&v)
}

// List returns every record of a kind, in no order. A record that cannot
// be read fails it with ErrCorrupt.
func List(m *ebpf.Map, kind Kind) ([]*Record, error) {
	var out []*Record
	err := Scan(m, func(k Kind) bool { return k == kind }, func(r *Record) { out = append(out, r) })
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Scan calls visit with every record of the kinds want accepts (every
// kind when want is nil), reading the ledger in batches. A record that
// cannot be read is skipped, and named in the error it returns after the
// others, which matches ErrCorrupt.
func Scan(m *ebpf.Map, want func(Kind) bool, visit func(*Record)) error {
	var (
		bad    []string
		cursor ebpf.MapBatchCursor
		keys   = make([]bpfobj.TypesLedgerKey, 128)
		vals   = make([]bpfobj.TypesLedgerRecord, len(keys))
	)
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i, k := range keys[:n] {
			if want != nil && !want(Kind(k.Kind)) {
				continue
			}
			r, err := decode(&vals[i])
			if err != nil {
				bad = append(bad, fmt.Sprintf("%v %d (%v)", Kind(k.Kind), k.Id, err))
				continue
			}
			visit(r)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return fmt.Errorf("read ledger: %w", err)
		}
	}
	if len(bad) == 0 {
		return nil
	}
	const shown = 4
	list := strings.Join(bad[:min(len(bad), shown)], ", ")
	if len(bad) > shown {
		list += fmt.Sprintf(" and %d more", len(bad)-shown)
	}
	return fmt.Errorf("%w: cannot read the ledger record of %s", ErrCorrupt, list)
}

// Delete removes a record; a missing one is not an error.
func Delete(m *ebpf.Map, kind Kind, id uint32) error {
	k := key(kind, id)
	if err := m.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete ledger record of %v %d: %w", kind, id, err)
	}
	return nil
}

func decode(v *bpfobj.TypesLedgerRecord) (*Record, error) {
	var r Record
	if err := json.Unmarshal(bytes.TrimRight(v.Data[:], "\x00"), &r); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if r.Version != Version {
		return nil, fmt.Errorf("%w: version %d, this build reads %d", ErrCorrupt, r.Version, Version)
	}
	return &r, nil
}

func (k Kind) String() string {
	switch k {
	case KindEndpoint:
		return "endpoint"
	case KindDatapath:
		return "datapath"
	case KindPolicy:
		return "policy"
	case KindCIDR:
		return "CIDR identity"
	case KindService:
		return "service"
	case KindDevice:
		return "node device"
	case KindNode:
		return "node"
	}
	return fmt.Sprintf("kind %d", uint32(k))
}

// PutBlob stores data as the blob of a record, in chunks, replacing the
// previous one. When old is what the blob holds now, only the chunks that
// differ are written.
func PutBlob(m *ebpf.Map, kind Kind, id uint32, data, old []byte) error {
	var v bpfobj.TypesLedgerBlob
	n := uint32(0)
	for off := 0; off < len(data) || off == 0; off += len(v.Data) {
		chunk := data[off:min(off+len(v.Data), len(data))]
		if old != nil && off < len(old) && bytes.Equal(chunk, old[off:min(off+len(v.Data), len(old))]) {
			n++
			continue
		}
		v.Len = uint32(len(chunk))
		copy(v.Data[:], chunk)
		k := bpfobj.TypesLedgerBlobKey{Kind: uint32(kind), Id: id, Chunk: n}
		if err := m.Update(&k, &v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("write blob of %v %d: %w", kind, id, err)
		}
		n++
		if len(data) == 0 {
			break
		}
	}
	return deleteBlobFrom(m, kind, id, n)
}

// GetBlob returns the blob of a record, or an error matching
// ebpf.ErrKeyNotExist.
func GetBlob(m *ebpf.Map, kind Kind, id uint32) ([]byte, error) {
	var (
		out []byte
		v   bpfobj.TypesLedgerBlob
	)
	for n := uint32(0); ; n++ {
		k := bpfobj.TypesLedgerBlobKey{Kind: uint32(kind), Id: id, Chunk: n}
		err := m.Lookup(&k, &v)
		if errors.Is(err, ebpf.ErrKeyNotExist) && n > 0 {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read blob of %v %d: %w", kind, id, err)
		}
		if v.Len > uint32(len(v.Data)) {
			return nil, fmt.Errorf("%w: blob chunk of %d bytes", ErrCorrupt, v.Len)
		}
		out = append(out, v.Data[:v.Len]...)
	}
}

// DeleteBlob removes the blob of a record; a missing one is not an error.
func DeleteBlob(m *ebpf.Map, kind Kind, id uint32) error { return deleteBlobFrom(m, kind, id, 0) }

// deleteBlobFrom removes the chunks of a blob from chunk n on.
func deleteBlobFrom(m *ebpf.Map, kind Kind, id uint32, n uint32) error {
	for ; ; n++ {
		k := bpfobj.TypesLedgerBlobKey{Kind: uint32(kind), Id: id, Chunk: n}
		err := m.Delete(&k)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("delete blob of %v %d: %w", kind, id, err)
		}
	}
}
