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
)

// nodeRecord is what a datapath's first Open was given, kept in the ledger
// so that a re-open with another namespace or other pod CIDRs is refused
// instead of silently acting on the wrong ones.
type nodeRecord struct {
	Version  int            `json:"version"`
	NetNSDev uint64         `json:"netns_dev"`
	NetNSIno uint64         `json:"netns_ino"`
	PodCIDRs []netip.Prefix `json:"pod_cidrs"`
	// Programs is the build whose programs are attached (bpfobj.Build).
	Programs string `json:"programs,omitempty"`
}

const nodeRecordVersion = 1

// checkNode records the namespace and node configuration of a new
// datapath, and checks those of a re-opened one. A re-open with no pod
// CIDRs takes the recorded ones. A tool that only inspects (MustExist, no
// NetNS) is not held to the namespace.
func (dp *Datapath) checkNode(cfg Config) error {
	st := dp.st
	var fi unix.Stat_t
	if err := unix.Fstat(int(st.NS), &fi); err != nil {
		return fmt.Errorf("identify network namespace: %w", err)
	}
	mine := nodeRecord{Version: nodeRecordVersion, NetNSDev: fi.Dev, NetNSIno: fi.Ino, PodCIDRs: st.PodCIDRs}

	r, err := ledger.Get(st.Objs.Ledger, ledger.KindDatapath, 0)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		obj, err := json.Marshal(mine)
		if err != nil {
			return err
		}
		return ledger.Put(st.Objs.Ledger, &ledger.Record{Kind: ledger.KindDatapath, State: ledger.Ready, Object: obj})
	}
	if err != nil {
		return fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	var pinned nodeRecord
	if err := json.Unmarshal(r.Object, &pinned); err != nil || pinned.Version != nodeRecordVersion {
		return fmt.Errorf("%w: node record version %d (%v)", ErrIncompatible, pinned.Version, err)
	}
	if inspecting := cfg.MustExist && cfg.NetNS == ""; !inspecting {
		if err := checkServes(st, pinned, cfg.NetNS); err != nil {
			return err
		}
	}
	if len(cfg.Node.PodCIDRs) == 0 {
		st.PodCIDRs = pinned.PodCIDRs
		return nil
	}
	if !samePrefixes(pinned.PodCIDRs, cfg.Node.PodCIDRs) {
		return fmt.Errorf("datapath %s has pod CIDRs %v, not %v: %w", st.Name, pinned.PodCIDRs, cfg.Node.PodCIDRs, ErrInvalid)
	}
	return nil
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
