// Package netdev creates and configures network devices in a given network
// namespace through netlink handles bound to it, so the calling thread's
// namespace never changes.
package netdev

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// handle returns a netlink handle bound to ns (the caller's when ns is closed).
func handle(ns netns.NsHandle) (*netlink.Handle, error) {
	if !ns.IsOpen() {
		return netlink.NewHandle()
	}
	return netlink.NewHandleAt(ns)
}

// Veth creates a veth pair with end nameA in nsA and nameB in nsB, sets both
// up and returns their interface indexes, each in its own namespace.
// Equivalent to: `ip -n A link add NAMEA type veth peer name NAMEB netns B`.
func Veth(nsA netns.NsHandle, nameA string, nsB netns.NsHandle, nameB string) (ifindexA, ifindexB int, err error) {
	ha, err := handle(nsA)
	if err != nil {
		return 0, 0, err
	}
	defer ha.Close()
	hb, err := handle(nsB)
	if err != nil {
		return 0, 0, err
	}
	defer hb.Close()

	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: nameA}, PeerName: nameB}
	if nsB.IsOpen() {
		veth.PeerNamespace = netlink.NsFd(nsB)
	}
	if err := ha.LinkAdd(veth); err != nil {
		return 0, 0, fmt.Errorf("add veth %s/%s: %w", nameA, nameB, err)
	}
	ifindexA, errA := up(ha, nameA)
	ifindexB, errB := up(hb, nameB)
	if errA != nil || errB != nil {
		ha.LinkDel(veth)
		return 0, 0, fmt.Errorf("set veth %s/%s up: %v %v", nameA, nameB, errA, errB)
	}
	return ifindexA, ifindexB, nil
}

func up(h *netlink.Handle, name string) (int, error) {
	l, err := h.LinkByName(name)
	if err != nil {
		return 0, err
	}
	return l.Attrs().Index, h.LinkSetUp(l)
}

// AddAddr adds prefix (the address and its subnet) to device dev in ns,
// without duplicate address detection. Equivalent to:
// `ip -n NS addr add PREFIX dev DEV nodad`.
func AddAddr(ns netns.NsHandle, dev string, prefix netip.Prefix) error {
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("device %s: %w", dev, err)
	}
	addr, err := netlink.ParseAddr(prefix.String())
	if err != nil {
		return err
	}
	addr.Flags = unix.IFA_F_NODAD
	if err := h.AddrAdd(l, addr); err != nil {
		return fmt.Errorf("add %s to %s: %w", prefix, dev, err)
	}
	return nil
}

// SetUp sets device dev in ns up. Equivalent to: `ip -n NS link set DEV up`.
func SetUp(ns netns.NsHandle, dev string) error {
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	_, err = up(h, dev)
	return err
}
