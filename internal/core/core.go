// Package core is the part of an open datapath that sluice's own object
// packages (endpoint, policy, service) work with: the loaded objects, the
// namespace, the node's configuration and the attach and locking helpers.
// Users reach it only through those packages.
package core

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/nsrun"
)

// State is one open datapath.
type State struct {
	Name     string
	Dir      string         // <bpffs>/<name>
	NS       netns.NsHandle // closed (-1) for the caller's namespace
	Mode     attach.Mode
	Objs     bpfobj.EndpointObjects
	PodCIDRs []netip.Prefix

	mu     sync.Mutex
	closed bool
}

var (
	of        func(any) *State
	teardowns []func(*State) error
)

// OnUnload registers what an object package must undo when its datapath is
// unloaded (the endpoint package: delete every endpoint's devices and
// namespace, which no pin would point to any more).
func OnUnload(f func(*State) error) { teardowns = append(teardowns, f) }

// Teardown runs the functions registered with OnUnload, past errors.
func (s *State) Teardown() error {
	var errs []error
	for _, f := range teardowns {
		errs = append(errs, f(s))
	}
	return errors.Join(errs...)
}

// Register lets the datapath package tell Of how to reach a Datapath's State.
func Register(f func(any) *State) { of = f }

// Of returns the State of a *datapath.Datapath.
func Of(dp any) *State { return of(dp) }

// Lock serializes changes to the datapath: among goroutines with a mutex,
// among processes with a flock on the pin directory. It fails with
// os.ErrClosed once the datapath is closed.
func (s *State) Lock() (unlock func(), err error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, fmt.Errorf("datapath %s: %w", s.Name, os.ErrClosed)
	}
	unlockDir, err := LockDir(s.Dir)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	return func() { unlockDir(); s.mu.Unlock() }, nil
}

// Closed reports whether Close was called.
func (s *State) Closed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close releases the handles; it is a no-op the second time.
func (s *State) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	errs := []error{s.Objs.Close()}
	if s.NS.IsOpen() {
		errs = append(errs, s.NS.Close())
	}
	return errors.Join(errs...)
}

// LockDir takes an exclusive flock on dir.
func LockDir(dir string) (unlock func(), err error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	if err := unix.Flock(fd, unix.LOCK_EX); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { unix.Close(fd) }, nil
}

// LinksDir is where the datapath's links are pinned.
func (s *State) LinksDir() string { return filepath.Join(s.Dir, "links") }

// LegacyPrefix starts the name of every legacy tc filter of this datapath.
func (s *State) LegacyPrefix() string { return "sluice/" + s.Name + "/" }

// AttachTC attaches prog to a tc hook of device ifindex in the datapath's
// namespace. key names the attachment, unique per datapath: attaching again
// with the same key swaps the program atomically.
func (s *State) AttachTC(ifindex int, hook attach.Hook, prog *ebpf.Program, key string) error {
	return nsrun.Do(s.NS, func() error {
		_, err := attach.TC(ifindex, hook, prog, s.Mode, filepath.Join(s.LinksDir(), key), s.LegacyPrefix()+key)
		return err
	})
}

// DetachTC undoes AttachTC; a missing attachment is not an error.
func (s *State) DetachTC(ifindex int, hook attach.Hook, key string) error {
	return errors.Join(
		attach.Detach(filepath.Join(s.LinksDir(), key)),
		nsrun.Do(s.NS, func() error { return attach.DetachLegacy(ifindex, hook, s.LegacyPrefix()+key) }),
	)
}

// IPCacheKey is the ipcache key of a prefix (see bpf/lib/ipcache.h): the
// family byte and its padding count as 32 bits of the matched prefix.
func IPCacheKey(p netip.Prefix) bpfobj.TypesIpcacheKey {
	k := bpfobj.TypesIpcacheKey{Prefixlen: 32 + uint32(p.Bits())}
	if p.Addr().Is4() {
		k.Family = 4
		a := p.Addr().As4()
		copy(k.Addr[:], a[:])
	} else {
		k.Family = 6
		a := p.Addr().As16()
		copy(k.Addr[:], a[:])
	}
	return k
}

// MapError wraps an error of a map update, so that a full map matches
// datapath.ErrMapFull (passed as full, since this package cannot import it).
func MapError(err, full error, what string) error {
	// A full hash map answers E2BIG, a full LPM trie ENOSPC.
	if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("%s: %w: %w", what, full, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}
