package attach

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// LegacyPriority and LegacyHandle place every legacy filter of sluice's, so
// that attaching again replaces it in one netlink request instead of adding
// another. Other tools pick low priorities by hand (Cilium and most tc
// examples use 1); the kernel, asked for none, picks one below the lowest
// priority from 0x8000 up (0xc000 on a bare hook), so below sluice's once
// that is there. Filters run lowest number first and a verdict ends the
// walk: sluice's program runs after the filters other tools put before it,
// as a tcx link appended behind the programs already attached does.
const (
	LegacyPriority = 0xc5a1
	LegacyHandle   = 0xc5a1
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
//	tc filter replace dev DEV ingress prio 0xc5a1 handle 0xc5a1 bpf da fd PROG name NAME
//
// except that it replaces only a filter named name, sluice's own: where
// another filter holds the priority and handle it fails with unix.EEXIST. A
// filter named name elsewhere on the hook (an older sluice put it at priority
// 1) is removed once the new one is in place.
func attachLegacy(ifindex int, hook Hook, prog *ebpf.Program, name string) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	// Replacing an existing clsact changes nothing and keeps its filters.
	if err := netlink.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("add clsact qdisc to ifindex %d: %w", ifindex, err)
	}
	filters, err := netlink.FilterList(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}, legacyParent(hook))
	if err != nil {
		return fmt.Errorf("list %s filters of ifindex %d: %w", hook, ifindex, err)
	}
	ours := false
	var stale []netlink.Filter
	for _, f := range filters {
		a := f.Attrs()
		bf, _ := f.(*netlink.BpfFilter)
		switch {
		case a.Priority == LegacyPriority && a.Handle == LegacyHandle && (a.Chain == nil || *a.Chain == 0):
			if bf == nil || bf.Name != name {
				other := f.Type()
				if bf != nil {
					other = fmt.Sprintf("bpf %q", bf.Name)
				}
				return fmt.Errorf("%s prio %#x handle %#x of ifindex %d holds another tool's filter (%s), not %q: %w",
					hook, LegacyPriority, LegacyHandle, ifindex, other, name, unix.EEXIST)
			}
			ours = true
		case bf != nil && bf.Name == name:
			stale = append(stale, f)
		}
	}
	filter := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    legacyParent(hook),
			Handle:    LegacyHandle,
			Priority:  LegacyPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Fd:           prog.FD(),
		Name:         name,
		DirectAction: true,
	}
	// Replace swaps the program of our filter in one request. Add is
	// exclusive: a filter that appeared since the list makes it fail
	// (EEXIST) instead of being replaced.
	put := netlink.FilterAdd
	if ours {
		put = netlink.FilterReplace
	}
	if err := put(filter); err != nil {
		return fmt.Errorf("add %s cls_bpf filter to ifindex %d: %w", hook, ifindex, err)
	}
	var errs []error
	for _, f := range stale {
		if err := netlink.FilterDel(f); err != nil {
			errs = append(errs, fmt.Errorf("delete old filter %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// DetachLegacy removes the legacy filter named name from one hook of a
// device, or every filter whose name starts with name when it ends with
// "/". Other filters stay, and so does the clsact qdisc: deleting it would
// delete every filter on the device.
func DetachLegacy(ifindex int, hook Hook, name string) error {
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
		if !ok || !ours(bf.Name, name) {
			continue
		}
		if err := netlink.FilterDel(bf); err != nil {
			errs = append(errs, fmt.Errorf("delete filter %s: %w", bf.Name, err))
		}
	}
	return errors.Join(errs...)
}

// ours reports whether a filter name is the one name asks for: that name
// exactly, or, when name ends with "/", any name under it ("endpoint-1" must
// not take "endpoint-10" with it).
func ours(filter, name string) bool {
	if strings.HasSuffix(name, "/") {
		return strings.HasPrefix(filter, name)
	}
	return filter == name
}

// LegacyAttached reports whether the legacy filter named name is on a hook
// of a device.
func LegacyAttached(ifindex int, hook Hook, name string) (bool, error) {
	filters, err := netlink.FilterList(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}, legacyParent(hook))
	if errors.Is(err, unix.EINVAL) {
		return false, nil // no clsact
	}
	if err != nil {
		return false, fmt.Errorf("list filters of ifindex %d: %w", ifindex, err)
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Name == name {
			return true, nil
		}
	}
	return false, nil
}

// RemoveLegacy removes, from every device in the calling thread's network
// namespace, the legacy filters whose name starts with prefix. Like
// DetachLegacy it leaves the clsact qdiscs and other filters alone.
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
