package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
)

// socketHooks are the socket programs (bpf/sock.c) and the hook each runs
// at. Each one's link is pinned in the links directory as
// "cgroup-<program>".
var socketHooks = []struct {
	name   string
	attach ebpf.AttachType
	prog   func(*bpfobj.SockPrograms) *ebpf.Program
}{
	{bpfobj.SockProgConnect4, ebpf.AttachCGroupInet4Connect, func(p *bpfobj.SockPrograms) *ebpf.Program { return p.Connect4 }},
	{bpfobj.SockProgConnect6, ebpf.AttachCGroupInet6Connect, func(p *bpfobj.SockPrograms) *ebpf.Program { return p.Connect6 }},
	{bpfobj.SockProgSendmsg4, ebpf.AttachCGroupUDP4Sendmsg, func(p *bpfobj.SockPrograms) *ebpf.Program { return p.Sendmsg4 }},
	{bpfobj.SockProgSendmsg6, ebpf.AttachCGroupUDP6Sendmsg, func(p *bpfobj.SockPrograms) *ebpf.Program { return p.Sendmsg6 }},
	{bpfobj.SockProgRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg, func(p *bpfobj.SockPrograms) *ebpf.Program { return p.Recvmsg4 }},
	{bpfobj.SockProgRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg, func(p *bpfobj.SockPrograms) *ebpf.Program { return p.Recvmsg6 }},
	{bpfobj.SockProgGetpeername4, ebpf.AttachCgroupInet4GetPeername, func(p *bpfobj.SockPrograms) *ebpf.Program { return p.Getpeername4 }},
	{bpfobj.SockProgGetpeername6, ebpf.AttachCgroupInet6GetPeername, func(p *bpfobj.SockPrograms) *ebpf.Program { return p.Getpeername6 }},
}

// cgroupLinkPrefix starts the pin name of every socket program's link.
const cgroupLinkPrefix = "cgroup-"

// attachSocketPrograms attaches the socket programs to the cgroup v2
// directory cgroup (and so to every cgroup below it), each with a link
// pinned in the links directory, so that Unload detaches them and a
// re-open finds them. A link pinned already on cgroup gets the new program
// in place (link.Update, atomic). One on another cgroup is moved
// make-before-break: every new link is made first, the pins then point to
// them, and only then are the old links detached, so no socket of a
// process in both cgroups goes untranslated in between.
//
// Nothing is half-applied: on failure the links this call made are
// detached, the programs it swapped are swapped back and the pins it
// replaced are restored. It returns an error wrapping ErrInvalid when
// cgroup is not a directory of a cgroup v2 filesystem, and the kernel's
// error (ErrNotSupported before Linux 5.8) when a program does not load
// or attach. Open calls it holding the directory lock.
func attachSocketPrograms(st *core.State, cgroup string) (err error) {
	id, err := cgroupID(cgroup)
	if err != nil {
		return err
	}
	progs, err := st.SockPrograms()
	if err != nil {
		return err
	}
	var changes []*cgroupChange
	defer func() {
		if err == nil {
			return
		}
		errs := []error{err}
		for i := len(changes) - 1; i >= 0; i-- {
			errs = append(errs, changes[i].undo())
		}
		// The handle is not kept on failure (Open fails with it), and
		// attached programs need no loaded one.
		err = errors.Join(append(errs, st.CloseSockPrograms())...)
	}()

	for _, h := range socketHooks {
		c := &cgroupChange{pin: filepath.Join(st.LinksDir(), cgroupLinkPrefix+h.name)}
		changes = append(changes, c)
		if err := c.prepare(cgroup, id, h.attach, h.prog(progs)); err != nil {
			return fmt.Errorf("attach %s to cgroup %s: %w", h.name, cgroup, err)
		}
	}
	for _, c := range changes {
		if err := c.commit(); err != nil {
			return err
		}
	}
	for _, c := range changes {
		c.finish()
	}
	return nil
}

// cgroupID returns the ID of the cgroup v2 directory path (its inode
// number), or an error wrapping ErrInvalid when path is no such directory.
func cgroupID(path string) (uint64, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w: %w", path, ErrInvalid, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("cgroup %s: not on a cgroup v2 filesystem: %w", path, ErrInvalid)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w: %w", path, ErrInvalid, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return 0, fmt.Errorf("cgroup %s: not a directory: %w", path, ErrInvalid)
	}
	return st.Ino, nil
}

// cgroupChange is what attachSocketPrograms does to one hook's pinned
// link, in three steps: prepare makes every change that can be undone
// (update the pinned link in place, or make a new link pinned beside the
// old one), commit points the pin at the new link, finish detaches the
// link it replaced. undo reverts prepare and commit.
type cgroupChange struct {
	pin string

	old     link.Link     // pinned at pin before the call, or nil
	oldID   link.ID       // old's ID
	oldProg *ebpf.Program // the program old ran, when it is updated in place
	updated bool          // old runs the new program now

	new     link.Link // made by this call, or nil
	renamed bool      // the pin points to new
}

// staging is where a new link is pinned until commit: beside the link it
// replaces, in the links directory, so that Unload detaches it too should
// the process die in between. (A BPF filesystem takes no dot in a name.)
func (c *cgroupChange) staging() string { return c.pin + "-new" }

func (c *cgroupChange) prepare(cgroup string, id uint64, attachType ebpf.AttachType, prog *ebpf.Program) error {
	old, err := link.LoadPinnedLink(c.pin, nil)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("load pinned link %s: %w", c.pin, err)
	default:
		c.old = old
		info, err := old.Info()
		if err != nil {
			return fmt.Errorf("pinned link %s: %w", c.pin, err)
		}
		c.oldID = info.ID
		if cg := info.Cgroup(); cg != nil && cg.CgroupId == id && ebpf.AttachType(cg.AttachType) == attachType {
			// Held, to swap back on failure.
			if c.oldProg, err = ebpf.NewProgramFromID(info.Program); err != nil {
				return fmt.Errorf("program of pinned link %s: %w", c.pin, err)
			}
			if err := old.Update(prog); err != nil {
				return fmt.Errorf("update pinned link %s: %w", c.pin, err)
			}
			c.updated = true
			return nil
		}
		// On another cgroup, or on none (its cgroup was removed):
		// replaced below.
	}

	// What a call that died between prepare and commit left behind.
	if err := attach.Detach(c.staging()); err != nil {
		return err
	}
	if c.new, err = link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: attachType, Program: prog}); err != nil {
		return err
	}
	if err := c.new.Pin(c.staging()); err != nil {
		return fmt.Errorf("pin link %s: %w", c.staging(), err)
	}
	return nil
}

// commit points the pin at the new link, replacing the old one's pin in
// one step (a rename within the BPF filesystem).
func (c *cgroupChange) commit() error {
	if c.new == nil {
		return nil
	}
	if err := os.Rename(c.staging(), c.pin); err != nil {
		return fmt.Errorf("pin link %s: %w", c.pin, err)
	}
	c.renamed = true
	return nil
}

// finish detaches the link the new one replaced and releases the handles.
// The change is made by then: an old link that fails to detach has lost
// its pin and goes when its last holder closes it, so failures are not
// reported.
func (c *cgroupChange) finish() {
	if c.old != nil && c.new != nil {
		_ = c.old.Detach()
	}
	c.close()
}

// undo reverts prepare and commit, as far as they got, and releases the
// handles.
func (c *cgroupChange) undo() error {
	defer c.close()
	var errs []error
	if c.updated {
		if err := c.old.Update(c.oldProg); err != nil {
			errs = append(errs, fmt.Errorf("restore the program of %s: %w", c.pin, err))
		}
	}
	if c.renamed {
		errs = append(errs, c.restorePin())
	} else if c.new != nil {
		if err := os.Remove(c.staging()); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if c.new != nil {
		if err := c.new.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("detach the new link of %s: %w", c.pin, err))
		}
	}
	return errors.Join(errs...)
}

// restorePin points the pin back at the old link, or removes it when
// there was none.
func (c *cgroupChange) restorePin() error {
	if c.old == nil {
		if err := os.Remove(c.pin); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	// A new handle: old's own still names the pin as its path.
	l, err := link.NewFromID(c.oldID)
	if err != nil {
		return fmt.Errorf("restore pin %s: %w", c.pin, err)
	}
	defer l.Close()
	if err := l.Pin(c.staging()); err != nil {
		return fmt.Errorf("restore pin %s: %w", c.pin, err)
	}
	if err := os.Rename(c.staging(), c.pin); err != nil {
		return fmt.Errorf("restore pin %s: %w", c.pin, err)
	}
	return nil
}

func (c *cgroupChange) close() {
	if c.old != nil {
		c.old.Close()
	}
	if c.oldProg != nil {
		c.oldProg.Close()
	}
	if c.new != nil {
		c.new.Close()
	}
}
