package policy_test

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/policy"
)

// ruleSet returns a policy of n ingress rules, each from its own identity to
// one TCP port: n map entries.
func ruleSet(t *testing.T, n int, port uint16) policy.Policy {
	t.Helper()
	var p policy.Policy
	for i := range n {
		p.Ingress = append(p.Ingress, policy.Rule{
			Peers: []policy.Peer{{Identity: datapath.Identity(2000 + i)}},
			Ports: []policy.Port{{Protocol: policy.TCP, Port: port}},
		})
	}
	c, err := policy.Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	if e, err := c.Resolve(1, nil); err != nil || len(e.Entries) != n {
		t.Fatalf("%d rules compile to %d entries (%v), want %d", n, len(e.Entries), err, n)
	}
	return p
}

// Limits.PolicyEntries is what the policies of all endpoints hold
// together, and every endpoint may have a policy (the ledger has room for
// its record): policies up to the limit are applied, one entry more is
// ErrMapFull and changes nothing.
func TestPolicyEntriesLimit(t *testing.T) {
	const limit = 48
	n := newNodeWith(t, datapath.Limits{Conntrack: 4096, Endpoints: 3, PolicyEntries: limit})
	if got := n.dp.Limits().PolicyEntries; got != limit {
		t.Fatalf("Limits().PolicyEntries = %d, want %d", got, limit)
	}
	ctx := context.Background()
	for i, ep := range []uint16{n.a.ID, n.b.ID, n.c.ID} {
		if _, err := policy.Apply(ctx, n.dp, ep, ruleSet(t, limit/3, uint16(80+i))); err != nil {
			t.Fatalf("policy of endpoint %d, %d of %d entries in use: %v", ep, i*limit/3, limit, err)
		}
	}
	for _, ep := range []uint16{n.a.ID, n.c.ID} {
		_, err := policy.Apply(ctx, n.dp, ep, ruleSet(t, limit/3+1, 80))
		if !errors.Is(err, datapath.ErrMapFull) {
			t.Errorf("one entry more than the limit, for endpoint %d: %v, want ErrMapFull", ep, err)
		}
	}
	if p, err := policy.Get(n.dp, n.a.ID); err != nil || len(p.Ingress) != limit/3 {
		t.Errorf("after the refused Apply, endpoint %d has %d rules (%v), want %d", n.a.ID, len(p.Ingress), err, limit/3)
	}
	// Room made is room to use.
	if _, err := policy.Delete(ctx, n.dp, n.b.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := policy.Apply(ctx, n.dp, n.a.ID, ruleSet(t, 2*limit/3, 80)); err != nil {
		t.Errorf("a policy that fits once another is deleted: %v", err)
	}
}

// Limits.CIDRIdentities is how many CIDR prefixes the policies name
// together: one more is ErrMapFull, and the policy stays as it was.
func TestCIDRIdentitiesLimit(t *testing.T) {
	n := newNodeWith(t, datapath.Limits{Conntrack: 4096, CIDRIdentities: 3})
	ctx := context.Background()
	cidrs := func(first, count int) policy.Policy {
		var p policy.Policy
		for i := range count {
			p.Ingress = append(p.Ingress, policy.Rule{Peers: []policy.Peer{{CIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(first + i), 0}), 24)}}})
		}
		return p
	}
	if _, err := policy.Apply(ctx, n.dp, n.a.ID, cidrs(0, 3)); err != nil {
		t.Fatalf("3 CIDR identities of 3: %v", err)
	}
	// The same prefixes again take no identity of their own.
	if _, err := policy.Apply(ctx, n.dp, n.b.ID, cidrs(0, 3)); err != nil {
		t.Fatalf("the same 3 prefixes for another endpoint: %v", err)
	}
	if _, err := policy.Apply(ctx, n.dp, n.c.ID, cidrs(2, 2)); !errors.Is(err, datapath.ErrMapFull) {
		t.Errorf("a fourth prefix: %v, want ErrMapFull", err)
	}
	if _, err := policy.Get(n.dp, n.c.ID); !errors.Is(err, datapath.ErrNotFound) {
		t.Errorf("after the refused Apply endpoint %d has a policy (%v)", n.c.ID, err)
	}
	// Room made is room to use.
	if _, err := policy.Apply(ctx, n.dp, n.a.ID, cidrs(0, 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := policy.Apply(ctx, n.dp, n.b.ID, cidrs(0, 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := policy.Apply(ctx, n.dp, n.c.ID, cidrs(2, 2)); err != nil {
		t.Errorf("a fourth prefix once two were freed: %v", err)
	}
}
