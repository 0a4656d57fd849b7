// Package endpoint connects workloads to the datapath. An endpoint is one
// workload (a pod, a container, a VM's tap, any network namespace) joined to
// the node by a veth pair, as Cilium's lxc endpoints are: the workload end
// (eth0) lives in the workload's namespace, the host end in the datapath's,
// and the from-endpoint program runs on the host end's tcx ingress.
//
// What the datapath does with an endpoint's packets:
//   - anti-spoofing: a packet whose source MAC or IP is not the endpoint's is
//     dropped (SPOOFED_SOURCE_MAC, SPOOFED_SOURCE_IP), and so are VLAN-tagged
//     frames (VLAN_TAGGED) and IP-in-IP or GRE, whose inner source nothing
//     checks (TUNNELED); docs/architecture.md lists every check and the
//     link-scope IPv6 traffic (neighbour discovery, MLD) that passes;
//   - local forwarding: a packet to another endpoint on the node is handed
//     straight to that endpoint's namespace (bpf_redirect_peer), without the
//     host stack, its TTL lowered by one as a router would;
//   - anything else goes to the host stack.
//
// The workload reaches everything through a gateway: the first address of
// the pod CIDR its address is in (datapath.Node.PodCIDRs). Its address is a
// /32 (IPv4) or /128 (IPv6), its default route goes via the gateway "onlink",
// and the gateway resolves through a permanent neighbour entry to the MAC of
// the host end — no ARP responder and no address on the host end are needed.
//
// All of an endpoint's state lives in the datapath's pinned maps, so a
// process that re-opens the datapath finds its endpoints with Get and List.
package endpoint

import (
	"net"
	"net/netip"

	"github.com/sluicedp/sluice/datapath"
)

// MaxID is the largest endpoint ID.
const MaxID = 65535

// Spec describes an endpoint to create.
type Spec struct {
	// ID identifies the endpoint in the datapath: 1 to MaxID, unique.
	ID uint16
	// IPv4 and IPv6 are the endpoint's addresses; at least one is needed,
	// each inside one of the datapath's pod CIDRs.
	IPv4, IPv6 netip.Addr
	// MAC is the workload end's address; when empty, a locally administered
	// one derived from the datapath's name and the ID, the same every time.
	// Required when adopting an interface.
	MAC net.HardwareAddr
	// Identity is the endpoint's security identity, at least
	// datapath.MinIdentity.
	Identity datapath.Identity
	// Labels are free-form, for display; about 1 KiB in all at most (the
	// endpoint's ledger record, labels included, must fit 2 KiB).
	Labels map[string]string

	// NetNS is the workload's network namespace: a name under /run/netns,
	// created when missing (and then removed by Delete), or a path such as
	// /proc/PID/ns/net, which must exist. Exactly one of NetNS and
	// Interface is set.
	NetNS string
	// IfName names the workload end; "eth0" when empty.
	IfName string
	// HostIfName names the host end; "sl-ep<ID>" when empty.
	HostIfName string
	// MTU of both ends; when 0, the node's (datapath.Node.MTU, derived
	// from its devices in a cluster), or 1500.
	MTU int

	// Interface adopts an existing host-side veth instead of creating one
	// (as a CNI plugin that made the pair itself would): sluice attaches to
	// it and registers the endpoint, but configures nothing inside the
	// workload and leaves the device in place on Delete. The workload must
	// route via the gateway to HostMAC (see Endpoint). Leave the interface
	// down: Create sets it up once the program is attached, and whatever an
	// interface that is up carries before that reaches the host unchecked.
	Interface string
}

// Endpoint is an endpoint as the datapath has it.
type Endpoint struct {
	Spec // as created, defaults filled in (MAC, IfName, HostIfName, MTU)

	// HostIfindex is the host end's interface index in the datapath's
	// namespace.
	HostIfindex int
	// HostMAC is the host end's MAC: the gateway's, for the workload.
	HostMAC net.HardwareAddr
	// Gateway4 and Gateway6 are the workload's gateways (invalid for a
	// family the endpoint lacks).
	Gateway4, Gateway6 netip.Addr
	// OwnsNetNS is true when Create made the namespace and Delete removes it.
	OwnsNetNS bool
}

// Adopted reports whether the endpoint uses a host interface it did not make.
func (e *Endpoint) Adopted() bool { return e.Interface != "" }

// Changes are what Update may change; zero fields stay as they are.
type Changes struct {
	// Identity, when not zero, replaces the endpoint's identity.
	Identity datapath.Identity
	// Labels, when not nil, replace the endpoint's labels; an empty map
	// clears them.
	Labels map[string]string
}

// Counters are an endpoint's packet and byte counts, summed over CPUs. Out
// counts what the workload sent, In what the datapath delivered to it.
type Counters struct {
	PacketsOut, BytesOut uint64
	PacketsIn, BytesIn   uint64
}
