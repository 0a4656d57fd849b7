package policy

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
)

func resolve(t testing.TB, p Policy, ids map[netip.Prefix]datapath.Identity) *MapEntries {
	t.Helper()
	c, err := Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Resolve(3, ids)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestDiff(t *testing.T) {
	from := resolve(t, Policy{Ingress: []Rule{
		{Peers: []Peer{{Identity: 300}}, Ports: []Port{{Protocol: TCP, Port: 80}}},
		{Peers: []Peer{{Identity: 301}}},
	}}, nil)
	to := resolve(t, Policy{Audit: true, Ingress: []Rule{
		{Peers: []Peer{{Identity: 301}}},
		{Peers: []Peer{{Identity: 302}}},
	}, Egress: []Rule{}}, nil)
	add, remove := Diff(from, to)
	if len(add.Entries) != 2 || len(add.Meta) != 2 || len(remove.Entries) != 1 || len(remove.Meta) != 0 {
		t.Errorf("add %v, remove %v", add, remove)
	}
	if k := (bpfobj.TypesPolicyKey{Identity: 301, Endpoint: 3}); add.Entries[k].Rule != 0 || remove.Entries[k] != (bpfobj.TypesPolicyEntry{}) {
		t.Errorf("rule 1 became rule 0: add %v, remove %v", add.Entries, remove.Entries)
	}
	if add, remove := Diff(to, to); len(add.Entries)+len(add.Meta)+len(remove.Entries)+len(remove.Meta) != 0 {
		t.Errorf("no change: add %v, remove %v", add, remove)
	}
	if len(Plan(to, to)) != 0 || len(Plan(nil, nil)) != 0 {
		t.Errorf("no change: %v", Plan(to, to))
	}
	if add, remove := Diff(nil, to); !maps.Equal(add.Entries, to.Entries) || !maps.Equal(add.Meta, to.Meta) || len(remove.Entries) != 0 {
		t.Errorf("from nothing: add %v, remove %v", add, remove)
	}
	if add, remove := Diff(from, nil); !maps.Equal(remove.Entries, from.Entries) || len(add.Entries) != 0 {
		t.Errorf("to nothing: add %v, remove %v", add, remove)
	}
}

// TestPlan replaces random policies with others, one map change at a
// time in a random order within each step, and checks after each change
// that every packet meets the old policy or the new one.
func TestPlan(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		data := make([]byte, 200)
		for j := range data {
			data[j] = byte(rnd.Uint32())
		}
		in := fuzzInput(data)
		ids := map[netip.Prefix]datapath.Identity{}
		for _, q := range universe {
			ids[q] = universeID(q)
		}
		policies := [2]Policy{genPolicy(&in), genPolicy(&in)}
		if i%10 == 0 {
			policies[i/10%2] = Policy{} // no policy before or after
		}
		from, to := resolve(t, policies[0], ids), resolve(t, policies[1], ids)
		packets := append(genPackets(policies[0], universe, &in), genPackets(policies[1], universe, &in)...)
		rnd.Shuffle(len(packets), func(a, b int) { packets[a], packets[b] = packets[b], packets[a] })
		packets = packets[:min(len(packets), 100)]
		state := &MapEntries{Entries: maps.Clone(from.Entries), Meta: maps.Clone(from.Meta)}
		check := func(what string) {
			for _, pkt := range packets {
				for _, dir := range []uint8{0, 1} {
					decide := func(m *MapEntries) policyResult {
						return policyCheck(m, 3, dir, uint32(pkt.remote), uint8(pkt.proto), pkt.port)
					}
					before, after, now := decide(from), decide(to), decide(state)
					pass := func(r policyResult) bool { return r.verdict != policyDenied }
					if before.verdict == after.verdict && now.verdict != before.verdict || pass(now) != pass(before) && pass(now) != pass(after) {
						t.Fatalf("case %d, %s: dir %d %s: %+v, before %+v, after %+v\nbefore: %s\nafter: %s",
							i, what, dir, pkt, now, before, after, describe(policies[0]), describe(policies[1]))
					}
				}
			}
		}
		for n, step := range Plan(from, to) {
			what := fmt.Sprintf("step %d", n+1)
			oneByOne(rnd, state.Entries, step.Entries, step.Delete, func() { check(what + " (entries)") })
			oneByOne(rnd, state.Meta, step.Meta, step.Delete, func() { check(what + " (meta)") })
		}
		if !maps.Equal(state.Entries, to.Entries) || !maps.Equal(state.Meta, to.Meta) {
			t.Fatalf("case %d: the plan ends in\n%v\n%v\nnot\n%v\n%v", i, state.Entries, state.Meta, to.Entries, to.Meta)
		}
	}
}

// oneByOne writes or deletes the changes in state one at a time, in a
// random order, calling check after each.
func oneByOne[K comparable, V any](rnd *rand.Rand, state, changes map[K]V, del bool, check func()) {
	keys := slices.Collect(maps.Keys(changes))
	rnd.Shuffle(len(keys), func(a, b int) { keys[a], keys[b] = keys[b], keys[a] })
	for _, k := range keys {
		if del {
			delete(state, k)
		} else {
			state[k] = changes[k]
		}
		check()
	}
}
