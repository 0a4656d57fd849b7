package attach

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Legacy filters sit at one fixed priority and handle, so that attaching
// again replaces the filter in one netlink request instead of adding another.
const (
	legacyPriority = 1
	legacyHandle   = 1
)

func legacyParent(hook Hook) uint32 {
	if hook == Egress {
		return netlink.HANDLE_MIN_EGRESS
	}
	return netlink.HANDLE_MIN_INGRESS
}

// attachLegacy is the equivalent of:
//
//	tc qdisc replace dev DEV clsact
//	tc filter replace dev DEV ingress prio 1 handle 1 bpf da fd PROG name NAME
func attachLegacy(ifindex int, hook Hook, prog *ebpf.Program, name string) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	if err := netlink.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("add clsact qdisc to ifindex %d: %w", ifindex, err)
	}
	filter := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    legacyParent(hook),
			Handle:    legacyHandle,
			Priority:  legacyPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Fd:           prog.FD(),
		Name:         name,
		DirectAction: true,
	}
	if err := netlink.FilterReplace(filter); err != nil {
		return fmt.Errorf("add %s cls_bpf filter to ifindex %d: %w", hook, ifindex, err)
	}
	return nil
}

// DetachLegacy removes the legacy filter on one hook of a device, if it is
// ours (its name starts with prefix).
func DetachLegacy(ifindex int, hook Hook, prefix string) error {
	filters, err := netlink.FilterList(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}, legacyParent(hook))
	if err != nil {
		if errors.Is(err, unix.ENODEV) || errors.Is(err, unix.EINVAL) {
			return nil // device or clsact gone: nothing attached
		}
		return fmt.Errorf("list filters of ifindex %d: %w", ifindex, err)
	}
	var errs []error
	for _, f := range filters {
		bf, ok := f.(*netlink.BpfFilter)
		if !ok || !strings.HasPrefix(bf.Name, prefix) {
			continue
		}
		if err := netlink.FilterDel(bf); err != nil {
			errs = append(errs, fmt.Errorf("delete filter %s: %w", bf.Name, err))
		}
	}
	return errors.Join(errs...)
}

// RemoveLegacy removes, from every device in the calling thread's network
// namespace, the legacy filters whose name starts with prefix.
func RemoveLegacy(prefix string) error {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("list devices: %w", err)
	}
	var errs []error
	for _, l := range links {
		for _, hook := range []Hook{Ingress, Egress} {
			errs = append(errs, DetachLegacy(l.Attrs().Index, hook, prefix))
		}
	}
	return errors.Join(errs...)
}
