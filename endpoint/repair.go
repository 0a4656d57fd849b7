package endpoint

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/ledger"
)

func init() {
	core.RegisterRepair(ledger.KindEndpoint, repairEndpoints)
	core.RegisterCheck(ledger.KindEndpoint, checkEndpoints)
	core.RegisterWorkloadNamespaces(namespaces)
}

// namespaces opens the network namespace of each endpoint that names one
// (an adopted endpoint may not), for the socket iterator
// (core.State.DestroySockets). A namespace that is gone has no sockets
// and is skipped.
func namespaces(st *core.State) ([]netns.NsHandle, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindEndpoint)
	if err != nil {
		return nil, err
	}
	var out []netns.NsHandle
	for _, r := range recs {
		ep, err := decode(r)
		if err != nil || ep.NetNS == "" {
			continue
		}
		ns, err := openNetNS(ep.NetNS, false)
		if errors.Is(err, datapath.ErrNotFound) {
			continue
		}
		if err != nil {
			return out, fmt.Errorf("endpoint %d: %w", ep.ID, err)
		}
		out = append(out, ns)
	}
	return out, nil
}

// repairEndpoints undoes every endpoint a killed Create or Delete left
// (a record not Ready), and writes back the map entries of a ready one
// that differ from its record (a killed Update). It returns how many
// endpoints it repaired.
func repairEndpoints(st *core.State) (int, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindEndpoint)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range recs {
		if r.State != ledger.Ready {
			if err := st.Undo(r); err != nil {
				return n, err
			}
			n++
		}
	}
	drift, err := checkReady(st, true)
	touched := map[string]bool{}
	for _, d := range drift {
		touched[d.Object] = true
	}
	return n + len(touched), err
}

// checkEndpoints compares each ready endpoint's entries in the endpoint
// map and the ipcache with its record, and looks for entries of those
// maps that no endpoint made.
func checkEndpoints(st *core.State, repair bool) ([]core.Drift, error) {
	drift, err := checkReady(st, repair)
	if err != nil {
		return drift, err
	}
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindEndpoint)
	if err != nil {
		return drift, err
	}
	ifindexes := map[uint32]bool{}
	prefixes := map[netip.Prefix]bool{}
	for _, r := range recs {
		ep, err := decode(r)
		if err != nil {
			drift = append(drift, core.Drift{Object: fmt.Sprintf("endpoint %d", r.ID), What: err.Error()})
			continue
		}
		ifindexes[uint32(ep.HostIfindex)] = true
		for _, a := range addrs(ep) {
			prefixes[hostPrefix(a)] = true
		}
	}
	var (
		ifindex uint32
		info    bpfobj.TypesEndpointInfo
		stray   []uint32
	)
	it := st.Objs.Endpoints.Iterate()
	for it.Next(&ifindex, &info) {
		if !ifindexes[ifindex] {
			stray = append(stray, ifindex)
		}
	}
	if err := it.Err(); err != nil {
		return drift, fmt.Errorf("read the endpoint map: %w", err)
	}
	for _, i := range stray {
		d := core.Drift{Object: "endpoints", What: fmt.Sprintf("an entry for interface %d, which no endpoint has", i)}
		if repair {
			if err := st.Objs.Endpoints.Delete(i); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return drift, err
			}
			d.Repaired = true
		}
		drift = append(drift, d)
	}
	orphans, err := st.CheckIpcache(ipcache.Endpoint, prefixes, repair)
	return append(drift, orphans...), err
}

// checkReady compares each ready endpoint's entries with its record.
func checkReady(st *core.State, repair bool) ([]core.Drift, error) {
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindEndpoint)
	if err != nil {
		return nil, err
	}
	var drift []core.Drift
	for _, r := range recs {
		if r.State != ledger.Ready {
			drift = append(drift, core.Drift{Object: fmt.Sprintf("endpoint %d", r.ID), What: fmt.Sprintf("%s by a process that was killed: Reconcile undoes it", r.State)})
			continue
		}
		ep, err := decode(r)
		if err != nil {
			continue // reported by checkEndpoints
		}
		object := fmt.Sprintf("endpoint %d", ep.ID)
		var have bpfobj.TypesEndpointInfo
		want := endpointInfo(ep, true)
		if err := st.Objs.Endpoints.Lookup(uint32(ep.HostIfindex), &have); err != nil || have != want {
			d := core.Drift{Object: object, What: "its endpoint map entry is missing or differs from its record"}
			if repair {
				if err := st.Objs.Endpoints.Put(uint32(ep.HostIfindex), &want); err != nil {
					return drift, core.MapError(err, datapath.ErrMapFull, object)
				}
				d.Repaired = true
			}
			drift = append(drift, d)
		}
		for _, a := range addrs(ep) {
			e, ok, err := ipcache.Lookup(st.Objs.Ipcache, hostPrefix(a))
			if err != nil {
				return drift, err
			}
			if ok && ipcache.Source(e.Source) == ipcache.Endpoint && e.Identity == uint32(ep.Identity) && e.Ifindex == uint32(ep.HostIfindex) {
				continue
			}
			d := core.Drift{Object: object, What: fmt.Sprintf("the ipcache entry of %s is missing or differs from its record", a)}
			if repair {
				v := ipcache.Entry{Identity: uint32(ep.Identity), Ifindex: uint32(ep.HostIfindex)}
				err := ipcache.Put(st.Objs.Ipcache, hostPrefix(a), v, ipcache.Endpoint)
				switch {
				case errors.Is(err, ipcache.ErrOwned):
					d.What += fmt.Sprintf(" (another writer holds it: %v)", err)
				case err != nil:
					return drift, err
				default:
					d.Repaired = true
				}
			}
			drift = append(drift, d)
		}
	}
	return drift, nil
}
