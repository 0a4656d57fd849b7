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
)

// LayoutVersion is the version of the pinned maps' layout this build reads
// and writes. Open refuses pins of any other version with ErrIncompatible.
const LayoutVersion = uint32(bpfobj.TypesLayoutVersionLAYOUT_VERSION)

// Datapath is one loaded datapath: one per network namespace. Its methods are
// safe for concurrent use.
type Datapath struct {
	st   *core.State
	node Node // what the datapath was first opened for

	mu         sync.Mutex
	stopEvents func() // stops the running Events reader and waits for it; nil when none
	closing    bool   // Close or Unload began: no Events reader may start
}

func init() {
	core.Register(func(dp any) *core.State { return dp.(*Datapath).st })
}

// Open loads the datapath named cfg.Name into cfg.NetNS, or re-opens it when
// its pins exist already, keeping all its state, and finishes what a
// process killed half-way through a change left (see Reconcile). Requires
// root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN to mount bpffs).
//
// It checks every pin before it loads anything, and a failed Open changes
// nothing of a datapath that runs: it removes only the pins it made
// itself. Its error wraps one of these, with the kernel's errno beside
// it where there is one:
//
//   - ErrInvalid: a bad Config; a re-open in another namespace or with
//     other pod CIDRs than the first Open's; an event rate the pinned
//     ring cannot hold; a BPFFS directory that is neither a BPF
//     filesystem nor empty; Limits the kernel has no memory for (ENOMEM).
//   - ErrNotFound: the namespace does not exist; MustExist and no
//     datapath is pinned under the name.
//   - ErrIncompatible: pins this build must not read: a stamp of another
//     LayoutVersion; a pin with the name of one of the maps that is not
//     that map (a directory, a program, a map of another type, key, value
//     or flags); a map missing from a datapath that has state; a ledger
//     record that cannot be read (the error names it). UnloadPinned
//     removes such a datapath.
//   - ErrNotSupported: the kernel lacks what Config.Cgroup needs.
//   - os.ErrPermission: missing privileges.
//   - ctx.Err(): ctx ended while Open waited for another process's lock.
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
	version, err := checkLayout(dir)
	if err != nil {
		return nil, fmt.Errorf("open datapath %s: %w", cfg.Name, err)
	}
	if version == 0 {
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
			(&Datapath{st: st}).useNode(node.Node)
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
	// Everything is checked before anything is loaded: a refused Open
	// changes nothing.
	var dp *Datapath
	f, err := inspect(dir, before, cfg)
	if err == nil {
		dp, err = loadPinned(cfg, ns, dir, f)
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

// loadPinned loads the objects with their maps pinned in dir, as inspect
// found them, and stamps the layout version.
func loadPinned(cfg Config, ns netns.NsHandle, dir string, f *found) (_ *Datapath, err error) {
	spec, events := f.spec, f.events
	st := &core.State{Name: cfg.Name, Dir: dir, NS: ns, Mode: attach.Mode(cfg.TCAttach)}
	// Maps only: each hook family's programs are loaded when first needed
	// (core.State.Programs), so a program this kernel refuses fails only
	// the calls that need it.
	err = spec.LoadAndAssign(&st.Objs.EndpointMaps, &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}})
	if errors.Is(err, ebpf.ErrMapIncompatible) || errors.Is(err, unix.EINVAL) {
		// EINVAL: a pin of the right name that is not a map. (inspect
		// refuses both first, unless a pin changed since.)
		return nil, fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	if errors.Is(err, unix.ENOMEM) {
		return nil, fmt.Errorf("%w: the kernel has no memory for maps of these Limits: %w", ErrInvalid, err)
	}
	if err != nil {
		return nil, fmt.Errorf("load objects: %w", err)
	}
	if info, err := st.Objs.Layout.Info(); err == nil {
		st.LayoutID, _ = info.ID()
	}
	st.CIDRIdentities = limitsOf(st).CIDRIdentities
	dp := &Datapath{st: st}
	// From here on, a failure closes the maps, and takes back what
	// setupNode made (the VXLAN device with it).
	undoNode := func() error { return nil }
	defer func() {
		if err != nil {
			err = errors.Join(err, undoNode())
			st.Objs.Close()
		}
	}()
	node, err := dp.checkNode(cfg)
	if err != nil {
		return nil, err
	}
	dp.node = node
	// A tool that only inspects (MustExist, no NetNS: the CLI) may be in
	// another namespace: it repairs nothing and attaches nothing there.
	if inspecting := cfg.MustExist && cfg.NetNS == ""; !inspecting {
		if _, err := reconcile(st); err != nil {
			return nil, err
		}
		if undoNode, err = setupNode(st, node); err != nil {
			undoNode = func() error { return nil } // setupNode took its own back
			return nil, fmt.Errorf("set up node: %w", err)
		}
		if err := upgrade(st); err != nil {
			return nil, err
		}
	}
	stamp := bpfobj.TypesLayoutStamp{Version: LayoutVersion}
	if err := st.Objs.Layout.Put(uint32(0), &stamp); err != nil {
		return nil, fmt.Errorf("stamp layout version: %w", err)
	}
	if events != nil {
		if err := dp.setEventConfig(*events); err != nil {
			return nil, err
		}
	}
	if cfg.Cgroup != "" {
		if err := attachSocketPrograms(st, cfg.Cgroup); err != nil {
			return nil, err
		}
	}
	return dp, nil
}

// checkLayout returns the layout version dir's pins are stamped with: 0
// when there is no stamp (no datapath, or one whose first Open did not
// finish). It fails with ErrIncompatible when the stamp is of another
// layout version, or cannot be read.
func checkLayout(dir string) (version uint32, err error) {
	version, err = readStamp(dir)
	if err != nil {
		return 0, err
	}
	if version != 0 && version != LayoutVersion {
		return 0, fmt.Errorf("%w: pins in %s have layout version %d, this build has %d", ErrIncompatible, dir, version, LayoutVersion)
	}
	return version, nil
}

// Name returns the datapath's name.
func (dp *Datapath) Name() string { return dp.st.Name }

// Node returns the local node the datapath serves: what its first Open
// was given (a re-open with a zero Config.Node takes it).
func (dp *Datapath) Node() Node {
	n := dp.node
	n.PodCIDRs = slices.Clone(n.PodCIDRs)
	n.Addresses = slices.Clone(n.Addresses)
	n.Devices = slices.Clone(n.Devices)
	n.ClusterCIDRs = slices.Clone(n.ClusterCIDRs)
	return n
}

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

// Unload tears the datapath down: it undoes what every object its ledger
// records made outside the pins (an endpoint's veth pair, the namespace
// Create made for it), detaches every program it attached, removes every
// pin and closes the handles. It holds the datapath's lock throughout, so
// a Create in this or another process waits and then fails. It goes on
// past errors and returns all of them; a ledger record it cannot read
// does not stop it either: what such a record of an endpoint made may be
// left, and the error (matching ErrIncompatible) names it. Unloading a
// closed Datapath fails with an error matching os.ErrClosed and changes
// nothing: open it again to unload it, or, where Open refuses the
// datapath, use UnloadPinned.
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
	return st.Unload(func() error { return teardown(st) })
}

// Reconcile finishes what a process killed half-way through a change left
// behind. An endpoint the ledger records as being created or deleted is
// undone whole (its devices, namespace, attachments and map entries
// removed). A change of a policy or a service is finished, or taken back
// where it cannot be: each is exactly its old version or its new one
// after. That takes the object's package in the program: in one without
// it, a half-changed policy is left as it is (undoing it would allow what
// it denies) and a half-changed service is removed. Open does the same.
// It returns how many objects it repaired.
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

// kindOrder is the order kinds are repaired and checked in: an endpoint
// undone takes its policy with it, a policy finished gives and takes CIDR
// identities.
var kindOrder = []ledger.Kind{ledger.KindEndpoint, ledger.KindPolicy, ledger.KindCIDR, ledger.KindService, ledger.KindDevice, ledger.KindNode}

// reconcile repairs every kind; call it with the lock.
func reconcile(st *core.State) (int, error) {
	n := 0
	for _, kind := range kindOrder {
		var k int
		var err error
		if repair := core.RepairOf(kind); repair != nil {
			k, err = repair(st)
		} else if kind == ledger.KindEndpoint || kind == ledger.KindService || kind == ledger.KindDevice {
			k, err = undoUnready(st, kind)
		}
		n += k
		if err != nil {
			return n, fmt.Errorf("reconcile: %w", err)
		}
	}
	return n, nil
}

// undoUnready undoes every record of a kind that is not Ready.
func undoUnready(st *core.State, kind ledger.Kind) (int, error) {
	recs, err := ledger.List(st.Objs.Ledger, kind)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range recs {
		if r.State == ledger.Ready {
			continue
		}
		if err := st.Undo(r); err != nil {
			return n, err
		}
		if kind == ledger.KindService {
			// The services' shared record goes too: every handle's
			// memo of the set is stale.
			if err := ledger.Delete(st.Objs.Ledger, ledger.KindService, 0); err != nil {
				return n, err
			}
		}
		n++
	}
	return n, nil
}

// Drift is a difference between the maps and what the ledger says they
// hold, found by Verify.
type Drift struct {
	// Object is what it concerns: "endpoint 3", "policy of endpoint 3",
	// "service 198.18.0.10:80/TCP", or, for an entry no object made, its
	// map.
	Object string
	What   string
	// Repaired says Verify mended it.
	Repaired bool
}

func (d Drift) String() string {
	s := d.Object + ": " + d.What
	if d.Repaired {
		s += " (repaired)"
	}
	return s
}

// Verify reads the maps back and compares them with the ledger, for every
// object kind whose package this program has: each endpoint's entries,
// each policy's entries as it resolves now, each CIDR identity, each
// service's frontend, backends and table, and entries no object made
// (after a writer was killed, a map was edited by hand, or a bug). It
// returns each difference. With repair it first finishes what killed
// writers left (as Reconcile does) and then mends each difference: the
// record decides, and entries no object made are deleted. Without repair
// it changes nothing and shares the lock with other readers; a read-only
// handle can verify but not repair.
func (dp *Datapath) Verify(ctx context.Context, repair bool) ([]Drift, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	lock := dp.st.ReadLock
	if repair {
		lock = dp.st.Lock
	}
	unlock, err := lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	var out []Drift
	if repair {
		n, err := reconcile(dp.st)
		if n > 0 {
			out = append(out, Drift{Object: "ledger", What: fmt.Sprintf("%d objects were left half-changed by killed writers", n), Repaired: err == nil})
		}
		if err != nil {
			return out, err
		}
	}
	for _, kind := range kindOrder {
		check := core.CheckOf(kind)
		if check == nil {
			continue
		}
		drift, err := check(dp.st, repair)
		for _, d := range drift {
			out = append(out, Drift(d))
		}
		if err != nil {
			return out, fmt.Errorf("verify: %w", err)
		}
	}
	return out, nil
}
