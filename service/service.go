package service

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/sluicedp/sluice/datapath"
)

// Protocol is the L4 protocol of a frontend.
type Protocol uint8

// Protocols a frontend may have.
const (
	TCP Protocol = 6
	UDP Protocol = 17
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return fmt.Sprintf("protocol(%d)", uint8(p))
}

// Frontend is the virtual address clients send to. It names its service:
// no two services have the same one.
type Frontend struct {
	Addr     netip.Addr // IPv4 or IPv6, not unspecified
	Port     uint16     // not 0
	Protocol Protocol
}

func (f Frontend) String() string {
	return netip.AddrPortFrom(f.Addr, f.Port).String() + "/" + f.Protocol.String()
}

// State is where a backend is in its life. In every state a backend keeps
// the flows it has, until it is removed from the service. New flows go to
// the service's ready backends: those Active with a weight. A service that
// has none sends them to its TerminatingServing backends with a weight
// instead, as kube-proxy does with terminating endpoints that still serve
// (Kubernetes KEP-1669, ProxyTerminatingEndpoints); while it has a ready
// backend again, they get none. No other state ever gets a new flow.
//
// A controller that follows EndpointSlices maps an endpoint's conditions
// to states so: ready is Active; terminating and serving is
// TerminatingServing; terminating and not serving is Terminating; neither
// ready nor terminating is Quarantined (or the backend is left out).
type State uint8

// Backend states, as Cilium names them, but for one: Cilium's Terminating
// (serving) is TerminatingServing here, and its TerminatingNotServing is
// Terminating, which keeps the meaning it had before the fallback came.
// The values are stored (in the ledger and the lb_backends map): a new
// state takes the next one.
const (
	// Active backends get new flows, in proportion to their weight: a
	// Kubernetes endpoint that is ready.
	Active State = iota
	// Terminating backends drain: they keep their flows and get no new
	// ones, even when the service has no other backend (a Kubernetes
	// endpoint that is terminating and no longer serving).
	Terminating
	// Quarantined backends failed a health check: no new flows.
	Quarantined
	// Maintenance backends are out of rotation by an operator's choice: no
	// new flows.
	Maintenance
	// TerminatingServing backends drain as Terminating ones do while the
	// service has a ready backend (Active, with a weight). When it has
	// none, new flows go to them, in proportion to their weight (0 gives
	// none here too), rather than nowhere: a Kubernetes endpoint that is
	// terminating and still serving. Client affinity holds among them
	// while they take the service's new flows.
	TerminatingServing
)

func (s State) String() string {
	switch s {
	case Active:
		return "active"
	case Terminating:
		return "terminating"
	case Quarantined:
		return "quarantined"
	case Maintenance:
		return "maintenance"
	case TerminatingServing:
		return "terminating-serving"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Backend is one address a service's flows go to.
type Backend struct {
	Addr netip.Addr // of the frontend's family
	Port uint16     // not 0
	// Weight is the backend's share of new flows relative to the others
	// that take them (see State); 0 gives it none, in every state. At
	// least one backend of the service needs a weight.
	Weight uint16
	State  State
}

// AddrPort is the backend's address and port: what names it within its
// service.
func (b Backend) AddrPort() netip.AddrPort { return netip.AddrPortFrom(b.Addr, b.Port) }

// Algorithm chooses a new flow's backend.
type Algorithm uint8

const (
	// Random picks a backend at random, weighted, for every new flow.
	Random Algorithm = iota
	// Maglev picks by a hash of the flow's client address, port and
	// protocol in a Maglev table: the same flow always gets the same
	// backend, and a change of one backend moves few flows of the
	// others. At the socket level, where the client port is not known yet,
	// it picks at random.
	Maglev
)

func (a Algorithm) String() string {
	switch a {
	case Random:
		return "random"
	case Maglev:
		return "maglev"
	}
	return fmt.Sprintf("algorithm(%d)", uint8(a))
}

// Reach says where a frontend is translated.
type Reach uint8

const (
	// Both translates at the socket level for processes in the datapath's
	// cgroup, and per packet for every other sender.
	Both Reach = iota
	// SocketOnly translates only at the socket level.
	SocketOnly
	// TCOnly translates only per packet, in the endpoint program.
	TCOnly
)

func (r Reach) String() string {
	switch r {
	case Both:
		return "both"
	case SocketOnly:
		return "socket"
	case TCOnly:
		return "tc"
	}
	return fmt.Sprintf("reach(%d)", uint8(r))
}

// NoBackend says what a frontend translated per packet does with a new
// flow no backend takes. Either way the packet counts as a NO_BACKEND drop;
// at the socket level connect and send fail with EPERM.
type NoBackend uint8

const (
	// Drop drops the packet.
	Drop NoBackend = iota
	// Reject answers it with an ICMP or ICMPv6 port unreachable from the
	// frontend, so the client's connect or receive fails at once with
	// ECONNREFUSED instead of timing out. An IPv4 packet with IP options
	// is dropped.
	Reject
)

func (n NoBackend) String() string {
	switch n {
	case Drop:
		return "drop"
	case Reject:
		return "reject"
	}
	return fmt.Sprintf("no-backend(%d)", uint8(n))
}

// Service is a frontend balanced over backends.
type Service struct {
	Frontend Frontend
	// Backends is the whole backend set: an Upsert makes it the set the
	// service has, in any order. Each address and port at most once.
	Backends  []Backend
	Algorithm Algorithm
	// MaglevSize is the Maglev table size, a prime at least the number of
	// backends that take new flows (see State); DefaultMaglevSize when 0.
	// Only for Maglev.
	MaglevSize int
	// Affinity, when not 0, sends every new flow of a client address to
	// the backend its last one went to, while that backend still takes
	// the service's new flows (see State) and less than Affinity has
	// passed since; whole seconds, at most a day.
	Affinity  time.Duration
	Reach     Reach
	NoBackend NoBackend
	// Owner names the program or controller that made the service. Sync
	// with an owner changes only that owner's services, so programs can
	// share a datapath; an Upsert or Sync of a frontend another owner
	// holds fails with ErrExists. Empty is an owner too: the one of
	// services made without one. At most 64 bytes.
	Owner string
}

// maxOwner bounds Service.Owner.
const maxOwner = 64

// MaxBackends is how many backends one service may have.
const MaxBackends = 4096

// maxMaglevSize bounds a Maglev table.
const maxMaglevSize = 1 << 20

// maxRandomSlots bounds the selection table of a Random service whose
// weights are unequal: weights are then approximated to 1 in this many.
const maxRandomSlots = 4096

// Validate reports what is wrong with s, wrapping datapath.ErrInvalid.
func (s *Service) Validate() error {
	f := s.Frontend
	bad := func(format string, args ...any) error {
		return fmt.Errorf("service %s: %s: %w", f, fmt.Sprintf(format, args...), datapath.ErrInvalid)
	}
	if !f.Addr.IsValid() || f.Addr.IsUnspecified() || f.Addr.Is4In6() || f.Addr.Zone() != "" {
		return bad("frontend address %v: want a specified IPv4 or IPv6 address", f.Addr)
	}
	if f.Addr.IsMulticast() {
		return bad("frontend address %v is multicast", f.Addr)
	}
	if f.Port == 0 {
		return bad("frontend port 0")
	}
	if f.Protocol != TCP && f.Protocol != UDP {
		return bad("protocol %v: want TCP or UDP", f.Protocol)
	}
	if s.Algorithm != Random && s.Algorithm != Maglev {
		return bad("unknown algorithm %v", s.Algorithm)
	}
	if s.Reach > TCOnly {
		return bad("unknown reach %v", s.Reach)
	}
	if s.NoBackend > Reject {
		return bad("unknown no-backend action %v", s.NoBackend)
	}
	if s.Affinity < 0 || s.Affinity > 24*time.Hour || s.Affinity%time.Second != 0 {
		return bad("affinity %v: want whole seconds up to 24h", s.Affinity)
	}
	if len(s.Owner) > maxOwner {
		return bad("owner of %d bytes: at most %d", len(s.Owner), maxOwner)
	}
	if len(s.Backends) > MaxBackends {
		return bad("%d backends: at most %d", len(s.Backends), MaxBackends)
	}
	seen := make(map[netip.AddrPort]bool, len(s.Backends))
	for _, b := range s.Backends {
		if !b.Addr.IsValid() || b.Addr.IsUnspecified() || b.Addr.Is4In6() || b.Addr.Zone() != "" || b.Addr.IsMulticast() {
			return bad("backend address %v: want a specified unicast address", b.Addr)
		}
		if b.Addr.Is4() != f.Addr.Is4() {
			return bad("backend %v is of the other address family", b.AddrPort())
		}
		if b.Port == 0 {
			return bad("backend %v: port 0", b.Addr)
		}
		if b.State > TerminatingServing {
			return bad("backend %v: unknown state %v", b.AddrPort(), b.State)
		}
		if seen[b.AddrPort()] {
			return bad("backend %v twice", b.AddrPort())
		}
		seen[b.AddrPort()] = true
	}
	if len(s.Backends) > 0 && !slices.ContainsFunc(s.Backends, func(b Backend) bool { return b.Weight > 0 }) {
		return bad("every backend has weight 0")
	}
	if s.Algorithm == Maglev {
		m := s.maglevSize()
		if !isPrime(m) || m > maxMaglevSize {
			return bad("maglev table size %d: want a prime up to %d", m, maxMaglevSize)
		}
		if usable, _ := s.takers(); len(usable) > m {
			return bad("maglev table size %d: too small for %d backends", m, len(usable))
		}
	} else if s.MaglevSize != 0 {
		return bad("a Maglev table size for the %v algorithm", s.Algorithm)
	}
	return nil
}

// takers returns the indexes in s.Backends of the backends that take new
// flows: the ready ones (Active, with a weight), or, when there are none,
// the TerminatingServing ones with a weight, and then fallback is true.
// None take them when neither kind is there.
func (s *Service) takers() (usable []int, fallback bool) {
	for i, b := range s.Backends {
		if b.State == Active && b.Weight > 0 {
			usable = append(usable, i)
		}
	}
	if len(usable) > 0 {
		return usable, false
	}
	for i, b := range s.Backends {
		if b.State == TerminatingServing && b.Weight > 0 {
			usable = append(usable, i)
		}
	}
	return usable, len(usable) > 0
}

func (s *Service) maglevSize() int {
	if s.MaglevSize == 0 {
		return DefaultMaglevSize
	}
	return s.MaglevSize
}
