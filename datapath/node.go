package datapath

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/netdev"
)

// nodeRecord is what a datapath's first Open was given, kept in the ledger
// so that a re-open with another namespace or another node configuration
// is refused instead of silently acting on the wrong ones.
type nodeRecord struct {
	Version  int    `json:"version"`
	NetNSDev uint64 `json:"netns_dev"`
	NetNSIno uint64 `json:"netns_ino"`
	Node     Node   `json:"node"`
	// Programs is the build whose programs are attached (bpfobj.Build).
	Programs string `json:"programs,omitempty"`
}

const nodeRecordVersion = 2

// checkNode records the namespace and node configuration of a new
// datapath, and checks those of a re-opened one. A re-open with a zero
// Config.Node takes the recorded one. A tool that only inspects
// (MustExist, no NetNS) is not held to the namespace.
func (dp *Datapath) checkNode(cfg Config) (Node, error) {
	st := dp.st
	var fi unix.Stat_t
	if err := unix.Fstat(int(st.NS), &fi); err != nil {
		return Node{}, fmt.Errorf("identify network namespace: %w", err)
	}
	mine := nodeRecord{Version: nodeRecordVersion, NetNSDev: fi.Dev, NetNSIno: fi.Ino, Node: cfg.Node}

	r, err := ledger.Get(st.Objs.Ledger, ledger.KindDatapath, 0)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		if err := checkDevices(st, cfg.Node); err != nil {
			return Node{}, err
		}
		dp.useNode(cfg.Node)
		obj, err := json.Marshal(mine)
		if err != nil {
			return Node{}, err
		}
		return cfg.Node, ledger.Put(st.Objs.Ledger, &ledger.Record{Kind: ledger.KindDatapath, State: ledger.Ready, Object: obj})
	}
	if err != nil {
		return Node{}, fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	var pinned nodeRecord
	if err := json.Unmarshal(r.Object, &pinned); err != nil || pinned.Version != nodeRecordVersion {
		return Node{}, fmt.Errorf("%w: node record version %d (%v)", ErrIncompatible, pinned.Version, err)
	}
	inspecting := cfg.MustExist && cfg.NetNS == ""
	if !inspecting {
		if err := checkServes(st, pinned, cfg.NetNS); err != nil {
			return Node{}, err
		}
	}
	if !cfg.Node.isZero() && !sameNode(pinned.Node, cfg.Node) {
		return Node{}, fmt.Errorf("datapath %s was opened for node %s, not %s: %w", st.Name, pinned.Node, cfg.Node, ErrInvalid)
	}
	if !inspecting {
		if err := checkDevices(st, pinned.Node); err != nil {
			return Node{}, err
		}
	}
	dp.useNode(pinned.Node)
	return pinned.Node, nil
}

// useNode makes n the datapath's node configuration.
func (dp *Datapath) useNode(n Node) {
	st := dp.st
	st.PodCIDRs = slices.Clone(n.PodCIDRs)
	st.Node = core.LocalNode{
		Name: n.Name, Routing: int(n.Routing), Addresses: slices.Clone(n.Addresses),
		ClusterCIDRs: slices.Clone(n.ClusterCIDRs), EndpointMTU: n.MTU, Encryption: int(n.Encryption),
	}
}

// checkDevices fails with ErrNotFound when a node device is missing.
func checkDevices(st *core.State, n Node) error {
	for _, d := range n.Devices {
		if _, err := netdev.Get(st.NS, d); err != nil {
			if errors.Is(err, unix.ENODEV) {
				return fmt.Errorf("node device %s: %w", d, ErrNotFound)
			}
			return err
		}
	}
	return nil
}

func (n Node) isZero() bool {
	return n.Name == "" && len(n.PodCIDRs) == 0 && n.Routing == RoutingLocal && len(n.Addresses) == 0 &&
		len(n.Devices) == 0 && len(n.ClusterCIDRs) == 0 && n.TunnelPort == 0 && n.MTU == 0 && !n.NoMasquerade &&
		n.Encryption == EncryptionNone
}

func (n Node) String() string {
	if n.Routing == RoutingLocal {
		return fmt.Sprintf("{pod CIDRs %v}", n.PodCIDRs)
	}
	return fmt.Sprintf("{%s, %s routing, addresses %v, devices %v, pod CIDRs %v, cluster CIDRs %v, tunnel port %d, MTU %d, masquerade %t, encryption %s}",
		n.Name, n.Routing, n.Addresses, n.Devices, n.PodCIDRs, n.ClusterCIDRs, n.TunnelPort, n.MTU, !n.NoMasquerade, n.Encryption)
}

func sameNode(a, b Node) bool {
	return a.Name == b.Name && a.Routing == b.Routing && a.TunnelPort == b.TunnelPort && a.MTU == b.MTU && a.NoMasquerade == b.NoMasquerade &&
		a.Encryption == b.Encryption &&
		samePrefixes(a.PodCIDRs, b.PodCIDRs) && samePrefixes(a.ClusterCIDRs, b.ClusterCIDRs) &&
		sameSet(a.Addresses, b.Addresses) && sameSet(a.Devices, b.Devices)
}

func sameSet[T comparable](a, b []T) bool {
	if len(a) != len(b) {
		return false
	}
	for _, x := range a {
		if !slices.Contains(b, x) {
			return false
		}
	}
	return true
}

func samePrefixes(a, b []netip.Prefix) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	cmp := func(x, y netip.Prefix) int {
		if c := x.Addr().Compare(y.Addr()); c != 0 {
			return c
		}
		return x.Bits() - y.Bits()
	}
	slices.SortFunc(a, cmp)
	slices.SortFunc(b, cmp)
	return slices.Equal(a, b)
}

// checkServes fails with ErrInvalid when st's namespace is not the one
// node says the datapath serves (spec names st's, for the error).
func checkServes(st *core.State, node nodeRecord, spec string) error {
	var fi unix.Stat_t
	if err := unix.Fstat(int(st.NS), &fi); err != nil {
		return fmt.Errorf("identify network namespace: %w", err)
	}
	if node.NetNSDev != fi.Dev || node.NetNSIno != fi.Ino {
		return fmt.Errorf("datapath %s serves the network namespace with inode %d, not %q (inode %d): %w",
			st.Name, node.NetNSIno, spec, fi.Ino, ErrInvalid)
	}
	return nil
}
