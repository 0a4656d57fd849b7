package policy

import (
	"fmt"
	"math/bits"
	"net/netip"
	"slices"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
)

// Compiled is a valid policy turned into policy map entries whose CIDR
// peers still wait for their identities (see Resolve).
type Compiled struct {
	audit    bool
	dirs     [2]*compiledDir // by datapath.Direction; nil: no policy
	cidrs    []Peer          // the CIDR peers entries refer to
	prefixes []netip.Prefix
}

type compiledDir struct {
	rules   int
	entries []entry
}

// entry is a policy map entry without its endpoint and direction, and with
// its peer unresolved when it is a CIDR.
type entry struct {
	identity   uint32 // when cidr < 0
	cidr       int    // index in Compiled.cidrs, or -1
	proto      uint8
	portPrefix uint8
	port       uint16
	rule       uint16
	flags      uint8
}

// portKey is the protocol and port part of a policy map key.
type portKey struct {
	proto, prefix uint8
	port          uint16
}

// Compile checks a policy and turns it into policy map entries. It needs
// no datapath: the identities of CIDR peers come later, through Resolve.
func Compile(p Policy) (*Compiled, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	c := &Compiled{audit: p.Audit}
	prefixes := map[netip.Prefix]bool{}
	var keys []portKey
	for dir, rules := range [][]Rule{datapath.Ingress: p.Ingress, datapath.Egress: p.Egress} {
		if rules == nil {
			continue
		}
		d := &compiledDir{rules: len(rules)}
		c.dirs[dir] = d
		for i, r := range rules {
			keys = keys[:0]
			for _, port := range r.Ports {
				keys = port.appendKeys(keys)
			}
			if len(keys) == 0 {
				keys = append(keys, portKey{}) // any protocol and port
			}
			var flags uint8
			if r.Action == Deny {
				flags = uint8(bpfobj.TypesPolicyEntryFlagPOLICY_DENY)
			}
			add := func(identity uint32, cidr int) {
				for _, k := range keys {
					d.entries = append(d.entries, entry{identity: identity, cidr: cidr, proto: k.proto,
						portPrefix: k.prefix, port: k.port, rule: uint16(i), flags: flags})
				}
			}
			if len(r.Peers) == 0 {
				add(0, -1)
			}
			for _, peer := range r.Peers {
				if !peer.CIDR.IsValid() {
					add(peer.identity(), -1)
					continue
				}
				add(0, len(c.cidrs))
				c.cidrs = append(c.cidrs, Peer{CIDR: peer.CIDR, Except: slices.Clone(peer.Except)})
				prefixes[peer.CIDR] = true
				for _, e := range peer.Except {
					prefixes[e] = true
				}
			}
		}
	}
	for p := range prefixes {
		c.prefixes = append(c.prefixes, p)
	}
	slices.SortFunc(c.prefixes, netip.Prefix.Compare)
	return c, nil
}

// identity is the policy map identity of a peer that is not a CIDR.
func (p Peer) identity() uint32 {
	switch p.Reserved {
	case World:
		return uint32(datapath.IdentityWorld)
	case Host:
		return uint32(datapath.IdentityHost)
	case All:
		return 0
	case RemoteNode:
		return uint32(datapath.IdentityRemoteNode)
	}
	return uint32(p.Identity)
}

// appendKeys appends the protocol and port parts of the keys that match
// the port: one, or for a port range the fewest aligned power-of-two blocks
// that cover it exactly.
func (p Port) appendKeys(keys []portKey) []portKey {
	proto := uint8(p.Protocol)
	switch {
	case p.Protocol.isICMP() && p.ICMPType == nil:
		return append(keys, portKey{proto: proto})
	case p.Protocol.isICMP() && p.ICMPCode == nil:
		return append(keys, portKey{proto: proto, prefix: 8, port: uint16(*p.ICMPType) << 8})
	case p.Protocol.isICMP():
		return append(keys, portKey{proto: proto, prefix: 16, port: uint16(*p.ICMPType)<<8 | uint16(*p.ICMPCode)})
	case p.Protocol == AnyProtocol || p.Port == 0:
		return append(keys, portKey{proto: proto})
	}
	lo, hi := uint32(p.Port), uint32(max(p.EndPort, p.Port))
	for lo <= hi {
		size := uint32(1) << bits.TrailingZeros32(lo) // lo > 0: at most 1<<15
		for lo+size-1 > hi {
			size >>= 1
		}
		keys = append(keys, portKey{proto: proto, prefix: uint8(16 - bits.TrailingZeros32(size)), port: uint16(lo)})
		lo += size
	}
	return keys
}

// Prefixes returns the CIDR and except prefixes of the policy, sorted and
// each once: those Resolve needs an identity for.
func (c *Compiled) Prefixes() []netip.Prefix { return slices.Clone(c.prefixes) }

// Rules returns the number of rules in a direction: 0 also when there is
// no policy in it (see Enforced).
func (c *Compiled) Rules(dir datapath.Direction) int {
	if d := c.dir(dir); d != nil {
		return d.rules
	}
	return 0
}

// Enforced reports whether the policy restricts a direction (its slice of
// rules is not nil): only then are that direction's packets looked up.
func (c *Compiled) Enforced(dir datapath.Direction) bool { return c.dir(dir) != nil }

func (c *Compiled) dir(dir datapath.Direction) *compiledDir {
	if int(dir) >= len(c.dirs) {
		return nil
	}
	return c.dirs[dir]
}

// MapEntries are an endpoint's entries in the datapath's policy and
// policy_meta maps.
type MapEntries struct {
	Entries map[bpfobj.TypesPolicyKey]bpfobj.TypesPolicyEntry
	// Meta holds one value per direction that has a policy.
	Meta map[bpfobj.TypesPolicyMetaKey]bpfobj.TypesPolicyMetaValue
}

// Resolve returns the map entries of the policy for an endpoint, given the
// CIDR identities the datapath gave prefixes.
//
// ids must hold an identity, from CIDRIdentityFirst to CIDRIdentityLast and
// each its own, for every prefix of Prefixes. It should hold every prefix
// the datapath's ipcache gives a CIDR identity, from any policy: a packet
// carries the identity of the most specific prefix that holds its address,
// so a CIDR peer's entries also name the prefixes inside it, save those
// inside its excepts (an except gets no entry of its own). A prefix added
// to the ipcache later therefore calls for resolving again the policies
// with a CIDR around it, best before the ipcache entry is written.
func (c *Compiled) Resolve(endpoint uint16, ids map[netip.Prefix]datapath.Identity) (*MapEntries, error) {
	if endpoint == 0 {
		return nil, fmt.Errorf("policy: endpoint 0: want 1 to 65535: %w", datapath.ErrInvalid)
	}
	cidrIDs, err := c.resolveCIDRs(ids)
	if err != nil {
		return nil, err
	}
	m, size := newMapEntries(), 0
	for _, d := range c.dirs {
		if d != nil {
			size += len(d.entries)
		}
	}
	m.Entries = make(map[bpfobj.TypesPolicyKey]bpfobj.TypesPolicyEntry, size)
	for dir, d := range c.dirs {
		if d == nil {
			continue
		}
		var meta bpfobj.TypesPolicyMetaValue
		if c.audit {
			meta.Flags = uint8(bpfobj.TypesPolicyMetaFlagPOLICY_META_AUDIT)
		}
		key := bpfobj.TypesPolicyKey{Endpoint: endpoint, Dir: uint8(dir)}
		for _, e := range d.entries {
			key.Proto, key.Port, key.PortPrefix = e.proto, e.port, e.portPrefix
			val := bpfobj.TypesPolicyEntry{Rule: e.rule, Flags: e.flags}
			if e.cidr < 0 {
				key.Identity = e.identity
				m.put(key, val, &meta)
				continue
			}
			for _, id := range cidrIDs[e.cidr] {
				key.Identity = id
				m.put(key, val, &meta)
			}
		}
		m.Meta[bpfobj.TypesPolicyMetaKey{Endpoint: endpoint, Dir: uint8(dir)}] = meta
	}
	return m, nil
}

// put adds an entry unless the key has one that wins: a deny over an
// allow, else the lower rule index, which came first. It records the
// entry's shape and port prefix in meta.
func (m *MapEntries) put(k bpfobj.TypesPolicyKey, v bpfobj.TypesPolicyEntry, meta *bpfobj.TypesPolicyMetaValue) {
	const deny = uint8(bpfobj.TypesPolicyEntryFlagPOLICY_DENY)
	if old, ok := m.Entries[k]; ok && (old.Flags&deny != 0 || v.Flags&deny == 0) {
		return
	}
	m.Entries[k] = v
	var shape bpfobj.TypesPolicyShape
	switch {
	case k.Identity != 0 && k.Proto != 0:
		shape = bpfobj.TypesPolicyShapePOLICY_SHAPE_ID_PROTO
	case k.Identity != 0:
		shape = bpfobj.TypesPolicyShapePOLICY_SHAPE_ID_ANY
	case k.Proto != 0:
		shape = bpfobj.TypesPolicyShapePOLICY_SHAPE_ANY_PROTO
	default:
		shape = bpfobj.TypesPolicyShapePOLICY_SHAPE_ANY_ANY
	}
	meta.Shapes |= uint8(shape)
	if k.Proto != 0 {
		meta.PortPrefixes |= 1 << k.PortPrefix
	}
}

// resolveCIDRs checks ids and returns, for each CIDR peer, the identities
// its entries name: the CIDR's own and those of the prefixes inside it but
// outside its excepts.
func (c *Compiled) resolveCIDRs(ids map[netip.Prefix]datapath.Identity) ([][]uint32, error) {
	invalid := func(format string, args ...any) error {
		return fmt.Errorf("policy: CIDR identities: %s: %w", fmt.Sprintf(format, args...), datapath.ErrInvalid)
	}
	for _, p := range c.prefixes {
		if _, ok := ids[p]; !ok {
			return nil, invalid("no identity for %s", p)
		}
	}
	if len(c.cidrs) == 0 {
		return nil, nil
	}
	known := make([]netip.Prefix, 0, len(ids))
	owner := make(map[datapath.Identity]netip.Prefix, len(ids))
	for p, id := range ids {
		if err := checkPrefix("prefix", p); err != nil {
			return nil, invalid("%v", err)
		}
		if id < CIDRIdentityFirst || id > CIDRIdentityLast {
			return nil, invalid("%s has identity %s: want %d to %d", p, id, CIDRIdentityFirst, CIDRIdentityLast)
		}
		if q, ok := owner[id]; ok {
			return nil, invalid("%s and %s both have identity %s", min(p.String(), q.String()), max(p.String(), q.String()), id)
		}
		owner[id] = p
		known = append(known, p)
	}
	slices.SortFunc(known, byAddress)
	out := make([][]uint32, len(c.cidrs))
	for i, peer := range c.cidrs {
		at, _ := slices.BinarySearchFunc(known, peer.CIDR, byAddress)
		out[i] = []uint32{uint32(ids[peer.CIDR])}
	inner:
		for _, q := range known[at+1:] {
			if !peer.CIDR.Contains(q.Addr()) {
				break
			}
			for _, e := range peer.Except {
				if e.Bits() <= q.Bits() && e.Contains(q.Addr()) {
					continue inner
				}
			}
			out[i] = append(out[i], uint32(ids[q]))
		}
	}
	return out, nil
}

// byAddress orders prefixes by address, then length, so that the prefixes
// inside a prefix follow it.
func byAddress(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}
