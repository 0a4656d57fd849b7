package policy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
)

// AssignIdentity gives the addresses of prefix the security identity id:
// remote workloads, another node's pods, an external network policies name
// by identity. It takes effect for new flows at once, with no policy
// applied again; the most specific prefix decides an address's identity,
// so a local endpoint's own address keeps the endpoint's. Assigning again
// replaces the identity. A prefix a local endpoint or a CIDR peer holds is
// ErrExists; a bad prefix or a reserved identity is ErrInvalid.
func AssignIdentity(ctx context.Context, dp *datapath.Datapath, prefix netip.Prefix, id datapath.Identity) error {
	if err := checkPrefix("prefix", prefix); err != nil {
		return fmt.Errorf("assign identity: %v: %w", err, datapath.ErrInvalid)
	}
	if id < datapath.MinIdentity || (id >= CIDRIdentityFirst && id <= CIDRIdentityLast) {
		return fmt.Errorf("assign identity %s to %s: want a workload identity, from %d, outside %d..%d: %w",
			id, prefix, datapath.MinIdentity, CIDRIdentityFirst, CIDRIdentityLast, datapath.ErrInvalid)
	}
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return err
	}
	defer unlock()
	err = ipcache.Put(st.Objs.Ipcache, prefix, ipcache.Entry{Identity: uint32(id)}, ipcache.Identity)
	if errors.Is(err, ipcache.ErrOwned) {
		return fmt.Errorf("assign identity %s: %w: %w", id, datapath.ErrExists, err)
	}
	if err != nil {
		return core.MapError(err, datapath.ErrMapFull, "assign identity to "+prefix.String())
	}
	return nil
}

// UnassignIdentity removes an identity AssignIdentity gave prefix; its
// addresses take the identity of the next less specific prefix, or world.
// A prefix with no assignment is not an error.
func UnassignIdentity(ctx context.Context, dp *datapath.Datapath, prefix netip.Prefix) error {
	if err := checkPrefix("prefix", prefix); err != nil {
		return fmt.Errorf("unassign identity: %v: %w", err, datapath.ErrInvalid)
	}
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return err
	}
	defer unlock()
	return ipcache.DeleteKey(st.Objs.Ipcache, ipcache.KeyBytes(prefix), ipcache.Identity)
}
