package policy

import "github.com/sluicedp/sluice/internal/bpfobj"

// This file transcribes the lookup of bpf/lib/policy.h line for line, over
// MapEntries instead of the policy and policy_meta maps. checkFunc is its
// shape, so that a test can put the real program (BPF_PROG_TEST_RUN) in its
// place.

// checkFunc decides a new flow as policy_check does.
type checkFunc func(m *MapEntries, ep uint16, dir uint8, identity uint32, proto uint8, port uint16) policyResult

const (
	policyAllowed = uint8(bpfobj.TypesPolicyVerdictPOLICY_ALLOWED)
	policyDenied  = uint8(bpfobj.TypesPolicyVerdictPOLICY_DENIED)
	policyAudited = uint8(bpfobj.TypesPolicyVerdictPOLICY_AUDITED)

	policyDeny          = uint8(bpfobj.TypesPolicyEntryFlagPOLICY_DENY)
	policyMetaAudit     = uint8(bpfobj.TypesPolicyMetaFlagPOLICY_META_AUDIT)
	policyShapeIDProto  = uint8(bpfobj.TypesPolicyShapePOLICY_SHAPE_ID_PROTO)
	policyShapeIDAny    = uint8(bpfobj.TypesPolicyShapePOLICY_SHAPE_ID_ANY)
	policyShapeAnyProto = uint8(bpfobj.TypesPolicyShapePOLICY_SHAPE_ANY_PROTO)
	policyShapeAnyAny   = uint8(bpfobj.TypesPolicyShapePOLICY_SHAPE_ANY_ANY)
	identityHost        = 1 // the emulator needs none; the header test checks it
	identityWorld       = 2
	cidrIdentityFirst   = uint32(1) << 24
	cidrIdentityLast    = (uint32(2) << 24) - 1
	policyNoRule        = 0xffff
)

type policyResult struct {
	verdict uint8
	rule    uint16
}

func policyProbe(m *MapEntries, key *bpfobj.TypesPolicyKey, res *policyResult) bool {
	e, ok := m.Entries[*key]

	if !ok {
		return false
	}
	if e.Flags&policyDeny != 0 {
		res.verdict = policyDenied
		res.rule = e.Rule
		return true
	}
	if res.verdict != policyAllowed {
		res.verdict = policyAllowed
		res.rule = e.Rule
	}
	return false
}

func policyProbePorts(m *MapEntries, key *bpfobj.TypesPolicyKey, port uint16, prefixes uint32, res *policyResult) bool {
	for k := 16; k >= 0; k-- {
		if prefixes&(1<<k) == 0 {
			continue
		}
		key.PortPrefix = uint8(k)
		if k != 0 {
			key.Port = port & uint16(0xffff<<(16-k))
		} else {
			key.Port = 0
		}
		if policyProbe(m, key, res) {
			return true
		}
	}
	return false
}

func policyProbeIdentity(m *MapEntries, key *bpfobj.TypesPolicyKey, identity uint32, proto uint8,
	port uint16, meta *bpfobj.TypesPolicyMetaValue, protoShape, anyShape uint8, res *policyResult) bool {
	key.Identity = identity
	key.Proto = proto
	if meta.Shapes&protoShape != 0 && policyProbePorts(m, key, port, meta.PortPrefixes, res) {
		return true
	}
	key.Proto = 0
	key.Port = 0
	key.PortPrefix = 0
	return meta.Shapes&anyShape != 0 && policyProbe(m, key, res)
}

func policyDecide(m *MapEntries, ep uint16, dir uint8, identity uint32, proto uint8, port uint16) uint32 {
	mk := bpfobj.TypesPolicyMetaKey{Endpoint: ep, Dir: dir}
	res := policyResult{verdict: 0, rule: policyNoRule}
	key := bpfobj.TypesPolicyKey{Endpoint: ep, Dir: dir}
	meta, ok := m.Meta[mk]

	if !ok {
		return uint32(policyAllowed)<<16 | policyNoRule /* no policy in this direction */
	}
	if policyProbeIdentity(m, &key, identity, proto, port, &meta,
		policyShapeIDProto, policyShapeIDAny, &res) {
		goto denied
	}
	if identity >= cidrIdentityFirst && identity <= cidrIdentityLast &&
		policyProbeIdentity(m, &key, identityWorld, proto, port, &meta,
			policyShapeIDProto, policyShapeIDAny, &res) {
		goto denied
	}
	if policyProbeIdentity(m, &key, 0, proto, port, &meta,
		policyShapeAnyProto, policyShapeAnyAny, &res) {
		goto denied
	}
	if res.verdict == policyAllowed {
		return uint32(policyAllowed)<<16 | uint32(res.rule)
	}
	res.verdict = policyDenied
denied:
	if meta.Flags&policyMetaAudit != 0 {
		res.verdict = policyAudited
	}
	return uint32(res.verdict)<<16 | uint32(res.rule)
}

func policyCheck(m *MapEntries, ep uint16, dir uint8, identity uint32, proto uint8, port uint16) policyResult {
	r := policyDecide(m, ep, dir, identity, proto, port)
	res := policyResult{verdict: uint8(r >> 16), rule: uint16(r & 0xffff)}

	return res
}

var _ checkFunc = policyCheck
