package datapath

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/wireguard"
	"github.com/sluicedp/sluice/internal/xfrm"
)

// Node IDs in node_cidrs (bpf/lib/node.h).
const (
	nodeLocal = uint32(bpfobj.TypesNodeIdNODE_LOCAL)
	nodeNone  = uint32(bpfobj.TypesNodeIdNODE_NONE)
)

// setupNode makes the datapath the local node n: its pod CIDRs and the
// cluster's in node_cidrs, its addresses in the ipcache as the host's,
// the VXLAN device (RoutingVXLAN) and IP forwarding, and the node-facing
// programs on its devices, each recorded in the ledger (KindDevice)
// before it is made. What is there already is kept: a re-open changes
// nothing that runs. The settings the programs read go last. On error,
// and when the returned undo is called (Open failed after), what this
// call attached is detached and the VXLAN device it made deleted.
func setupNode(st *core.State, n Node) (undo func() error, err error) {
	var made []*ledger.Record
	takeBack := func() error {
		var errs []error
		for i := len(made) - 1; i >= 0; i-- {
			errs = append(errs, st.Undo(made[i]))
		}
		st.CloseNodePrograms()
		return errors.Join(errs...)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, takeBack())
		}
	}()
	mtu, err := endpointMTU(st, n)
	if err != nil {
		return nil, err
	}
	st.Node.EndpointMTU = mtu
	settings := bpfobj.TypesNodeSettings{Routing: uint32(n.Routing), EndpointMtu: uint32(mtu)}
	if n.Routing == RoutingLocal {
		return takeBack, st.Objs.NodeConfig.Put(uint32(0), &settings)
	}
	for _, p := range n.PodCIDRs {
		if err := putNodeCIDR(st, p, nodeLocal); err != nil {
			return nil, err
		}
	}
	for _, p := range n.ClusterCIDRs {
		if err := putNodeCIDR(st, p, nodeNone); err != nil {
			return nil, err
		}
	}
	for _, a := range n.Addresses {
		err := ipcache.Put(st.Objs.Ipcache, netip.PrefixFrom(a, a.BitLen()), ipcache.Entry{Identity: uint32(IdentityHost)}, ipcache.Node)
		if err != nil {
			return nil, fmt.Errorf("node address %s: %w", a, err)
		}
		if a.Is4() {
			settings.Flags |= uint32(bpfobj.TypesNodeConfigFlagNODE_CONFIG_IPV4)
			settings.Ipv4 = bpfobj.Addr16(a)
		} else {
			settings.Flags |= uint32(bpfobj.TypesNodeConfigFlagNODE_CONFIG_IPV6)
			settings.Ipv6 = bpfobj.Addr16(a)
		}
	}
	if !n.NoMasquerade {
		settings.Flags |= uint32(bpfobj.TypesNodeConfigFlagNODE_CONFIG_MASQUERADE)
	}
	// Pods' traffic to the world goes through the stack, and natively
	// routed traffic is looked up (bpf_fib_lookup) as forwarded.
	if err := netdev.Forward(st.NS); err != nil {
		return nil, err
	}
	if n.Routing == RoutingVXLAN {
		settings.TunnelPort = cmp.Or(n.TunnelPort, DefaultTunnelPort)
		ifindex, r, err := setupTunnel(st, settings.TunnelPort, mtu)
		if r != nil {
			made = append(made, r)
		}
		if err != nil {
			return nil, err
		}
		settings.TunnelIfindex = uint32(ifindex)
		if err := tunnelRoutes(st, n); err != nil {
			return nil, err
		}
	}
	settings.Encryption = uint32(n.Encryption)
	switch n.Encryption {
	case EncryptionIPsec:
		// The policies every peer shares: what is marked and matches no
		// peer's policy is dropped, never sent in clear. Unload removes
		// them with the rest (they are told by their request ID).
		if err := xfrm.Supported(st.NS); err != nil {
			return nil, fmt.Errorf("IPsec: %w: %w", ErrNotSupported, err)
		}
		if err := xfrm.InstallBase(st.NS, n.Addresses); err != nil {
			return nil, fmt.Errorf("IPsec: %w", err)
		}
	case EncryptionWireGuard:
		ifindex, r, err := setupWireGuard(st, n)
		if r != nil {
			made = append(made, r)
		}
		if err != nil {
			return nil, err
		}
		settings.WgIfindex = uint32(ifindex)
	}
	for _, name := range n.Devices {
		l, err := netdev.Get(st.NS, name)
		if err != nil {
			return nil, fmt.Errorf("node device %s: %w", name, err)
		}
		r, err := attachNodePrograms(st, uint32(l.Index), &ledger.Device{Name: name, Ifindex: l.Index},
			ledger.Link{Program: bpfobj.HostProgFromNetdev}, ledger.Link{Program: bpfobj.HostProgToNetdev, Egress: true})
		if r != nil {
			made = append(made, r)
		}
		if err != nil {
			return nil, err
		}
	}
	return takeBack, st.Objs.NodeConfig.Put(uint32(0), &settings)
}

// setupTunnel makes the VXLAN device, or finds the one an earlier Open
// made, and attaches from-overlay and to-overlay to it. Its name is the
// datapath's, so the datapath owns it. The record (KindDevice 0) is
// written before the device is made: a process killed in between leaves a
// record that Reconcile undoes, device included. It returns the device's
// index and, when it attached the programs, the record.
func setupTunnel(st *core.State, port uint16, mtu int) (int, *ledger.Record, error) {
	dev := &ledger.Device{Name: TunnelDevice, Owned: true}
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindDevice, 0)
	if errors.Is(err, ebpf.ErrKeyNotExist) || (err == nil && r.State != ledger.Ready) {
		err = ledger.Put(st.Objs.Ledger, &ledger.Record{Kind: ledger.KindDevice, ID: 0, State: ledger.Creating, Made: ledger.Made{Device: dev}})
	}
	if err != nil {
		return 0, nil, fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	ifindex, err := netdev.VXLAN(st.NS, TunnelDevice, port, mtu)
	if err != nil {
		// A device of that name that is not such a device is not ours
		// to remove: only the record goes, unless it is Ready.
		if r == nil || r.State != ledger.Ready {
			err = errors.Join(err, ledger.Delete(st.Objs.Ledger, ledger.KindDevice, 0))
		}
		return 0, nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	dev.Ifindex = ifindex
	r, err = attachNodePrograms(st, 0, dev, ledger.Link{Program: bpfobj.OverlayProgFromOverlay},
		ledger.Link{Program: bpfobj.OverlayProgToOverlay, Egress: true})
	return ifindex, r, err
}

// tunnelRoutes routes the cluster's pod ranges into the VXLAN device, from
// the node's address of each family (none for a family it has no address
// of): the node's own traffic to other nodes' pods goes over the overlay,
// where to-overlay addresses it. Local endpoints' host routes are more
// specific. The routes go with the device.
func tunnelRoutes(st *core.State, n Node) error {
	for _, p := range n.ClusterCIDRs {
		i := slices.IndexFunc(n.Addresses, func(a netip.Addr) bool { return a.Is4() == p.Addr().Is4() })
		if i < 0 {
			continue
		}
		if err := netdev.TunnelRoute(st.NS, TunnelDevice, p, n.Addresses[i]); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalid, err)
		}
	}
	return nil
}

// wireGuardDeviceID is the WireGuard device's KindDevice record: no
// ifindex (a node device's ID) is that large.
const wireGuardDeviceID = 1 << 31

// setupWireGuard makes the WireGuard device, or finds the one an earlier
// Open made (its private key, and so the node's public key, is kept).
// The record is written first, as setupTunnel's: the datapath owns the
// device by its name. It returns the device's index and, when it made
// the record, the record.
func setupWireGuard(st *core.State, n Node) (int, *ledger.Record, error) {
	if err := wireguard.Supported(st.NS); err != nil {
		return 0, nil, fmt.Errorf("WireGuard: %w: %w", ErrNotSupported, err)
	}
	mtu, err := smallestDeviceMTU(st, n)
	if err != nil {
		return 0, nil, err
	}
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindDevice, wireGuardDeviceID)
	ready := err == nil && r.State == ledger.Ready
	if !ready && (err == nil || errors.Is(err, ebpf.ErrKeyNotExist)) {
		r = &ledger.Record{Kind: ledger.KindDevice, ID: wireGuardDeviceID, State: ledger.Creating,
			Made: ledger.Made{Device: &ledger.Device{Name: WireGuardDevice, Owned: true}}}
		err = ledger.Put(st.Objs.Ledger, r)
	}
	if err != nil {
		return 0, nil, fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	ifindex, _, err := wireguard.Ensure(st.NS, WireGuardDevice, WireGuardPort, mtu-encryptOverhead(n))
	if err == nil {
		err = netdev.LooseRPFilter(st.NS)
	}
	if err != nil {
		if !ready {
			err = errors.Join(err, ledger.Delete(st.Objs.Ledger, ledger.KindDevice, wireGuardDeviceID))
		}
		return 0, nil, fmt.Errorf("WireGuard device: %w: %w", ErrInvalid, err)
	}
	if ready {
		return ifindex, nil, nil
	}
	r.State = ledger.Ready
	return ifindex, r, ledger.Put(st.Objs.Ledger, r)
}

// encryptOverhead is what n's encryption adds to a packet between nodes.
func encryptOverhead(n Node) int {
	switch {
	case n.Encryption == EncryptionNone:
		return 0
	case slices.ContainsFunc(n.Addresses, netip.Addr.Is4):
		return encryptOverhead4
	}
	return encryptOverhead6
}

// smallestDeviceMTU is the smallest MTU of n's devices.
func smallestDeviceMTU(st *core.State, n Node) (int, error) {
	mtu := 0
	for _, name := range n.Devices {
		l, err := netdev.Get(st.NS, name)
		if err != nil {
			return 0, fmt.Errorf("node device %s: %w", name, err)
		}
		if mtu == 0 || l.MTU < mtu {
			mtu = l.MTU
		}
	}
	return mtu, nil
}

// endpointMTU is n.MTU, or, when 0, what fits the smallest node device
// once VXLAN and encryption have added their headers.
func endpointMTU(st *core.State, n Node) (int, error) {
	if n.MTU != 0 || n.Routing == RoutingLocal {
		return n.MTU, nil
	}
	mtu, err := smallestDeviceMTU(st, n)
	if err != nil {
		return 0, err
	}
	mtu -= encryptOverhead(n)
	if n.Routing == RoutingVXLAN {
		overhead := vxlanOverhead6
		if slices.ContainsFunc(n.Addresses, netip.Addr.Is4) {
			overhead = vxlanOverhead4
		}
		mtu -= overhead
	}
	if mtu < 1280 {
		return 0, fmt.Errorf("node devices %v leave endpoints an MTU of %d, below IPv6's 1280: %w", n.Devices, mtu, ErrInvalid)
	}
	return mtu, nil
}

// putNodeCIDR points prefix at a node in node_cidrs.
func putNodeCIDR(st *core.State, p netip.Prefix, node uint32) error {
	k := ipcache.Key(p)
	v := bpfobj.TypesNodeRoute{Node: node}
	if err := st.Objs.NodeCidrs.Put(&k, &v); err != nil {
		return core.MapError(err, ErrMapFull, "node CIDR "+p.String())
	}
	return nil
}

// attachNodePrograms attaches node-facing programs to tc hooks of dev
// (each link's Program, on ingress or, Egress, egress), recorded as
// KindDevice id: first the record (Creating), then the attachments, then
// the record Ready, which it returns. A device recorded Ready with the
// same index and links is attached already: it returns no record (an
// upgrade that adds a program records and attaches them all again). On
// error what it attached is undone, and the record with it.
func attachNodePrograms(st *core.State, id uint32, dev *ledger.Device, links ...ledger.Link) (*ledger.Record, error) {
	for i := range links {
		hook := "in"
		if links[i].Egress {
			hook = "out"
		}
		links[i].Key = fmt.Sprintf("dev%d-%s", dev.Ifindex, hook)
	}
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindDevice, id)
	if err == nil && r.State == ledger.Ready && r.Made.Device != nil && r.Made.Device.Ifindex == dev.Ifindex &&
		slices.Equal(r.Made.Links, links) {
		return nil, nil
	}
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	r = &ledger.Record{Kind: ledger.KindDevice, ID: id, State: ledger.Creating, Made: ledger.Made{Device: dev, Links: links}}
	if err := ledger.Put(st.Objs.Ledger, r); err != nil {
		return nil, err
	}
	for _, l := range links {
		if err := attachNodeLink(st, dev, l); err != nil {
			return nil, errors.Join(err, st.Undo(r))
		}
	}
	r.State = ledger.Ready
	return r, ledger.Put(st.Objs.Ledger, r)
}

// attachNodeLink attaches the link's program to its hook of dev, or swaps
// the one there for it.
func attachNodeLink(st *core.State, dev *ledger.Device, l ledger.Link) error {
	p, err := st.NodeProgram(l.Program)
	if err != nil {
		return err
	}
	hook := attach.Ingress
	if l.Egress {
		hook = attach.Egress
	}
	if err := st.AttachTC(dev.Ifindex, hook, p, l.Key); err != nil {
		return fmt.Errorf("attach %s to %s: %w", l.Program, dev.Name, err)
	}
	return nil
}
