package datapath

import (
	"fmt"

	"github.com/sluicedp/sluice/internal/batch"
	"github.com/sluicedp/sluice/internal/bpfobj"
)

// MapUsage is how full one of the datapath's maps is.
type MapUsage struct {
	// Map names the map: "conntrack" (tracked flows) or "snat"
	// (masqueraded flows, both sides of each).
	Map      string
	Entries  int // entries present, expired ones included until collected
	Capacity int // the most it holds
}

// Fill is Entries over Capacity: 0 empty, 1 full.
func (u MapUsage) Fill() float64 {
	if u.Capacity == 0 {
		return 0
	}
	return float64(u.Entries) / float64(u.Capacity)
}

// Usage returns how full the maps that traffic fills are: conntrack (an
// LRU: when full, each new flow evicts the least recently used one) and
// the masquerading map (when full, new masqueraded flows are dropped with
// ReasonSNATMapFull). Counting reads each map whole, in batches: about
// as long as CollectFlows takes. On a closed Datapath it fails with an
// error matching os.ErrClosed.
func (dp *Datapath) Usage() ([]MapUsage, error) {
	release, err := dp.st.Use()
	if err != nil {
		return nil, err
	}
	defer release()
	ct, err := batch.Count[bpfobj.TypesCtKey, bpfobj.TypesCtEntry](dp.st.Objs.Conntrack)
	if err != nil {
		return nil, fmt.Errorf("count conntrack entries: %w", err)
	}
	snat, err := batch.Count[bpfobj.TypesSnatKey, bpfobj.TypesSnatEntry](dp.st.Objs.Snat)
	if err != nil {
		return nil, fmt.Errorf("count masquerading entries: %w", err)
	}
	return []MapUsage{
		{Map: "conntrack", Entries: ct, Capacity: int(dp.st.Objs.Conntrack.MaxEntries())},
		{Map: "snat", Entries: snat, Capacity: int(dp.st.Objs.Snat.MaxEntries())},
	}, nil
}
