package node

import (
	"encoding/binary"
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
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/txn"
)

// record is a node's ledger record (KindNode, by the node's ID). While a
// change is made (State Creating), Node is the new version and Old the
// one it replaces (nil for a new node). What each version writes follows
// from it (made), so the record names no entries: it stays small. The
// routes of protocol 197 in the datapath's namespace are all nodes', so
// Unload, which needs no package node, removes them all.
type record struct {
	Version int   `json:"version"`
	Node    Node  `json:"node"`
	Old     *Node `json:"old,omitempty"`
}

const recordVersion = 1

// MaxPodCIDRs is how many pod CIDRs a node may have.
const MaxPodCIDRs = 16

// nodeNone marks a cluster CIDR in node_cidrs (bpf/lib/node.h).
const nodeNone = uint32(bpfobj.TypesNodeIdNODE_NONE)

// installed is a node the ledger records.
type installed struct {
	id   uint32
	spec Node
	rec  *ledger.Record
}

// nodes is every node the ledger records.
type nodes struct {
	nodes []*installed
}

func (ns *nodes) byName(name string) *installed {
	for _, in := range ns.nodes {
		if in.spec.Name == name {
			return in
		}
	}
	return nil
}

func (ns *nodes) drop(in *installed) {
	ns.nodes = slices.DeleteFunc(ns.nodes, func(x *installed) bool { return x == in })
}

// load reads every node record; one that is not Ready (its change was
// never finished: Reconcile finishes it) counts as its new version.
func load(st *core.State) (*nodes, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindNode)
	if err != nil {
		return nil, err
	}
	out := &nodes{}
	for _, r := range recs {
		if r.ID == keysID {
			continue
		}
		var obj record
		if err := json.Unmarshal(r.Object, &obj); err != nil || obj.Version != recordVersion {
			return nil, fmt.Errorf("%w: node %d: record version %d (%v)", ledger.ErrCorrupt, r.ID, obj.Version, err)
		}
		out.nodes = append(out.nodes, &installed{id: r.ID, spec: obj.Node, rec: r})
	}
	return out, nil
}

// validateLocal checks n alone and against the local node.
func validateLocal(st *core.State, n Node) error {
	invalid := func(format string, args ...any) error {
		return fmt.Errorf("node %q: %s: %w", n.Name, fmt.Sprintf(format, args...), datapath.ErrInvalid)
	}
	local := st.Node
	if local.Routing == core.RoutingLocal {
		return invalid("datapath %s has no routing mode (datapath.Node.Routing): it is a single node", st.Name)
	}
	if !datapath.ValidNodeName(n.Name) {
		return invalid("want 1 to 63 of [a-z0-9.-], starting and ending with a letter or digit")
	}
	if n.Name == local.Name {
		return invalid("the local node's name")
	}
	if len(n.Addresses) == 0 {
		return invalid("no address")
	}
	if err := datapath.CheckNodeAddresses(n.Addresses); err != nil {
		return fmt.Errorf("node %q: %w", n.Name, err)
	}
	for _, a := range n.Addresses {
		if slices.Contains(local.Addresses, a) {
			return invalid("address %s is the local node's", a)
		}
	}
	if len(n.PodCIDRs) > MaxPodCIDRs {
		return invalid("%d pod CIDRs: at most %d", len(n.PodCIDRs), MaxPodCIDRs)
	}
	for i, p := range n.PodCIDRs {
		if !p.IsValid() || p.Addr().Is4In6() || p != p.Masked() {
			return invalid("pod CIDR %s: want a network address", p)
		}
		for _, q := range n.PodCIDRs[:i] {
			if p.Overlaps(q) {
				return invalid("pod CIDRs %s and %s overlap", q, p)
			}
		}
		if !slices.ContainsFunc(local.ClusterCIDRs, func(c netip.Prefix) bool { return c.Bits() < p.Bits() && c.Contains(p.Addr()) }) {
			return invalid("pod CIDR %s is not inside one of the cluster CIDRs %v (nor one of them)", p, local.ClusterCIDRs)
		}
		for _, q := range st.PodCIDRs {
			if p.Overlaps(q) {
				return invalid("pod CIDR %s overlaps the local node's %s", p, q)
			}
		}
		if local.Routing == core.RoutingNative && !slices.ContainsFunc(n.Addresses, func(a netip.Addr) bool { return a.Is4() == p.Addr().Is4() }) {
			return invalid("pod CIDR %s: routing natively, the node needs an address of its family", p)
		}
	}
	if local.Encryption == core.EncryptionWireGuard && n.WireGuardKey == ([32]byte{}) {
		return invalid("no WireGuard key: the datapath encrypts with WireGuard")
	}
	if local.Encryption != core.EncryptionNone && !slices.ContainsFunc(n.Addresses, func(a netip.Addr) bool {
		return slices.ContainsFunc(local.Addresses, func(l netip.Addr) bool { return l.Is4() == a.Is4() })
	}) {
		return invalid("no address of a family the local node has: encryption needs one")
	}
	return nil
}

// checkAddressesFree fails with ErrExists when an address of n is in the
// ipcache as another object's than a node's (a local endpoint's, an
// identity assignment's).
func checkAddressesFree(st *core.State, n Node) error {
	for _, a := range n.Addresses {
		e, ok, err := ipcache.Lookup(st.Objs.Ipcache, netip.PrefixFrom(a, a.BitLen()))
		if err != nil {
			return err
		}
		if ok && ipcache.Source(e.Source) != ipcache.Node {
			return fmt.Errorf("node %q: address %s: %w: the %s that has it", n.Name, a, datapath.ErrExists, ipcache.Source(e.Source))
		}
	}
	return nil
}

// disjoint fails with ErrExists when a and b share an address or pod
// CIDR.
func disjoint(a, b Node) error {
	for _, x := range a.Addresses {
		if slices.Contains(b.Addresses, x) {
			return fmt.Errorf("node %q: address %s is node %q's: %w", a.Name, x, b.Name, datapath.ErrExists)
		}
	}
	for _, p := range a.PodCIDRs {
		for _, q := range b.PodCIDRs {
			if p.Overlaps(q) {
				return fmt.Errorf("node %q: pod CIDR %s overlaps node %q's %s: %w", a.Name, p, b.Name, q, datapath.ErrExists)
			}
		}
	}
	if a.WireGuardKey != ([32]byte{}) && a.WireGuardKey == b.WireGuardKey {
		return fmt.Errorf("node %q: WireGuard key is node %q's: %w", a.Name, b.Name, datapath.ErrExists)
	}
	return nil
}

// apply adds or changes n, one transaction, and updates all.
func apply(st *core.State, all *nodes, n Node) (c Changes, err error) {
	if err := validateLocal(st, n); err != nil {
		return Changes{}, err
	}
	in := all.byName(n.Name)
	for _, other := range all.nodes {
		if other != in {
			if err := disjoint(n, other.spec); err != nil {
				return Changes{}, err
			}
		}
	}
	if in != nil && in.rec.State != ledger.Ready {
		// What a killed process left is finished first: a change is
		// made from one whole version.
		if err := finish(st, in.rec); err != nil {
			return Changes{}, err
		}
		if in.rec, err = ledger.Get(st.Objs.Ledger, ledger.KindNode, in.id); err != nil {
			return Changes{}, err
		}
	}
	var old *Node
	c = Changes{Created: in == nil}
	if in != nil {
		if equal(in.spec, n) {
			return Changes{}, nil
		}
		o := in.spec
		old = &o
		c.Addresses = !slices.Equal(o.Addresses, n.Addresses)
		c.WireGuardKey = o.WireGuardKey != n.WireGuardKey
		c.AddedCIDRs = minus(n.PodCIDRs, o.PodCIDRs)
		c.RemovedCIDRs = minus(o.PodCIDRs, n.PodCIDRs)
	} else {
		id, err := freeID(st, all)
		if err != nil {
			return Changes{}, err
		}
		in = &installed{id: id}
		c.AddedCIDRs = slices.Clone(n.PodCIDRs)
	}
	if err := change(st, in.id, old, n); err != nil {
		return Changes{}, fmt.Errorf("apply node %s: %w", n.Name, err)
	}
	rec, err := ledger.Get(st.Objs.Ledger, ledger.KindNode, in.id)
	if err != nil {
		return c, err
	}
	in.spec, in.rec = n, rec
	if c.Created {
		all.nodes = append(all.nodes, in)
	}
	return c, nil
}

func equal(a, b Node) bool {
	return a.Name == b.Name && slices.Equal(a.Addresses, b.Addresses) && slices.Equal(a.PodCIDRs, b.PodCIDRs) &&
		a.WireGuardKey == b.WireGuardKey
}

// minus is what a has and b has not.
func minus[T comparable](a, b []T) []T {
	var out []T
	for _, x := range a {
		if !slices.Contains(b, x) {
			out = append(out, x)
		}
	}
	return out
}

// freeID returns the lowest node ID no record has; ErrMapFull when there
// are Limits.Nodes nodes.
func freeID(st *core.State, all *nodes) (uint32, error) {
	limit := st.NodeLimit()
	if len(all.nodes) >= limit {
		return 0, fmt.Errorf("%d nodes, the datapath's limit: %w", limit, datapath.ErrMapFull)
	}
	taken := map[uint32]bool{}
	for _, in := range all.nodes {
		taken[in.id] = true
	}
	for id := uint32(1); ; id++ {
		if !taken[id] {
			return id, nil
		}
	}
}

// change makes node id the version n, from old (nil: a new node):
//
//	intent   the record names both versions (State Creating)
//	encrypt  n's IPsec states and policies, or WireGuard peer, made: what
//	         is sent to n is encrypted from the first packet
//	maps     n's entries written
//	routes   n's routes installed (routing natively): n is live
//	cleanup  what old had and n has not is removed
//	ready    the record names n alone (Ready)
//
// A failure before n is live takes it all back. After, the record stays
// Creating until it is Ready, so what a kill or a failed cleanup leaves,
// repair finishes.
func change(st *core.State, id uint32, old *Node, n Node) error {
	want := made(st, id, n)
	var had ledger.Made
	if old != nil {
		had = made(st, id, *old)
	}
	prev, err := ledger.Get(st.Objs.Ledger, ledger.KindNode, id)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		prev = nil
	} else if err != nil {
		return err
	}
	intent := &ledger.Record{Kind: ledger.KindNode, ID: id, State: ledger.Creating}
	intent.Object, err = json.Marshal(record{Version: recordVersion, Node: n, Old: old})
	if err != nil {
		return err
	}
	return txn.Run("node",
		txn.Phase{Name: "intent",
			Do: func() error { return ledger.Put(st.Objs.Ledger, intent) },
			Undo: func() error {
				if prev == nil {
					return ledger.Delete(st.Objs.Ledger, ledger.KindNode, id)
				}
				return ledger.Put(st.Objs.Ledger, prev)
			}},
		txn.Phase{Name: "encrypt",
			Do: func() error { return encrypt(st, id, n) },
			Undo: func() error {
				if old == nil {
					return unencrypt(st, id, n, nil)
				}
				return errors.Join(unencrypt(st, id, n, old), encrypt(st, id, *old))
			}},
		txn.Phase{Name: "maps",
			Do: func() error { return writeEntries(st, id, n) },
			Undo: func() error {
				errs := []error{st.DeleteEntries(minusEntries(want, had).Entries)}
				if old != nil {
					errs = append(errs, writeEntries(st, id, *old))
				}
				return errors.Join(errs...)
			}},
		txn.Phase{Name: "routes",
			Do: func() error { return addRoutes(st, want.Routes) },
			Undo: func() error {
				return errors.Join(removeRoutes(st, minus(want.Routes, had.Routes)), addRoutes(st, had.Routes))
			}},
		txn.Phase{Name: "cleanup", After: true, Do: func() error {
			err := errors.Join(st.DeleteEntries(minusEntries(had, want).Entries), removeRoutes(st, minus(had.Routes, want.Routes)))
			if old != nil {
				err = errors.Join(err, unencrypt(st, id, *old, &n))
			}
			return err
		}},
		txn.Phase{Name: "ready", After: true, Do: func() error { return commit(st, id, n) }},
	)
}

// commit writes node id's record as version n, Ready.
func commit(st *core.State, id uint32, n Node) error {
	obj, err := json.Marshal(record{Version: recordVersion, Node: n})
	if err != nil {
		return err
	}
	return ledger.Put(st.Objs.Ledger, &ledger.Record{Kind: ledger.KindNode, ID: id, State: ledger.Ready, Object: obj})
}

// remove deletes a node: the record says Deleting, then its entries and
// routes go, then the record.
func remove(st *core.State, in *installed) error {
	r := *in.rec
	r.State = ledger.Deleting
	return txn.Run("node delete",
		txn.Phase{Name: "intent", Do: func() error { return ledger.Put(st.Objs.Ledger, &r) }},
		txn.Phase{Name: "take apart", After: true, Do: func() error { return finish(st, &r) }},
	)
}

// finish completes what the record of a node says is under way: a change
// (Creating) is made whole in its new version, then the record is Ready;
// a Delete (Deleting) takes away what both versions have, then the
// record.
func finish(st *core.State, r *ledger.Record) error {
	var obj record
	if err := json.Unmarshal(r.Object, &obj); err != nil || obj.Version != recordVersion {
		return fmt.Errorf("%w: node %d: %v", ledger.ErrCorrupt, r.ID, err)
	}
	both := made(st, r.ID, obj.Node)
	if obj.Old != nil {
		both = union(both, made(st, r.ID, *obj.Old))
	}
	if r.State == ledger.Deleting {
		err := errors.Join(st.DeleteEntries(both.Entries), removeRoutes(st, both.Routes), unencrypt(st, r.ID, obj.Node, nil))
		if obj.Old != nil {
			err = errors.Join(err, unencrypt(st, r.ID, *obj.Old, nil))
		}
		if err != nil {
			return fmt.Errorf("delete node %s: %w", obj.Node.Name, err)
		}
		return ledger.Delete(st.Objs.Ledger, ledger.KindNode, r.ID)
	}
	want := made(st, r.ID, obj.Node)
	err := errors.Join(
		encrypt(st, r.ID, obj.Node),
		writeEntries(st, r.ID, obj.Node),
		addRoutes(st, want.Routes),
		st.DeleteEntries(minusEntries(both, want).Entries),
		removeRoutes(st, minus(both.Routes, want.Routes)),
	)
	if obj.Old != nil {
		err = errors.Join(err, unencrypt(st, r.ID, *obj.Old, &obj.Node))
	}
	if err != nil {
		return fmt.Errorf("finish node %s: %w", obj.Node.Name, err)
	}
	return commit(st, r.ID, obj.Node)
}

// made is what node id's version n writes: its addresses (node_addrs and
// the ipcache), its pod CIDRs (node_cidrs) and, routing natively, a
// route to each.
func made(st *core.State, id uint32, n Node) ledger.Made {
	var m ledger.Made
	for _, a := range n.Addresses {
		m.Entries = append(m.Entries,
			ledger.Entry{Map: bpfobj.EndpointMapNodeAddrs, Key: addrKey(a)},
			ledger.Entry{Map: bpfobj.EndpointMapIpcache, Key: ipcache.KeyBytes(netip.PrefixFrom(a, a.BitLen())), Source: uint8(ipcache.Node)})
	}
	for _, p := range n.PodCIDRs {
		m.Entries = append(m.Entries, ledger.Entry{Map: bpfobj.EndpointMapNodeCidrs, Key: ipcache.KeyBytes(p)})
		if st.Node.Routing == core.RoutingNative {
			if via, ok := addressOf(n, p.Addr().Is4()); ok {
				m.Routes = append(m.Routes, ledger.Route{Prefix: p, Via: via})
			}
		}
	}
	return m
}

func addressOf(n Node, v4 bool) (netip.Addr, bool) {
	for _, a := range n.Addresses {
		if a.Is4() == v4 {
			return a, true
		}
	}
	return netip.Addr{}, false
}

func addrKey(a netip.Addr) []byte {
	k := bpfobj.TypesNodeAddrKey{Family: 6, Addr: a.As16()}
	if a.Is4() {
		k.Family = 4
		k.Addr = [16]byte{}
		a4 := a.As4()
		copy(k.Addr[:], a4[:])
	}
	b, _ := binary.Append(nil, binary.NativeEndian, &k)
	return b
}

// route is what node_cidrs says of each pod CIDR of n.
func route(id uint32, n Node) bpfobj.TypesNodeRoute {
	r := bpfobj.TypesNodeRoute{Node: id}
	if a, ok := addressOf(n, true); ok {
		r.Flags |= uint32(bpfobj.TypesNodeFlagNODE_F_IPV4)
		r.Ipv4 = binary.NativeEndian.Uint32(a.AsSlice())
	}
	if a, ok := addressOf(n, false); ok {
		r.Flags |= uint32(bpfobj.TypesNodeFlagNODE_F_IPV6)
		r.Ipv6 = a.As16()
	}
	return r
}

// writeEntries writes every map entry of node id's version n.
func writeEntries(st *core.State, id uint32, n Node) error {
	for _, a := range n.Addresses {
		k := addrKey(a)
		if err := st.Objs.NodeAddrs.Put(k, id); err != nil {
			return core.MapError(err, datapath.ErrMapFull, "node address "+a.String())
		}
		err := ipcache.Put(st.Objs.Ipcache, netip.PrefixFrom(a, a.BitLen()), ipcache.Entry{Identity: uint32(datapath.IdentityRemoteNode)}, ipcache.Node)
		if errors.Is(err, ipcache.ErrOwned) {
			return fmt.Errorf("node address %s: %w: %w", a, datapath.ErrExists, err)
		}
		if err != nil {
			return core.MapError(err, datapath.ErrMapFull, "node address "+a.String())
		}
	}
	r := route(id, n)
	for _, p := range n.PodCIDRs {
		k := ipcache.Key(p)
		if err := st.Objs.NodeCidrs.Put(&k, &r); err != nil {
			return core.MapError(err, datapath.ErrMapFull, "pod CIDR "+p.String())
		}
		txn.Crash("node/maps/half")
	}
	return nil
}

func addRoutes(st *core.State, routes []ledger.Route) error {
	for _, r := range routes {
		if err := netdev.ReplaceRoute(st.NS, r.Prefix, r.Via); err != nil {
			return err
		}
	}
	return nil
}

func removeRoutes(st *core.State, routes []ledger.Route) error {
	var errs []error
	for _, r := range routes {
		errs = append(errs, netdev.DeleteRoute(st.NS, r.Prefix, r.Via))
	}
	return errors.Join(errs...)
}

// union is what a and b make together.
func union(a, b ledger.Made) ledger.Made {
	out := ledger.Made{Entries: slices.Clone(a.Entries), Routes: slices.Clone(a.Routes)}
	out.Entries = append(out.Entries, minusEntries(b, a).Entries...)
	out.Routes = append(out.Routes, minus(b.Routes, a.Routes)...)
	return out
}

// minusEntries is the entries of a that b does not have.
func minusEntries(a, b ledger.Made) ledger.Made {
	var out ledger.Made
	for _, e := range a.Entries {
		if !slices.ContainsFunc(b.Entries, func(f ledger.Entry) bool { return f.Map == e.Map && string(f.Key) == string(e.Key) }) {
			out.Entries = append(out.Entries, e)
		}
	}
	return out
}
