// Package attach attaches programs to network devices and cgroups and keeps
// the attachment alive beyond the process: bpf_links (tcx, XDP, cgroup) are
// pinned, and the legacy clsact + cls_bpf fallback lives in the kernel's tc
// tables until removed. Attaching again where a link is already pinned swaps
// the program atomically (link.Update), so upgrades drop no packet.
//
// Functions that take an interface index resolve it in the calling thread's
// network namespace; run them through nsrun.Do.
package attach

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Mode says how tc programs are attached.
type Mode int

const (
	// Auto uses tcx links where the kernel has them (Linux 6.6) and falls
	// back to Legacy otherwise.
	Auto Mode = iota
	// TCX uses tcx bpf_links only.
	TCX
	// Legacy uses a clsact qdisc with direct-action cls_bpf filters.
	Legacy
)

func (m Mode) String() string {
	switch m {
	case Auto:
		return "auto"
	case TCX:
		return "tcx"
	case Legacy:
		return "legacy"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Hook is the tc hook of a device.
type Hook int

const (
	Ingress Hook = iota
	Egress
)

func (h Hook) String() string {
	if h == Egress {
		return "egress"
	}
	return "ingress"
}

// TC attaches prog to hook of the device with index ifindex and returns the
// mode it used. In tcx mode the link is pinned at pin; in legacy mode the
// filter is named name, by which RemoveLegacy finds it again.
//
// sluice's program runs first on the hook: it checks what a workload may
// send, and a program before it that returned "pass" would skip that. A
// tcx link goes at the head of the hook's chain; attaching again swaps the
// program in place, and when another program has been put before it since,
// a new link is made at the head (make before break) and the old one goes.
// A legacy filter takes priority 1 (LegacyPriority), the first.
func TC(ifindex int, hook Hook, prog *ebpf.Program, mode Mode, pin, name string) (Mode, error) {
	if mode != Legacy {
		attachType := ebpf.AttachTCXIngress
		if hook == Egress {
			attachType = ebpf.AttachTCXEgress
		}
		create := func() (link.Link, error) {
			return link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: attachType, Anchor: link.Head()})
		}
		err := pinned(pin, prog, func(info *link.Info) bool {
			tcx := info.TCX()
			return tcx != nil && int(tcx.Ifindex) == ifindex && ebpf.AttachType(tcx.AttachType) == attachType
		}, create)
		if err == nil {
			err = keepFirst(pin, ifindex, attachType, create)
		}
		if err == nil || mode == TCX || !errors.Is(err, ebpf.ErrNotSupported) {
			return TCX, err
		}
	}
	return Legacy, attachLegacy(ifindex, hook, prog, name)
}

// keepFirst makes the tcx link pinned at pin the first of its hook again
// when another program was put before it. A program may be attached to a
// hook once, so the link cannot be made anew before the old one goes:
// instead a program that drops everything guards the head while the old
// link is detached and the new one made in front of it. Packets in that
// moment (two system calls) are dropped, never let past sluice's checks.
func keepFirst(pin string, ifindex int, attachType ebpf.AttachType, create func() (link.Link, error)) error {
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: attachType})
	if err != nil {
		return fmt.Errorf("query tcx programs of ifindex %d: %w", ifindex, err)
	}
	old, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	defer old.Close()
	info, err := old.Info()
	if err != nil {
		return fmt.Errorf("link %s: %w", pin, err)
	}
	if len(res.Programs) == 0 {
		return nil
	}
	if first, ok := res.Programs[0].LinkID(); !ok || first == info.ID {
		return nil
	}
	drop, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "sluice_guard",
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 2 /* TC_ACT_SHOT */), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("load the guard program: %w", err)
	}
	defer drop.Close()
	guard, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: drop, Attach: attachType, Anchor: link.Head()})
	if err != nil {
		return fmt.Errorf("attach the guard program to ifindex %d: %w", ifindex, err)
	}
	defer guard.Close() // closing an unpinned link detaches it
	if err := old.Unpin(); err != nil {
		return fmt.Errorf("unpin link %s: %w", pin, err)
	}
	if err := old.Detach(); err != nil {
		return fmt.Errorf("detach link %s: %w", pin, err)
	}
	l, err := create()
	if err != nil {
		return err
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin link %s: %w", pin, err)
	}
	return nil
}

// XDP attaches prog to the XDP hook of the device with index ifindex and pins
// the link at pin. flags selects the XDP mode (link.XDPGenericMode, ...).
func XDP(ifindex int, prog *ebpf.Program, flags link.XDPAttachFlags, pin string) error {
	return pinned(pin, prog, func(info *link.Info) bool {
		xdp := info.XDP()
		return xdp != nil && int(xdp.Ifindex) == ifindex
	}, func() (link.Link, error) {
		return link.AttachXDP(link.XDPOptions{Interface: ifindex, Program: prog, Flags: flags})
	})
}

// Cgroup attaches prog to the cgroup v2 directory cgroup with the given
// attach type and pins the link at pin.
func Cgroup(cgroup string, attachType ebpf.AttachType, prog *ebpf.Program, pin string) error {
	var st unix.Stat_t
	if err := unix.Stat(cgroup, &st); err != nil {
		return fmt.Errorf("cgroup %s: %w", cgroup, err)
	}
	return pinned(pin, prog, func(info *link.Info) bool {
		cg := info.Cgroup()
		return cg != nil && cg.CgroupId == st.Ino && ebpf.AttachType(cg.AttachType) == attachType
	}, func() (link.Link, error) {
		return link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: attachType, Program: prog})
	})
}

// Detach detaches the link pinned at pin and removes the pin. The detach is
// synchronous and applies even if another process holds the link open. A
// missing pin is not an error.
func Detach(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		// Not a link we can load: the pin is all there is to remove.
		if rmErr := os.Remove(pin); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
			return fmt.Errorf("remove pin %s: %w", pin, errors.Join(err, rmErr))
		}
		return nil
	}
	defer l.Close()
	// Dropping the pin alone would free the link asynchronously, some time
	// after this returns; an explicit detach is immediate.
	if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("detach link %s: %w", pin, err)
	}
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin link %s: %w", pin, err)
	}
	return nil
}

// DetachAll detaches every link pinned in dir (see Detach).
func DetachAll(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	var errs []error
	for _, e := range entries {
		errs = append(errs, Detach(filepath.Join(dir, e.Name())))
	}
	return errors.Join(errs...)
}

// pinned makes sure a link running prog is pinned at pin: a pinned link that
// still targets what same describes gets its program swapped in place; one
// that does not (its device or cgroup is gone) is replaced by create's.
func pinned(pin string, prog *ebpf.Program, same func(*link.Info) bool, create func() (link.Link, error)) error {
	old, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		defer old.Close()
		info, err := old.Info()
		if err == nil && same(info) {
			if err := old.Update(prog); err != nil {
				return fmt.Errorf("update pinned link %s: %w", pin, err)
			}
			return nil
		}
		// Defunct or pointing elsewhere: replace it below.
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("load pinned link %s: %w", pin, err)
	}

	l, err := create()
	if err != nil {
		return err
	}
	defer l.Close()
	if old != nil {
		if err := old.Unpin(); err != nil {
			l.Close()
			return fmt.Errorf("unpin stale link %s: %w", pin, err)
		}
	}
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin link %s: %w", pin, err)
	}
	return nil
}
