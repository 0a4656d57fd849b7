package policy

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/gob"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"net/netip"
	"slices"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/ledger"
)

// Changes says what Apply or Delete changed in the datapath's maps.
type Changes struct {
	Added   int // entries written that were not there
	Changed int // entries written over another value
	Removed int // entries deleted
}

// record is an endpoint's policy as the ledger keeps it; the policy itself
// is the record's blob (a policy of many rules does not fit a record).
type record struct {
	Version    int            `json:"version"`
	Generation uint64         `json:"generation"`         // new at every Apply, never one used before (newGeneration)
	Prefixes   []netip.Prefix `json:"prefixes,omitempty"` // the CIDR identities it holds
}

const recordVersion = 1

// Apply makes p the policy of the endpoint with the given ID, replacing the
// one it had, and returns how many map entries it wrote and deleted: only
// the difference. The new entries are written before the old ones go, so a
// flow both policies allow passes throughout. Bad input is ErrInvalid, an
// unknown endpoint ErrNotFound, and more entries than the maps hold
// ErrMapFull; on error the endpoint's policy is as it was.
func Apply(ctx context.Context, dp *datapath.Datapath, endpoint uint16, p Policy) (Changes, error) {
	c, err := Compile(p)
	if err != nil {
		return Changes{}, err
	}
	doc, err := encode(p)
	if err != nil {
		return Changes{}, err
	}
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return Changes{}, err
	}
	defer unlock()
	if err := checkEndpoint(st, endpoint); err != nil {
		return Changes{}, err
	}
	return apply(st, endpoint, c, doc)
}

// Delete removes the endpoint's policy: it allows everything again, both
// ways. Deleting a policy that is not there is not an error.
func Delete(ctx context.Context, dp *datapath.Datapath, endpoint uint16) (Changes, error) {
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return Changes{}, err
	}
	defer unlock()
	return apply(st, endpoint, nil, nil)
}

// Get returns the endpoint's policy, or an error matching ErrNotFound when
// it has none.
func Get(dp *datapath.Datapath, endpoint uint16) (Policy, error) {
	st := core.Of(dp)
	release, err := st.Use()
	if err != nil {
		return Policy{}, err
	}
	defer release()
	return get(st, endpoint)
}

// List returns the IDs of the endpoints that have a policy.
func List(dp *datapath.Datapath) ([]uint16, error) {
	st := core.Of(dp)
	release, err := st.Use()
	if err != nil {
		return nil, err
	}
	defer release()
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindPolicy)
	if err != nil {
		return nil, fmt.Errorf("list policies: %w: %w", datapath.ErrIncompatible, err)
	}
	var out []uint16
	for _, r := range recs {
		out = append(out, uint16(r.ID))
	}
	slices.Sort(out)
	return out, nil
}

func get(st *core.State, endpoint uint16) (Policy, error) {
	doc, err := ledger.GetBlob(st.Objs.LedgerBlobs, ledger.KindPolicy, uint32(endpoint))
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Policy{}, fmt.Errorf("policy of endpoint %d: %w", endpoint, datapath.ErrNotFound)
	}
	if err != nil {
		return Policy{}, err
	}
	p, err := decode(doc)
	if err != nil {
		return Policy{}, fmt.Errorf("policy of endpoint %d: %w: %w", endpoint, datapath.ErrIncompatible, err)
	}
	return p, nil
}

// docVersion starts a stored policy: the version of its encoding, gob (a
// tenth of the size of JSON for a policy of many rules, and faster).
const docVersion = 1

func encode(p Policy) ([]byte, error) {
	buf := bytes.NewBuffer([]byte{docVersion})
	if err := gob.NewEncoder(buf).Encode(p); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func decode(doc []byte) (Policy, error) {
	var p Policy
	if len(doc) == 0 || doc[0] != docVersion {
		return p, fmt.Errorf("stored policy of another version")
	}
	err := gob.NewDecoder(bytes.NewReader(doc[1:])).Decode(&p)
	return p, err
}

// memo is what Apply last wrote for an endpoint through this handle:
// valid while the ledger record has the same generation.
type memo struct {
	generation uint64
	entries    *MapEntries
	doc        []byte
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

func memoKey(endpoint uint16) string { return fmt.Sprintf("policy/%d", endpoint) }

// checkEndpoint fails with ErrNotFound unless the endpoint exists and is
// ready.
func checkEndpoint(st *core.State, endpoint uint16) error {
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindEndpoint, uint32(endpoint))
	if err == nil && r.State == ledger.Ready {
		return nil
	}
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	return fmt.Errorf("policy of endpoint %d: no such endpoint: %w", endpoint, datapath.ErrNotFound)
}

// apply replaces the endpoint's entries with those of c (none when c is
// nil). The entries there are read from the map, not taken from a record,
// so a change a killed process left half-done is finished here.
func apply(st *core.State, endpoint uint16, c *Compiled, doc []byte) (changes Changes, err error) {
	var old record
	if r, err := ledger.Get(st.Objs.Ledger, ledger.KindPolicy, uint32(endpoint)); err == nil {
		json.Unmarshal(r.Object, &old)
	}
	// What this handle wrote last, if nobody wrote since: no need to read
	// the maps back.
	var last *memo
	if v, ok := st.Memo.LoadAndDelete(memoKey(endpoint)); ok && v.(*memo).generation == old.Generation {
		last = v.(*memo)
	}
	var want *MapEntries
	var rec record
	if c != nil {
		ids, fresh, err := acquireCIDRs(st, endpoint, c.Prefixes())
		if err != nil {
			return changes, err
		}
		defer func() {
			if err != nil {
				releaseCIDRs(st, endpoint, c.Prefixes(), old.Prefixes)
			}
		}()
		// A new CIDR identity takes its addresses from the prefixes
		// around it: the policies with such a prefix name it too, before
		// any packet carries it.
		if err := refresh(st, endpoint, ids, fresh); err != nil {
			return changes, err
		}
		if err := publishCIDRs(st, fresh); err != nil {
			return changes, err
		}
		if want, err = c.Resolve(endpoint, ids); err != nil {
			return changes, err
		}
		rec = record{Version: recordVersion, Generation: newGeneration(), Prefixes: c.Prefixes()}
		// The record first, so that a process killed half-way leaves it
		// naming this endpoint's entries to sweep, and another handle's
		// memo out of date.
		var oldDoc []byte
		if last != nil {
			oldDoc = last.doc
		}
		if err := putRecord(st, endpoint, rec, doc, oldDoc); err != nil {
			return changes, err
		}
	}
	var have *MapEntries
	if last != nil {
		have = last.entries
	} else if have, err = current(st, endpoint); err != nil {
		return changes, err
	}
	// A direction that gets its first policy, even one with no rule
	// (nothing allowed), changes only the summary.
	summaryChanged := want != nil && !maps.Equal(have.Meta, want.Meta)
	if changes, err = write(st, endpoint, have, want); err != nil {
		return changes, err
	}
	if want != nil {
		st.Memo.Store(memoKey(endpoint), &memo{generation: rec.Generation, entries: want, doc: doc})
	}
	// A stricter policy governs the flows already running: whatever it
	// no longer allows is forgotten, and only a new connection could
	// bring it back, which the policy decides.
	if want != nil && (summaryChanged || changes.Added+changes.Removed+changes.Changed > 0) {
		if err := revokeFlows(st, endpoint, want); err != nil {
			return changes, err
		}
	}
	// The rule indexes name the new rules now: their counts start over.
	if err := st.Sweep(counterSweep(endpoint)); err != nil {
		return changes, err
	}
	var keep []netip.Prefix
	if c != nil {
		keep = c.Prefixes()
	} else if err := errors.Join(
		ledger.Delete(st.Objs.Ledger, ledger.KindPolicy, uint32(endpoint)),
		ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindPolicy, uint32(endpoint)),
	); err != nil {
		return changes, err
	}
	releaseCIDRs(st, endpoint, old.Prefixes, keep)
	return changes, nil
}

// write makes the endpoint's map entries want, in Plan's order: no packet
// sees a mix that neither the old nor the new entries would give. On error
// what it wrote is put back.
func write(st *core.State, endpoint uint16, have, want *MapEntries) (changes Changes, err error) {
	if have == nil {
		if have, err = current(st, endpoint); err != nil {
			return changes, err
		}
	}
	steps := Plan(have, want)
	adds := 0
	for _, step := range steps {
		if !step.Delete {
			adds += len(step.Entries)
		}
	}
	if len(have.Entries)+adds > int(st.Objs.Policy.MaxEntries()) {
		return changes, fmt.Errorf("policy of endpoint %d needs %d more entries, the policy map holds %d in all: %w",
			endpoint, adds, st.Objs.Policy.MaxEntries(), datapath.ErrMapFull)
	}
	for _, step := range steps {
		for k, v := range step.Meta {
			if step.Delete {
				err = deleteKey(st.Objs.PolicyMeta, &k)
			} else {
				err = st.Objs.PolicyMeta.Put(&k, &v)
			}
			if err != nil {
				restore(st, have, want)
				return changes, core.MapError(err, datapath.ErrMapFull, fmt.Sprintf("policy of endpoint %d", endpoint))
			}
		}
		for k, v := range step.Entries {
			if step.Delete {
				err = deleteKey(st.Objs.Policy, &k)
				changes.Removed++
			} else {
				if _, had := have.Entries[k]; had {
					changes.Changed++
				} else {
					changes.Added++
				}
				err = st.Objs.Policy.Put(&k, &v)
			}
			if err != nil {
				restore(st, have, want)
				return changes, core.MapError(err, datapath.ErrMapFull, fmt.Sprintf("policy of endpoint %d", endpoint))
			}
		}
	}
	return changes, nil
}

// refresh resolves again, with ids, the policies of other endpoints that
// name a prefix around one of the fresh ones, and writes their entries.
func refresh(st *core.State, except uint16, ids map[netip.Prefix]datapath.Identity, fresh []netip.Prefix) error {
	if len(fresh) == 0 {
		return nil
	}
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindPolicy)
	if err != nil {
		return err
	}
	for _, r := range recs {
		ep := uint16(r.ID)
		var rec record
		if ep == except || json.Unmarshal(r.Object, &rec) != nil || !covers(rec.Prefixes, fresh) {
			continue
		}
		p, err := get(st, ep)
		if err != nil {
			return err
		}
		c, err := Compile(p)
		if err != nil {
			return err
		}
		want, err := c.Resolve(ep, ids)
		if err != nil {
			return err
		}
		// A new generation: every handle's memo of ep is out of date.
		rec.Generation = newGeneration()
		if r.Object, err = json.Marshal(rec); err != nil {
			return err
		}
		if err := ledger.Put(st.Objs.Ledger, r); err != nil {
			return err
		}
		st.Memo.Delete(memoKey(ep))
		if _, err := write(st, ep, nil, want); err != nil {
			return err
		}
	}
	return nil
}

// covers reports whether a prefix of outer holds one of inner.
func covers(outer, inner []netip.Prefix) bool {
	for _, o := range outer {
		for _, i := range inner {
			if o.Bits() < i.Bits() && o.Contains(i.Addr()) {
				return true
			}
		}
	}
	return false
}

// restore puts back the entries a failed replacement had written over.
func restore(st *core.State, have, want *MapEntries) {
	for k := range want.orEmpty().Entries {
		if v, ok := have.Entries[k]; ok {
			st.Objs.Policy.Put(&k, &v)
		} else {
			st.Objs.Policy.Delete(&k)
		}
	}
	for k := range want.orEmpty().Meta {
		if v, ok := have.Meta[k]; ok {
			st.Objs.PolicyMeta.Put(&k, &v)
		} else {
			st.Objs.PolicyMeta.Delete(&k)
		}
	}
}

func deleteKey(m *ebpf.Map, k any) error {
	if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete from %s: %w", m, err)
	}
	return nil
}

// putRecord writes the ledger record and blob of an endpoint's policy. Its
// sweeps and meta keys are what undoing it (with its endpoint) removes.
func putRecord(st *core.State, endpoint uint16, rec record, doc, oldDoc []byte) error {
	obj, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	id := uint32(endpoint)
	r := &ledger.Record{Kind: ledger.KindPolicy, ID: id, State: ledger.Ready, Object: obj}
	r.Made.Sweeps = []ledger.Sweep{
		{Map: "policy", Offset: int(unsafe.Offsetof(bpfobj.TypesPolicyKey{}.Endpoint)), Size: 2, Value: id},
		{Map: "policy_meta", Offset: int(unsafe.Offsetof(bpfobj.TypesPolicyMetaKey{}.Endpoint)), Size: 2, Value: id},
		counterSweep(endpoint),
	}
	if err := ledger.PutBlob(st.Objs.LedgerBlobs, ledger.KindPolicy, id, doc, oldDoc); err != nil {
		return core.MapError(err, datapath.ErrMapFull, fmt.Sprintf("policy of endpoint %d", endpoint))
	}
	if err := ledger.Put(st.Objs.Ledger, r); err != nil {
		if errors.Is(err, ledger.ErrTooLarge) {
			return fmt.Errorf("policy of endpoint %d: %w: %w", endpoint, datapath.ErrInvalid, err)
		}
		return err
	}
	return nil
}

// counterSweep names the endpoint's per-rule counters.
func counterSweep(endpoint uint16) ledger.Sweep {
	return ledger.Sweep{Map: "policy_counters", Offset: int(unsafe.Offsetof(bpfobj.TypesPolicyCounterKey{}.Endpoint)), Size: 2, Value: uint32(endpoint)}
}

// current reads the endpoint's entries from the maps, in batches: a
// policy of thousands of rules in a few system calls.
func current(st *core.State, endpoint uint16) (*MapEntries, error) {
	m := newMapEntries()
	const batch = 4096
	keys := make([]bpfobj.TypesPolicyKey, batch)
	vals := make([]bpfobj.TypesPolicyEntry, batch)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := st.Objs.Policy.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			if keys[i].Endpoint == endpoint {
				m.Entries[keys[i]] = vals[i]
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read policy entries: %w", err)
		}
	}
	for _, dir := range []uint8{0, 1} {
		mk := bpfobj.TypesPolicyMetaKey{Endpoint: endpoint, Dir: dir}
		var mv bpfobj.TypesPolicyMetaValue
		if err := st.Objs.PolicyMeta.Lookup(&mk, &mv); err == nil {
			m.Meta[mk] = mv
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, fmt.Errorf("read policy meta: %w", err)
		}
	}
	return m, nil
}

// cidrRecord is a CIDR identity as the ledger keeps it: its prefix and the
// endpoints whose policies name it.
type cidrRecord struct {
	Prefix netip.Prefix `json:"prefix"`
	Users  []uint16     `json:"users"`
}

// acquireCIDRs returns the identities of the prefixes endpoint's policy
// names, and every other CIDR identity (Resolve needs them all), and which
// prefixes are fresh: given an identity of the CIDR range now, recorded in
// the ledger with their users but not yet in the ipcache (publishCIDRs).
func acquireCIDRs(st *core.State, endpoint uint16, prefixes []netip.Prefix) (map[netip.Prefix]datapath.Identity, []netip.Prefix, error) {
	ids := map[netip.Prefix]datapath.Identity{}
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindCIDR)
	if err != nil {
		return nil, nil, err
	}
	byPrefix := map[netip.Prefix]*ledger.Record{}
	for _, r := range recs {
		var c cidrRecord
		if json.Unmarshal(r.Object, &c) == nil {
			byPrefix[c.Prefix] = r
			ids[c.Prefix] = CIDRIdentityFirst + datapath.Identity(r.ID)
		}
	}
	var fresh []netip.Prefix
	for _, p := range prefixes {
		r := byPrefix[p]
		if r == nil {
			if r, err = allocateCIDR(st, p); err != nil {
				return nil, nil, err
			}
			byPrefix[p] = r
			ids[p] = CIDRIdentityFirst + datapath.Identity(r.ID)
			fresh = append(fresh, p)
		}
		var c cidrRecord
		json.Unmarshal(r.Object, &c)
		if !slices.Contains(c.Users, endpoint) {
			c.Users = append(c.Users, endpoint)
			r.Object, _ = json.Marshal(c)
			if err := ledger.Put(st.Objs.Ledger, r); err != nil {
				return nil, nil, err
			}
		}
	}
	return ids, fresh, nil
}

// allocateCIDR gives prefix p an identity of the CIDR range, the slot its
// hash names or the next free one, and records it.
func allocateCIDR(st *core.State, p netip.Prefix) (*ledger.Record, error) {
	h := fnv.New32a()
	b, _ := p.MarshalBinary()
	h.Write(b)
	span := uint32(CIDRIdentityLast - CIDRIdentityFirst + 1)
	for i := uint32(0); i < 1024; i++ {
		slot := (h.Sum32() + i) % span
		_, err := ledger.Get(st.Objs.Ledger, ledger.KindCIDR, slot)
		if err == nil {
			continue
		}
		if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, err
		}
		obj, _ := json.Marshal(cidrRecord{Prefix: p})
		r := &ledger.Record{Kind: ledger.KindCIDR, ID: slot, State: ledger.Ready, Object: obj}
		r.Made.Entries = []ledger.Entry{{Map: "ipcache", Key: ipcache.KeyBytes(p), Source: uint8(ipcache.CIDR)}}
		if err := ledger.Put(st.Objs.Ledger, r); err != nil {
			return nil, err
		}
		return r, nil
	}
	return nil, fmt.Errorf("CIDR %s: no free identity near its slot: %w", p, datapath.ErrMapFull)
}

// publishCIDRs puts fresh CIDR identities in the ipcache. A prefix another
// writer holds there (an endpoint's address, an assigned identity) keeps
// its identity: the CIDR entry would add nothing, since the most specific
// prefix decides.
func publishCIDRs(st *core.State, fresh []netip.Prefix) error {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindCIDR)
	if err != nil {
		return err
	}
	for _, r := range recs {
		var c cidrRecord
		if json.Unmarshal(r.Object, &c) != nil || !slices.Contains(fresh, c.Prefix) {
			continue
		}
		err := ipcache.Put(st.Objs.Ipcache, c.Prefix, ipcache.Entry{Identity: uint32(CIDRIdentityFirst) + r.ID}, ipcache.CIDR)
		if err != nil && !errors.Is(err, ipcache.ErrOwned) {
			return core.MapError(err, datapath.ErrMapFull, "CIDR "+c.Prefix.String())
		}
	}
	return nil
}

// releaseCIDRs drops endpoint from the users of the prefixes in drop that
// keep does not hold, and every user whose policy is gone; a prefix left
// with no user loses its identity and its ipcache entry.
func releaseCIDRs(st *core.State, endpoint uint16, drop, keep []netip.Prefix) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindCIDR)
	if err != nil {
		return
	}
	for _, r := range recs {
		var c cidrRecord
		if json.Unmarshal(r.Object, &c) != nil || slices.Contains(keep, c.Prefix) {
			continue
		}
		// Users whose policy is gone (an endpoint deleted with its
		// policy) go too, whichever endpoint applies now.
		users := slices.DeleteFunc(slices.Clone(c.Users), func(u uint16) bool {
			_, err := ledger.Get(st.Objs.Ledger, ledger.KindPolicy, uint32(u))
			return (u == endpoint && slices.Contains(drop, c.Prefix)) || errors.Is(err, ebpf.ErrKeyNotExist)
		})
		if len(users) == len(c.Users) {
			continue
		}
		c.Users = users
		if len(c.Users) == 0 {
			st.Undo(r)
			continue
		}
		r.Object, _ = json.Marshal(c)
		ledger.Put(st.Objs.Ledger, r)
	}
}

// revokeFlows forgets the tracked flows of the endpoint that its new policy
// does not allow, so that their next packets meet the policy and are
// dropped (a TCP segment other than a SYN of a flow conntrack does not
// know is dropped whatever the policy). A flow between two local endpoints
// is forgotten on both sides: the other side's entry would let its
// replies through. The flows it still allows are kept and lose nothing.
// Service entries (CT_SERVICE) say which backend a flow was sent to, not
// whether it may go: the flow's own entry, to the backend, is decided.
func revokeFlows(st *core.State, endpoint uint16, m *MapEntries) error {
	var (
		k           bpfobj.TypesCtKey
		v           bpfobj.TypesCtEntry
		own, theirs []bpfobj.TypesCtKey
	)
	egress, ingress := uint8(bpfobj.TypesCtDirCT_EGRESS), uint8(bpfobj.TypesCtDirCT_INGRESS)
	it := st.Objs.Conntrack.Iterate()
	for it.Next(&k, &v) {
		if v.Endpoint != endpoint || (k.Dir != egress && k.Dir != ingress) {
			continue
		}
		dir, peer := datapath.Egress, k
		peer.Dir = ingress
		if k.Dir == ingress {
			dir, peer.Dir = datapath.Ingress, egress
		}
		if verdict, _ := m.Decide(endpoint, dir, datapath.Identity(v.Policy.Identity), k.Proto, flowPort(&k)); verdict == datapath.VerdictDenied {
			own, theirs = append(own, k), append(theirs, peer)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read tracked flows: %w", err)
	}
	for _, k := range own {
		if err := deleteKey(st.Objs.Conntrack, &k); err != nil {
			return err
		}
	}
	// The other side's entry only if it is another endpoint's: the same
	// tuple the other way may be this endpoint's own flow.
	for _, k := range theirs {
		if st.Objs.Conntrack.Lookup(&k, &v) != nil || v.Endpoint == endpoint {
			continue
		}
		if err := deleteKey(st.Objs.Conntrack, &k); err != nil {
			return err
		}
	}
	return nil
}

// flowPort is the port policy decides a tracked flow by: its destination
// port, or for ICMP echo (the one ICMP flow tracked) the request's type.
func flowPort(k *bpfobj.TypesCtKey) uint16 {
	switch Protocol(k.Proto) {
	case ICMP:
		return 8 << 8
	case ICMPv6:
		return 128 << 8
	}
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], k.Dport)
	return binary.BigEndian.Uint16(b[:])
}

// Counters are the new flows each rule of an endpoint's policy decided, by
// rule index, in each direction.
type Counters struct {
	Ingress, Egress []uint64
}

// ReadCounters returns the per-rule counters of the endpoint's policy, or
// an error matching ErrNotFound when it has none.
func ReadCounters(dp *datapath.Datapath, endpoint uint16) (Counters, error) {
	st := core.Of(dp)
	release, err := st.Use()
	if err != nil {
		return Counters{}, err
	}
	defer release()
	p, err := get(st, endpoint)
	if err != nil {
		return Counters{}, err
	}
	read := func(dir datapath.Direction, n int) ([]uint64, error) {
		out := make([]uint64, n)
		for rule := range n {
			k := bpfobj.TypesPolicyCounterKey{Endpoint: endpoint, Dir: uint8(dir), Rule: uint16(rule)}
			var percpu []bpfobj.TypesPolicyCounter
			err := st.Objs.PolicyCounters.Lookup(&k, &percpu)
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("read policy counters: %w", err)
			}
			for _, c := range percpu {
				out[rule] += c.Flows
			}
		}
		return out, nil
	}
	var c Counters
	if c.Ingress, err = read(datapath.Ingress, len(p.Ingress)); err != nil {
		return Counters{}, err
	}
	if c.Egress, err = read(datapath.Egress, len(p.Egress)); err != nil {
		return Counters{}, err
	}
	return c, nil
}
