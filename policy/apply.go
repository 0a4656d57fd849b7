package policy

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/batch"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/txn"
)

// Changes says what Apply or Delete changed in the datapath's maps.
type Changes struct {
	Added   int // entries written that were not there
	Changed int // entries written over another value
	Removed int // entries deleted
}

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
		var rec record
		if json.Unmarshal(r.Object, &rec) == nil && rec.NoLive {
			continue // its first Apply is under way
		}
		out = append(out, uint16(r.ID))
	}
	slices.Sort(out)
	return out, nil
}

func get(st *core.State, endpoint uint16) (Policy, error) {
	_, rec, err := loadRecord(st, endpoint)
	if err != nil {
		return Policy{}, err
	}
	if rec == nil || rec.NoLive {
		return Policy{}, fmt.Errorf("policy of endpoint %d: %w", endpoint, datapath.ErrNotFound)
	}
	doc, err := liveDoc(st, endpoint, rec)
	if err != nil {
		return Policy{}, err
	}
	p, err := decode(doc)
	if err != nil {
		return Policy{}, fmt.Errorf("policy of endpoint %d: %w: %w", endpoint, datapath.ErrIncompatible, err)
	}
	return p, nil
}

// memo is what Apply last wrote for an endpoint through this handle:
// valid while the ledger record has the same generation.
type memo struct {
	generation uint64
	entries    *MapEntries
	doc        []byte
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

// apply makes c, encoded as doc, the endpoint's policy, or none when c is
// nil, as one transaction (internal/txn) of these phases:
//
//   - cidrs: the CIDR identities c names, given and put in the ipcache
//     (undo: given back);
//   - plan: c's entries, and what differs from those in the maps; when
//     nothing does, and c is the live policy, nothing is written;
//   - intent: c's encoding into the blob slot not live, and the record,
//     Creating, naming it as the target (undo: the record as it was);
//   - maps: the entries, written in Plan's order (undo: the old ones
//     written back);
//   - revoke: the tracked flows c does not allow forgotten;
//   - commit: the record, Ready, naming c live;
//   - cleanup: the old policy's blob, its rules' counters and the CIDR
//     identities only it held, removed.
//
// A process killed at any point leaves the record naming the live policy
// (Get returns it) and the target, and maps holding either or a mix of
// both: Reconcile finishes the change (repair). The entries in the maps
// are read back unless this handle's memo is current, so a change a killed
// process left is finished here too.
func apply(st *core.State, endpoint uint16, c *Compiled, doc []byte) (Changes, error) {
	r, old, err := loadRecord(st, endpoint)
	if err != nil {
		return Changes{}, err
	}
	ready := r == nil || r.State == ledger.Ready
	var last *memo
	if v, ok := st.Memo.LoadAndDelete(memoKey(endpoint)); ok && old != nil && ready && v.(*memo).generation == old.Generation {
		last = v.(*memo)
	}
	if last != nil && c != nil && bytes.Equal(last.doc, doc) {
		st.Memo.Store(memoKey(endpoint), last) // applied already, by this handle
		return Changes{}, nil
	}
	var (
		prefixes   []netip.Prefix // c's CIDR identities
		held       []netip.Prefix // those the record holds: the live policy's and an unfinished target's
		have, want *MapEntries
		live       []byte
		steps      []Step
		changes    Changes
		next       = target{Delete: c == nil}
		gen        = newGeneration()
		restored   = true // the maps are as they were, after an undo
	)
	if old != nil {
		held = old.Prefixes
		if old.Target != nil {
			held = append(slices.Clone(held), old.Target.Prefixes...)
		}
		if !old.NoLive {
			next.Slot = 1 - old.Slot
		}
	}
	if c != nil {
		prefixes = c.Prefixes()
		next.Prefixes = prefixes
	}
	err = txn.Run("policy",
		txn.Phase{
			Name: "cidrs",
			Do: func() error {
				if c == nil {
					return nil
				}
				ids, fresh, err := acquireCIDRs(st, endpoint, prefixes)
				if err != nil {
					return err
				}
				// A new CIDR identity takes its addresses from the
				// prefixes around it: the policies with such a prefix
				// name it too, before any packet carries it.
				if err := refresh(st, endpoint, ids, fresh); err != nil {
					return err
				}
				if err := publishCIDRs(st, fresh); err != nil {
					return err
				}
				want, err = c.Resolve(endpoint, ids)
				return err
			},
			Undo: func() error {
				if c != nil {
					releaseCIDRs(st, endpoint, prefixes, held)
				}
				return nil
			},
		},
		txn.Phase{
			Name: "plan",
			Do: func() (err error) {
				if last != nil {
					have, live = last.entries, last.doc
				} else {
					if have, err = current(st, endpoint); err != nil {
						return err
					}
					if live, err = liveDoc(st, endpoint, old); err != nil {
						return err
					}
				}
				steps = Plan(have, want)
				if ready && len(steps) == 0 && bytes.Equal(live, doc) {
					return txn.ErrUnchanged
				}
				return checkRoom(st, endpoint, have, steps)
			},
		},
		txn.Phase{
			Name: "intent",
			Do: func() error {
				if c != nil {
					if err := putDoc(st, endpoint, next.Slot, doc, nil); err != nil {
						return err
					}
				}
				rec := record{Generation: gen, Target: &next, NoLive: old == nil || old.NoLive}
				if old != nil {
					rec.Prefixes, rec.Slot = old.Prefixes, old.Slot
				}
				return putRecord(st, endpoint, ledger.Creating, &rec)
			},
			Undo: func() error {
				var errs []error
				if c != nil {
					errs = append(errs, deleteDoc(st, endpoint, next.Slot))
				}
				if old == nil {
					errs = append(errs, ledger.Delete(st.Objs.Ledger, ledger.KindPolicy, uint32(endpoint)))
				} else {
					// The record as it was, generation and all, when the
					// maps are as they were: a memo of them still holds.
					was := *old
					if !restored {
						was.Generation = gen
					}
					errs = append(errs, putRecord(st, endpoint, r.State, &was))
				}
				return errors.Join(errs...)
			},
		},
		txn.Phase{
			Name: "maps",
			Do: func() (err error) {
				changes, err = write(st, endpoint, steps, have)
				return err
			},
			// The new entries' plan backwards: no packet meets a
			// policy that is neither.
			Undo: func() error {
				_, err := write(st, endpoint, Plan(want, have), want)
				restored = err == nil
				return err
			},
		},
		txn.Phase{
			Name: "revoke",
			// A stricter policy governs the flows already running:
			// whatever it no longer allows is forgotten, and only a
			// new connection could bring it back, which the policy
			// decides. A direction that gets its first policy, even
			// one with no rule, changes only the summary.
			Do: func() error {
				if c == nil || len(steps) == 0 {
					return nil
				}
				return revokeFlows(st, endpoint, want)
			},
		},
		txn.Phase{
			Name: "commit",
			Do: func() error {
				if c == nil {
					return ledger.Delete(st.Objs.Ledger, ledger.KindPolicy, uint32(endpoint))
				}
				if err := putRecord(st, endpoint, ledger.Ready, &record{Generation: gen, Prefixes: prefixes, Slot: next.Slot}); err != nil {
					return err
				}
				st.Memo.Store(memoKey(endpoint), &memo{generation: gen, entries: want, doc: doc})
				return nil
			},
		},
		txn.Phase{
			Name:  "cleanup",
			After: true,
			// What the old policy had and the new one does not.
			Do: func() error {
				var errs []error
				for _, slot := range []uint32{0, 1} {
					if c == nil || slot != next.Slot {
						errs = append(errs, deleteDoc(st, endpoint, slot))
					}
				}
				if !bytes.Equal(live, doc) {
					// The rule indexes name the new rules now: their
					// counts start over.
					errs = append(errs, st.Sweep(counterSweep(endpoint)))
				}
				releaseCIDRs(st, endpoint, held, prefixes)
				return errors.Join(errs...)
			},
		},
	)
	if errors.Is(err, txn.ErrUnchanged) {
		if c != nil {
			st.Memo.Store(memoKey(endpoint), &memo{generation: old.Generation, entries: want, doc: doc})
		}
		return Changes{}, nil
	}
	if err != nil {
		return Changes{}, err
	}
	return changes, nil
}

// checkRoom fails with ErrMapFull when the policy map cannot hold the
// endpoint's entries at the peak of the change, when the new entries are
// written and the old not yet deleted, even with no other endpoint's in
// it. Beside the others' entries the map itself refuses (E2BIG, counted
// against the whole map), and the change is taken back: counting the map
// first would walk all its buckets for every change.
func checkRoom(st *core.State, endpoint uint16, have *MapEntries, steps []Step) error {
	peak := len(have.Entries)
	for _, step := range steps {
		for k := range step.Entries {
			if _, ok := have.Entries[k]; !ok && !step.Delete {
				peak++
			}
		}
	}
	if size := int(st.Objs.Policy.MaxEntries()); peak > size {
		return fmt.Errorf("policy of endpoint %d needs %d entries, the policy map holds %d: %w", endpoint, peak, size, datapath.ErrMapFull)
	}
	return nil
}

// write takes the steps of a plan (Plan) from the endpoint's entries have,
// and counts what changed: a direction's summary is an entry too, counted
// once though a plan may write it twice (covering, then final). A kill
// half-way is a crash point of its own: the maps hold a mix.
func write(st *core.State, endpoint uint16, steps []Step, have *MapEntries) (changes Changes, err error) {
	total := 0
	for _, step := range steps {
		total += len(step.Entries)
	}
	done := 0
	counted := map[bpfobj.TypesPolicyMetaKey]bool{}
	for _, step := range steps {
		for k, v := range step.Meta {
			was, had := have.Meta[k]
			switch {
			case step.Delete:
				changes.Removed++
			case counted[k] || (had && was == v):
			case had:
				changes.Changed++
			default:
				changes.Added++
			}
			counted[k] = true
			if step.Delete {
				err = deleteKey(st.Objs.PolicyMeta, &k)
			} else {
				err = st.Objs.PolicyMeta.Put(&k, &v)
			}
			if err != nil {
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
				return changes, core.MapError(err, datapath.ErrMapFull, fmt.Sprintf("policy of endpoint %d", endpoint))
			}
			if done++; done == total/2 {
				txn.Crash("policy/maps/half")
			}
		}
	}
	return changes, nil
}

// refresh resolves again, with ids, the policies of other endpoints that
// name a prefix around one of the fresh ones, and writes their entries,
// each as a change of its own: its record Creating with its own policy as
// the target, then Ready.
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
		if ep == except || r.State != ledger.Ready || json.Unmarshal(r.Object, &rec) != nil || !covers(rec.Prefixes, fresh) {
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
		have, err := current(st, ep)
		if err != nil {
			return err
		}
		// A new generation: every handle's memo of ep is out of date.
		st.Memo.Delete(memoKey(ep))
		rec.Generation = newGeneration()
		rec.Target = &target{Slot: rec.Slot, Prefixes: rec.Prefixes}
		if err := putRecord(st, ep, ledger.Creating, &rec); err != nil {
			return err
		}
		if _, err := write(st, ep, Plan(have, want), have); err != nil {
			_, undoErr := write(st, ep, Plan(want, have), want)
			return errors.Join(err, undoErr)
		}
		rec.Target = nil
		if err := putRecord(st, ep, ledger.Ready, &rec); err != nil {
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

func deleteKey(m *ebpf.Map, k any) error {
	if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete from %s: %w", m, err)
	}
	return nil
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
	ids, byPrefix, err := cidrIdentities(st)
	if err != nil {
		return nil, nil, err
	}
	if limit := st.CIDRIdentities; limit > 0 {
		n := len(byPrefix)
		for _, p := range prefixes {
			if byPrefix[p] == nil {
				n++
			}
		}
		if n > limit {
			return nil, nil, fmt.Errorf("policy of endpoint %d: %d CIDR identities, the datapath holds %d: %w", endpoint, n, limit, datapath.ErrMapFull)
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
			txn.Crash("policy/cidrs/recorded")
		} else if _, ok, err := ipcache.Lookup(st.Objs.Ipcache, p); err != nil {
			return nil, nil, err
		} else if !ok {
			// Recorded by a process killed before it reached the
			// ipcache: the prefix would count as world, and a deny of
			// it would not match.
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

// cidrIdentities returns every CIDR identity the ledger records, and its
// record, by prefix.
func cidrIdentities(st *core.State) (map[netip.Prefix]datapath.Identity, map[netip.Prefix]*ledger.Record, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindCIDR)
	if err != nil {
		return nil, nil, err
	}
	ids := map[netip.Prefix]datapath.Identity{}
	byPrefix := map[netip.Prefix]*ledger.Record{}
	for _, r := range recs {
		var c cidrRecord
		if json.Unmarshal(r.Object, &c) == nil {
			byPrefix[c.Prefix] = r
			ids[c.Prefix] = CIDRIdentityFirst + datapath.Identity(r.ID)
		}
	}
	return ids, byPrefix, nil
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
			return nil, core.MapError(err, datapath.ErrMapFull, "CIDR "+p.String())
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
		v           bpfobj.TypesCtEntry
		own, theirs []bpfobj.TypesCtKey
	)
	egress, ingress := uint8(bpfobj.TypesCtDirCT_EGRESS), uint8(bpfobj.TypesCtDirCT_INGRESS)
	// In batches, bucket by bucket: an iteration by next key aborts when
	// the datapath deletes the key it stands on, which a busy map does.
	const batch = 4096
	keys := make([]bpfobj.TypesCtKey, batch)
	vals := make([]bpfobj.TypesCtEntry, batch)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := st.Objs.Conntrack.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			k, v := keys[i], vals[i]
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
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return fmt.Errorf("read tracked flows: %w", err)
		}
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
	_, rec, err := loadRecord(st, endpoint)
	if err != nil {
		return Counters{}, err
	}
	if rec == nil || rec.NoLive {
		return Counters{}, fmt.Errorf("policy of endpoint %d: %w", endpoint, datapath.ErrNotFound)
	}
	rules, err := rulesOf(st, endpoint, rec)
	if err != nil {
		return Counters{}, err
	}
	c := rules.counters()
	for _, dir := range []datapath.Direction{datapath.Ingress, datapath.Egress} {
		for rule := range c.of(dir) {
			k := bpfobj.TypesPolicyCounterKey{Endpoint: endpoint, Dir: uint8(dir), Rule: uint16(rule)}
			var percpu []bpfobj.TypesPolicyCounter
			err := st.Objs.PolicyCounters.Lookup(&k, &percpu)
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				continue
			}
			if err != nil {
				return Counters{}, fmt.Errorf("read policy counters: %w", err)
			}
			c.add(&k, percpu)
		}
	}
	return c, nil
}

// ReadAllCounters returns the per-rule counters of every endpoint's
// policy, by endpoint: ReadCounters of each, in one pass over the ledger
// and one over the counters.
func ReadAllCounters(dp *datapath.Datapath) (map[uint16]Counters, error) {
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
	out := make(map[uint16]Counters, len(recs))
	for _, r := range recs {
		var rec record
		if err := json.Unmarshal(r.Object, &rec); err != nil || rec.Version != recordVersion {
			return nil, fmt.Errorf("policy of endpoint %d: %w: unreadable record", r.ID, datapath.ErrIncompatible)
		}
		if rec.NoLive {
			continue // its first Apply is under way
		}
		rules, err := rulesOf(st, uint16(r.ID), &rec)
		if err != nil {
			return nil, err
		}
		out[uint16(r.ID)] = rules.counters()
	}
	err = batch.EachPerCPU(st.Objs.PolicyCounters, func(k *bpfobj.TypesPolicyCounterKey, percpu []bpfobj.TypesPolicyCounter) {
		if c, ok := out[k.Endpoint]; ok {
			c.add(k, percpu)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("read policy counters: %w", err)
	}
	return out, nil
}

// of returns the counters of a direction.
func (c *Counters) of(dir datapath.Direction) []uint64 {
	if dir == datapath.Egress {
		return c.Egress
	}
	return c.Ingress
}

// add adds a counter read from the map to its rule's, if the rule is one
// of the live policy's (until the cleanup of an Apply that changed the
// policy starts its counts over, the old policy's may still be there).
func (c *Counters) add(k *bpfobj.TypesPolicyCounterKey, percpu []bpfobj.TypesPolicyCounter) {
	rules := c.of(datapath.Direction(k.Dir))
	if int(k.Rule) >= len(rules) {
		return
	}
	for _, v := range percpu {
		rules[k.Rule] += v.Flows
	}
}

// rules is how many rules an endpoint's live policy has in each
// direction, as of a ledger record's generation and slot.
type rules struct {
	generation      uint64
	slot            uint32
	ingress, egress int
}

// counters returns zero counters for the rules.
func (r rules) counters() Counters {
	return Counters{Ingress: make([]uint64, r.ingress), Egress: make([]uint64, r.egress)}
}

func rulesKey(endpoint uint16) string { return fmt.Sprintf("policy rules/%d", endpoint) }

// rulesOf returns how many rules the live policy of the endpoint, whose
// ledger record is rec, has. Decoding the policy is most of what reading
// its counters costs, so the answer stays on the handle for as long as
// the record names the same policy (every change makes a new
// generation).
func rulesOf(st *core.State, endpoint uint16, rec *record) (rules, error) {
	if v, ok := st.Memo.Load(rulesKey(endpoint)); ok {
		if r := v.(rules); r.generation == rec.Generation && r.slot == rec.Slot {
			return r, nil
		}
	}
	doc, err := liveDoc(st, endpoint, rec)
	if err != nil {
		return rules{}, err
	}
	p, err := decode(doc)
	if err != nil {
		return rules{}, fmt.Errorf("policy of endpoint %d: %w: %w", endpoint, datapath.ErrIncompatible, err)
	}
	r := rules{generation: rec.Generation, slot: rec.Slot, ingress: len(p.Ingress), egress: len(p.Egress)}
	st.Memo.Store(rulesKey(endpoint), r)
	return r, nil
}
