// Package netdev creates and configures network devices in a given network
// namespace through netlink handles bound to it, so the calling thread's
// namespace never changes.
package netdev

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/nsrun"
)

// handle returns a netlink handle bound to ns (the caller's when ns is closed).
func handle(ns netns.NsHandle) (*netlink.Handle, error) {
	if !ns.IsOpen() {
		return netlink.NewHandle()
	}
	return netlink.NewHandleAt(ns)
}

// VethPair describes a veth pair whose ends may sit in two namespaces.
type VethPair struct {
	NS, PeerNS     netns.NsHandle // closed handles mean the caller's namespace
	Name, PeerName string
	PeerMAC        net.HardwareAddr // random when nil
	MTU            int              // the kernel's default when 0
	// KeepDown leaves the first end (Name) down, for the caller to set up
	// when it is ready; the link carries nothing until then.
	KeepDown bool
}

// Veth creates a veth pair, sets both ends up (but the first when KeepDown
// is set) and returns their interface indexes, each in its own namespace. It fails with an error matching
// unix.EEXIST when a name is taken. Equivalent to:
// `ip -n NS link add NAME mtu MTU type veth peer name PEER netns PEERNS address MAC`.
func Veth(v VethPair) (ifindex, peerIfindex int, err error) {
	h, err := handle(v.NS)
	if err != nil {
		return 0, 0, err
	}
	defer h.Close()
	hp, err := handle(v.PeerNS)
	if err != nil {
		return 0, 0, err
	}
	defer hp.Close()

	veth := &netlink.Veth{
		LinkAttrs:        netlink.LinkAttrs{Name: v.Name, MTU: v.MTU},
		PeerName:         v.PeerName,
		PeerHardwareAddr: v.PeerMAC,
		PeerMTU:          uint32(v.MTU),
	}
	if v.PeerNS.IsOpen() {
		veth.PeerNamespace = netlink.NsFd(v.PeerNS)
	}
	if err := h.LinkAdd(veth); err != nil {
		return 0, 0, fmt.Errorf("add veth %s/%s: %w", v.Name, v.PeerName, err)
	}
	ifindex, errA := index(h, v.Name, !v.KeepDown)
	peerIfindex, errB := index(hp, v.PeerName, true)
	if errA != nil || errB != nil {
		h.LinkDel(veth)
		return 0, 0, fmt.Errorf("set veth %s/%s up: %w", v.Name, v.PeerName, errors.Join(errA, errB))
	}
	return ifindex, peerIfindex, nil
}

// Link describes an existing device.
type Link struct {
	Index   int
	Type    string // "veth", "dummy", ...
	MAC     net.HardwareAddr
	Up      bool // administratively up
	Running bool // operationally up: it carries packets
	MTU     int
	// RxPackets is what the device has received (for a tunnel device:
	// decapsulated) since it was made.
	RxPackets uint64
}

// Get returns the device named name in ns, or an error matching
// unix.ENODEV when there is none. Equivalent to: `ip -n NS link show NAME`.
func Get(ns netns.NsHandle, name string) (Link, error) {
	h, err := handle(ns)
	if err != nil {
		return Link{}, err
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) {
			return Link{}, fmt.Errorf("device %s: %w", name, unix.ENODEV)
		}
		return Link{}, fmt.Errorf("device %s: %w", name, err)
	}
	a := l.Attrs()
	out := Link{Index: a.Index, Type: l.Type(), MAC: a.HardwareAddr, Up: a.Flags&net.FlagUp != 0, Running: a.OperState == netlink.OperUp, MTU: a.MTU}
	if a.Statistics != nil {
		out.RxPackets = a.Statistics.RxPackets
	}
	return out, nil
}

// Delete removes the device with index ifindex from ns; a device that is
// gone already is not an error. Equivalent to: `ip -n NS link del DEV`.
func Delete(ns netns.NsHandle, ifindex int) error {
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByIndex(ifindex)
	if err != nil {
		return nil
	}
	if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete device %s: %w", l.Attrs().Name, err)
	}
	return nil
}

// DefaultRoute routes everything of gw's family through gw on dev, with gw
// reachable on the link and resolved statically to mac, so the workload
// never needs ARP or neighbour discovery for it. Equivalent to:
//
//	ip -n NS neigh replace GW lladdr MAC dev DEV nud permanent
//	ip -n NS route replace default via GW dev DEV onlink
func DefaultRoute(ns netns.NsHandle, dev string, gw netip.Addr, mac net.HardwareAddr) error {
	return onDevice(ns, dev, func(h *netlink.Handle, l netlink.Link) error {
		return defaultRoute(h, l, gw, mac)
	})
}

func defaultRoute(h *netlink.Handle, l netlink.Link, gw netip.Addr, mac net.HardwareAddr) error {
	family := netlink.FAMILY_V4
	if gw.Is6() {
		family = netlink.FAMILY_V6
	}
	neigh := &netlink.Neigh{
		LinkIndex:    l.Attrs().Index,
		Family:       family,
		State:        netlink.NUD_PERMANENT,
		IP:           gw.AsSlice(),
		HardwareAddr: mac,
	}
	if err := h.NeighSet(neigh); err != nil {
		return fmt.Errorf("add neighbour %s: %w", gw, err)
	}
	route := &netlink.Route{
		LinkIndex: l.Attrs().Index,
		Gw:        gw.AsSlice(),
		Flags:     int(netlink.FLAG_ONLINK),
		Family:    family,
	}
	if err := h.RouteReplace(route); err != nil {
		return fmt.Errorf("add default route via %s: %w", gw, err)
	}
	return nil
}

// index returns the index of device name, and sets it up when up is true.
func index(h *netlink.Handle, name string, up bool) (int, error) {
	l, err := h.LinkByName(name)
	if err != nil {
		return 0, err
	}
	if !up {
		return l.Attrs().Index, nil
	}
	return l.Attrs().Index, h.LinkSetUp(l)
}

// AddAddr adds prefix (the address and its subnet) to device dev in ns,
// without duplicate address detection. Equivalent to:
// `ip -n NS addr add PREFIX dev DEV nodad`.
func AddAddr(ns netns.NsHandle, dev string, prefix netip.Prefix) error {
	return onDevice(ns, dev, func(h *netlink.Handle, l netlink.Link) error {
		addr, err := netlink.ParseAddr(prefix.String())
		if err != nil {
			return err
		}
		addr.Flags = unix.IFA_F_NODAD
		if err := h.AddrAdd(l, addr); err != nil {
			return fmt.Errorf("add %s to %s: %w", prefix, dev, err)
		}
		return nil
	})
}

// SetUp sets device dev in ns up. Equivalent to: `ip -n NS link set DEV up`.
func SetUp(ns netns.NsHandle, dev string) error {
	return onDevice(ns, dev, func(h *netlink.Handle, l netlink.Link) error {
		if err := h.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", dev, err)
		}
		return nil
	})
}

// TunnelRoute routes prefix into the tunnel device dev in ns, from the
// source address src: how the node's own traffic reaches the pods of other
// nodes over the overlay (the device's egress program finds the node).
// Equivalent to: `ip -n NS route replace PREFIX dev DEV src SRC scope link
// proto 197`.
func TunnelRoute(ns netns.NsHandle, dev string, prefix netip.Prefix, src netip.Addr) error {
	return onDevice(ns, dev, func(h *netlink.Handle, l netlink.Link) error {
		dst := &net.IPNet{IP: prefix.Addr().AsSlice(), Mask: net.CIDRMask(prefix.Bits(), prefix.Addr().BitLen())}
		route := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Src: src.AsSlice(), Scope: netlink.SCOPE_LINK, Protocol: RouteProtocol}
		if err := h.RouteReplace(route); err != nil {
			return fmt.Errorf("route %s into %s from %s: %w", prefix, dev, src, err)
		}
		return nil
	})
}

// HostRoute routes addr (as a /32 or /128) through device dev in ns, on the
// link: how the node reaches an endpoint's address. Equivalent to:
// `ip -n NS route replace ADDR dev DEV scope link`.
func HostRoute(ns netns.NsHandle, dev string, addr netip.Addr) error {
	return onDevice(ns, dev, func(h *netlink.Handle, l netlink.Link) error {
		dst := &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(addr.BitLen(), addr.BitLen())}
		route := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Scope: netlink.SCOPE_LINK}
		if err := h.RouteReplace(route); err != nil {
			return fmt.Errorf("route %s via %s: %w", addr, dev, err)
		}
		return nil
	})
}

// WaitRunning waits until device dev in ns is operationally up: its carrier
// is on and the kernel has given it a queueing discipline to send through.
// Setting a veth end up turns its carrier on at once, but the kernel
// activates the transmit queue a moment later (link watch): a packet sent
// in between is dropped.
func WaitRunning(ns netns.NsHandle, dev string, timeout time.Duration) error {
	return onDevice(ns, dev, func(h *netlink.Handle, l netlink.Link) error {
		deadline := time.Now().Add(timeout)
		for l.Attrs().OperState != netlink.OperUp {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s is %s after %v, not up", dev, l.Attrs().OperState, timeout)
			}
			time.Sleep(time.Millisecond)
			var err error
			if l, err = h.LinkByIndex(l.Attrs().Index); err != nil {
				return fmt.Errorf("device %s: %w", dev, err)
			}
		}
		return nil
	})
}

// onDevice runs fn with a handle in ns and the device dev found there.
func onDevice(ns netns.NsHandle, dev string, fn func(*netlink.Handle, netlink.Link) error) error {
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("device %s: %w", dev, err)
	}
	return fn(h, l)
}

// VXLAN makes a VXLAN device in collect-metadata mode (the tunnel's far
// end and VNI come with each packet, from BPF) on UDP port port, up, and
// returns its index; a device of that name that is such a device already
// is taken as it is (its MTU set). Learning and ARP are off: BPF decides
// every packet. Equivalent to:
// `ip -n NS link add NAME mtu MTU type vxlan external dstport PORT nolearning`
// and `ip -n NS link set NAME arp off up`.
func VXLAN(ns netns.NsHandle, name string, port uint16, mtu int) (ifindex int, err error) {
	h, err := handle(ns)
	if err != nil {
		return 0, err
	}
	defer h.Close()
	if l, err := h.LinkByName(name); err == nil {
		v, ok := l.(*netlink.Vxlan)
		if !ok || !v.FlowBased || v.Port != int(port) {
			return 0, fmt.Errorf("device %s exists and is not a VXLAN device with external metadata on port %d: %w", name, port, unix.EEXIST)
		}
		if err := h.LinkSetMTU(l, mtu); err != nil {
			return 0, fmt.Errorf("set the MTU of %s: %w", name, err)
		}
		if err := h.LinkSetARPOff(l); err != nil {
			return 0, fmt.Errorf("set %s noarp: %w", name, err)
		}
		return index(h, name, true)
	}
	v := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}, FlowBased: true, Port: int(port), Learning: false}
	if err := h.LinkAdd(v); err != nil {
		return 0, fmt.Errorf("add VXLAN device %s: %w", name, err)
	}
	// No ARP or neighbour discovery: what the node routes into the device
	// goes to many nodes, and the egress program addresses it.
	if err := h.LinkSetARPOff(v); err != nil {
		h.LinkDel(v)
		return 0, fmt.Errorf("set %s noarp: %w", name, err)
	}
	ifindex, err = index(h, name, true)
	if err != nil {
		h.LinkDel(v)
		return 0, err
	}
	return ifindex, nil
}

// RouteProtocol marks the routes sluice installs (as `proto sluice` would,
// were it named in /etc/iproute2/rt_protos), so that they are told from
// everyone else's.
const RouteProtocol = 0xc5

// ReplaceRoute routes prefix via the next hop via in ns (the kernel finds
// the device from its own routes to via). Equivalent to:
// `ip -n NS route replace PREFIX via VIA proto 197`.
func ReplaceRoute(ns netns.NsHandle, prefix netip.Prefix, via netip.Addr) error {
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	if err := h.RouteReplace(route(prefix, via)); err != nil {
		return fmt.Errorf("route %s via %s: %w", prefix, via, err)
	}
	return nil
}

// DeleteRoute removes the route ReplaceRoute made; one that is gone (or
// goes elsewhere now) is not an error.
func DeleteRoute(ns netns.NsHandle, prefix netip.Prefix, via netip.Addr) error {
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	err = h.RouteDel(route(prefix, via))
	if err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete route %s via %s: %w", prefix, via, err)
	}
	return nil
}

// Routes returns the routes of RouteProtocol via a next hop in ns (package
// node's, to other nodes' pod CIDRs): prefix to next hop. The routes into
// a device (TunnelRoute) go with it.
func Routes(ns netns.NsHandle) (map[netip.Prefix]netip.Addr, error) {
	h, err := handle(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	out := map[netip.Prefix]netip.Addr{}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := h.RouteListFiltered(family, &netlink.Route{Protocol: RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			return nil, fmt.Errorf("list routes: %w", err)
		}
		for _, r := range rs {
			if r.Dst == nil || r.Gw == nil {
				continue
			}
			a, _ := netip.AddrFromSlice(r.Dst.IP)
			bits, _ := r.Dst.Mask.Size()
			gw, _ := netip.AddrFromSlice(r.Gw)
			out[netip.PrefixFrom(a.Unmap(), bits)] = gw.Unmap()
		}
	}
	return out, nil
}

func route(prefix netip.Prefix, via netip.Addr) *netlink.Route {
	dst := &net.IPNet{IP: prefix.Addr().AsSlice(), Mask: net.CIDRMask(prefix.Bits(), prefix.Addr().BitLen())}
	return &netlink.Route{Dst: dst, Gw: via.AsSlice(), Protocol: RouteProtocol}
}

// Forward turns IP forwarding on in ns, IPv4 and IPv6, on every device:
// a router's setting. Equivalent to `sysctl net.ipv4.conf.all.forwarding=1
// net.ipv6.conf.all.forwarding=1` inside ns.
func Forward(ns netns.NsHandle) error {
	return nsrun.Do(ns, func() error {
		for _, f := range []string{"/proc/sys/net/ipv4/conf/all/forwarding", "/proc/sys/net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile(f, []byte("1"), 0); err != nil {
				return fmt.Errorf("turn forwarding on: %w", err)
			}
		}
		return nil
	})
}

// LooseRPFilter makes IPv4's strict reverse path filter in ns loose: a
// packet a tunnel device decrypts comes from an address whose route goes
// out of another device, which strict filtering (1) drops and loose (2)
// accepts. The kernel takes the larger of "all" and the device's value,
// so "all" must not be 1. Equivalent to, when it is 1:
// `sysctl net.ipv4.conf.all.rp_filter=2` inside ns.
func LooseRPFilter(ns netns.NsHandle) error {
	return nsrun.Do(ns, func() error {
		const f = "/proc/sys/net/ipv4/conf/all/rp_filter"
		v, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("read rp_filter: %w", err)
		}
		if string(v) != "1\n" {
			return nil
		}
		if err := os.WriteFile(f, []byte("2"), 0); err != nil {
			return fmt.Errorf("make rp_filter loose: %w", err)
		}
		return nil
	})
}
