package node

import (
	"bytes"
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
)

func init() {
	core.RegisterRepair(ledger.KindNode, repair)
	core.RegisterCheck(ledger.KindNode, check)
}

// repair finishes what a killed process left: a change (Creating) is
// made whole in its new version, a Delete (Deleting) finished.
func repair(st *core.State) (int, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindNode)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range recs {
		if r.State == ledger.Ready {
			continue
		}
		if r.ID == keysID {
			// The key set first: nodes finished after use its keys.
			if _, err := finishKeys(st); err != nil {
				return n, err
			}
			n++
			continue
		}
		if err := finish(st, r); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// check compares node_addrs, node_cidrs, the ipcache's node entries and
// the routes with the records, the local node's entries among them; with
// repair, it rewrites what differs and deletes what no node has.
func check(st *core.State, fix bool) ([]core.Drift, error) {
	all, err := load(st)
	if err != nil {
		return nil, err
	}
	var drift []core.Drift
	add := func(object, what string, mend func() error) error {
		d := core.Drift{Object: object, What: what}
		if fix {
			if err := mend(); err != nil {
				return err
			}
			d.Repaired = true
		}
		drift = append(drift, d)
		return nil
	}

	// What node_cidrs and node_addrs should hold, by raw key.
	cidrs := map[string]bpfobj.TypesNodeRoute{}
	addrs := map[string]uint32{}
	owned := map[netip.Prefix]bool{}
	if st.Node.Routing != core.RoutingLocal {
		for _, p := range st.PodCIDRs {
			cidrs[string(ipcache.KeyBytes(p))] = bpfobj.TypesNodeRoute{Node: 0}
		}
		for _, p := range st.Node.ClusterCIDRs {
			cidrs[string(ipcache.KeyBytes(p))] = bpfobj.TypesNodeRoute{Node: nodeNone}
		}
	}
	for _, a := range st.Node.Addresses {
		owned[netip.PrefixFrom(a, a.BitLen())] = true
	}
	routes := map[netip.Prefix]netip.Addr{}
	for _, in := range all.nodes {
		r := route(in.id, in.spec)
		for _, p := range in.spec.PodCIDRs {
			cidrs[string(ipcache.KeyBytes(p))] = r
		}
		for _, a := range in.spec.Addresses {
			addrs[string(addrKey(a))] = in.id
			owned[netip.PrefixFrom(a, a.BitLen())] = true
			e, ok, err := ipcache.Lookup(st.Objs.Ipcache, netip.PrefixFrom(a, a.BitLen()))
			if err != nil {
				return drift, err
			}
			if !ok || e.Identity != uint32(datapath.IdentityRemoteNode) || ipcache.Source(e.Source) != ipcache.Node {
				if err := add("node "+in.spec.Name, fmt.Sprintf("ipcache has no remote-node entry for %s", a), func() error {
					return writeEntries(st, in.id, in.spec)
				}); err != nil {
					return drift, err
				}
			}
		}
		for _, rt := range made(st, in.id, in.spec).Routes {
			routes[rt.Prefix] = rt.Via
		}
	}

	if err := checkMap(st.Objs.NodeCidrs, cidrs, "node_cidrs", add); err != nil {
		return drift, err
	}
	if err := checkMap(st.Objs.NodeAddrs, addrs, "node_addrs", add); err != nil {
		return drift, err
	}
	d, err := st.CheckIpcache(ipcache.Node, owned, fix)
	drift = append(drift, d...)
	if err != nil {
		return drift, err
	}
	if err := checkEncryption(st, all, add); err != nil {
		return drift, err
	}
	if st.Node.Routing == core.RoutingNative {
		have, err := netdev.Routes(st.NS)
		if err != nil {
			return drift, err
		}
		for p, via := range routes {
			if have[p] != via {
				if err := add("routes", fmt.Sprintf("no route to %s via %s", p, via), func() error {
					return netdev.ReplaceRoute(st.NS, p, via)
				}); err != nil {
					return drift, err
				}
			}
		}
		for p, via := range have {
			if _, ok := routes[p]; !ok {
				if err := add("routes", fmt.Sprintf("a route to %s via %s, which no node has", p, via), func() error {
					return netdev.DeleteRoute(st.NS, p, via)
				}); err != nil {
					return drift, err
				}
			}
		}
	}
	return drift, nil
}

// checkMap compares a hash or LPM map with what it should hold.
func checkMap[V comparable](m *ebpf.Map, want map[string]V, name string, add func(object, what string, mend func() error) error) error {
	seen := map[string]bool{}
	var k []byte
	var v V
	it := m.Iterate()
	var extra [][]byte
	var wrong []string
	for it.Next(&k, &v) {
		key := string(k)
		w, ok := want[key]
		switch {
		case !ok:
			extra = append(extra, bytes.Clone(k))
		case w != v:
			wrong = append(wrong, key)
		}
		seen[key] = true
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	for _, key := range extra {
		if err := add(name, fmt.Sprintf("entry %x, which no node has", key), func() error { return deleteKey(m, []byte(key)) }); err != nil {
			return err
		}
	}
	for key, w := range want {
		if seen[key] && !slices.Contains(wrong, key) {
			continue
		}
		what := "missing entry"
		if seen[key] {
			what = "entry that differs"
		}
		if err := add(name, fmt.Sprintf("%s %x", what, key), func() error { return m.Put([]byte(key), w) }); err != nil {
			return err
		}
	}
	return nil
}

func deleteKey(m *ebpf.Map, key []byte) error {
	if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	return nil
}
