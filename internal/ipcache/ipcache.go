// Package ipcache owns the ipcache: the LPM map from an address prefix to
// its security identity and, for a local endpoint's address, its
// interface. Several objects write it, so every write goes through
// here, under these rules:
//
//   - each entry has one writer, its Source: a local endpoint writes the
//     host prefixes of its addresses; a node (local or remote) its
//     underlay addresses; an identity assignment the prefixes it names;
//     policies their CIDR peers, with identities of their own;
//   - Put adds a prefix, or replaces one of its own source; a prefix of
//     another source is ErrOwned, so nobody overwrites, and later deletes,
//     what another object wrote;
//   - Delete removes only a prefix of its own source.
//
// The most specific prefix decides a packet's entry, so different sources
// can hold covering and covered prefixes at once.
package ipcache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/bpfobj"
)

// Source says who wrote an entry.
type Source uint8

const (
	Endpoint = Source(bpfobj.TypesIpcacheSourceIPCACHE_SOURCE_ENDPOINT)
	Node     = Source(bpfobj.TypesIpcacheSourceIPCACHE_SOURCE_NODE)
	Identity = Source(bpfobj.TypesIpcacheSourceIPCACHE_SOURCE_IDENTITY)
	CIDR     = Source(bpfobj.TypesIpcacheSourceIPCACHE_SOURCE_CIDR)
)

func (s Source) String() string {
	switch s {
	case Endpoint:
		return "endpoint"
	case Node:
		return "node"
	case Identity:
		return "identity assignment"
	case CIDR:
		return "CIDR peer"
	}
	return fmt.Sprintf("source %d", uint8(s))
}

// Entry is what the ipcache says of a prefix.
type Entry = bpfobj.TypesIpcacheValue

// ErrOwned reports a prefix another source wrote.
var ErrOwned = errors.New("prefix belongs to another writer")

// Key is the ipcache key of a prefix (see bpf/lib/ipcache.h): the family
// byte and its padding count as 32 bits of the matched prefix.
func Key(p netip.Prefix) bpfobj.TypesIpcacheKey {
	k := bpfobj.TypesIpcacheKey{Prefixlen: 32 + uint32(p.Bits())}
	if p.Addr().Is4() {
		k.Family = 4
		a := p.Addr().As4()
		copy(k.Addr[:], a[:])
	} else {
		k.Family = 6
		a := p.Addr().As16()
		copy(k.Addr[:], a[:])
	}
	return k
}

// KeyBytes is Key as the map's raw key, as the ledger records it.
func KeyBytes(p netip.Prefix) []byte {
	k := Key(p)
	b, _ := binary.Append(nil, binary.NativeEndian, &k)
	return b
}

// Lookup returns the entry of exactly prefix p, and whether there is one;
// a covering prefix's entry is not p's.
func Lookup(m *ebpf.Map, p netip.Prefix) (Entry, bool, error) {
	return lookupExact(m, Key(p), p.Bits())
}

// lookupExact looks key up and keeps the entry only if it is key's own: an
// LPM lookup returns the longest match, which is the exact entry whenever
// there is one.
func lookupExact(m *ebpf.Map, key any, bits int) (Entry, bool, error) {
	var e Entry
	err := m.Lookup(key, &e)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Entry{}, false, nil
	}
	if err != nil {
		return Entry{}, false, fmt.Errorf("look up in the ipcache: %w", err)
	}
	if int(e.PrefixLen) != bits {
		return Entry{}, false, nil
	}
	return e, true, nil
}

// Put writes the entry of prefix p for source src: a new prefix, or one
// src wrote before. A prefix of another source fails with ErrOwned and
// stays as it is.
func Put(m *ebpf.Map, p netip.Prefix, e Entry, src Source) error {
	e.Source, e.PrefixLen = uint8(src), uint8(p.Bits())
	k := Key(p)
	err := m.Update(&k, &e, ebpf.UpdateNoExist)
	if !errors.Is(err, ebpf.ErrKeyExist) {
		return err
	}
	have, ok, err := Lookup(m, p)
	if err != nil {
		return err
	}
	if ok && Source(have.Source) != src {
		return fmt.Errorf("%s: %w: the %s that wrote it", p, ErrOwned, Source(have.Source))
	}
	return m.Update(&k, &e, ebpf.UpdateAny)
}

// DeleteKey removes the entry with the raw key if src wrote it; a missing
// entry is not an error.
func DeleteKey(m *ebpf.Map, key []byte, src Source) error {
	if len(key) < 4 {
		return fmt.Errorf("ipcache key of %d bytes", len(key))
	}
	bits := int(binary.NativeEndian.Uint32(key)) - 32 // the family's bits
	have, ok, err := lookupExact(m, key, bits)
	if err != nil || !ok {
		return err
	}
	if Source(have.Source) != src {
		return nil // another writer's since: not ours to remove
	}
	if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete from the ipcache: %w", err)
	}
	return nil
}

// List returns every entry, by prefix.
func List(m *ebpf.Map) (map[netip.Prefix]Entry, error) {
	out := map[netip.Prefix]Entry{}
	var k bpfobj.TypesIpcacheKey
	var e Entry
	it := m.Iterate()
	for it.Next(&k, &e) {
		bits := int(k.Prefixlen) - 32
		var a netip.Addr
		if k.Family == 4 {
			a = netip.AddrFrom4([4]byte(k.Addr[:4]))
		} else {
			a = netip.AddrFrom16(k.Addr)
		}
		p, err := a.Prefix(bits)
		if err != nil {
			return nil, fmt.Errorf("ipcache key %+v: %w", k, err)
		}
		out[p] = e
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read the ipcache: %w", err)
	}
	return out, nil
}
