package policy

import (
	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
)

// Decide is the datapath's policy lookup (policy_decide in
// bpf/lib/policy.h), line for line, on an endpoint's map entries: the
// verdict on a new flow in direction dir with the remote identity,
// protocol and port (ICMP: type << 8 | code), and the rule that decided
// (NoRule for none). Apply uses it to find the tracked flows a new policy
// no longer allows; tests compare it with the semantics and with the
// program.
func (m *MapEntries) Decide(endpoint uint16, dir datapath.Direction, identity datapath.Identity, proto uint8, port uint16) (datapath.Verdict, uint16) {
	meta, ok := m.Meta[bpfobj.TypesPolicyMetaKey{Endpoint: endpoint, Dir: uint8(dir)}]
	if !ok {
		return datapath.VerdictAllowed, NoRule // no policy in this direction
	}
	key := bpfobj.TypesPolicyKey{Endpoint: endpoint, Dir: uint8(dir)}
	res := decision{rule: NoRule}
	shape := func(s bpfobj.TypesPolicyShape) uint8 { return uint8(s) }
	denied := m.probeIdentity(&key, uint32(identity), proto, port, meta,
		shape(bpfobj.TypesPolicyShapePOLICY_SHAPE_ID_PROTO), shape(bpfobj.TypesPolicyShapePOLICY_SHAPE_ID_ANY), &res) ||
		(identity >= CIDRIdentityFirst && identity <= CIDRIdentityLast &&
			m.probeIdentity(&key, uint32(datapath.IdentityWorld), proto, port, meta,
				shape(bpfobj.TypesPolicyShapePOLICY_SHAPE_ID_PROTO), shape(bpfobj.TypesPolicyShapePOLICY_SHAPE_ID_ANY), &res)) ||
		m.probeIdentity(&key, 0, proto, port, meta,
			shape(bpfobj.TypesPolicyShapePOLICY_SHAPE_ANY_PROTO), shape(bpfobj.TypesPolicyShapePOLICY_SHAPE_ANY_ANY), &res)
	if !denied && res.allowed {
		return datapath.VerdictAllowed, res.rule
	}
	if meta.Flags&uint8(bpfobj.TypesPolicyMetaFlagPOLICY_META_AUDIT) != 0 {
		return datapath.VerdictAudited, res.rule
	}
	return datapath.VerdictDenied, res.rule
}

type decision struct {
	allowed bool
	rule    uint16
}

// probe is policy_probe: a deny decides (true), an allow is kept.
func (m *MapEntries) probe(key *bpfobj.TypesPolicyKey, res *decision) bool {
	e, ok := m.Entries[*key]
	if !ok {
		return false
	}
	if e.Flags&uint8(bpfobj.TypesPolicyEntryFlagPOLICY_DENY) != 0 {
		res.allowed, res.rule = false, e.Rule
		return true
	}
	if !res.allowed {
		res.allowed, res.rule = true, e.Rule
	}
	return false
}

// probePorts is policy_probe_ports.
func (m *MapEntries) probePorts(key *bpfobj.TypesPolicyKey, port uint16, prefixes uint32, res *decision) bool {
	for k := 16; k >= 0; k-- {
		if prefixes&(1<<k) == 0 {
			continue
		}
		key.PortPrefix = uint8(k)
		key.Port = 0
		if k > 0 {
			key.Port = port & uint16(0xffff<<(16-k))
		}
		if m.probe(key, res) {
			return true
		}
	}
	return false
}

// probeIdentity is policy_probe_identity.
func (m *MapEntries) probeIdentity(key *bpfobj.TypesPolicyKey, identity uint32, proto uint8, port uint16,
	meta bpfobj.TypesPolicyMetaValue, protoShape, anyShape uint8, res *decision) bool {
	key.Identity, key.Proto = identity, proto
	if meta.Shapes&protoShape != 0 && m.probePorts(key, port, meta.PortPrefixes, res) {
		return true
	}
	key.Proto, key.Port, key.PortPrefix = 0, 0, 0
	return meta.Shapes&anyShape != 0 && m.probe(key, res)
}
