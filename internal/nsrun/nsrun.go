// Package nsrun runs code inside another network namespace.
//
// A namespace belongs to an OS thread, not to a goroutine, so the work runs on
// a throwaway goroutine locked to its thread. The thread is never switched
// back: when the goroutine ends still locked, the Go runtime retires the
// thread, so no other goroutine can ever run in the wrong namespace.
package nsrun

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Do runs fn with the calling thread in the network namespace ns and returns
// fn's error. A closed handle (-1) means the caller's own namespace.
func Do(ns netns.NsHandle, fn func() error) error {
	if !ns.IsOpen() {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: the thread dies with this goroutine.
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// New creates a network namespace bound at /run/netns/name (as `ip netns add
// name` does) and returns a handle to it; the caller's namespace is unchanged.
func New(name string) (netns.NsHandle, error) {
	type result struct {
		ns  netns.NsHandle
		err error
	}
	resc := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// NewNamed switches this thread into the new namespace; the thread
		// dies with this goroutine.
		ns, err := netns.NewNamed(name)
		resc <- result{ns, err}
	}()
	r := <-resc
	if r.err != nil {
		return netns.None(), fmt.Errorf("create network namespace %q: %w", name, r.err)
	}
	return r.ns, nil
}

// DeleteNamed removes the network namespace bound at /run/netns/name (as
// `ip netns delete name` does). A missing one is not an error, and neither
// is a file that was never bound to a namespace (a process killed while
// creating it leaves one): it is removed.
func DeleteNamed(name string) error {
	path := filepath.Join("/run/netns", name)
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete network namespace %s: %w", name, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete network namespace %s: %w", name, err)
	}
	return nil
}
