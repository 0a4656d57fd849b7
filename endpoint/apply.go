package endpoint

import (
	"context"
	"errors"
	"fmt"
	"maps"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
)

// Change says what Apply did.
type Change int

const (
	// Unchanged: the endpoint was as the spec says already.
	Unchanged Change = iota
	// Created: there was no endpoint with the spec's ID.
	Created
	// Updated: its identity or labels changed, in place.
	Updated
	// Replaced: something only a new veth pair can change (addresses,
	// namespace, names, MAC, MTU) differed; the endpoint was deleted and
	// created again.
	Replaced
)

func (c Change) String() string {
	return [...]string{"unchanged", "created", "updated", "replaced"}[c]
}

// Apply makes the endpoint with spec's ID be as spec says, whatever there
// is now: it creates it, updates its identity and labels in place, or, when
// anything else differs, replaces it (the workload's interface is made
// anew). Applying the same spec twice changes nothing the second time:
// defaults, the MAC included, are the same every time. It returns the
// endpoint and what it did; errors are those of Create, and on error the
// endpoint is as before, or, for a failed replacement, gone.
func Apply(ctx context.Context, dp *datapath.Datapath, spec Spec) (*Endpoint, Change, error) {
	st := core.Of(dp)
	want, err := normalize(spec, st.Name, st.PodCIDRs, st.Node.EndpointMTU)
	if err != nil {
		return nil, Unchanged, err
	}
	have, err := Get(dp, spec.ID)
	if errors.Is(err, datapath.ErrNotFound) {
		ep, err := Create(ctx, dp, spec)
		return ep, Created, err
	}
	if err != nil {
		return nil, Unchanged, err
	}
	same := have.Spec
	same.Identity, same.Labels = want.Identity, want.Labels
	switch {
	case !sameSpec(same, want.Spec):
		if err := Delete(ctx, dp, spec.ID); err != nil {
			return nil, Unchanged, err
		}
		ep, err := Create(ctx, dp, spec)
		return ep, Replaced, err
	case have.Identity != want.Identity || !maps.Equal(have.Labels, want.Labels):
		ep, err := Update(ctx, dp, spec.ID, Changes{Identity: want.Identity, Labels: labelsOrEmpty(want.Labels)})
		return ep, Updated, err
	}
	return have, Unchanged, nil
}

// labelsOrEmpty turns nil labels into an empty map, which Update takes as
// "clear them".
func labelsOrEmpty(l map[string]string) map[string]string {
	if l == nil {
		return map[string]string{}
	}
	return l
}

func sameSpec(a, b Spec) bool {
	return a.ID == b.ID && a.IPv4 == b.IPv4 && a.IPv6 == b.IPv6 && a.MAC.String() == b.MAC.String() &&
		a.Identity == b.Identity && maps.Equal(a.Labels, b.Labels) && a.NetNS == b.NetNS &&
		a.IfName == b.IfName && a.HostIfName == b.HostIfName && a.MTU == b.MTU && a.Interface == b.Interface
}

// Status is what the kernel says of an endpoint now, beside the spec it was
// made from.
type Status struct {
	// HostUp says the host end of the veth pair exists and is set up.
	HostUp bool
	// Running says both ends are up and the pair carries packets.
	Running bool
	// Attached says the from-endpoint program is attached to the host end.
	Attached bool
	// Counters are the endpoint's packet and byte counts.
	Counters Counters
}

// ReadStatus returns an endpoint's status, or an error matching
// datapath.ErrNotFound. A handle opened read-only knows no namespace to
// look in: it fails with an error matching os.ErrPermission.
func ReadStatus(dp *datapath.Datapath, id uint16) (Status, error) {
	if st := core.Of(dp); st.ReadOnly {
		return Status{}, fmt.Errorf("endpoint %d: status: %w", id, core.ErrReadOnly)
	}
	ep, err := Get(dp, id)
	if err != nil {
		return Status{}, err
	}
	c, err := ReadCounters(dp, id)
	if err != nil {
		return Status{}, err
	}
	st := core.Of(dp)
	release, err := st.Use()
	if err != nil {
		return Status{}, err
	}
	defer release()
	s := Status{Counters: c}
	if l, err := netdev.Get(st.NS, ep.HostIfName); err == nil && l.Index == ep.HostIfindex {
		s.HostUp, s.Running = l.Up, l.Running
	}
	s.Attached, err = attached(st, ep)
	return s, err
}

// attached reports whether from-endpoint is attached to the endpoint's host
// end: as a tcx program of that name, or as the datapath's legacy filter.
// (By name: after a re-open the program attached is an earlier process's
// load of it, another program ID.)
func attached(st *core.State, ep *Endpoint) (bool, error) {
	var found bool
	err := nsrun.Do(st.NS, func() error {
		// tcx where the kernel has it (an error where it has not), else a
		// legacy filter.
		res, err := link.QueryPrograms(link.QueryOptions{Target: ep.HostIfindex, Attach: ebpf.AttachTCXIngress})
		if err == nil {
			for _, p := range res.Programs {
				if programName(p.ID) == "from_endpoint" {
					found = true
					return nil
				}
			}
		}
		found, err = attach.LegacyAttached(ep.HostIfindex, attach.Ingress, st.LegacyPrefix()+linkKey(ep.ID))
		return err
	})
	return found, err
}

// programName returns the name of the program with the given ID, or "".
func programName(id ebpf.ProgramID) string {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return ""
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return ""
	}
	return info.Name
}
