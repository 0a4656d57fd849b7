// Package core is the part of an open datapath that sluice's own object
// packages (endpoint, policy, service) work with: the loaded objects, the
// namespace, the node's configuration, the locks, and the undoing of what
// the ledger says an object made. Users reach it only through those
// packages.
package core

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
)

// State is one open datapath.
//
// Locks, always taken in this order: mu (changes, within the process), rw
// (the handles: read-held by every call that uses them, write-held by
// Close), the flock on Dir (changes, across processes). A call that holds
// them finds the handles open and the datapath still pinned.
type State struct {
	Name     string
	Dir      string         // <bpffs>/<name>
	NS       netns.NsHandle // the datapath's namespace, open until Close
	Mode     attach.Mode
	Objs     bpfobj.EndpointObjects
	PodCIDRs []netip.Prefix
	Node     LocalNode  // the local node, as Open was given it or found it recorded
	LayoutID ebpf.MapID // of the pinned layout map this State opened
	ReadOnly bool       // opened for inspection: no changes
	// CIDRIdentities is how many CIDR identities the datapath holds
	// (Limits); 0 for a datapath made before they had a limit of their
	// own: as many as the ledger has room for.
	CIDRIdentities int

	mu     sync.RWMutex
	rw     sync.RWMutex
	closed bool

	progMu sync.Mutex // loading programs

	// Memo holds what object packages last wrote through this handle, so
	// a change need not read it back from the maps; each package checks
	// its memo against the ledger before trusting it.
	Memo sync.Map
}

// LocalNode is what object packages need of the local node's
// configuration (datapath.Node).
type LocalNode struct {
	Name         string
	Routing      int // datapath.Routing
	Addresses    []netip.Addr
	ClusterCIDRs []netip.Prefix
	EndpointMTU  int // endpoint.Spec.MTU's default
	Encryption   int // datapath.Encryption
}

// Routing modes, as datapath.Routing numbers them.
const (
	RoutingLocal = iota
	RoutingVXLAN
	RoutingNative
)

// Encryption between nodes, as datapath.Encryption numbers it.
const (
	EncryptionNone = iota
	EncryptionIPsec
	EncryptionWireGuard
)

var of func(any) *State

// Register lets the datapath package tell Of how to reach a Datapath's State.
func Register(f func(any) *State) { of = f }

// Of returns the State of a *datapath.Datapath.
func Of(dp any) *State { return of(dp) }

// Use holds the handles open for a call that reads through them. It fails
// with os.ErrClosed once the datapath is closed.
func (s *State) Use() (release func(), err error) {
	s.rw.RLock()
	if s.closed {
		s.rw.RUnlock()
		return nil, fmt.Errorf("datapath %s: %w", s.Name, os.ErrClosed)
	}
	return s.rw.RUnlock, nil
}

// Lock serializes changes to the datapath: among goroutines with a mutex,
// among processes with an exclusive flock on the pin directory. Waiting
// for either ends with ctx. It fails with os.ErrClosed once the datapath
// is closed, and with errGone (matching os.ErrNotExist) once it was
// unloaded, by this process or another.
func (s *State) Lock(ctx context.Context) (unlock func(), err error) {
	if s.ReadOnly {
		return nil, fmt.Errorf("datapath %s: %w", s.Name, ErrReadOnly)
	}
	return s.lock(ctx, false)
}

// ReadLock is Lock for calls that read the object records and must not see
// a change half-made: readers share it (a read lock on the mutex, a shared
// flock), writers exclude them. A read-only handle takes only the read
// hold (Use): it must not block the datapath's writers.
func (s *State) ReadLock(ctx context.Context) (unlock func(), err error) {
	if s.ReadOnly {
		return s.Use()
	}
	return s.lock(ctx, true)
}

func (s *State) lock(ctx context.Context, shared bool) (unlock func(), err error) {
	tryLock, lock, unlockMu := s.mu.TryLock, s.mu.Lock, s.mu.Unlock
	if shared {
		tryLock, lock, unlockMu = s.mu.TryRLock, s.mu.RLock, s.mu.RUnlock
	}
	if err := waitFor(ctx, tryLock, lock, unlockMu); err != nil {
		return nil, err
	}
	release, err := s.Use()
	if err != nil {
		unlockMu()
		return nil, err
	}
	unlockDir, err := lockDir(ctx, s.Dir, shared)
	if err == nil {
		err = s.checkPinned()
		if err != nil {
			unlockDir()
		}
	}
	if err != nil {
		release()
		unlockMu()
		return nil, err
	}
	return func() { unlockDir(); release(); unlockMu() }, nil
}

// waitFor takes a lock, or gives up when ctx ends first; a lock taken
// after that is given back (unlock). A lock that is free costs no
// goroutine.
func waitFor(ctx context.Context, tryLock func() bool, lock, unlock func()) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if tryLock() {
		return nil
	}
	if ctx.Done() == nil {
		lock()
		return nil
	}
	got := make(chan struct{})
	go func() { lock(); close(got) }()
	select {
	case <-got:
		return nil
	case <-ctx.Done():
		go func() { <-got; unlock() }()
		return ctx.Err()
	}
}

// Change starts a change to the datapath dp (a *datapath.Datapath): it
// checks ctx and takes the lock. Every object package's changing call
// begins with it.
func Change(ctx context.Context, dp any) (st *State, unlock func(), err error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	st = Of(dp)
	unlock, err = st.Lock(ctx)
	if err != nil {
		return nil, nil, err
	}
	return st, unlock, nil
}

// checkPinned fails when the pins are no longer the ones this State opened:
// another process unloaded the datapath (and maybe made a new one) while
// this one held handles.
func (s *State) checkPinned() error {
	m, err := ebpf.LoadPinnedMap(filepath.Join(s.Dir, "layout"), &ebpf.LoadPinOptions{ReadOnly: true})
	if err == nil {
		defer m.Close()
		info, err := m.Info()
		if err == nil {
			if id, ok := info.ID(); ok && id == s.LayoutID {
				return nil
			}
		}
	}
	return fmt.Errorf("datapath %s: %w", s.Name, ErrUnloaded)
}

// ErrUnloaded reports a handle on a datapath that was unloaded since it was
// opened. It matches os.ErrNotExist.
var ErrUnloaded = fmt.Errorf("unloaded since it was opened: %w", os.ErrNotExist)

// ErrReadOnly reports a change asked of a datapath opened read-only. It
// matches os.ErrPermission.
var ErrReadOnly = fmt.Errorf("opened read-only: %w", os.ErrPermission)

// Closed reports whether Close was called.
func (s *State) Closed() bool {
	s.rw.RLock()
	defer s.rw.RUnlock()
	return s.closed
}

// Close releases the handles once no call uses them; it is a no-op the
// second time.
func (s *State) Close() error {
	s.rw.Lock()
	defer s.rw.Unlock()
	return s.closeLocked()
}

func (s *State) closeLocked() error {
	if s.closed {
		return nil
	}
	s.closed = true
	s.CloseNodePrograms()
	errs := []error{s.Objs.Close(), s.CloseSockPrograms()}
	if s.NS.IsOpen() {
		errs = append(errs, s.NS.Close())
	}
	return errors.Join(errs...)
}

// Unload runs teardown holding every lock, then closes the handles. It
// fails with os.ErrClosed on a closed datapath.
func (s *State) Unload(teardown func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rw.Lock()
	defer s.rw.Unlock()
	if s.closed {
		return fmt.Errorf("unload datapath %s: %w", s.Name, os.ErrClosed)
	}
	unlockDir, err := LockDir(context.Background(), s.Dir)
	if err != nil {
		return err
	}
	defer unlockDir()
	if err := s.checkPinned(); err != nil {
		return errors.Join(err, s.closeLocked())
	}
	return errors.Join(teardown(), s.closeLocked())
}

// LockDir takes an exclusive flock on dir, waiting for it as long as ctx
// lets it.
func LockDir(ctx context.Context, dir string) (unlock func(), err error) {
	return lockDir(ctx, dir, false)
}

// lockDir takes a flock on dir, shared or exclusive. A flock cannot be
// waited for with a deadline, so it is tried without blocking, again and
// again, until it is had or ctx ends.
func lockDir(ctx context.Context, dir string, shared bool) (unlock func(), err error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir, err)
	}
	how := unix.LOCK_EX
	if shared {
		how = unix.LOCK_SH
	}
	for wait := 100 * time.Microsecond; ; wait = min(2*wait, 20*time.Millisecond) {
		err = unix.Flock(fd, how|unix.LOCK_NB)
		if err == nil {
			return func() { unix.Close(fd) }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			unix.Close(fd)
			return nil, fmt.Errorf("lock %s: %w", dir, err)
		}
		select {
		case <-ctx.Done():
			unix.Close(fd)
			return nil, fmt.Errorf("lock %s: %w", dir, ctx.Err())
		case <-time.After(wait):
		}
	}
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

// Map returns the datapath's map with the given name, or nil.
func (s *State) Map(name string) *ebpf.Map { return s.maps()[name] }

// maps returns the datapath's maps by name.
func (s *State) maps() map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	v := reflect.ValueOf(&s.Objs.EndpointMaps).Elem()
	for i := range v.NumField() {
		if m, ok := v.Field(i).Interface().(*ebpf.Map); ok {
			out[v.Type().Field(i).Tag.Get("ebpf")] = m
		}
	}
	return out
}

// SetMaps puts maps, by name, into the State's objects.
func (s *State) SetMaps(maps map[string]*ebpf.Map) {
	v := reflect.ValueOf(&s.Objs.EndpointMaps).Elem()
	for i := range v.NumField() {
		if m, ok := maps[v.Type().Field(i).Tag.Get("ebpf")]; ok {
			v.Field(i).Set(reflect.ValueOf(m))
		}
	}
}

// EndpointPrograms returns the endpoint programs, loading them, wired to the
// datapath's maps, the first time they are needed: Open loads maps only, so
// a program the kernel refuses fails the calls that need it, not Open.
func (s *State) EndpointPrograms() (*bpfobj.EndpointPrograms, error) {
	if s.ReadOnly {
		return nil, fmt.Errorf("datapath %s: %w", s.Name, ErrReadOnly)
	}
	s.progMu.Lock()
	defer s.progMu.Unlock()
	if s.Objs.FromEndpoint != nil {
		return &s.Objs.EndpointPrograms, nil
	}
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		return nil, err
	}
	maps := s.maps()
	for name, m := range maps {
		spec.Maps[name].MaxEntries = m.MaxEntries() // sized at the first Open
	}
	var progs bpfobj.EndpointPrograms
	if err := spec.LoadAndAssign(&progs, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
		return nil, fmt.Errorf("load the endpoint programs: %w", err)
	}
	s.Objs.EndpointPrograms = progs
	return &s.Objs.EndpointPrograms, nil
}

// Undo removes everything the record says its object made, in the reverse
// order of making it: its attachments, its map entries, its device (when
// the object made it), its namespace, and last the record. What is gone
// already is skipped, so Undo can finish what a killed process began. On
// error the record stays, and Undo may be called again. Call it with the
// lock held.
func (s *State) Undo(r *ledger.Record) error {
	var errs []error
	if d := r.Made.Device; d != nil {
		for _, l := range r.Made.Links {
			hook := attach.Ingress
			if l.Egress {
				hook = attach.Egress
			}
			errs = append(errs, s.DetachTC(d.Ifindex, hook, l.Key))
		}
	}
	if err := s.DeleteEntries(r.Made.Entries); err != nil {
		errs = append(errs, fmt.Errorf("undo %v %d: %w", r.Kind, r.ID, err))
	}
	for _, sw := range r.Made.Sweeps {
		errs = append(errs, s.Sweep(sw))
	}
	for _, ref := range r.Made.Records {
		errs = append(errs, ledger.DeleteBlob(s.Objs.LedgerBlobs, ref.Kind, ref.ID), ledger.Delete(s.Objs.Ledger, ref.Kind, ref.ID))
	}
	for _, rt := range r.Made.Routes {
		errs = append(errs, netdev.DeleteRoute(s.NS, rt.Prefix, rt.Via))
	}
	if d := r.Made.Device; d != nil && d.Owned {
		errs = append(errs, deleteDevice(s.NS, d))
	}
	if r.Made.NetNS != "" {
		errs = append(errs, nsrun.DeleteNamed(r.Made.NetNS))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("undo %v %d: %w", r.Kind, r.ID, err)
	}
	return ledger.Delete(s.Objs.Ledger, r.Kind, r.ID)
}

// DeleteEntries deletes map entries a record names; one that is gone is
// skipped, and an ipcache entry is deleted only while its source still
// holds it.
func (s *State) DeleteEntries(entries []ledger.Entry) error {
	var errs []error
	for _, e := range entries {
		m := s.Map(e.Map)
		switch {
		case m == nil:
			errs = append(errs, fmt.Errorf("no map %s", e.Map))
		case e.Source != 0:
			errs = append(errs, ipcache.DeleteKey(m, e.Key, ipcache.Source(e.Source)))
		default:
			if err := m.Delete(e.Key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("delete from %s: %w", e.Map, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Sweep deletes every entry of a map whose key (or value) matches.
func (s *State) Sweep(sw ledger.Sweep) error { return s.SweepExcept(sw, nil) }

// SweepExcept is Sweep, keeping the entries whose raw key keep (when not
// nil) reports true for.
func (s *State) SweepExcept(sw ledger.Sweep, keep func(key []byte) bool) error {
	m := s.Map(sw.Map)
	if m == nil {
		return fmt.Errorf("sweep: no map %s", sw.Map)
	}
	var keys [][]byte
	if sw.InValue {
		// A map the datapath writes (conntrack) can lose the entry an
		// iteration stands on, which aborts it: start over, a few times.
		var err error
		for range 8 {
			keys = keys[:0]
			var k, v []byte
			it := m.Iterate()
			for it.Next(&k, &v) {
				if sw.Matches(v) {
					keys = append(keys, slices.Clone(k))
				}
			}
			if err = it.Err(); !errors.Is(err, ebpf.ErrIterationAborted) {
				break
			}
		}
		if err != nil {
			return fmt.Errorf("sweep %s: %w", sw.Map, err)
		}
	} else {
		var cur any // nil: from the first key
		for {
			next := make([]byte, m.KeySize())
			err := m.NextKey(cur, next)
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				break
			}
			if err != nil {
				return fmt.Errorf("sweep %s: %w", sw.Map, err)
			}
			if sw.Matches(next) {
				keys = append(keys, next)
			}
			cur = next
		}
	}
	for _, k := range keys {
		if keep != nil && keep(k) {
			continue
		}
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("sweep %s: %w", sw.Map, err)
		}
	}
	return nil
}

// deleteDevice deletes the device the record names: the one with its index,
// or, when a killed process made it but never recorded the index, the veth
// of that name.
func deleteDevice(ns netns.NsHandle, d *ledger.Device) error {
	l, err := netdev.Get(ns, d.Name)
	if errors.Is(err, unix.ENODEV) {
		return nil
	}
	if err != nil {
		return err
	}
	if (d.Ifindex != 0 && l.Index != d.Ifindex) || (d.Ifindex == 0 && l.Type != "veth" && l.Type != "vxlan" && l.Type != "wireguard") {
		return nil // another device took the name since
	}
	return netdev.Delete(ns, l.Index)
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

// A Repair makes the records of one kind whole again after a process was
// killed half-way through changing them (see internal/txn): it finishes or
// takes back each change, and returns how many it found. Call it with the
// lock held.
type Repair func(*State) (int, error)

var repairs = map[ledger.Kind]Repair{}

// RegisterRepair sets the repair of a kind; the object package of the
// kind registers it when it is imported.
func RegisterRepair(kind ledger.Kind, r Repair) { repairs[kind] = r }

// RepairOf returns the repair of a kind, or nil when the package of the
// kind is not in this program.
func RepairOf(kind ledger.Kind) Repair { return repairs[kind] }

// Drift is a difference between the maps and what the ledger says they
// hold, found by a Check.
type Drift struct {
	Object   string // the object it concerns, or the map of an entry no object made
	What     string // the difference
	Repaired bool
}

// A Check compares the maps with the records of one kind, and reports
// each difference; with repair, it mends each one too. A repair writes
// what the record says, and removes entries no record names. Call it with
// the lock held (a read hold suffices without repair).
type Check func(s *State, repair bool) ([]Drift, error)

var checks = map[ledger.Kind]Check{}

// RegisterCheck sets the check of a kind; the object package of the kind
// registers it when it is imported.
func RegisterCheck(kind ledger.Kind, c Check) { checks[kind] = c }

// CheckOf returns the check of a kind, or nil when the package of the kind
// is not in this program.
func CheckOf(kind ledger.Kind) Check { return checks[kind] }

// CheckIpcache reports each ipcache entry of a source whose prefix owned
// does not hold (an entry no object of that kind made), and with repair
// deletes it.
func (s *State) CheckIpcache(src ipcache.Source, owned map[netip.Prefix]bool, repair bool) ([]Drift, error) {
	entries, err := ipcache.List(s.Objs.Ipcache)
	if err != nil {
		return nil, err
	}
	var drift []Drift
	for p, e := range entries {
		if ipcache.Source(e.Source) != src || owned[p] {
			continue
		}
		d := Drift{Object: "ipcache", What: fmt.Sprintf("%s, an entry of a %s, which none has", p, src)}
		if repair {
			if err := ipcache.DeleteKey(s.Objs.Ipcache, ipcache.KeyBytes(p), src); err != nil {
				return drift, err
			}
			d.Repaired = true
		}
		drift = append(drift, d)
	}
	return drift, nil
}
