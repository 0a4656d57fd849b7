package core

import (
	"fmt"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/bpfobj"
)

// nodeProgramsKey is the Memo key of a node-facing object's loaded
// collection, by the object's name.
type nodeProgramsKey string

// nodeObject is a node-facing object: its name, how to load it, its
// programs.
type nodeObject struct {
	name  nodeProgramsKey
	load  func() (*ebpf.CollectionSpec, error)
	progs []string
}

var nodeObjects = []nodeObject{
	{"host", bpfobj.LoadHost, []string{bpfobj.HostProgFromNetdev, bpfobj.HostProgToNetdev}},
	{"overlay", bpfobj.LoadOverlay, []string{bpfobj.OverlayProgFromOverlay, bpfobj.OverlayProgToOverlay}},
}

// NodeProgram returns the node-facing program of that name (from_netdev,
// to_netdev, from_overlay, to_overlay), loading its object, wired to the
// datapath's maps, the first time it is needed, as EndpointPrograms does.
func (s *State) NodeProgram(name string) (*ebpf.Program, error) {
	if s.ReadOnly {
		return nil, fmt.Errorf("datapath %s: %w", s.Name, ErrReadOnly)
	}
	i := slices.IndexFunc(nodeObjects, func(o nodeObject) bool { return slices.Contains(o.progs, name) })
	if i < 0 {
		return nil, fmt.Errorf("no node-facing program %q", name)
	}
	obj := nodeObjects[i]
	s.progMu.Lock()
	defer s.progMu.Unlock()
	if c, ok := s.Memo.Load(obj.name); ok {
		return c.(*ebpf.Collection).Programs[name], nil
	}
	spec, err := obj.load()
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
	s.Memo.Store(obj.name, c)
	return c.Programs[name], nil
}

// CloseNodePrograms closes what NodeProgram loaded; attached programs keep
// running, held by their links.
func (s *State) CloseNodePrograms() {
	s.progMu.Lock()
	defer s.progMu.Unlock()
	for _, obj := range nodeObjects {
		if c, ok := s.Memo.LoadAndDelete(obj.name); ok {
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
