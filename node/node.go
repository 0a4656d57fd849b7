// Package node makes a cluster out of datapaths, with no orchestrator: the
// caller tells each node's datapath about the other nodes, and pods reach
// pods across nodes, under policy, over VXLAN or natively routed
// (datapath.Node.Routing).
//
// A remote node is its name, its underlay addresses and its pod CIDRs.
// Here its addresses have the reserved remote-node identity, which
// policies can name (datapath.IdentityRemoteNode); its pods' identities
// come from the ipcache (policy.AssignIdentity) or, over VXLAN, with each
// packet. Changing a node's address re-points its traffic at once;
// deleting a node makes its pod CIDRs unreachable
// (datapath.ReasonNodeUnreachable).
//
// Every change is one transaction (see docs/architecture.md): Apply and
// Delete leave each node exactly as it was or as asked, also when the
// process is killed half-way (Reconcile, or the next Open, finishes it).
package node

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/core"
)

// Node is a remote node.
type Node struct {
	// Name identifies the node: 1 to 63 of [a-z0-9.-], starting and
	// ending with a letter or digit; never the local node's.
	Name string
	// Addresses are its underlay addresses: at most one IPv4 and one
	// IPv6, at least one. Over VXLAN the tunnel goes to the IPv4 one when
	// there is one; routing natively, each pod CIDR goes via the address
	// of its own family, which the node must have.
	Addresses []netip.Addr
	// PodCIDRs are the ranges its pods have, at most MaxPodCIDRs, each
	// inside one of the cluster's (datapath.Node.ClusterCIDRs; not one of
	// them) and overlapping no other node's nor the local node's.
	PodCIDRs []netip.Prefix
	// WireGuardKey is its WireGuard public key (WireGuardPublicKey on
	// that node), required when the datapath encrypts with WireGuard
	// (datapath.EncryptionWireGuard): no two nodes have the same.
	WireGuardKey [32]byte
}

func (n Node) String() string {
	return fmt.Sprintf("%s %v %v", n.Name, n.Addresses, n.PodCIDRs)
}

// Changes says what Apply changed.
type Changes struct {
	Created      bool           // the node is new
	Addresses    bool           // its addresses changed: its traffic goes to the new ones
	WireGuardKey bool           // its WireGuard key changed
	AddedCIDRs   []netip.Prefix // pod CIDRs it did not have
	RemovedCIDRs []netip.Prefix // pod CIDRs it no longer has
}

// Unchanged reports whether Apply changed nothing.
func (c Changes) Unchanged() bool {
	return !c.Created && !c.Addresses && !c.WireGuardKey && len(c.AddedCIDRs) == 0 && len(c.RemovedCIDRs) == 0
}

// SyncChanges says what Sync changed, by node name.
type SyncChanges struct {
	Added, Changed, Removed []string
	Unchanged               int
}

// Apply adds the node n, or changes the node of its name to n, and
// returns what it changed; applying the same node again changes nothing.
// Its errors wrap:
//
//   - datapath.ErrInvalid: a bad node (no address, a bad name or the
//     local node's, a pod CIDR outside the cluster's or overlapping the
//     local node's, one with no address of its family when routing
//     natively), or a datapath with RoutingLocal;
//   - datapath.ErrExists: an address or pod CIDR another node has;
//   - datapath.ErrMapFull: no room for another node (Limits.Nodes) or
//     its entries.
//
// On error nothing is changed.
func Apply(ctx context.Context, dp *datapath.Datapath, n Node) (Changes, error) {
	n = normalize(n)
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return Changes{}, err
	}
	defer unlock()
	all, err := load(st)
	if err != nil {
		return Changes{}, err
	}
	return apply(st, all, n)
}

// Delete removes the node of that name: its pods become unreachable and
// its address an unknown one. An unknown name is datapath.ErrNotFound.
func Delete(ctx context.Context, dp *datapath.Datapath, name string) error {
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return err
	}
	defer unlock()
	all, err := load(st)
	if err != nil {
		return err
	}
	in := all.byName(name)
	if in == nil {
		return fmt.Errorf("node %q: %w", name, datapath.ErrNotFound)
	}
	return remove(st, in)
}

// Sync makes the datapath's remote nodes exactly all: it deletes every
// other node and applies each of all, each node in its own transaction.
// It checks the whole set first and changes nothing when it cannot be
// made: a node named twice, a bad node (as Apply), two nodes that share
// an address or pod CIDR, an address another object holds. An address or
// pod CIDR that moves from one node to another is applied in an order
// that frees it first; two nodes that swap them need two Syncs
// (datapath.ErrExists). An error of the kernel or a full map part-way
// leaves the nodes before it changed.
func Sync(ctx context.Context, dp *datapath.Datapath, all []Node) (SyncChanges, error) {
	all = slices.Clone(all)
	want := map[string]bool{}
	for i, n := range all {
		n = normalize(n)
		all[i] = n
		if want[n.Name] {
			return SyncChanges{}, fmt.Errorf("sync nodes: node %q named twice: %w", n.Name, datapath.ErrInvalid)
		}
		want[n.Name] = true
		for _, m := range all[:i] {
			if err := disjoint(n, m); err != nil {
				return SyncChanges{}, fmt.Errorf("sync nodes: %w", err)
			}
		}
	}
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return SyncChanges{}, err
	}
	defer unlock()
	have, err := load(st)
	if err != nil {
		return SyncChanges{}, err
	}
	for _, n := range all {
		if err := validateLocal(st, n); err != nil {
			return SyncChanges{}, fmt.Errorf("sync nodes: %w", err)
		}
		if err := checkAddressesFree(st, n); err != nil {
			return SyncChanges{}, fmt.Errorf("sync nodes: %w", err)
		}
	}
	order, err := syncOrder(have, all, want)
	if err != nil {
		return SyncChanges{}, fmt.Errorf("sync nodes: %w", err)
	}
	var out SyncChanges
	// Nodes that go, go first: what they free, the others may take.
	for _, in := range slices.Clone(have.nodes) {
		if want[in.spec.Name] {
			continue
		}
		if err := remove(st, in); err != nil {
			return out, err
		}
		have.drop(in)
		out.Removed = append(out.Removed, in.spec.Name)
	}
	for _, n := range order {
		c, err := apply(st, have, n)
		if err != nil {
			return out, err
		}
		out.count(n.Name, c)
	}
	return out, nil
}

// syncOrder orders all so that no node is applied while another still
// has (in its version of have) an address or pod CIDR the node's new
// version takes. A cycle, nodes swapping them, has no such order.
func syncOrder(have *nodes, all []Node, want map[string]bool) ([]Node, error) {
	current := map[string]Node{}
	for _, in := range have.nodes {
		if want[in.spec.Name] {
			current[in.spec.Name] = in.spec
		}
	}
	var order []Node
	pending := all
	for len(pending) > 0 {
		var blocked []Node
		var why error
		for _, n := range pending {
			err := func() error {
				for name, m := range current {
					if name != n.Name {
						if err := disjoint(n, m); err != nil {
							return err
						}
					}
				}
				return nil
			}()
			if err != nil {
				blocked, why = append(blocked, n), err
				continue
			}
			order = append(order, n)
			current[n.Name] = n
		}
		if len(blocked) == len(pending) {
			return nil, fmt.Errorf("nodes swap addresses or pod CIDRs (make the swap in two Syncs): %w", why)
		}
		pending = blocked
	}
	return order, nil
}

func (s *SyncChanges) count(name string, c Changes) {
	switch {
	case c.Created:
		s.Added = append(s.Added, name)
	case c.Unchanged():
		s.Unchanged++
	default:
		s.Changed = append(s.Changed, name)
	}
}

// Get returns the node of that name, or datapath.ErrNotFound.
func Get(dp *datapath.Datapath, name string) (Node, error) {
	all, release, err := read(dp)
	if err != nil {
		return Node{}, err
	}
	defer release()
	in := all.byName(name)
	if in == nil {
		return Node{}, fmt.Errorf("node %q: %w", name, datapath.ErrNotFound)
	}
	return clone(in.spec), nil
}

// List returns every remote node, sorted by name.
func List(dp *datapath.Datapath) ([]Node, error) {
	all, release, err := read(dp)
	if err != nil {
		return nil, err
	}
	defer release()
	out := make([]Node, 0, len(all.nodes))
	for _, in := range all.nodes {
		out = append(out, clone(in.spec))
	}
	slices.SortFunc(out, func(a, b Node) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func read(dp *datapath.Datapath) (*nodes, func(), error) {
	st := core.Of(dp)
	release, err := st.ReadLock(context.Background())
	if err != nil {
		return nil, nil, err
	}
	all, err := load(st)
	if err != nil {
		release()
		return nil, nil, err
	}
	return all, release, nil
}

// normalize sorts a node's addresses and CIDRs, so that the same node
// given in another order is the same.
func normalize(n Node) Node {
	n = clone(n)
	slices.SortFunc(n.Addresses, netip.Addr.Compare)
	slices.SortFunc(n.PodCIDRs, comparePrefixes)
	return n
}

func clone(n Node) Node {
	n.Addresses = slices.Clone(n.Addresses)
	n.PodCIDRs = slices.Clone(n.PodCIDRs)
	return n
}

func comparePrefixes(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}
