package core

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/nsrun"
)

// A SocketTarget names the sockets DestroySockets closes: the connected
// UDP sockets that the socket programs sent to Backend when they asked
// for Frontend, a UDP frontend.
type SocketTarget struct {
	Frontend netip.AddrPort
	Backend  netip.AddrPort
}

// sockDestroyKey is the Memo key of the loaded socket iterator (a
// *sockDestroyer), or of the error of a kernel that refused it for lack of
// bpf_sock_destroy: that kernel will not grow it, so the next call fails
// at once. CloseSockPrograms releases it.
type sockDestroyKey struct{}

// sockDestroyer is the loaded socket iterator. Its runs share the targets
// map, so mu serializes them.
type sockDestroyer struct {
	mu      sync.Mutex
	prog    *ebpf.Program
	targets *ebpf.Map
	iter    *link.Iter
	closed  bool
}

func (d *sockDestroyer) close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	return errors.Join(d.iter.Close(), d.prog.Close(), d.targets.Close())
}

// DestroySockets closes the connected UDP sockets that the socket
// programs (connect4/6) sent to a target's backend for its frontend, and
// returns how many it closed. Call it once a backend left its service,
// with the lock held (Change): a connected UDP socket
// chose its backend once, at connect, and would otherwise keep sending to
// it. A closed socket's next receive fails with ECONNABORTED, and its
// next send without an address with EDESTADDRREQ; an application that
// connects again is sent to a backend that takes new flows.
//
// It runs a socket iterator (bpf/sock_destroy.c) in the datapath's
// network namespace and in every endpoint's, where the datapath's cgroup
// has its sockets. The namespace of an adopted endpoint (one made with
// an Interface) is not known, and neither is that of a process of the
// cgroup elsewhere: their sockets are left as they are. A socket that
// connected to a backend's address by itself is left too, and so is one
// the socket programs sent to the same backend for another frontend.
//
// The first call loads the iterator, which reads the kernel's BTF (tens
// of milliseconds); later ones reuse it until Close.
//
// It requires Linux 6.5 (the bpf_sock_destroy kfunc): on older kernels
// it fails with an error matching ebpf.ErrNotSupported and closes
// nothing. It fails with ErrReadOnly on a read-only handle, and with
// os.ErrClosed once the datapath is closed. On any other error some
// sockets may have been closed already; none is closed twice, so the call
// can be repeated.
func (s *State) DestroySockets(targets []SocketTarget) (n int, err error) {
	if s.ReadOnly {
		return 0, fmt.Errorf("datapath %s: %w", s.Name, ErrReadOnly)
	}
	keys, err := sockDestroyKeys(targets)
	if err != nil || len(keys) == 0 {
		return 0, err
	}
	d, err := s.sockDestroyer()
	if err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, fmt.Errorf("datapath %s: %w", s.Name, os.ErrClosed)
	}

	spaces, err := s.socketNamespaces()
	if err != nil {
		return 0, err
	}
	defer func() {
		for _, ns := range spaces {
			ns.Close()
		}
	}()

	size := int(d.targets.MaxEntries())
	for len(keys) > 0 {
		chunk := keys[:min(size, len(keys))]
		keys = keys[len(chunk):]
		if err := fillTargets(d.targets, chunk); err != nil {
			return 0, err
		}
		for _, ns := range spaces {
			var closed int
			err := nsrun.Do(ns, func() (err error) {
				closed, err = runIter(d.iter)
				return err
			})
			n += closed
			if err != nil {
				return 0, fmt.Errorf("destroy sockets in network namespace %s: %w", ns.UniqueId(), err)
			}
		}
	}
	return n, nil
}

// sockDestroyKeys turns targets into sock_destroy_targets keys, each once.
// An IPv4-mapped address is the IPv4 address, as the socket programs see
// it.
func sockDestroyKeys(targets []SocketTarget) ([]bpfobj.TypesSockDestroyKey, error) {
	seen := make(map[bpfobj.TypesSockDestroyKey]bool, len(targets))
	keys := make([]bpfobj.TypesSockDestroyKey, 0, len(targets))
	for _, t := range targets {
		fe, be := t.Frontend.Addr().Unmap(), t.Backend.Addr().Unmap()
		if !fe.IsValid() || !be.IsValid() {
			return nil, fmt.Errorf("destroy sockets of %v: an invalid address: %w", t, os.ErrInvalid)
		}
		k := bpfobj.TypesSockDestroyKey{
			Frontend: bpfobj.TypesLbFrontendKey{
				Addr:   bpfobj.Addr16(fe),
				Port:   bpfobj.NetworkOrder(t.Frontend.Port()),
				Proto:  unix.IPPROTO_UDP, // the iterator walks UDP sockets only
				Family: bpfobj.Family(fe),
			},
			Addr:   bpfobj.Addr16(be),
			Port:   bpfobj.NetworkOrder(t.Backend.Port()),
			Family: bpfobj.Family(be),
		}
		if !seen[k] {
			seen[k] = true
			keys = append(keys, k)
		}
	}
	return keys, nil
}

// sockDestroyer returns the socket iterator, loading it the first time
// it is needed, as SockPrograms does.
func (s *State) sockDestroyer() (*sockDestroyer, error) {
	s.progMu.Lock()
	defer s.progMu.Unlock()
	if v, ok := s.Memo.Load(sockDestroyKey{}); ok {
		if err, ok := v.(error); ok {
			return nil, err
		}
		return v.(*sockDestroyer), nil
	}
	d, err := s.loadSockDestroy()
	if errors.Is(err, ebpf.ErrNotSupported) {
		s.Memo.Store(sockDestroyKey{}, err)
	}
	if err != nil {
		return nil, err
	}
	s.Memo.Store(sockDestroyKey{}, d)
	return d, nil
}

// loadSockDestroy loads the iterator program, wired to the datapath's
// lb_sock_revnat, with its own targets map, and attaches it. A kernel
// without bpf_sock_destroy (before Linux 6.5) refuses it with
// ErrNotSupported.
func (s *State) loadSockDestroy() (*sockDestroyer, error) {
	spec, err := bpfobj.LoadSockDestroy()
	if err != nil {
		return nil, err
	}
	maps, err := s.datapathMaps(spec)
	if err != nil {
		return nil, fmt.Errorf("load the socket iterator: %w", err)
	}
	var objs struct {
		Prog    *ebpf.Program `ebpf:"destroy_udp"`
		Targets *ebpf.Map     `ebpf:"sock_destroy_targets"`
	}
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
		return nil, fmt.Errorf("load the socket iterator (bpf_sock_destroy needs Linux 6.5): %w", err)
	}
	// The link is no attachment: each Open of it starts a run.
	it, err := link.AttachIter(link.IterOptions{Program: objs.Prog})
	if err != nil {
		return nil, errors.Join(fmt.Errorf("attach the socket iterator: %w", err), objs.Prog.Close(), objs.Targets.Close())
	}
	return &sockDestroyer{prog: objs.Prog, targets: objs.Targets, iter: it}, nil
}

// fillTargets makes m hold exactly keys.
func fillTargets(m *ebpf.Map, keys []bpfobj.TypesSockDestroyKey) error {
	var k bpfobj.TypesSockDestroyKey
	var old []bpfobj.TypesSockDestroyKey
	for it := m.Iterate(); ; {
		var v uint32
		if !it.Next(&k, &v) {
			if err := it.Err(); err != nil {
				return fmt.Errorf("destroy sockets: read the targets: %w", err)
			}
			break
		}
		old = append(old, k)
	}
	for _, k := range old {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("destroy sockets: clear the targets: %w", err)
		}
	}
	for _, k := range keys {
		if err := m.Put(k, uint32(1)); err != nil {
			return fmt.Errorf("destroy sockets: write the targets: %w", err)
		}
	}
	return nil
}

// runIter runs the iterator over the UDP sockets of the calling thread's
// network namespace (an iterator walks the namespace it is opened in) and
// returns how many sockets it destroyed: it writes a cookie of 8 bytes
// for each.
func runIter(it *link.Iter) (int, error) {
	r, err := it.Open()
	if err != nil {
		return 0, fmt.Errorf("open the socket iterator: %w", err)
	}
	defer r.Close()
	n, err := io.Copy(io.Discard, r)
	if err != nil {
		return 0, fmt.Errorf("run the socket iterator: %w", err)
	}
	return int(n / 8), nil
}

// socketNamespaces opens the network namespaces where the datapath's
// cgroup may have sockets: the datapath's own and each endpoint's
// (RegisterWorkloadNamespaces), each once. The caller closes them.
func (s *State) socketNamespaces() (out []netns.NsHandle, err error) {
	defer func() {
		if err != nil {
			for _, ns := range out {
				ns.Close()
			}
			out = nil
		}
	}()
	seen := map[string]bool{}
	add := func(ns netns.NsHandle) {
		if id := ns.UniqueId(); !seen[id] {
			seen[id] = true
			out = append(out, ns)
			return
		}
		ns.Close()
	}
	// A handle of its own, closed with the others.
	var own netns.NsHandle
	if s.NS.IsOpen() {
		var fd int
		fd, err = unix.FcntlInt(uintptr(s.NS), unix.F_DUPFD_CLOEXEC, 0)
		own = netns.NsHandle(fd)
	} else {
		own, err = netns.Get()
	}
	if err != nil {
		return nil, fmt.Errorf("destroy sockets: the datapath's network namespace: %w", err)
	}
	add(own)

	if workloadNamespaces == nil {
		return out, nil // no endpoint package: no endpoint namespace
	}
	spaces, err := workloadNamespaces(s)
	if err != nil {
		for _, ns := range spaces {
			ns.Close()
		}
		return nil, fmt.Errorf("destroy sockets: %w", err)
	}
	for _, ns := range spaces {
		if !isNetNS(ns) {
			ns.Close() // a name a killed process never bound
			continue
		}
		add(ns)
	}
	return out, nil
}

var workloadNamespaces func(*State) ([]netns.NsHandle, error)

// RegisterWorkloadNamespaces sets what lists the network namespaces of
// the datapath's workloads (open handles, closed by the caller): package
// endpoint, which knows its endpoints' namespaces, registers it.
func RegisterWorkloadNamespaces(f func(*State) ([]netns.NsHandle, error)) { workloadNamespaces = f }

// isNetNS reports whether ns is a namespace at all, not the empty file
// under /run/netns that a process killed while it created one leaves.
func isNetNS(ns netns.NsHandle) bool {
	var fs unix.Statfs_t
	return unix.Fstatfs(int(ns), &fs) == nil && fs.Type == unix.NSFS_MAGIC
}
