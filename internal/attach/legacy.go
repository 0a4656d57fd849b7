package attach

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// LegacyPriority is where sluice's legacy filters go. Filters run lowest
// priority first and a verdict ends the walk, so sluice takes priority 1,
// the first, as its tcx link goes at the head: a filter before it that
// returned "pass" would skip its checks. Within a priority the filter
// added last runs first, so attaching again, when another tool's filter
// went in front since, adds sluice's anew (at the other of its two
// handles, LegacyHandle and LegacyHandle+1) before it removes the old one.
// A filter of another kind or protocol at priority 1 makes the attach
// fail.
const (
	LegacyPriority = 1
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
//	tc filter replace dev DEV ingress prio 1 handle 0xc5a1 bpf da fd PROG name NAME
//
// except that it replaces only a filter named name, sluice's own, and only
// while that one runs first: otherwise it adds one at whichever of its two
// handles is free, in front of the rest, and then removes every other
// filter named name on the hook (an older one, or one an older sluice put
// at priority 0xc5a1). Where another filter holds both handles it fails
// with unix.EEXIST.
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
	var (
		mine  []netlink.Filter // named name, anywhere on the hook
		first netlink.Filter   // the one that runs first (a dump lists them in order)
		taken = map[uint32]string{}
	)
	for _, f := range filters {
		a := f.Attrs()
		if a.Chain != nil && *a.Chain != 0 {
			continue
		}
		if first == nil {
			first = f
		}
		bf, _ := f.(*netlink.BpfFilter)
		if bf != nil && bf.Name == name {
			mine = append(mine, f)
			continue
		}
		if a.Priority == LegacyPriority && (a.Handle == LegacyHandle || a.Handle == LegacyHandle+1) {
			other := f.Type()
			if bf != nil {
				other = fmt.Sprintf("bpf %q", bf.Name)
			}
			taken[a.Handle] = other
		}
	}
	filter := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    legacyParent(hook),
			Priority:  LegacyPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Fd:           prog.FD(),
		Name:         name,
		DirectAction: true,
	}
	// Ours runs first: swap its program in one request.
	if first != nil && len(mine) > 0 && first == mine[0] && first.Attrs().Priority == LegacyPriority {
		filter.Handle = first.Attrs().Handle
		if err := netlink.FilterReplace(filter); err != nil {
			return fmt.Errorf("replace %s cls_bpf filter of ifindex %d: %w", hook, ifindex, err)
		}
		return deleteFilters(mine[1:], name)
	}
	// Add ours in front, at a handle of ours that is free. Add is
	// exclusive: a filter that appeared since the list makes it fail
	// (EEXIST) instead of being replaced.
	used := map[uint32]bool{}
	for _, f := range mine {
		if f.Attrs().Priority == LegacyPriority {
			used[f.Attrs().Handle] = true
		}
	}
	for _, h := range []uint32{LegacyHandle, LegacyHandle + 1} {
		if _, other := taken[h]; other || used[h] {
			continue
		}
		filter.Handle = h
		if err := netlink.FilterAdd(filter); err != nil {
			return fmt.Errorf("add %s cls_bpf filter to ifindex %d: %w", hook, ifindex, err)
		}
		return deleteFilters(mine, name)
	}
	return fmt.Errorf("%s prio %d handles %#x and %#x of ifindex %d hold other filters (%s, %s), not %q: %w",
		hook, LegacyPriority, LegacyHandle, LegacyHandle+1, ifindex, taken[LegacyHandle], taken[LegacyHandle+1], name, unix.EEXIST)
}

// deleteFilters deletes the old filters named name that a new one replaced.
func deleteFilters(old []netlink.Filter, name string) error {
	var errs []error
	for _, f := range old {
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
