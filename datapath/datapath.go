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
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpffs"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/nsrun"
)

// LayoutVersion is the version of the pinned maps' layout this build reads
// and writes. Open refuses pins of any other version with ErrIncompatible.
const LayoutVersion = uint32(bpfobj.TypesLayoutVersionLAYOUT_VERSION)

// Datapath is one loaded datapath: one per network namespace. Its methods are
// safe for concurrent use.
type Datapath struct {
	st *core.State

	mu         sync.Mutex
	stopEvents func() // stops the running Events reader and waits for it; nil when none
	closing    bool   // Close or Unload began: no Events reader may start
}

func init() {
	core.Register(func(dp any) *core.State { return dp.(*Datapath).st })
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
	dp, err := load(ctx, cfg, ns)
	if err != nil {
		if ns.IsOpen() {
			ns.Close()
		}
		return nil, fmt.Errorf("open datapath %s: %w", cfg.Name, err)
	}
	return dp, nil
}

// openNetNS opens the namespace spec names; an empty spec means the
// calling thread's, held from now on so that later calls from any thread
// act on the same one.
// OpenReadOnly opens a pinned datapath for inspection, as the sluice
// command does: it loads the pinned maps read-only and no program, takes no
// lock, and changes nothing, so it works where a program would not load
// and beside the process that owns the datapath. The one thing it writes is
// its place in the event ring, as every events reader does. Calls that
// would change the datapath fail with an error matching os.ErrPermission;
// so does ReadStatus, since the handle knows no namespace. Only cfg.Name
// and cfg.BPFFS are used. It returns ErrNotFound when no such datapath is
// pinned and ErrIncompatible for pins of another layout.
func OpenReadOnly(ctx context.Context, cfg Config) (*Datapath, error) {
	if !validName.MatchString(cfg.Name) {
		return nil, fmt.Errorf("datapath name %q: %w", cfg.Name, ErrInvalid)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if cfg.BPFFS == "" {
		cfg.BPFFS = DefaultBPFFS
	}
	dir := filepath.Join(cfg.BPFFS, cfg.Name)
	fresh, err := checkLayout(dir)
	if err != nil {
		return nil, fmt.Errorf("open datapath %s: %w", cfg.Name, err)
	}
	if fresh {
		return nil, fmt.Errorf("open datapath %s: no datapath pinned in %s: %w", cfg.Name, dir, ErrNotFound)
	}
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		return nil, err
	}
	maps := map[string]*ebpf.Map{}
	closeAll := func() {
		for _, m := range maps {
			m.Close()
		}
	}
	for name := range spec.Maps {
		// The ring is mapped writable to move the reader's position.
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), &ebpf.LoadPinOptions{ReadOnly: name != bpfobj.EndpointMapEvents})
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("open datapath %s: %w: map %s: %w", cfg.Name, ErrIncompatible, name, err)
		}
		maps[name] = m
	}
	st := &core.State{Name: cfg.Name, Dir: dir, NS: netns.None(), ReadOnly: true}
	st.SetMaps(maps)
	if info, err := st.Objs.Layout.Info(); err == nil {
		st.LayoutID, _ = info.ID()
	}
	if r, err := ledger.Get(st.Objs.Ledger, ledger.KindDatapath, 0); err == nil {
		var node nodeRecord
		if json.Unmarshal(r.Object, &node) == nil {
			st.PodCIDRs = node.PodCIDRs
		}
	}
	return &Datapath{st: st}, nil
}

func openNetNS(spec string) (netns.NsHandle, error) {
	if spec == "" {
		ns, err := netns.Get()
		if err != nil {
			return netns.None(), fmt.Errorf("open the current network namespace: %w", err)
		}
		return ns, nil
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

func load(ctx context.Context, cfg Config, ns netns.NsHandle) (*Datapath, error) {
	dir := filepath.Join(cfg.BPFFS, cfg.Name)
	if cfg.MustExist {
		if _, err := os.Stat(filepath.Join(dir, "layout")); err != nil {
			return nil, fmt.Errorf("no datapath pinned in %s: %w", dir, ErrNotFound)
		}
	}
	if err := bpffs.Ensure(cfg.BPFFS); errors.Is(err, bpffs.ErrOccupied) {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	} else if err != nil {
		return nil, err // a mount the kernel refused: os.ErrPermission without CAP_SYS_ADMIN
	}
	_, statErr := os.Stat(dir)
	madeDir := errors.Is(statErr, os.ErrNotExist)
	if err := os.MkdirAll(filepath.Join(dir, "links"), 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory: %w", err)
	}
	unlock, err := core.LockDir(ctx, dir)
	if err != nil {
		return nil, err
	}
	defer unlock()

	before, err := pins(dir)
	if err != nil {
		return nil, err
	}
	fresh, err := checkLayout(dir)
	if err == nil && !fresh {
		err = checkPins(dir, before)
	}
	var dp *Datapath
	if err == nil {
		dp, err = loadPinned(cfg, ns, dir, fresh)
	}
	if err != nil {
		// Remove what this Open made, and nothing else: the pins of a
		// datapath that runs stay as they are.
		err = errors.Join(err, removeNew(dir, before, madeDir))
	}
	return dp, err
}

// pins lists the names in a pin directory.
func pins(dir string) (map[string]bool, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list pins: %w", err)
	}
	out := map[string]bool{}
	for _, e := range entries {
		out[e.Name()] = true
	}
	return out, nil
}

// checkPins fails with ErrIncompatible when a datapath's pins lack a map
// this build has: loading would make a new, empty one, and the state the
// missing one held (endpoints, records) would silently be gone.
func checkPins(dir string, have map[string]bool) error {
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		return err
	}
	for name := range spec.Maps {
		if !have[name] {
			return fmt.Errorf("%w: the datapath in %s has no %s map", ErrIncompatible, dir, name)
		}
	}
	return nil
}

// removeNew removes the pins of dir that are not in before, and dir itself
// when this Open made it.
func removeNew(dir string, before map[string]bool, madeDir bool) error {
	if madeDir {
		return os.RemoveAll(dir)
	}
	now, err := pins(dir)
	if err != nil {
		return err
	}
	var errs []error
	for name := range now {
		if !before[name] {
			errs = append(errs, os.RemoveAll(filepath.Join(dir, name)))
		}
	}
	return errors.Join(errs...)
}

// loadPinned loads the objects with their maps pinned in dir and stamps the
// layout version.
func loadPinned(cfg Config, ns netns.NsHandle, dir string, fresh bool) (*Datapath, error) {
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		return nil, err
	}
	events := cfg.Events
	if events == nil && fresh {
		def := DefaultEventConfig()
		events = &def
	}
	if err := sizeMaps(spec, dir, cfg.Limits, events); err != nil {
		return nil, err
	}
	st := &core.State{Name: cfg.Name, Dir: dir, NS: ns, Mode: attach.Mode(cfg.TCAttach), PodCIDRs: slices.Clone(cfg.Node.PodCIDRs)}
	// Maps only: each hook family's programs are loaded when first needed
	// (core.State.Programs), so a program this kernel refuses fails only
	// the calls that need it.
	err = spec.LoadAndAssign(&st.Objs.EndpointMaps, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}})
	if errors.Is(err, ebpf.ErrMapIncompatible) || errors.Is(err, unix.EINVAL) {
		// EINVAL: a pin of the right name that is not a map.
		return nil, fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	if err != nil {
		return nil, fmt.Errorf("load objects: %w", err)
	}
	if info, err := st.Objs.Layout.Info(); err == nil {
		st.LayoutID, _ = info.ID()
	}
	dp := &Datapath{st: st}
	if err := dp.checkNode(cfg); err != nil {
		st.Objs.Close()
		return nil, err
	}
	if _, err := reconcile(st); err != nil {
		st.Objs.Close()
		return nil, err
	}
	stamp := bpfobj.TypesLayoutStamp{Version: LayoutVersion}
	if err := st.Objs.Layout.Put(uint32(0), &stamp); err != nil {
		st.Objs.Close()
		return nil, fmt.Errorf("stamp layout version: %w", err)
	}
	if events != nil {
		if err := events.validate(); err != nil {
			st.Objs.Close()
			return nil, err
		}
		if err := dp.setEventConfig(*events); err != nil {
			st.Objs.Close()
			return nil, err
		}
	}
	if cfg.Cgroup != "" {
		if err := attachSocketPrograms(st, cfg.Cgroup); err != nil {
			st.Objs.Close()
			return nil, err
		}
	}
	return dp, nil
}

// sizeMaps sets the sizes of the maps: a pinned map keeps its size (a
// re-open cannot resize it), a new one takes it from limits, and the event
// ring is sized for the event config (see ringBytes).
func sizeMaps(spec *ebpf.CollectionSpec, dir string, limits Limits, events *EventConfig) error {
	limits = limits.withDefaults()
	ev := DefaultEventConfig()
	if events != nil {
		ev = *events
	}
	want := map[string]uint32{
		bpfobj.EndpointMapEndpoints:    uint32(limits.Endpoints),
		bpfobj.EndpointMapEpCounters:   uint32(limits.Endpoints),
		bpfobj.EndpointMapIpcache:      uint32(limits.IPCache),
		bpfobj.EndpointMapLedger:       uint32(limits.Endpoints+limits.Services) + ledgerSpare,
		bpfobj.EndpointMapConntrack:    uint32(limits.Conntrack),
		bpfobj.EndpointMapLbFrontends:  uint32(limits.Services),
		bpfobj.EndpointMapLbRevnat:     uint32(limits.Services),
		bpfobj.EndpointMapLbBackends:   uint32(limits.Backends),
		bpfobj.EndpointMapLbCounters:   uint32(limits.Backends),
		bpfobj.EndpointMapLbSlots:      uint32(limits.ServiceSlots / len(bpfobj.TypesLbSlotBlock{}.Backend)),
		bpfobj.EndpointMapLbAffinity:   uint32(max(limits.Conntrack/4, 1024)),
		bpfobj.EndpointMapLbSockRevnat: uint32(max(limits.Conntrack/4, 1024)),
		bpfobj.EndpointMapEvents:       uint32(ringBytes(ev, cpus())),
	}
	for name, size := range want {
		m := spec.Maps[name]
		pinned, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), &ebpf.LoadPinOptions{ReadOnly: true})
		switch {
		case err == nil:
			m.MaxEntries = pinned.MaxEntries()
			pinned.Close()
		case errors.Is(err, os.ErrNotExist):
			m.MaxEntries = size
		default:
			return fmt.Errorf("%w: load pinned %s: %w", ErrIncompatible, name, err)
		}
	}
	return nil
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
	if err := m.Lookup(uint32(0), raw); err != nil {
		return false, fmt.Errorf("%w: read layout stamp: %w", ErrIncompatible, err)
	}
	if len(raw) < 4 {
		return false, fmt.Errorf("%w: a layout stamp of %d bytes", ErrIncompatible, len(raw))
	}
	version := binary.NativeEndian.Uint32(raw)
	if version == 0 {
		return true, nil // an Open that failed before stamping it
	}
	if version != LayoutVersion {
		return false, fmt.Errorf("%w: pins in %s have layout version %d, this build has %d", ErrIncompatible, dir, version, LayoutVersion)
	}
	return false, nil
}

// Name returns the datapath's name.
func (dp *Datapath) Name() string { return dp.st.Name }

// PinDir returns the directory where the datapath's maps and links are pinned.
func (dp *Datapath) PinDir() string { return dp.st.Dir }

// Close releases the datapath's handles and ends a running Events reader;
// an Events call racing it fails with an error matching os.ErrClosed.
// The datapath keeps running: its programs stay attached and its maps
// pinned. Close waits for calls in flight on this handle; calls after it
// fail with an error matching os.ErrClosed. Closing twice is a no-op.
func (dp *Datapath) Close() error {
	dp.stopReader()
	return dp.st.Close()
}

// stopReader keeps a new Events reader from starting and ends the running
// one, if any, waiting for it.
func (dp *Datapath) stopReader() {
	dp.mu.Lock()
	dp.closing = true
	stop := dp.stopEvents
	dp.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// Unload tears the datapath down: it undoes every object its ledger
// records (an endpoint's veth pair, the namespace Create made for it),
// detaches every program it attached, removes every pin and closes the
// handles. It holds the datapath's lock throughout, so a Create in this or
// another process waits and then fails. It goes on past errors and returns
// all of them. Unloading a closed Datapath fails with an error matching
// os.ErrClosed and changes nothing: open it again to unload it.
func (dp *Datapath) Unload() error {
	dp.stopReader()
	st := dp.st
	defer func() {
		// An Unload refused (a closed handle, a lock not had) leaves the
		// handle as it was: it may read events again.
		if !st.Closed() {
			dp.mu.Lock()
			dp.closing = false
			dp.mu.Unlock()
		}
	}()
	return st.Unload(func() error {
		var errs []error
		for _, kind := range []ledger.Kind{ledger.KindEndpoint} {
			recs, err := ledger.List(st.Objs.Ledger, kind)
			errs = append(errs, err)
			for _, r := range recs {
				errs = append(errs, st.Undo(r))
			}
		}
		errs = append(errs,
			attach.DetachAll(st.LinksDir()),
			nsrun.Do(st.NS, func() error { return attach.RemoveLegacy(st.LegacyPrefix()) }),
		)
		if err := os.RemoveAll(st.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove pins: %w", err))
		}
		return errors.Join(errs...)
	})
}

// Reconcile finishes what a process killed half-way through a change left
// behind: an object the ledger records as being created or deleted is
// undone whole (its devices, namespace, attachments and map entries
// removed). Open does the same. It returns how many objects it undid.
func (dp *Datapath) Reconcile(ctx context.Context) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	unlock, err := dp.st.Lock(ctx)
	if err != nil {
		return 0, err
	}
	defer unlock()
	return reconcile(dp.st)
}

// reconcile undoes every record that is not Ready; call it with the lock.
func reconcile(st *core.State) (int, error) {
	n := 0
	for _, kind := range []ledger.Kind{ledger.KindEndpoint, ledger.KindService} {
		recs, err := ledger.List(st.Objs.Ledger, kind)
		if err != nil {
			return n, fmt.Errorf("reconcile: %w", err)
		}
		for _, r := range recs {
			if r.State == ledger.Ready {
				continue
			}
			if err := st.Undo(r); err != nil {
				return n, fmt.Errorf("reconcile: %w", err)
			}
			if kind == ledger.KindService {
				// The services' shared record goes too: every handle's
				// memo of the set is stale.
				if err := ledger.Delete(st.Objs.Ledger, ledger.KindService, 0); err != nil {
					return n, fmt.Errorf("reconcile: %w", err)
				}
			}
			n++
		}
	}
	return n, nil
}
