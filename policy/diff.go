package policy

import (
	"slices"

	"github.com/sluicedp/sluice/internal/bpfobj"
)

// Diff returns what turns the map entries from into to: add holds the
// entries and meta values to write (those to lacks or has with another
// value), remove the keys of from that to lacks, with their old values. A
// nil argument has no entries. Plan orders the same changes so that no
// packet meets a policy that is neither from nor to.
func Diff(from, to *MapEntries) (add, remove *MapEntries) {
	from, to = from.orEmpty(), to.orEmpty()
	add, remove = newMapEntries(), newMapEntries()
	diff(add.Entries, remove.Entries, from.Entries, to.Entries)
	diff(add.Meta, remove.Meta, from.Meta, to.Meta)
	return add, remove
}

func diff[K, V comparable](add, remove, from, to map[K]V) {
	for k, v := range to {
		if old, ok := from[k]; !ok || old != v {
			add[k] = v
		}
	}
	for k, v := range from {
		if _, ok := to[k]; !ok {
			remove[k] = v
		}
	}
}

// Step is one batch of changes to the policy maps: its entries and meta
// values are written, or deleted when Delete is set, in any order.
type Step struct {
	Delete bool
	*MapEntries
}

// Plan returns the steps that turn the map entries from into to, to take
// in order. Taken so, each packet meets from's policy or to's at every
// moment: a packet both decide alike is decided so throughout, any other
// is let through only if one of them lets it through. The steps:
//
//  1. delete the meta of directions to has no policy in (their packets
//     are allowed from then on, as to wants);
//  2. write, for directions both have a policy in, meta that covers the
//     entries of both (audit if either audits);
//  3. write to's deny entries, 4. then its allow entries;
//  5. delete from's allow entries, 6. then its deny entries;
//  7. write to's meta (directions that gain a policy see it only now,
//     with all their entries in place).
//
// Steps with nothing to do are left out: no steps means no change.
func Plan(from, to *MapEntries) []Step {
	from, to = from.orEmpty(), to.orEmpty()
	add, remove := Diff(from, to)
	addDeny, addAllow := splitDeny(add.Entries)
	removeDeny, removeAllow := splitDeny(remove.Entries)
	steps := []Step{
		{Delete: true, MapEntries: &MapEntries{Meta: remove.Meta}},
		{MapEntries: &MapEntries{Meta: cover(from.Meta, to.Meta)}},
		{MapEntries: &MapEntries{Entries: addDeny}},
		{MapEntries: &MapEntries{Entries: addAllow}},
		{Delete: true, MapEntries: &MapEntries{Entries: removeAllow}},
		{Delete: true, MapEntries: &MapEntries{Entries: removeDeny}},
		{MapEntries: &MapEntries{Meta: add.Meta}},
	}
	return slices.DeleteFunc(steps, func(s Step) bool { return len(s.Entries) == 0 && len(s.Meta) == 0 })
}

// cover returns, for each direction both from and to have meta for and
// whose meta changes, a meta value that makes the entries of both
// visible.
func cover(from, to map[bpfobj.TypesPolicyMetaKey]bpfobj.TypesPolicyMetaValue) map[bpfobj.TypesPolicyMetaKey]bpfobj.TypesPolicyMetaValue {
	out := map[bpfobj.TypesPolicyMetaKey]bpfobj.TypesPolicyMetaValue{}
	for k, t := range to {
		f, ok := from[k]
		if !ok || f == t {
			continue
		}
		u := bpfobj.TypesPolicyMetaValue{PortPrefixes: f.PortPrefixes | t.PortPrefixes, Shapes: f.Shapes | t.Shapes, Flags: f.Flags | t.Flags}
		if u != f {
			out[k] = u
		}
	}
	return out
}

// splitDeny splits entries into denies and allows.
func splitDeny(m map[bpfobj.TypesPolicyKey]bpfobj.TypesPolicyEntry) (deny, allow map[bpfobj.TypesPolicyKey]bpfobj.TypesPolicyEntry) {
	deny, allow = map[bpfobj.TypesPolicyKey]bpfobj.TypesPolicyEntry{}, map[bpfobj.TypesPolicyKey]bpfobj.TypesPolicyEntry{}
	for k, v := range m {
		if v.Flags&uint8(bpfobj.TypesPolicyEntryFlagPOLICY_DENY) != 0 {
			deny[k] = v
		} else {
			allow[k] = v
		}
	}
	return deny, allow
}

func newMapEntries() *MapEntries {
	return &MapEntries{
		Entries: make(map[bpfobj.TypesPolicyKey]bpfobj.TypesPolicyEntry),
		Meta:    make(map[bpfobj.TypesPolicyMetaKey]bpfobj.TypesPolicyMetaValue),
	}
}

func (m *MapEntries) orEmpty() *MapEntries {
	if m == nil {
		return newMapEntries()
	}
	return m
}
