// Package datapath loads sluice's BPF datapath into a network namespace and
// owns what it is made of: the pinned maps, the attached programs and the
// event stream. The packages endpoint, policy and service change what the
// datapath does; this one opens it, observes it and tears it down.
//
// State lives in pinned maps and links, not in the process: Close releases
// the handles and the datapath keeps forwarding; Open with the same name
// picks it up again; Unload removes it.
package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/bpf"
	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpffs"
	"github.com/sluicedp/sluice/internal/nsrun"
)

// LayoutVersion is the version of the pinned maps' layout this build reads
// and writes. Open refuses pins of any other version with ErrIncompatible.
const LayoutVersion = uint32(bpf.TypesLayoutVersionLAYOUT_VERSION)

// Datapath is one loaded datapath: one per network namespace. Its methods are
// safe for concurrent use.
type Datapath struct {
	name string
	dir  string // <bpffs>/<name>
	ns   netns.NsHandle
	mode AttachMode
	objs bpf.DatapathObjects

	mu      sync.Mutex
	reading bool // an Events reader is running
	closed  bool
}

// Open loads the datapath named cfg.Name into cfg.NetNS, or re-opens it when
// its pins exist already, keeping all its state. It returns ErrInvalid for a
// bad Config, ErrNotFound when the namespace does not exist, and
// ErrIncompatible when the pins were written with another LayoutVersion.
// Requires root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN to mount bpffs).
func Open(ctx context.Context, cfg Config) (*Datapath, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if cfg.BPFFS == "" {
		cfg.BPFFS = DefaultBPFFS
	}
	ns, err := openNetNS(cfg.NetNS)
	if err != nil {
		return nil, err
	}
	dp, err := load(cfg, ns)
	if err != nil {
		if ns.IsOpen() {
			ns.Close()
		}
		return nil, fmt.Errorf("open datapath %s: %w", cfg.Name, err)
	}
	return dp, nil
}

func openNetNS(spec string) (netns.NsHandle, error) {
	if spec == "" {
		return netns.None(), nil
	}
	path := spec
	if !strings.ContainsRune(spec, '/') {
		path = filepath.Join("/run/netns", spec)
	}
	ns, err := netns.GetFromPath(path)
	if errors.Is(err, unix.ENOENT) {
		return netns.None(), fmt.Errorf("network namespace %s: %w", spec, ErrNotFound)
	}
	if err != nil {
		return netns.None(), fmt.Errorf("network namespace %s: %w", spec, err)
	}
	return ns, nil
}

func load(cfg Config, ns netns.NsHandle) (*Datapath, error) {
	if err := bpffs.Ensure(cfg.BPFFS); err != nil {
		return nil, err
	}
	dir := filepath.Join(cfg.BPFFS, cfg.Name)
	if err := os.MkdirAll(filepath.Join(dir, "links"), 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory: %w", err)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()

	fresh, err := checkLayout(dir)
	if err != nil {
		return nil, err
	}
	spec, err := bpf.LoadDatapath()
	if err != nil {
		return nil, err
	}
	dp := &Datapath{name: cfg.Name, dir: dir, ns: ns, mode: cfg.TCAttach}
	err = spec.LoadAndAssign(&dp.objs, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}})
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return nil, fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	if err != nil {
		return nil, fmt.Errorf("load objects: %w", err)
	}
	stamp := bpf.DatapathLayoutStamp{Version: LayoutVersion}
	if err := dp.objs.Layout.Put(uint32(0), &stamp); err != nil {
		dp.objs.Close()
		return nil, fmt.Errorf("stamp layout version: %w", err)
	}
	events := cfg.Events
	if events == nil && fresh {
		def := DefaultEventConfig()
		events = &def
	}
	if events != nil {
		if err := dp.SetEventConfig(*events); err != nil {
			dp.objs.Close()
			return nil, err
		}
	}
	return dp, nil
}

// checkLayout reports whether dir holds no datapath yet, and fails with
// ErrIncompatible when it holds one of another layout version.
func checkLayout(dir string) (fresh bool, err error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, "layout"), &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrNotExist) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("%w: read layout stamp: %w", ErrIncompatible, err)
	}
	defer m.Close()
	// The version is the stamp's first field in every layout, so a stamp of
	// any layout can be read this way.
	raw := make([]byte, m.ValueSize())
	if err := m.Lookup(uint32(0), raw); err != nil || len(raw) < 4 {
		return false, fmt.Errorf("%w: read layout stamp: %v", ErrIncompatible, err)
	}
	version := binary.NativeEndian.Uint32(raw)
	if version != LayoutVersion {
		return false, fmt.Errorf("%w: pins in %s have layout version %d, this build has %d", ErrIncompatible, dir, version, LayoutVersion)
	}
	return false, nil
}

// lockDir takes an exclusive lock on dir so that two processes opening or
// unloading the same datapath take turns.
func lockDir(dir string) (unlock func(), err error) {
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

// Name returns the datapath's name.
func (dp *Datapath) Name() string { return dp.name }

// PinDir returns the directory where the datapath's maps and links are pinned.
func (dp *Datapath) PinDir() string { return dp.dir }

// Close releases the datapath's handles. The datapath keeps running: its
// programs stay attached and its maps pinned. Closing twice is a no-op.
func (dp *Datapath) Close() error {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	if dp.closed {
		return nil
	}
	dp.closed = true
	errs := []error{dp.objs.Close()}
	if dp.ns.IsOpen() {
		errs = append(errs, dp.ns.Close())
	}
	return errors.Join(errs...)
}

// Unload tears the datapath down: it detaches every program it attached,
// removes every pin and closes the handles. It goes on past errors and
// returns all of them.
func (dp *Datapath) Unload() error {
	var errs []error
	if unlock, err := lockDir(dp.dir); err != nil {
		errs = append(errs, err)
	} else {
		defer unlock()
	}
	errs = append(errs,
		attach.DetachAll(filepath.Join(dp.dir, "links")),
		nsrun.Do(dp.ns, func() error { return attach.RemoveLegacy(dp.legacyPrefix()) }),
		dp.Close(),
	)
	if err := os.RemoveAll(dp.dir); err != nil {
		errs = append(errs, fmt.Errorf("remove pins: %w", err))
	}
	return errors.Join(errs...)
}

// legacyPrefix starts the name of every legacy tc filter this datapath adds.
func (dp *Datapath) legacyPrefix() string { return "sluice/" + dp.name + "/" }

// linkPin is where the link for key is pinned.
func (dp *Datapath) linkPin(key string) string { return filepath.Join(dp.dir, "links", key) }

// attachTC attaches prog to a tc hook of the device ifindex in the
// datapath's namespace. key names the attachment (unique per datapath): attaching
// again with the same key swaps the program atomically.
func (dp *Datapath) attachTC(ifindex int, hook attach.Hook, prog *ebpf.Program, key string) error {
	return nsrun.Do(dp.ns, func() error {
		_, err := attach.TC(ifindex, hook, prog, dp.mode, dp.linkPin(key), dp.legacyPrefix()+key)
		return err
	})
}

// detachTC undoes attachTC; a missing attachment is not an error.
func (dp *Datapath) detachTC(ifindex int, hook attach.Hook, key string) error {
	return errors.Join(
		attach.Detach(dp.linkPin(key)),
		nsrun.Do(dp.ns, func() error { return attach.DetachLegacy(ifindex, hook, dp.legacyPrefix()+key) }),
	)
}
