package datapath

import (
	"fmt"
	"net/netip"
	"regexp"

	"github.com/sluicedp/sluice/internal/attach"
)

// DefaultBPFFS is where pins go unless Config.BPFFS says otherwise.
const DefaultBPFFS = "/sys/fs/bpf"

// Config describes the datapath to open.
type Config struct {
	// Name identifies the datapath: its pins live in <BPFFS>/<Name>/, and
	// opening the same name again picks up the same state. 1 to 64 of
	// [a-z0-9_-], starting with a letter or digit.
	Name string
	// NetNS is the network namespace the datapath serves, as a name under
	// /run/netns (as `ip netns` shows it) or a path such as
	// /proc/1234/ns/net. Empty means the caller's namespace.
	NetNS string
	// BPFFS is a BPF filesystem mount; DefaultBPFFS when empty. It is
	// mounted there if it is not yet.
	BPFFS string
	// TCAttach says how tc programs are attached: AttachAuto (tcx links
	// where the kernel has them, Linux 6.6; clsact + cls_bpf otherwise),
	// AttachTCX or AttachLegacy.
	TCAttach AttachMode
	// Node describes the local node.
	Node Node
	// MustExist makes Open fail with ErrNotFound, instead of creating the
	// datapath, when none is pinned under this name: for tools that only
	// inspect.
	MustExist bool
	// Events configures drop and trace events. Nil keeps the settings of a
	// datapath that is re-opened and applies DefaultEventConfig to a new one.
	Events *EventConfig
	// Limits sizes the maps of a new datapath; zero fields take the
	// defaults. A re-opened datapath keeps the sizes its pinned maps have.
	Limits Limits
	// Cgroup is a cgroup v2 directory (such as
	// /sys/fs/cgroup/workloads) whose processes have service frontends
	// translated when their sockets connect and send, so that connected
	// flows need no per-packet translation and see the frontend as their
	// peer. The socket programs are attached there (moved there from where
	// an earlier Open put them); empty leaves them as they are.
	Cgroup string
}

// Limits are the capacities of a datapath's maps, fixed when it is first
// opened. A full map refuses what does not fit with ErrMapFull.
type Limits struct {
	// Endpoints is how many local endpoints the datapath holds: 1 to
	// 65535, DefaultEndpoints when 0.
	Endpoints int
	// IPCache is how many prefixes the ipcache holds (the addresses of
	// local endpoints among them): 2 to 1<<24, DefaultIPCache when 0.
	IPCache int
	// Conntrack is how many flows the datapath tracks at once (each
	// connection between two local endpoints takes two): 1024 to 1<<24,
	// DefaultConntrack when 0. Its map is allocated whole when the
	// datapath is made, about 150 bytes a flow. When it is full the least
	// recently used flow makes room.
	Conntrack int
	// Services is how many service frontends the datapath holds: 1 to
	// 65535, DefaultServices when 0.
	Services int
	// Backends is how many backends all services have together: 1 to
	// 1<<24, DefaultBackends when 0.
	Backends int
	// ServiceSlots is how many selection slots all services have
	// together, kept in blocks of 16: a random service takes about as many
	// as it has active backends (more with unequal weights), a Maglev one
	// its table size, each rounded up to 16. 1024 to 1<<26,
	// DefaultServiceSlots when 0. Entries are allocated as they are used.
	ServiceSlots int
}

// Default capacities.
const (
	DefaultEndpoints = 16384
	DefaultIPCache   = 65536
	DefaultConntrack = 131072

	DefaultServices     = 16384
	DefaultBackends     = 131072
	DefaultServiceSlots = 1 << 20
)

// ledgerSpare is room in the ledger beyond one record per endpoint: the
// datapath's own and those of later object kinds.
const ledgerSpare = 1024

func (l Limits) withDefaults() Limits {
	if l.Endpoints == 0 {
		l.Endpoints = DefaultEndpoints
	}
	if l.IPCache == 0 {
		l.IPCache = DefaultIPCache
	}
	if l.Conntrack == 0 {
		l.Conntrack = DefaultConntrack
	}
	if l.Services == 0 {
		l.Services = DefaultServices
	}
	if l.Backends == 0 {
		l.Backends = DefaultBackends
	}
	if l.ServiceSlots == 0 {
		l.ServiceSlots = DefaultServiceSlots
	}
	return l
}

func (l Limits) validate() error {
	if l.Endpoints < 0 || l.Endpoints > 65535 {
		return fmt.Errorf("limit of %d endpoints: want 1 to 65535: %w", l.Endpoints, ErrInvalid)
	}
	if l.IPCache < 0 || l.IPCache == 1 || l.IPCache > 1<<24 {
		return fmt.Errorf("limit of %d ipcache prefixes: want 2 to %d: %w", l.IPCache, 1<<24, ErrInvalid)
	}
	if l.Conntrack != 0 && (l.Conntrack < 1024 || l.Conntrack > 1<<24) {
		return fmt.Errorf("limit of %d tracked flows: want 1024 to %d: %w", l.Conntrack, 1<<24, ErrInvalid)
	}
	if l.Services < 0 || l.Services > 65535 {
		return fmt.Errorf("limit of %d services: want 1 to 65535: %w", l.Services, ErrInvalid)
	}
	if l.Backends < 0 || l.Backends > 1<<24 {
		return fmt.Errorf("limit of %d backends: want 1 to %d: %w", l.Backends, 1<<24, ErrInvalid)
	}
	if l.ServiceSlots != 0 && (l.ServiceSlots < 1024 || l.ServiceSlots > 1<<26) {
		return fmt.Errorf("limit of %d service slots: want 1024 to %d: %w", l.ServiceSlots, 1<<26, ErrInvalid)
	}
	return nil
}

// AttachMode says how tc programs are attached.
type AttachMode int

const (
	// AttachAuto uses tcx links where the kernel has them (Linux 6.6) and
	// clsact + cls_bpf otherwise.
	AttachAuto = AttachMode(attach.Auto)
	// AttachTCX uses tcx links only.
	AttachTCX = AttachMode(attach.TCX)
	// AttachLegacy uses a clsact qdisc with direct-action cls_bpf filters
	// (`tc filter add ... bpf da`), named sluice/<datapath>/<what>.
	AttachLegacy = AttachMode(attach.Legacy)
)

func (m AttachMode) String() string { return attach.Mode(m).String() }

var validName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)

func (c *Config) validate() error {
	if !validName.MatchString(c.Name) {
		return fmt.Errorf("datapath name %q: want 1 to 64 of [a-z0-9_-] starting with a letter or digit: %w", c.Name, ErrInvalid)
	}
	if c.TCAttach < AttachAuto || c.TCAttach > AttachLegacy {
		return fmt.Errorf("tc attach mode %d: %w", int(c.TCAttach), ErrInvalid)
	}
	if err := c.Node.validate(); err != nil {
		return err
	}
	if err := c.Limits.validate(); err != nil {
		return err
	}
	if c.Events != nil {
		if err := c.Events.validate(); err != nil {
			return err
		}
	}
	return nil
}

// Node describes the local node.
type Node struct {
	// PodCIDRs are the ranges local endpoints take their addresses from,
	// IPv4 and IPv6 alike. The first address of each range is the gateway
	// of the endpoints in it: it routes their traffic and no endpoint may
	// have it. An IPv4 range is at most a /30, an IPv6 range at most a /126.
	PodCIDRs []netip.Prefix
}

func (n *Node) validate() error {
	for i, p := range n.PodCIDRs {
		max := 30
		if p.Addr().Is6() {
			max = 126
		}
		if !p.IsValid() || p.Addr().Is4In6() || p != p.Masked() || p.Bits() > max {
			return fmt.Errorf("pod CIDR %s: want a network address with a prefix of at most /%d: %w", p, max, ErrInvalid)
		}
		for _, q := range n.PodCIDRs[:i] {
			if p.Overlaps(q) {
				return fmt.Errorf("pod CIDRs %s and %s overlap: %w", q, p, ErrInvalid)
			}
		}
	}
	return nil
}

// EventConfig switches drop and trace events on and off and limits how many
// the datapath sends. Counters (Metrics) are kept whatever it says.
type EventConfig struct {
	Drops  bool // report dropped packets
	Traces bool // report packets passing trace points (verbose)
	// PolicyVerdicts reports the policy verdict on every new flow
	// (allowed, denied, audited) as a PolicyEvent.
	PolicyVerdicts bool
	// RatePerCPU caps the records sent per second on each CPU; 0 means no
	// limit. Records over the limit are counted (LostEvent), not sent.
	RatePerCPU uint32
	// Burst is how many records may be sent at once above the rate (at
	// least 1 when RatePerCPU is set).
	Burst uint32
}

// DefaultEventConfig reports drops, not traces, at most 1000 a second per
// CPU with bursts of 100.
func DefaultEventConfig() EventConfig {
	return EventConfig{Drops: true, RatePerCPU: 1000, Burst: 100}
}

func (e *EventConfig) validate() error {
	if e.RatePerCPU > 1_000_000_000 {
		return fmt.Errorf("event rate %d per second: at most 1e9: %w", e.RatePerCPU, ErrInvalid)
	}
	if e.RatePerCPU != 0 && e.Burst == 0 {
		return fmt.Errorf("event burst 0 with rate %d: want at least 1: %w", e.RatePerCPU, ErrInvalid)
	}
	return nil
}
