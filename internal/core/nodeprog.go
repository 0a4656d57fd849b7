package core

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/bpfobj"
)

// nodeProgramsKey is the Memo key of a node-facing object's loaded
// programs, by the object's name.
type nodeProgramsKey string

// NodeProgram returns the node-facing program of that name (from_netdev,
// from_overlay), loading its object, wired to the datapath's maps, the
// first time it is needed, as EndpointPrograms does.
func (s *State) NodeProgram(name string) (*ebpf.Program, error) {
	if s.ReadOnly {
		return nil, fmt.Errorf("datapath %s: %w", s.Name, ErrReadOnly)
	}
	var load func() (*ebpf.CollectionSpec, error)
	switch name {
	case bpfobj.HostProgFromNetdev:
		load = bpfobj.LoadHost
	case bpfobj.OverlayProgFromOverlay:
		load = bpfobj.LoadOverlay
	default:
		return nil, fmt.Errorf("no node-facing program %q", name)
	}
	s.progMu.Lock()
	defer s.progMu.Unlock()
	if c, ok := s.Memo.Load(nodeProgramsKey(name)); ok {
		return c.(*ebpf.Collection).Programs[name], nil
	}
	spec, err := load()
	if err != nil {
		return nil, err
	}
	maps, err := s.datapathMaps(spec)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", name, err)
	}
	c, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: maps})
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", name, err)
	}
	s.Memo.Store(nodeProgramsKey(name), c)
	return c.Programs[name], nil
}

// CloseNodePrograms closes what NodeProgram loaded; attached programs keep
// running, held by their links.
func (s *State) CloseNodePrograms() {
	s.progMu.Lock()
	defer s.progMu.Unlock()
	for _, name := range []string{bpfobj.HostProgFromNetdev, bpfobj.OverlayProgFromOverlay} {
		if c, ok := s.Memo.LoadAndDelete(nodeProgramsKey(name)); ok {
			c.(*ebpf.Collection).Close()
		}
	}
}

// NodeAddrSpare is room in node_addrs beyond two addresses for each of
// Limits.Nodes: a node changing its address holds the new one before the
// old one goes.
const NodeAddrSpare = 64

// NodeLimit is how many remote nodes the datapath holds (Limits.Nodes).
func (s *State) NodeLimit() int {
	return max(int(s.Objs.NodeAddrs.MaxEntries())-NodeAddrSpare, 0) / 2
}
