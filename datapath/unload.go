package datapath

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/xfrm"
)

// UnloadPinned tears down the datapath pinned as cfg.Name in cfg.BPFFS,
// as Unload does, without a handle on it: it is how to remove a datapath
// that Open refuses with ErrIncompatible (a pin in place of a map that is
// not that map, a ledger record that cannot be read). It uses cfg.Name,
// cfg.BPFFS (DefaultBPFFS when empty), cfg.NetNS (the datapath's
// namespace, where its endpoints' devices are; empty means the caller's)
// and cfg.TCAttach. Handles on the datapath, in this process or another,
// fail from then on with an error matching os.ErrNotExist.
//
// It undoes what the readable ledger records made outside the pins,
// detaches every program the datapath attached and removes the pin
// directory, pins that are not this build's maps included. It goes on
// past errors and returns all of them; a record it cannot read (or a
// ledger that is not this build's) is reported with ErrIncompatible: what
// it made, such as an endpoint's veth pair, may be left.
//
// It changes nothing and returns ErrNotFound when no datapath is pinned
// under the name, ErrIncompatible when the pins have another layout
// version (unload them with the build that made them), and ErrInvalid for
// a bad name or a namespace other than the one the datapath serves.
// Equivalent to Open then Unload where Open succeeds. Requires root.
func UnloadPinned(ctx context.Context, cfg Config) error {
	if !validName.MatchString(cfg.Name) {
		return fmt.Errorf("datapath name %q: %w", cfg.Name, ErrInvalid)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if cfg.BPFFS == "" {
		cfg.BPFFS = DefaultBPFFS
	}
	if err := unloadPinned(ctx, cfg); err != nil {
		return fmt.Errorf("unload datapath %s: %w", cfg.Name, err)
	}
	return nil
}

func unloadPinned(ctx context.Context, cfg Config) error {
	dir := filepath.Join(cfg.BPFFS, cfg.Name)
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		return err
	}
	if !isDatapathDir(dir, spec) {
		return fmt.Errorf("no datapath pinned in %s: %w", dir, ErrNotFound)
	}
	ns, err := openNetNS(cfg.NetNS)
	if err != nil {
		return err
	}
	st := &core.State{Name: cfg.Name, Dir: dir, NS: ns, Mode: attach.Mode(cfg.TCAttach)}
	defer st.Close() // the maps and the namespace
	unlock, err := core.LockDir(ctx, dir)
	if err != nil {
		return err
	}
	defer unlock()
	// A stamp of another version: its maps are not this build's to read.
	// An unreadable stamp says nothing: go on with what reads.
	if version, err := readStamp(dir); err == nil && version != 0 && version != LayoutVersion {
		return fmt.Errorf("%w: pins in %s have layout version %d, this build has %d: unload them with that build", ErrIncompatible, dir, version, LayoutVersion)
	}
	have, err := pins(dir)
	if err != nil {
		return err
	}
	var errs []error
	maps := map[string]*ebpf.Map{}
	for _, name := range sortedNames(spec) {
		if !have[name] {
			continue
		}
		m, err := loadPinnedMap(spec, dir, name, false)
		if err != nil {
			// Its pin goes with the rest; without the ledger, what the
			// objects made outside the pins is not known.
			if name == bpfobj.EndpointMapLedger {
				errs = append(errs, fmt.Errorf("%w; what the objects made outside the pins may be left", err))
			}
			continue
		}
		maps[name] = m
	}
	st.SetMaps(maps)
	if err := checkNetNS(st, cfg.NetNS); err != nil {
		return err
	}
	return errors.Join(append(errs, teardown(st))...)
}

// isDatapathDir reports whether dir holds a datapath's pins: its links
// directory and the pin of one of its maps, at least. A directory of
// another tool's pins that happens to have the name is not one.
func isDatapathDir(dir string, spec *ebpf.CollectionSpec) bool {
	if fi, err := os.Stat(filepath.Join(dir, "links")); err != nil || !fi.IsDir() {
		return false
	}
	for name := range spec.Maps {
		if _, err := os.Lstat(filepath.Join(dir, name)); err == nil {
			return true
		}
	}
	return false
}

// checkNetNS fails with ErrInvalid when the datapath's ledger says it
// serves another namespace than st's (spec names it, for the error). An
// unreadable or missing record says nothing.
func checkNetNS(st *core.State, spec string) error {
	if st.Objs.Ledger == nil {
		return nil
	}
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindDatapath, 0)
	if err != nil {
		return nil
	}
	var node nodeRecord
	if json.Unmarshal(r.Object, &node) != nil || node.Version != nodeRecordVersion {
		return nil
	}
	return checkServes(st, node, spec)
}

// mayMakeOutside reports whether records of a kind may name what lives
// outside the pins (devices, namespaces, attachments): every kind but
// those whose objects are map entries alone. Teardown reads only those.
func mayMakeOutside(k ledger.Kind) bool {
	switch k {
	case ledger.KindDatapath, ledger.KindPolicy, ledger.KindCIDR, ledger.KindService:
		return false
	}
	return true
}

// teardown removes the datapath of st, holding its lock: what its
// objects made outside the pins, as their ledger records say, its
// programs' attachments, and its pins. It goes on past errors and returns
// all of them. A record it cannot read is skipped and named in the error:
// what it made may be left.
func teardown(st *core.State) error {
	var errs []error
	if st.Objs.Ledger != nil {
		recs, err := readLedger(st.Objs.Ledger, mayMakeOutside)
		if err != nil {
			errs = append(errs, fmt.Errorf("%w; what it made outside the pins may be left", err))
		}
		for _, r := range recs {
			if r.Made.NetNS == "" && r.Made.Device == nil && len(r.Made.Links) == 0 && len(r.Made.Routes) == 0 {
				continue // map entries only: they go with the maps
			}
			// The maps go with the pins: only what lives outside them
			// is undone.
			r.Made.Entries, r.Made.Sweeps, r.Made.Records = nil, nil, nil
			errs = append(errs, st.Undo(r))
		}
	}
	errs = append(errs,
		removeRoutes(st),
		removeIPsec(st),
		attach.DetachAll(st.LinksDir()),
		nsrun.Do(st.NS, func() error { return attach.RemoveLegacy(st.LegacyPrefix()) }),
	)
	if err := os.RemoveAll(st.Dir); err != nil {
		errs = append(errs, fmt.Errorf("remove pins: %w", err))
	}
	return errors.Join(errs...)
}

// removeIPsec removes the xfrm states and policies of IPsec between nodes
// (package node's and the shared ones Open made), told from everyone
// else's by their request ID and marks: a datapath without IPsec has none.
func removeIPsec(st *core.State) error {
	if !st.NS.IsOpen() {
		return nil
	}
	return xfrm.RemoveAll(st.NS)
}

// removeRoutes removes the routes of sluice's protocol in the datapath's
// namespace: package node's, to other nodes' pod CIDRs. Their records
// name no routes (a node's record stays small), and the namespace has one
// datapath.
func removeRoutes(st *core.State) error {
	if !st.NS.IsOpen() {
		return nil
	}
	routes, err := netdev.Routes(st.NS)
	if err != nil {
		return err
	}
	var errs []error
	for p, via := range routes {
		errs = append(errs, netdev.DeleteRoute(st.NS, p, via))
	}
	return errors.Join(errs...)
}
