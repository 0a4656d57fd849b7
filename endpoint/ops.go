package endpoint

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/batch"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/txn"
)

// Create provisions an endpoint and connects it to the datapath:
//
//   - the workload's namespace (created when spec.NetNS names one that is
//     missing) and a veth pair: `ip link add HOSTIF type veth peer name eth0
//     netns NS address MAC`, both ends up;
//   - inside the workload: the address as a /32 or /128, a default route via
//     the gateway and a permanent neighbour entry for it
//     (`ip addr add`, `ip route add default via GW onlink`,
//     `ip neigh add GW lladdr HOSTMAC nud permanent`);
//   - the from-endpoint program on the host end's tcx ingress (from-host on
//     its egress), the endpoint map and ipcache entries, and only then the
//     host end up: the workload cannot send a packet that the program does
//     not see;
//   - in the datapath's namespace, a route to each address through the host
//     end (`ip route replace ADDR dev HOSTIF scope link`), so the node
//     reaches the endpoint.
//
// Bad input returns a datapath.ErrInvalid error; an ID, address or interface
// name in use returns datapath.ErrExists; a namespace path that does not
// exist returns datapath.ErrNotFound. In every error case nothing is left
// behind: what Create made before failing, it removes.
func Create(ctx context.Context, dp *datapath.Datapath, spec Spec) (*Endpoint, error) {
	st := core.Of(dp)
	ep, err := normalize(spec, st.Name, st.PodCIDRs, st.Node.EndpointMTU)
	if err != nil {
		return nil, err
	}
	// The record must fit; check with the widest values filled in later.
	trial := *ep
	trial.HostIfindex, trial.HostMAC, trial.OwnsNetNS = 1<<31-1, ep.MAC, true
	if err := fits(&trial); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	unlock, err := st.Lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := settle(st, ep.ID); err != nil {
		return nil, err
	}
	if err := checkFree(st, ep); err != nil {
		return nil, err
	}
	if err := connect(st, ep); err != nil {
		return nil, err
	}
	return ep, nil
}

// fits checks that the ledger record of ep fits its map.
func fits(ep *Endpoint) error {
	rec := intent(ep)
	rec.Made.Device.Ifindex = ep.HostIfindex
	rec.Made.Entries = entries(ep)
	if err := setObject(rec, ep); err != nil {
		return err
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if len(b) > len(bpfobj.TypesLedgerRecord{}.Data) {
		return fmt.Errorf("endpoint %d: its record takes %d bytes, at most %d fit: shorten the labels: %w",
			ep.ID, len(b), len(bpfobj.TypesLedgerRecord{}.Data), datapath.ErrInvalid)
	}
	return nil
}

// settle undoes what a process killed in the middle of creating or deleting
// endpoint id left behind, so that the ID can be used again.
func settle(st *core.State, id uint16) error {
	rec, err := lookupRecord(st, id)
	if errors.Is(err, datapath.ErrNotFound) {
		return nil
	}
	if err != nil || rec.State == ledger.Ready {
		return err
	}
	return st.Undo(rec)
}

// intent is the ledger record of an endpoint about to be made: everything
// it may create is named before anything is created.
func intent(ep *Endpoint) *ledger.Record {
	rec := &ledger.Record{Kind: ledger.KindEndpoint, ID: uint32(ep.ID), State: ledger.Creating}
	rec.Made.Device = &ledger.Device{Name: ep.HostIfName, Owned: !ep.Adopted()}
	rec.Made.Links = links(ep.ID)
	// Its policy, if one is applied, goes with it: too many entries to
	// list, so swept by the endpoint field of their keys.
	id := uint32(ep.ID)
	rec.Made.Sweeps = []ledger.Sweep{
		{Map: "policy", Offset: int(unsafe.Offsetof(bpfobj.TypesPolicyKey{}.Endpoint)), Size: 2, Value: id},
		{Map: "policy_meta", Offset: int(unsafe.Offsetof(bpfobj.TypesPolicyMetaKey{}.Endpoint)), Size: 2, Value: id},
		{Map: "policy_counters", Offset: int(unsafe.Offsetof(bpfobj.TypesPolicyCounterKey{}.Endpoint)), Size: 2, Value: id},
		// Its tracked flows: an endpoint that gets its addresses later
		// must not inherit them.
		{Map: "conntrack", InValue: true, Offset: int(unsafe.Offsetof(bpfobj.TypesCtEntry{}.Endpoint)), Size: 2, Value: id},
	}
	// Both slots of its policy's blob (see package policy).
	rec.Made.Records = []ledger.Ref{{Kind: ledger.KindPolicy, ID: id}, {Kind: ledger.KindPolicy, ID: id | 1<<16}}
	if ep.OwnsNetNS {
		rec.Made.NetNS = ep.NetNS
	}
	return rec
}

// connect makes the endpoint's devices, attaches the program and registers
// it, as one transaction (internal/txn): the record first, as Creating,
// naming all it will make, whose undo takes apart whatever the later
// phases made. A process killed half-way leaves a record that Open,
// Reconcile or the next Create with this ID undoes.
func connect(st *core.State, ep *Endpoint) error {
	ep.OwnsNetNS = !ep.Adopted() && !strings.ContainsRune(ep.NetNS, '/') && !namedNetNSExists(ep.NetNS)
	rec := intent(ep)
	return txn.Run("endpoint",
		txn.Phase{
			Name: "intent",
			Do: func() error {
				if err := setObject(rec, ep); err != nil {
					return err
				}
				return putRecord(st, rec)
			},
			Undo: func() error { return st.Undo(rec) },
		},
		txn.Phase{
			Name: "devices",
			Do: func() error {
				if ep.Adopted() {
					return adopt(st, ep)
				}
				return provision(st, ep)
			},
		},
		txn.Phase{
			Name: "record",
			Do: func() error {
				rec.Made.Device.Ifindex = ep.HostIfindex
				rec.Made.Entries = entries(ep)
				if err := setObject(rec, ep); err != nil {
					return err
				}
				return putRecord(st, rec)
			},
		},
		txn.Phase{
			Name: "attach",
			// The program first: until the endpoint is registered
			// below it drops whatever the workload sends
			// (UNKNOWN_ENDPOINT), and the host end is still down unless
			// the caller adopted it up.
			Do: func() error {
				progs, err := st.EndpointPrograms()
				if err != nil {
					return fmt.Errorf("endpoint %d: %w", ep.ID, err)
				}
				if err := st.AttachTC(ep.HostIfindex, attach.Ingress, progs.FromEndpoint, linkKey(ep.ID)); err != nil {
					return fmt.Errorf("endpoint %d: attach from-endpoint to %s: %w", ep.ID, ep.HostIfName, err)
				}
				if err := st.AttachTC(ep.HostIfindex, attach.Egress, progs.FromHost, egressKey(ep.ID)); err != nil {
					return fmt.Errorf("endpoint %d: attach from-host to %s: %w", ep.ID, ep.HostIfName, err)
				}
				return nil
			},
		},
		txn.Phase{Name: "register", Do: func() error { return register(st, ep) }},
		txn.Phase{
			Name: "up",
			Do: func() error {
				if err := netdev.SetUp(st.NS, ep.HostIfName); err != nil {
					return fmt.Errorf("endpoint %d: %w", ep.ID, err)
				}
				// The node reaches the endpoint through its host end;
				// the routes go with the device.
				for _, a := range addrs(ep) {
					if err := netdev.HostRoute(st.NS, ep.HostIfName, a); err != nil {
						return fmt.Errorf("endpoint %d: %w", ep.ID, err)
					}
				}
				if !ep.Adopted() { // an adopted pair's far end is the caller's to set up
					return waitRunning(st, ep)
				}
				return nil
			},
		},
		txn.Phase{
			Name: "ready",
			Do: func() error {
				if err := setReady(st, ep, true); err != nil {
					return err
				}
				rec.State = ledger.Ready
				return putRecord(st, rec)
			},
		},
	)
}

// namedNetNSExists reports whether /run/netns/name exists.
func namedNetNSExists(name string) bool {
	_, err := os.Stat(filepath.Join("/run/netns", name))
	return err == nil
}

// entries are the map entries an endpoint writes, as the ledger records
// them for undoing.
func entries(ep *Endpoint) []ledger.Entry {
	u32 := func(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
	out := []ledger.Entry{
		{Map: "endpoints", Key: u32(uint32(ep.HostIfindex))},
		{Map: "ep_counters", Key: u32(uint32(ep.ID))},
	}
	for _, a := range addrs(ep) {
		out = append(out, ledger.Entry{Map: "ipcache", Key: ipcache.KeyBytes(hostPrefix(a)), Source: uint8(ipcache.Endpoint)})
	}
	return out
}

// runningTimeout bounds the wait for a new veth pair to carry packets; it
// takes microseconds, but a loaded or emulated machine is slower.
const runningTimeout = 10 * time.Second

// waitRunning waits until both ends of a new endpoint's veth pair can send,
// so that the endpoint works when Create returns.
func waitRunning(st *core.State, ep *Endpoint) error {
	ns, err := openNetNS(ep.NetNS, false)
	if err != nil {
		return fmt.Errorf("endpoint %d: %w", ep.ID, err)
	}
	defer ns.Close()
	if err := errors.Join(
		netdev.WaitRunning(st.NS, ep.HostIfName, runningTimeout),
		netdev.WaitRunning(ns, ep.IfName, runningTimeout),
	); err != nil {
		return fmt.Errorf("endpoint %d: %w", ep.ID, err)
	}
	return nil
}

// setReady marks the endpoint as one packets may be delivered to, or not.
func setReady(st *core.State, ep *Endpoint, ready bool) error {
	info := endpointInfo(ep, ready)
	err := st.Objs.Endpoints.Update(uint32(ep.HostIfindex), &info, ebpf.UpdateExist)
	if errors.Is(err, ebpf.ErrKeyNotExist) && !ready {
		return nil // gone already: a Delete that failed half-way
	}
	if err != nil {
		return fmt.Errorf("endpoint %d: mark ready=%t: %w", ep.ID, ready, err)
	}
	return nil
}

// linkKey names the attachment of from-endpoint to an endpoint's host end
// (tcx ingress); egressKey that of from-host (tcx egress).
func linkKey(id uint16) string   { return fmt.Sprintf("endpoint-%d", id) }
func egressKey(id uint16) string { return fmt.Sprintf("endpoint-%d-egress", id) }

// links are an endpoint's attachments, as its ledger record names them.
func links(id uint16) []ledger.Link {
	return []ledger.Link{
		{Key: linkKey(id), Program: bpfobj.EndpointProgFromEndpoint},
		{Key: egressKey(id), Egress: true, Program: bpfobj.EndpointProgFromHost},
	}
}

// checkFree fails with ErrExists when the endpoint's ID, addresses or host
// interface are taken.
func checkFree(st *core.State, ep *Endpoint) error {
	exists := func(format string, args ...any) error {
		return fmt.Errorf("endpoint %d: %s: %w", ep.ID, fmt.Sprintf(format, args...), datapath.ErrExists)
	}
	if _, err := lookup(st, ep.ID); err == nil {
		return exists("the ID is in use")
	} else if !errors.Is(err, datapath.ErrNotFound) {
		return err
	}
	// A local endpoint's address is in the ipcache as a host prefix; a
	// covering prefix (a remote node's, an identity's) is no conflict.
	for _, a := range addrs(ep) {
		v, ok, err := ipcache.Lookup(st.Objs.Ipcache, hostPrefix(a))
		switch {
		case err != nil:
			return err
		case ok && ipcache.Source(v.Source) != ipcache.Endpoint:
			return exists("%s has an ipcache entry of a %s", a, ipcache.Source(v.Source))
		case ok:
			var owner bpfobj.TypesEndpointInfo
			if st.Objs.Endpoints.Lookup(v.Ifindex, &owner) == nil {
				return exists("%s belongs to endpoint %d", a, owner.Id)
			}
			return exists("%s belongs to another endpoint", a)
		}
	}
	if !ep.Adopted() {
		if _, err := netdev.Get(st.NS, ep.HostIfName); err == nil {
			return exists("interface %s exists", ep.HostIfName)
		}
	}
	return nil
}

// provision makes the workload's side: namespace, veth pair (its host end
// down), addresses, routes.
func provision(st *core.State, ep *Endpoint) error {
	ns, err := openNetNS(ep.NetNS, ep.OwnsNetNS)
	if err != nil {
		return fmt.Errorf("endpoint %d: %w", ep.ID, err)
	}
	defer ns.Close()
	if _, err := netdev.Get(ns, ep.IfName); err == nil {
		return fmt.Errorf("endpoint %d: interface %s exists in %s: %w", ep.ID, ep.IfName, ep.NetNS, datapath.ErrExists)
	}

	hostIfindex, _, err := netdev.Veth(netdev.VethPair{
		NS: st.NS, Name: ep.HostIfName,
		PeerNS: ns, PeerName: ep.IfName, PeerMAC: ep.MAC,
		MTU: ep.MTU, KeepDown: true,
	})
	if errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("endpoint %d: %w: %w", ep.ID, datapath.ErrExists, err)
	}
	if err != nil {
		return fmt.Errorf("endpoint %d: %w", ep.ID, err)
	}
	host, err := netdev.Get(st.NS, ep.HostIfName)
	if err != nil {
		return fmt.Errorf("endpoint %d: %w", ep.ID, err)
	}
	ep.HostIfindex, ep.HostMAC = hostIfindex, host.MAC

	if err := netdev.SetUp(ns, "lo"); err != nil {
		return fmt.Errorf("endpoint %d: %w", ep.ID, err)
	}
	for _, fam := range []struct{ addr, gw netip.Addr }{{ep.IPv4, ep.Gateway4}, {ep.IPv6, ep.Gateway6}} {
		if !fam.addr.IsValid() {
			continue
		}
		if err := netdev.AddAddr(ns, ep.IfName, netip.PrefixFrom(fam.addr, fam.addr.BitLen())); err != nil {
			return fmt.Errorf("endpoint %d: %w", ep.ID, err)
		}
		if err := netdev.DefaultRoute(ns, ep.IfName, fam.gw, ep.HostMAC); err != nil {
			return fmt.Errorf("endpoint %d: %w", ep.ID, err)
		}
	}
	return nil
}

// adopt takes over a host-side veth the caller made.
func adopt(st *core.State, ep *Endpoint) error {
	host, err := netdev.Get(st.NS, ep.Interface)
	if errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("endpoint %d: adopt %s: %w", ep.ID, ep.Interface, datapath.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("endpoint %d: adopt %s: %w", ep.ID, ep.Interface, err)
	}
	if host.Type != "veth" {
		return fmt.Errorf("endpoint %d: adopt %s: it is a %s device, not a veth: %w", ep.ID, ep.Interface, host.Type, datapath.ErrInvalid)
	}
	var info bpfobj.TypesEndpointInfo
	if err := st.Objs.Endpoints.Lookup(uint32(host.Index), &info); err == nil {
		return fmt.Errorf("endpoint %d: adopt %s: endpoint %d has it: %w", ep.ID, ep.Interface, info.Id, datapath.ErrExists)
	}
	ep.HostIfindex, ep.HostMAC = host.Index, host.MAC
	return nil
}

// openNetNS opens the namespace spec names (a path, or a name under
// /run/netns), creating a named one that is missing when create is set. A
// missing one is otherwise ErrNotFound.
func openNetNS(spec string, create bool) (netns.NsHandle, error) {
	path := spec
	if !strings.ContainsRune(spec, '/') {
		path = filepath.Join("/run/netns", spec)
	}
	ns, err := netns.GetFromPath(path)
	switch {
	case err == nil:
		return ns, nil
	case !errors.Is(err, unix.ENOENT):
		return ns, fmt.Errorf("network namespace %s: %w", spec, err)
	case create && path != spec:
		return nsrun.New(spec)
	}
	return ns, fmt.Errorf("network namespace %s: %w", spec, datapath.ErrNotFound)
}

// Mirrors enum endpoint_flag in bpf/lib/endpoint.h.
const (
	flagIPv4  = uint32(bpfobj.TypesEndpointFlagENDPOINT_F_IPV4)
	flagIPv6  = uint32(bpfobj.TypesEndpointFlagENDPOINT_F_IPV6)
	flagReady = uint32(bpfobj.TypesEndpointFlagENDPOINT_F_READY)
)

// ipv4Key is an IPv4 address as the BPF side stores it: network byte order
// in a native __be32.
func ipv4Key(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

// endpointInfo is the endpoint's entry in the endpoint map; ready says
// whether packets may be delivered to it.
func endpointInfo(ep *Endpoint, ready bool) bpfobj.TypesEndpointInfo {
	info := bpfobj.TypesEndpointInfo{
		Id:       uint32(ep.ID),
		Identity: uint32(ep.Identity),
		Ifindex:  uint32(ep.HostIfindex),
		Mac:      [6]byte(ep.MAC),
		HostMac:  [6]byte(ep.HostMAC),
	}
	if ep.IPv4.IsValid() {
		info.Flags |= flagIPv4
		info.Ipv4 = ipv4Key(ep.IPv4)
	}
	if ep.IPv6.IsValid() {
		info.Flags |= flagIPv6
		info.Ipv6 = ep.IPv6.As16()
	}
	if ready {
		info.Flags |= flagReady
	}
	return info
}

// hostPrefix is the /32 or /128 of an address.
func hostPrefix(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

func addrs(ep *Endpoint) []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// register writes the endpoint into the maps: counters, endpoint map (not
// yet ready) and ipcache. The ledger record names every entry, so a
// failure is undone from it.
func register(st *core.State, ep *Endpoint) error {
	fail := func(err error, what string) error {
		return core.MapError(err, datapath.ErrMapFull, fmt.Sprintf("endpoint %d: %s", ep.ID, what))
	}
	zero := make([]bpfobj.TypesEndpointCounters, ebpf.MustPossibleCPU())
	if err := st.Objs.EpCounters.Update(uint32(ep.ID), zero, ebpf.UpdateAny); err != nil {
		return fail(err, "add counters")
	}
	info := endpointInfo(ep, false) // ready once its host end is up
	if err := st.Objs.Endpoints.Update(uint32(ep.HostIfindex), &info, ebpf.UpdateNoExist); err != nil {
		return fail(err, "add to endpoint map")
	}
	for _, a := range addrs(ep) {
		v := ipcache.Entry{Identity: uint32(ep.Identity), Ifindex: uint32(ep.HostIfindex)}
		err := ipcache.Put(st.Objs.Ipcache, hostPrefix(a), v, ipcache.Endpoint)
		if errors.Is(err, ipcache.ErrOwned) {
			return fmt.Errorf("endpoint %d: %w: %w", ep.ID, datapath.ErrExists, err)
		}
		if err != nil {
			return fail(err, "add "+a.String()+" to ipcache")
		}
	}
	return nil
}

// Get returns the endpoint with the given ID, or an error matching
// datapath.ErrNotFound.
func Get(dp *datapath.Datapath, id uint16) (*Endpoint, error) {
	st := core.Of(dp)
	release, err := st.Use()
	if err != nil {
		return nil, err
	}
	defer release()
	return lookup(st, id)
}

// List returns every endpoint of the datapath, by ID. An endpoint that is
// being created or deleted is not listed.
func List(dp *datapath.Datapath) ([]*Endpoint, error) {
	st := core.Of(dp)
	release, err := st.Use()
	if err != nil {
		return nil, err
	}
	defer release()
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindEndpoint)
	if err != nil {
		return nil, fmt.Errorf("list endpoints: %w: %w", datapath.ErrIncompatible, err)
	}
	var out []*Endpoint
	for _, rec := range recs {
		if rec.State != ledger.Ready {
			continue
		}
		ep, err := decode(rec)
		if err != nil {
			return nil, err
		}
		out = append(out, ep)
	}
	slices.SortFunc(out, func(a, b *Endpoint) int { return int(a.ID) - int(b.ID) })
	return out, nil
}

// Update changes an endpoint's identity or labels. A new identity applies
// to the next packet. It returns the updated endpoint, datapath.ErrNotFound
// for an unknown ID and datapath.ErrInvalid for a reserved identity or labels
// too large; on error nothing changed.
func Update(ctx context.Context, dp *datapath.Datapath, id uint16, c Changes) (*Endpoint, error) {
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return nil, err
	}
	defer unlock()
	ep, err := lookup(st, id)
	if err != nil {
		return nil, err
	}
	next := *ep
	if c.Identity != 0 {
		if c.Identity < datapath.MinIdentity {
			return nil, fmt.Errorf("endpoint %d: identity %s: identities below %d are reserved: %w", id, c.Identity, datapath.MinIdentity, datapath.ErrInvalid)
		}
		next.Identity = c.Identity
	}
	if c.Labels != nil {
		next.Labels = c.Labels
	}
	rec, err := lookupRecord(st, id)
	if err != nil {
		return nil, err
	}
	if err := setObject(rec, &next); err != nil {
		return nil, err
	}
	if err := fits(&next); err != nil {
		return nil, err
	}

	// Identity lives in the endpoint map and the ipcache; the record last.
	// Each write replaces an existing entry, so a failure half-way is undone
	// by writing the old values back.
	write := func(e *Endpoint) error {
		info := endpointInfo(e, true)
		if err := st.Objs.Endpoints.Update(uint32(e.HostIfindex), &info, ebpf.UpdateExist); err != nil {
			return err
		}
		for _, a := range addrs(e) {
			v := ipcache.Entry{Identity: uint32(e.Identity), Ifindex: uint32(e.HostIfindex)}
			if err := ipcache.Put(st.Objs.Ipcache, hostPrefix(a), v, ipcache.Endpoint); err != nil {
				return err
			}
		}
		return nil
	}
	// A process killed between the phases leaves the maps the new
	// version and the record the old one: Reconcile writes the maps
	// back (repairEndpoints).
	err = txn.Run("endpoint update",
		txn.Phase{
			Name: "maps",
			Do: func() error {
				if err := write(&next); err != nil {
					return fmt.Errorf("endpoint %d: update: %w", id, err)
				}
				return nil
			},
			Undo: func() error { return write(ep) },
		},
		txn.Phase{Name: "record", Do: func() error { return putRecord(st, rec) }},
	)
	if err != nil {
		return nil, err
	}
	return &next, nil
}

// Delete takes the endpoint apart: it stops delivery to it, detaches its
// program, removes it from the maps, deletes its veth pair (`ip link del
// HOSTIF`; not an adopted one) and the namespace Create made for it.
// Deleting an endpoint that does not exist is not an error. On error the
// endpoint is recorded as being deleted: it is no longer listed, and
// Delete, Reconcile or the next Open finishes the job.
func Delete(ctx context.Context, dp *datapath.Datapath, id uint16) error {
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return err
	}
	defer unlock()
	rec, err := lookupRecord(st, id)
	if errors.Is(err, datapath.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	ep, decodeErr := decode(rec)
	err = txn.Run("endpoint delete",
		txn.Phase{
			Name: "intent",
			// From here the endpoint is being deleted: it is no longer
			// listed, and what stops this Delete, Reconcile finishes.
			Do: func() error {
				if rec.State != ledger.Ready {
					return nil
				}
				rec.State = ledger.Deleting
				return putRecord(st, rec)
			},
		},
		txn.Phase{
			Name:  "stop",
			After: true,
			// Nothing is delivered to it from now on; then it comes
			// apart.
			Do: func() error {
				if decodeErr != nil {
					return nil
				}
				return setReady(st, ep, false)
			},
		},
		txn.Phase{Name: "take apart", After: true, Do: func() error { return st.Undo(rec) }},
	)
	if err != nil {
		return fmt.Errorf("endpoint %d: delete: %w", id, err)
	}
	return nil
}

// ReadCounters returns the endpoint's packet and byte counters, or an error
// matching datapath.ErrNotFound.
func ReadCounters(dp *datapath.Datapath, id uint16) (Counters, error) {
	st := core.Of(dp)
	release, err := st.Use()
	if err != nil {
		return Counters{}, err
	}
	defer release()
	var percpu []bpfobj.TypesEndpointCounters
	err = st.Objs.EpCounters.Lookup(uint32(id), &percpu)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Counters{}, fmt.Errorf("endpoint %d: %w", id, datapath.ErrNotFound)
	}
	if err != nil {
		return Counters{}, fmt.Errorf("endpoint %d: read counters: %w", id, err)
	}
	return sum(percpu), nil
}

// ReadAllCounters returns the counters of every endpoint, by ID:
// ReadCounters of each, in one pass over the counters. An endpoint is in
// it from the moment Create gives it counters until Delete takes them
// away: those List returns, and one being created or deleted.
func ReadAllCounters(dp *datapath.Datapath) (map[uint16]Counters, error) {
	st := core.Of(dp)
	release, err := st.Use()
	if err != nil {
		return nil, err
	}
	defer release()
	out := make(map[uint16]Counters)
	err = batch.EachPerCPU(st.Objs.EpCounters, func(id *uint32, percpu []bpfobj.TypesEndpointCounters) {
		out[uint16(*id)] = sum(percpu)
	})
	if err != nil {
		return nil, fmt.Errorf("read endpoint counters: %w", err)
	}
	return out, nil
}

// sum adds up an endpoint's counters of every CPU.
func sum(percpu []bpfobj.TypesEndpointCounters) Counters {
	var c Counters
	for _, v := range percpu {
		c.PacketsOut += v.PacketsOut
		c.BytesOut += v.BytesOut
		c.PacketsIn += v.PacketsIn
		c.BytesIn += v.BytesIn
	}
	return c
}
