package datapath

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
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
	// inspect. With no NetNS either, Open is not held to the datapath's
	// namespace, and so neither reconciles nor upgrades programs: the
	// calling thread may be in another namespace.
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
// opened: every map that holds objects is sized from them. A full map
// refuses what does not fit with ErrMapFull, and the change is not made.
// The defaults (DefaultLimits) allow 16,384 endpoints, each with a policy
// of 16 entries, 16,384 CIDR identities, and 16,384 services with 131,072
// backends together, up to 1,023 of them Maglev services with the default
// table (and so room to change any of them). Maps that are not
// preallocated (most of them: those that hold objects) take memory as
// they fill, beyond an index of 16 bytes for each entry they may hold
// rounded up to a power of two; Conntrack and the maps sized from it are
// allocated whole, and so are the backends' per-CPU counters. With the
// defaults an empty datapath takes about 60 MiB of kernel memory and 3 MiB
// more per CPU (see Capacity in docs/architecture.md).
type Limits struct {
	// Endpoints is how many local endpoints the datapath holds, each with
	// a policy or not: 1 to 65535, DefaultEndpoints when 0.
	Endpoints int
	// IPCache is how many prefixes the ipcache holds: the addresses of
	// local endpoints (one for each address family an endpoint has), CIDR
	// identities, identities assigned to prefixes. 2 to 1<<24,
	// DefaultIPCache when 0.
	IPCache int
	// Conntrack is how many flows the datapath tracks at once (each
	// connection between two local endpoints takes two): 1024 to 1<<24,
	// DefaultConntrack when 0. Its map is allocated whole when the
	// datapath is made, about 150 bytes a flow; so are the maps sized from
	// it: service affinities and socket translations (a quarter as many,
	// at least 1024 each) and fragmented datagrams in flight (a sixteenth,
	// at least 1024). When one is full the least recently used entry
	// makes room. Masqueraded flows take their own map, half as many
	// (not allocated whole); when it is full a new one is dropped
	// (ReasonSNATMapFull) until CollectFlows removes expired ones.
	Conntrack int
	// PolicyEntries is how many map entries the policies of all endpoints
	// compile to together (policy.Compile; a rule takes one for each peer
	// identity, protocol and aligned block of its port range): 1 to 1<<24,
	// DefaultPolicyEntries when 0. An Apply writes the endpoint's new
	// entries before its old ones go, so it needs room for those it adds.
	// The per-rule counters have as much room.
	PolicyEntries int
	// CIDRIdentities is how many CIDR prefixes the policies of all
	// endpoints may name together: each takes an identity, recorded in
	// the ledger, which keeps room for this many (and an ipcache entry,
	// counted in IPCache). 1 to 1<<20, DefaultCIDRIdentities when 0.
	CIDRIdentities int
	// Services is how many service frontends the datapath holds: 1 to
	// 65535, DefaultServices when 0.
	Services int
	// Backends is how many backends all services have together: 1 to
	// 1<<24, DefaultBackends when 0.
	Backends int
	// ServiceSlots is how many selection slots all services have
	// together, kept in blocks of 16: a random service takes about as many
	// as it has backends that take new flows (more with unequal weights),
	// a Maglev one its table size (16,381, 1,024 blocks, by default), each
	// rounded up to 16. A change writes the service's new table beside the
	// old one, so changing a service needs room for its table once more.
	// ServiceSlots/16,384 Maglev services of the default size fit, one
	// fewer with room to change them. 1024 to 1<<26, DefaultServiceSlots
	// when 0.
	ServiceSlots int
	// Nodes is how many remote nodes the datapath knows (package node):
	// 1 to 65535, DefaultNodes when 0. Each may have two addresses and
	// four pod CIDRs on average (node.MaxPodCIDRs at most).
	Nodes int
}

// Default capacities.
const (
	DefaultEndpoints      = 16384
	DefaultIPCache        = 65536
	DefaultConntrack      = 131072
	DefaultPolicyEntries  = 262144
	DefaultCIDRIdentities = 16384

	DefaultServices     = 16384
	DefaultBackends     = 131072
	DefaultServiceSlots = 1 << 24 // 1,024 Maglev tables of 16,381 slots

	DefaultNodes = 4096
)

// DefaultLimits returns the limits a datapath gets when Config.Limits is
// zero.
func DefaultLimits() Limits { return Limits{}.withDefaults() }

// ledgerSpare is room in the ledger beyond the records the limits allow:
// the datapath's own record, an object's record written before the map
// that refuses it, and the records of later object kinds. Limits derives
// CIDRIdentities from the ledger's size with it.
const ledgerSpare = 1024

// Room in the ledger's blobs (chunks of ledgerBlobChunk bytes): a policy
// takes about 20 to 40 bytes of encoding per entry (policyBlobBytes
// covers that, twice, for the next policy an Apply writes beside the live
// one), a service with more backends than fit its record about 100 per
// backend (serviceBlobBytes); each takes at least one chunk.
const (
	policyBlobBytes  = 2 * 40
	serviceBlobBytes = 128
	blobSpare        = 64
)

var ledgerBlobChunk = len(bpfobj.TypesLedgerBlob{}.Data)

// slotBlock is how many selection slots an lb_slots entry holds.
var slotBlock = len(bpfobj.TypesLbSlotBlock{}.Backend)

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
	if l.PolicyEntries == 0 {
		l.PolicyEntries = DefaultPolicyEntries
	}
	if l.CIDRIdentities == 0 {
		l.CIDRIdentities = DefaultCIDRIdentities
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
	if l.Nodes == 0 {
		l.Nodes = DefaultNodes
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
	if l.PolicyEntries < 0 || l.PolicyEntries > 1<<24 {
		return fmt.Errorf("limit of %d policy entries: want 1 to %d: %w", l.PolicyEntries, 1<<24, ErrInvalid)
	}
	if l.CIDRIdentities < 0 || l.CIDRIdentities > 1<<20 {
		return fmt.Errorf("limit of %d CIDR identities: want 1 to %d: %w", l.CIDRIdentities, 1<<20, ErrInvalid)
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
	if l.Nodes < 0 || l.Nodes > 65535 {
		return fmt.Errorf("limit of %d nodes: want 1 to 65535: %w", l.Nodes, ErrInvalid)
	}
	return nil
}

// ledgerRoom is how many records the ledger holds for limits (with their
// defaults) but the CIDR identities: an endpoint's and its policy's, a
// service's and the one all services share, a node's, and the spare
// (which holds the node devices' too).
func (l Limits) ledgerRoom() int {
	return 2*l.Endpoints + l.Services + 1 + l.Nodes + ledgerSpare
}

// Room in the node maps beyond what Nodes asks: the local node's pod
// CIDRs and the cluster's.
const nodeCIDRSpare = 256

// mapSizes returns the size of each map that limits (with their defaults)
// size; the event ring is sized elsewhere (ringBytes), and the maps not
// named here keep the size bpf/ gives them (one entry, or one per drop
// reason).
func (l Limits) mapSizes() map[string]uint32 {
	chunks := func(bytes int) int { return (bytes + ledgerBlobChunk - 1) / ledgerBlobChunk }
	blobs := l.Endpoints + chunks(l.PolicyEntries*policyBlobBytes) +
		l.Services + chunks(l.Backends*serviceBlobBytes) + blobSpare
	return map[string]uint32{
		bpfobj.EndpointMapEndpoints:      uint32(l.Endpoints),
		bpfobj.EndpointMapEpCounters:     uint32(l.Endpoints),
		bpfobj.EndpointMapIpcache:        uint32(l.IPCache),
		bpfobj.EndpointMapConntrack:      uint32(l.Conntrack),
		bpfobj.EndpointMapFragments:      uint32(max(l.Conntrack/16, 1024)),
		bpfobj.EndpointMapPolicy:         uint32(l.PolicyEntries),
		bpfobj.EndpointMapPolicyCounters: uint32(l.PolicyEntries),
		bpfobj.EndpointMapPolicyMeta:     uint32(2 * l.Endpoints), // one per endpoint and direction
		bpfobj.EndpointMapLedger:         uint32(l.ledgerRoom() + l.CIDRIdentities),
		bpfobj.EndpointMapLedgerBlobs:    uint32(blobs),
		bpfobj.EndpointMapLbFrontends:    uint32(l.Services),
		bpfobj.EndpointMapLbRevnat:       uint32(l.Services),
		bpfobj.EndpointMapLbBackends:     uint32(l.Backends),
		bpfobj.EndpointMapLbCounters:     uint32(l.Backends),
		bpfobj.EndpointMapLbSlots:        uint32(l.ServiceSlots / slotBlock),
		bpfobj.EndpointMapLbAffinity:     uint32(max(l.Conntrack/4, 1024)),
		bpfobj.EndpointMapLbSockRevnat:   uint32(max(l.Conntrack/4, 1024)),
		bpfobj.EndpointMapNodeAddrs:      uint32(2*l.Nodes + core.NodeAddrSpare),
		bpfobj.EndpointMapNodeCidrs:      uint32(4*l.Nodes + nodeCIDRSpare),
		bpfobj.EndpointMapSnat:           uint32(l.Conntrack), // two for each masqueraded flow
	}
}

// limitsOf returns the limits a datapath's maps were sized for, from
// their sizes.
func limitsOf(st *core.State) Limits {
	o := &st.Objs
	l := Limits{
		Endpoints:     int(o.Endpoints.MaxEntries()),
		IPCache:       int(o.Ipcache.MaxEntries()),
		Conntrack:     int(o.Conntrack.MaxEntries()),
		PolicyEntries: int(o.Policy.MaxEntries()),
		Services:      int(o.LbFrontends.MaxEntries()),
		Backends:      int(o.LbBackends.MaxEntries()),
		ServiceSlots:  int(o.LbSlots.MaxEntries()) * slotBlock,
		Nodes:         st.NodeLimit(),
	}
	// A datapath made before CIDR identities had a limit has no room of
	// its own for them.
	l.CIDRIdentities = max(int(o.Ledger.MaxEntries())-l.ledgerRoom(), 0)
	return l
}

// Limits returns the capacities of the datapath's maps: those the Limits
// of its first Open gave them, with the defaults filled in. It works on a
// read-only handle, and on a closed one.
func (dp *Datapath) Limits() Limits { return limitsOf(dp.st) }

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

// Node describes the local node: its pods, and, in a cluster, how it
// reaches the other nodes (package node adds them).
type Node struct {
	// Name is the node's name, as the other nodes know it; required with
	// a Routing other than RoutingLocal.
	Name string
	// PodCIDRs are the ranges local endpoints take their addresses from,
	// IPv4 and IPv6 alike. The first address of each range is the gateway
	// of the endpoints in it: it routes their traffic and no endpoint may
	// have it. An IPv4 range is at most a /30, an IPv6 range at most a /126.
	PodCIDRs []netip.Prefix
	// Routing says how traffic to other nodes' pods leaves: RoutingLocal
	// (the default: no other nodes), RoutingVXLAN or RoutingNative.
	Routing Routing
	// Addresses are the node's underlay addresses, IPv4 and/or IPv6: what
	// other nodes send to. Here they have the host's identity. Required
	// with a Routing other than RoutingLocal.
	Addresses []netip.Addr
	// Devices are the node's devices towards the underlay, by name; the
	// node-device program runs on each: it delivers what other nodes (and
	// the world) send to local endpoints, through their ingress policy,
	// and drops packets from outside that claim a local pod's address.
	// Required with a Routing other than RoutingLocal.
	Devices []string
	// ClusterCIDRs are the pod ranges of the whole cluster, each local pod
	// CIDR inside one (more specific): an address in them that no node's pod CIDR covers
	// is unreachable (ReasonNodeUnreachable), and a source in them is a
	// pod's, which only the overlay (or, routing natively, its node) may
	// bring. Required with a Routing other than RoutingLocal.
	ClusterCIDRs []netip.Prefix
	// TunnelPort is the UDP port of VXLAN; DefaultTunnelPort when 0.
	TunnelPort uint16
	// NoMasquerade turns masquerading off. With a routing mode, what local
	// pods send outside ClusterCIDRs leaves the node devices with the
	// node's address of its family (Addresses) and a port of the node's
	// (61000-65535), and the replies are turned back, in BPF (IPv4 and
	// IPv6; TCP, UDP and ICMP echo); a pod's traffic of a family the node
	// has no address of leaves as it is.
	NoMasquerade bool
	// MTU is the endpoints' MTU (endpoint.Spec.MTU's default): 1280 to
	// 65535, or 0 to derive it from the smallest MTU of Devices less what
	// VXLAN adds (50 bytes over IPv4, 70 over IPv6) and what Encryption
	// adds (IPsec: 60 over IPv4, 80 over IPv6; WireGuard: 60 or 80).
	// 1500 with RoutingLocal.
	MTU int
	// Encryption encrypts what goes between this node and the others:
	// EncryptionNone (the default), EncryptionIPsec or
	// EncryptionWireGuard. Every node of a cluster must use the same.
	Encryption Encryption
}

// Encryption says how traffic between nodes is encrypted: its pods'
// traffic to other nodes' pods and, over VXLAN, the tunnel itself. The
// kernel encrypts; BPF steers. See docs/architecture.md.
type Encryption int

const (
	// EncryptionNone sends in clear.
	EncryptionNone Encryption = iota
	// EncryptionIPsec encrypts with ESP in tunnel mode (the kernel's
	// xfrm), with keys derived for each pair of nodes from the cluster's
	// key set, which the caller gives every node (node.SetIPsecKeys);
	// until it has, traffic to other nodes is dropped
	// (ReasonNoKey), never sent in clear.
	EncryptionIPsec
	// EncryptionWireGuard encrypts with the kernel's WireGuard, through a
	// device the datapath makes (WireGuardDevice, UDP port
	// WireGuardPort) with a private key of its own; the caller gives each
	// remote node's public key with it (node.Node.WireGuardKey) and
	// publishes this node's (node.WireGuardPublicKey).
	EncryptionWireGuard
)

func (e Encryption) String() string {
	switch e {
	case EncryptionNone:
		return "none"
	case EncryptionIPsec:
		return "ipsec"
	case EncryptionWireGuard:
		return "wireguard"
	}
	return fmt.Sprintf("encryption(%d)", int(e))
}

// WireGuardDevice is the name of the WireGuard device the datapath makes
// in its namespace with EncryptionWireGuard; WireGuardPort its UDP port.
const (
	WireGuardDevice = "sluice_wg"
	WireGuardPort   = 51871
)

// What encryption adds to a packet between nodes, the outer IP header
// included: ESP in tunnel mode (header, IV, padding, trailer, a 16-byte
// ICV) and WireGuard (UDP, its header, a 16-byte tag).
const (
	encryptOverhead4 = 60
	encryptOverhead6 = 80
)

// Routing says how a node's endpoints reach the pods of other nodes.
type Routing int

const (
	// RoutingLocal has no other nodes: a single-node datapath.
	RoutingLocal Routing = iota
	// RoutingVXLAN encapsulates traffic to another node's pods in VXLAN,
	// through a device the datapath makes (named TunnelDevice), with the
	// sender's identity in the VNI: the receiving node enforces its
	// policy on the true source, even for an address it was never told
	// about.
	RoutingVXLAN
	// RoutingNative routes traffic to another node's pods as it is, out of
	// the node device the kernel's route names: package node installs a
	// route to each pod CIDR via its node's address, and the datapath
	// turns IP forwarding on in its namespace. A receiving node knows a
	// remote pod's identity only from the ipcache (policy.AssignIdentity).
	RoutingNative
)

func (r Routing) String() string {
	switch r {
	case RoutingLocal:
		return "local"
	case RoutingVXLAN:
		return "vxlan"
	case RoutingNative:
		return "native"
	}
	return fmt.Sprintf("routing(%d)", int(r))
}

// DefaultTunnelPort is VXLAN's UDP port unless Node.TunnelPort says
// otherwise: Linux's and Cilium's.
const DefaultTunnelPort = 8472

// TunnelDevice is the name of the VXLAN device the datapath makes in its
// namespace with RoutingVXLAN.
const TunnelDevice = "sluice_vxlan"

// VXLAN's overhead: outer IP, UDP, VXLAN and inner Ethernet headers.
const (
	vxlanOverhead4 = 20 + 8 + 8 + 14
	vxlanOverhead6 = 40 + 8 + 8 + 14
)

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
	if n.Routing < RoutingLocal || n.Routing > RoutingNative {
		return fmt.Errorf("routing mode %d: want RoutingLocal, RoutingVXLAN or RoutingNative: %w", int(n.Routing), ErrInvalid)
	}
	if n.MTU != 0 && (n.MTU < 1280 || n.MTU > 65535) {
		return fmt.Errorf("endpoint MTU %d: want 1280 (the IPv6 minimum) to 65535: %w", n.MTU, ErrInvalid)
	}
	if n.Encryption < EncryptionNone || n.Encryption > EncryptionWireGuard {
		return fmt.Errorf("encryption %d: want EncryptionNone, EncryptionIPsec or EncryptionWireGuard: %w", int(n.Encryption), ErrInvalid)
	}
	if n.Routing == RoutingLocal {
		if n.Name != "" || len(n.Addresses) > 0 || len(n.Devices) > 0 || len(n.ClusterCIDRs) > 0 || n.TunnelPort != 0 || n.NoMasquerade || n.Encryption != EncryptionNone {
			return fmt.Errorf("node %q: name, addresses, devices, cluster CIDRs, tunnel port, masquerading and encryption need a routing mode: %w", n.Name, ErrInvalid)
		}
		return nil
	}
	if !validNodeName.MatchString(n.Name) {
		return fmt.Errorf("node name %q: want 1 to 63 of [a-z0-9.-], starting and ending with a letter or digit: %w", n.Name, ErrInvalid)
	}
	if len(n.Addresses) == 0 {
		return fmt.Errorf("node %s: no address: %w", n.Name, ErrInvalid)
	}
	if err := CheckNodeAddresses(n.Addresses); err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	if len(n.Devices) == 0 {
		return fmt.Errorf("node %s: no device: %w", n.Name, ErrInvalid)
	}
	for i, d := range n.Devices {
		if d == "" || len(d) > 15 || slices.Contains(n.Devices[:i], d) || d == TunnelDevice || d == WireGuardDevice {
			return fmt.Errorf("node %s: device %q: want distinct interface names of 1 to 15 bytes, not %s or %s: %w", n.Name, d, TunnelDevice, WireGuardDevice, ErrInvalid)
		}
	}
	if len(n.ClusterCIDRs) == 0 {
		return fmt.Errorf("node %s: no cluster CIDRs: %w", n.Name, ErrInvalid)
	}
	for i, p := range n.ClusterCIDRs {
		if !p.IsValid() || p.Addr().Is4In6() || p != p.Masked() {
			return fmt.Errorf("cluster CIDR %s: want a network address: %w", p, ErrInvalid)
		}
		for _, q := range n.ClusterCIDRs[:i] {
			if p.Overlaps(q) {
				return fmt.Errorf("cluster CIDRs %s and %s overlap: %w", q, p, ErrInvalid)
			}
		}
	}
	for _, p := range n.PodCIDRs {
		if !slices.ContainsFunc(n.ClusterCIDRs, func(c netip.Prefix) bool { return c.Bits() < p.Bits() && c.Contains(p.Addr()) }) {
			return fmt.Errorf("pod CIDR %s is not inside one of the cluster CIDRs %v (nor one of them): %w", p, n.ClusterCIDRs, ErrInvalid)
		}
	}
	return nil
}

var validNodeName = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$`)

// ValidNodeName reports whether name is fit for a node: 1 to 63 of
// [a-z0-9.-], starting and ending with a letter or digit.
func ValidNodeName(name string) bool { return validNodeName.MatchString(name) }

// CheckNodeAddresses checks a node's underlay addresses: at most one
// IPv4 and one IPv6, each a unicast address (not unspecified, loopback,
// multicast or link-local). It returns an error matching ErrInvalid.
func CheckNodeAddresses(addrs []netip.Addr) error {
	var v4, v6 int
	for _, a := range addrs {
		if !a.IsValid() || a.Is4In6() || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() ||
			a.IsLinkLocalUnicast() || a.Zone() != "" || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
			return fmt.Errorf("address %s: want a unicast address: %w", a, ErrInvalid)
		}
		if a.Is4() {
			v4++
		} else {
			v6++
		}
	}
	if v4 > 1 || v6 > 1 {
		return fmt.Errorf("addresses %v: want at most one IPv4 and one IPv6: %w", addrs, ErrInvalid)
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
