package policy

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/ledger"
)

func init() {
	core.RegisterRepair(ledger.KindPolicy, repairPolicies)
	core.RegisterRepair(ledger.KindCIDR, repairCIDRs)
	core.RegisterCheck(ledger.KindPolicy, checkPolicies)
	core.RegisterCheck(ledger.KindCIDR, checkCIDRs)
}

// repairPolicies finishes each change of a policy that a killed process
// left (a record that is not Ready): its target becomes live, or, when it
// cannot (its blob is not whole, the maps cannot hold it), the live policy
// is written again. It returns how many it finished.
func repairPolicies(st *core.State) (int, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindPolicy)
	if err != nil {
		return 0, fmt.Errorf("policies: %w: %w", datapath.ErrIncompatible, err)
	}
	n := 0
	for _, r := range recs {
		if r.State == ledger.Ready {
			// A process killed after the change, before it deleted
			// the old policy's blob, left it.
			var rec record
			if json.Unmarshal(r.Object, &rec) == nil {
				if err := deleteDoc(st, uint16(r.ID), 1-rec.Slot); err != nil {
					return n, err
				}
			}
			continue
		}
		ep := uint16(r.ID)
		st.Memo.Delete(memoKey(ep))
		if checkEndpoint(st, ep) != nil {
			// Its endpoint is gone: so is the policy, whole.
			if err := st.Undo(r); err != nil {
				return n, err
			}
			n++
			continue
		}
		_, rec, err := loadRecord(st, ep)
		if err != nil {
			return n, err
		}
		if err := finish(st, ep, rec); err != nil {
			return n, fmt.Errorf("policy of endpoint %d: finish a change: %w", ep, err)
		}
		n++
	}
	return n, nil
}

// finish makes the change's target the endpoint's policy, or, failing
// that, its live policy again.
func finish(st *core.State, ep uint16, rec *record) error {
	var errs []error
	if t := rec.Target; t != nil {
		if t.Delete {
			_, err := apply(st, ep, nil, nil)
			return err
		}
		err := applyDoc(st, ep, t.Slot)
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Errorf("target: %w", err))
	}
	if rec.NoLive {
		_, err := apply(st, ep, nil, nil)
		return errors.Join(append(errs, err)...)
	}
	if err := applyDoc(st, ep, rec.Slot); err != nil {
		return errors.Join(append(errs, fmt.Errorf("live: %w", err))...)
	}
	return nil
}

// applyDoc applies the policy of a blob slot.
func applyDoc(st *core.State, ep uint16, slot uint32) error {
	doc, err := ledger.GetBlob(st.Objs.LedgerBlobs, ledger.KindPolicy, blobID(ep, slot))
	if err != nil {
		return err
	}
	p, err := decode(doc)
	if err != nil {
		return err
	}
	c, err := Compile(p)
	if err != nil {
		return err
	}
	_, err = apply(st, ep, c, doc)
	return err
}

// repairCIDRs makes every CIDR identity what the policies say (see
// checkCIDRs). A process killed after recording an identity and before
// the ipcache had it would otherwise leave the prefix as world: a deny of
// it would not match. It returns how many identities it changed.
func repairCIDRs(st *core.State) (int, error) {
	drift, err := checkCIDRs(st, true)
	return len(drift), err
}

// checkCIDRs compares every CIDR identity with the policies: its users are
// the endpoints whose policy (live, or the target of a change) names its
// prefix, one with no user should be gone, and one with users should be in
// the ipcache; a CIDR entry of the ipcache that no identity has should not
// be there.
func checkCIDRs(st *core.State, repair bool) ([]core.Drift, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindCIDR)
	if err != nil {
		return nil, fmt.Errorf("CIDR identities: %w: %w", datapath.ErrIncompatible, err)
	}
	var drift []core.Drift
	recorded := map[netip.Prefix]bool{}
	for _, r := range recs {
		var c cidrRecord
		if err := json.Unmarshal(r.Object, &c); err != nil {
			return drift, fmt.Errorf("CIDR identity %d: %w: %w", r.ID, datapath.ErrIncompatible, err)
		}
		object := "CIDR identity of " + c.Prefix.String()
		users := slices.DeleteFunc(slices.Clone(c.Users), func(u uint16) bool {
			_, rec, err := loadRecord(st, u)
			return err == nil && (rec == nil || !rec.holds(c.Prefix))
		})
		if len(users) == 0 {
			d := core.Drift{Object: object, What: "no policy names it"}
			if repair {
				if err := st.Undo(r); err != nil {
					return drift, err
				}
				d.Repaired = true
			}
			drift = append(drift, d)
			continue
		}
		recorded[c.Prefix] = true
		if len(users) != len(c.Users) {
			d := core.Drift{Object: object, What: fmt.Sprintf("%d of its users have no policy that names it", len(c.Users)-len(users))}
			if repair {
				c.Users = users
				r.Object, _ = json.Marshal(c)
				if err := ledger.Put(st.Objs.Ledger, r); err != nil {
					return drift, err
				}
				d.Repaired = true
			}
			drift = append(drift, d)
		}
		id := uint32(CIDRIdentityFirst) + r.ID
		v, ok, err := ipcache.Lookup(st.Objs.Ipcache, c.Prefix)
		if err != nil {
			return drift, err
		}
		if ok && (ipcache.Source(v.Source) != ipcache.CIDR || v.Identity == id) {
			continue // its own, or another writer's, which decides
		}
		d := core.Drift{Object: object, What: "not in the ipcache: the prefix counts as world"}
		if repair {
			if err := ipcache.Put(st.Objs.Ipcache, c.Prefix, ipcache.Entry{Identity: id}, ipcache.CIDR); err != nil && !errors.Is(err, ipcache.ErrOwned) {
				return drift, core.MapError(err, datapath.ErrMapFull, object)
			}
			d.Repaired = true
		}
		drift = append(drift, d)
	}
	stray, err := st.CheckIpcache(ipcache.CIDR, recorded, repair)
	return append(drift, stray...), err
}

// checkPolicies compares the policy maps with the policies: each ready
// policy's entries with what it resolves to now, and the entries, meta,
// counters and stored policies of endpoints that have no policy.
func checkPolicies(st *core.State, repair bool) ([]core.Drift, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindPolicy)
	if err != nil {
		return nil, fmt.Errorf("policies: %w: %w", datapath.ErrIncompatible, err)
	}
	ids, _, err := cidrIdentities(st)
	if err != nil {
		return nil, err
	}
	var drift []core.Drift
	live := map[uint32]bool{} // blob IDs in use
	have := map[uint16]bool{}
	for _, r := range recs {
		ep := uint16(r.ID)
		have[ep] = true
		object := fmt.Sprintf("policy of endpoint %d", ep)
		_, rec, err := loadRecord(st, ep)
		if err != nil {
			drift = append(drift, core.Drift{Object: object, What: err.Error()})
			continue
		}
		live[blobID(ep, rec.Slot)] = true
		if r.State != ledger.Ready {
			if rec.Target != nil {
				live[blobID(ep, rec.Target.Slot)] = true
			}
			drift = append(drift, core.Drift{Object: object, What: "being changed by a process that was killed: Reconcile finishes the change"})
			continue
		}
		p, err := get(st, ep)
		if err != nil {
			drift = append(drift, core.Drift{Object: object, What: err.Error()})
			continue
		}
		c, err := Compile(p)
		if err != nil {
			drift = append(drift, core.Drift{Object: object, What: err.Error()})
			continue
		}
		want, err := c.Resolve(ep, ids)
		if err != nil {
			drift = append(drift, core.Drift{Object: object, What: err.Error()})
			continue
		}
		in, err := current(st, ep)
		if err != nil {
			return drift, err
		}
		add, remove := Diff(in, want)
		if n := len(add.Entries) + len(add.Meta) + len(remove.Entries) + len(remove.Meta); n > 0 {
			d := core.Drift{Object: object, What: fmt.Sprintf("the maps lack or differ in %d of its entries and hold %d it does not have",
				len(add.Entries)+len(add.Meta), len(remove.Entries)+len(remove.Meta))}
			if repair {
				st.Memo.Delete(memoKey(ep))
				if _, err := write(st, ep, Plan(in, want), in); err != nil {
					return drift, err
				}
				d.Repaired = true
			}
			drift = append(drift, d)
		}
	}
	// Entries of endpoints with no policy.
	stray := map[string]map[uint16]int{}
	count := func(m string, ep uint16) {
		if !have[ep] {
			if stray[m] == nil {
				stray[m] = map[uint16]int{}
			}
			stray[m][ep]++
		}
	}
	if err := eachKey(st.Objs.Policy, func(k *bpfobj.TypesPolicyKey) { count("policy", k.Endpoint) }); err != nil {
		return drift, err
	}
	if err := eachKey(st.Objs.PolicyMeta, func(k *bpfobj.TypesPolicyMetaKey) { count("policy_meta", k.Endpoint) }); err != nil {
		return drift, err
	}
	if err := eachKey(st.Objs.PolicyCounters, func(k *bpfobj.TypesPolicyCounterKey) { count("policy_counters", k.Endpoint) }); err != nil {
		return drift, err
	}
	for _, m := range []string{"policy", "policy_meta", "policy_counters"} {
		for ep, n := range stray[m] {
			d := core.Drift{Object: m, What: fmt.Sprintf("%d entries of endpoint %d, which has no policy", n, ep)}
			if repair {
				for _, sw := range sweeps(ep) {
					if sw.Map == m {
						if err := st.Sweep(sw); err != nil {
							return drift, err
						}
					}
				}
				d.Repaired = true
			}
			drift = append(drift, d)
		}
	}
	// Stored policies no record names.
	var blobs []bpfobj.TypesLedgerBlobKey
	if err := eachKey(st.Objs.LedgerBlobs, func(k *bpfobj.TypesLedgerBlobKey) {
		if ledger.Kind(k.Kind) == ledger.KindPolicy && k.Chunk == 0 && !live[k.Id] {
			blobs = append(blobs, *k)
		}
	}); err != nil {
		return drift, err
	}
	for _, k := range blobs {
		d := core.Drift{Object: "ledger_blobs", What: fmt.Sprintf("a stored policy of endpoint %d (slot %d) that no record names", k.Id&0xffff, k.Id>>16)}
		if repair {
			if err := ledger.DeleteBlob(st.Objs.LedgerBlobs, ledger.KindPolicy, k.Id); err != nil {
				return drift, err
			}
			d.Repaired = true
		}
		drift = append(drift, d)
	}
	return drift, nil
}

// eachKey calls f with every key of a map. The maps it walks change only
// under the lock (the datapath adds counters, and deletes none).
func eachKey[K any](m *ebpf.Map, f func(*K)) error {
	var cur, next K
	var from any // nil: from the first key
	for {
		err := m.NextKey(from, &next)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", m, err)
		}
		cur = next
		f(&cur)
		from = &cur
	}
}

// holds reports whether the record's live policy or its target names a
// prefix.
func (rec *record) holds(p netip.Prefix) bool {
	if slices.Contains(rec.Prefixes, p) {
		return true
	}
	return rec.Target != nil && slices.Contains(rec.Target.Prefixes, p)
}
