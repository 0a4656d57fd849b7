package core

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/bpfobj"
)

// sockProgramsKey is the Memo key of the loaded socket programs: they live
// beside the object packages' memos rather than in a field of State, and
// CloseSockPrograms is what releases them.
type sockProgramsKey struct{}

// SockPrograms returns the socket programs (service translation at connect,
// sendmsg, recvmsg and getpeername), loading them, wired to the datapath's
// maps, the first time they are needed, as EndpointPrograms does. It fails
// with ErrReadOnly on a read-only handle, and with the verifier's error
// when the kernel refuses a program (the eight hooks are all there since
// Linux 5.8).
func (s *State) SockPrograms() (*bpfobj.SockPrograms, error) {
	if s.ReadOnly {
		return nil, fmt.Errorf("datapath %s: %w", s.Name, ErrReadOnly)
	}
	s.progMu.Lock()
	defer s.progMu.Unlock()
	if p, ok := s.Memo.Load(sockProgramsKey{}); ok {
		return p.(*bpfobj.SockPrograms), nil
	}
	spec, err := bpfobj.LoadSock()
	if err != nil {
		return nil, err
	}
	maps, err := s.datapathMaps(spec)
	if err != nil {
		return nil, fmt.Errorf("load the socket programs: %w", err)
	}
	progs := new(bpfobj.SockPrograms)
	if err := spec.LoadAndAssign(progs, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
		return nil, fmt.Errorf("load the socket programs: %w", err)
	}
	s.Memo.Store(sockProgramsKey{}, progs)
	return progs, nil
}

// CloseSockPrograms closes the socket programs if SockPrograms loaded them,
// and the socket iterator if DestroySockets did; the next call that needs
// them loads them again. Attached programs keep running: their pinned
// links hold them. Close must call it.
func (s *State) CloseSockPrograms() error {
	s.progMu.Lock()
	defer s.progMu.Unlock()
	var errs []error
	if p, ok := s.Memo.LoadAndDelete(sockProgramsKey{}); ok {
		errs = append(errs, p.(*bpfobj.SockPrograms).Close())
	}
	if d, ok := s.Memo.LoadAndDelete(sockDestroyKey{}); ok {
		if d, ok := d.(*sockDestroyer); ok {
			errs = append(errs, d.close())
		}
	}
	return errors.Join(errs...)
}

// datapathMaps returns, for each pinned map of spec, the datapath's map of
// that name, and sizes spec's as it is (at the first Open): an object
// loaded beside the datapath's must never get a map of its own.
func (s *State) datapathMaps(spec *ebpf.CollectionSpec) (map[string]*ebpf.Map, error) {
	have := s.maps()
	maps := map[string]*ebpf.Map{}
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		m := have[name]
		if m == nil {
			return nil, fmt.Errorf("the datapath has no map %s", name)
		}
		ms.MaxEntries = m.MaxEntries()
		maps[name] = m
	}
	return maps, nil
}
