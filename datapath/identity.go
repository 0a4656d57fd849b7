package datapath

import "fmt"

// Identity is a numeric security identity: the name policy uses for a set
// of workloads. The caller chooses identities; sluice only carries them.
// Identities below MinIdentity are reserved.
type Identity uint32

// Reserved identities, as Cilium numbers them.
const (
	// IdentityUnknown is no identity; never valid for an endpoint.
	IdentityUnknown Identity = 0
	// IdentityHost is the node itself.
	IdentityHost Identity = 1
	// IdentityWorld is any address outside the cluster.
	IdentityWorld Identity = 2
	// IdentityUnmanaged is a local workload sluice does not manage.
	IdentityUnmanaged Identity = 3
	// IdentityRemoteNode is another node of the cluster (package node):
	// its underlay addresses, and what it sends itself over VXLAN.
	IdentityRemoteNode Identity = 6
	// MinIdentity is the first identity an endpoint may have.
	MinIdentity Identity = 256
)

func (id Identity) String() string {
	switch id {
	case IdentityUnknown:
		return "unknown"
	case IdentityHost:
		return "host"
	case IdentityWorld:
		return "world"
	case IdentityUnmanaged:
		return "unmanaged"
	case IdentityRemoteNode:
		return "remote-node"
	}
	if id < MinIdentity {
		return fmt.Sprintf("reserved:%d", uint32(id))
	}
	return fmt.Sprintf("%d", uint32(id))
}
