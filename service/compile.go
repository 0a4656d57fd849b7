package service

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"slices"

	"github.com/sluicedp/sluice/internal/bpfobj"
)

// Entries is what a service puts in the datapath's maps: its frontend, its
// backends by ID and its selection table. Compile makes them.
type Entries struct {
	Key      bpfobj.TypesLbFrontendKey
	Frontend bpfobj.TypesLbFrontend
	Backends []bpfobj.TypesLbBackend // in the order of Service.Backends
	IDs      []uint32                // the backends' IDs, in the same order
	Slots    []uint32                // backend ID per slot: of the backends that take new flows (State)
}

// backendID is the ID of a service's backend: the service's ID and a number
// the service gives its backends, so that an ID is never shared between
// services.
func backendID(service uint16, n uint16) uint32 { return uint32(service)<<16 | uint32(n) }

// Compile turns a valid service into its map entries, given the service's
// ID, which of its two selection tables to write (half, 0 or 1), and its
// backends' numbers and counter indexes (in the order of s.Backends). It
// is pure: the same input always gives the same entries.
func Compile(s *Service, id uint16, half uint32, numbers []uint16, counters []uint32) Entries {
	e := Entries{
		Key: frontendKey(s.Frontend),
		Frontend: bpfobj.TypesLbFrontend{
			Service:  uint32(id),
			Table:    2*uint32(id) + half,
			Affinity: uint32(s.Affinity.Seconds()),
		},
	}
	switch s.Reach {
	case Both:
		e.Frontend.Flags = uint32(bpfobj.TypesLbFlagLB_F_SOCKET | bpfobj.TypesLbFlagLB_F_TC)
	case SocketOnly:
		e.Frontend.Flags = uint32(bpfobj.TypesLbFlagLB_F_SOCKET)
	case TCOnly:
		e.Frontend.Flags = uint32(bpfobj.TypesLbFlagLB_F_TC)
	}
	if s.NoBackend == Reject {
		e.Frontend.Flags |= uint32(bpfobj.TypesLbFlagLB_F_REJECT)
	}
	for i, b := range s.Backends {
		e.IDs = append(e.IDs, backendID(id, numbers[i]))
		e.Backends = append(e.Backends, backendValue(b, id, counters[i]))
	}
	// The table holds the backends that take new flows: the ready ones,
	// or the terminating ones that serve when none is ready. The
	// frontend says which, for affinity and for a SYN on a tracked tuple
	// (lb_open in bpf/lib/service.h).
	usable, fallback := s.takers()
	if len(usable) == 0 {
		return e
	}
	if fallback {
		e.Frontend.Flags |= uint32(bpfobj.TypesLbFlagLB_F_FALLBACK)
	}
	// The same backends in any order make the same table.
	slices.SortFunc(usable, func(a, b int) int {
		return s.Backends[a].AddrPort().Compare(s.Backends[b].AddrPort())
	})
	if s.Algorithm == Maglev {
		e.Frontend.Flags |= uint32(bpfobj.TypesLbFlagLB_F_MAGLEV)
		mb := make([]MaglevBackend, len(usable))
		for k, i := range usable {
			mb[k] = MaglevBackend{Key: s.Backends[i].AddrPort().String(), Weight: s.Backends[i].Weight}
		}
		table, err := MaglevTable(mb, s.maglevSize())
		if err != nil {
			panic("service: Compile of a service that is not valid: " + err.Error())
		}
		e.Slots = make([]uint32, len(table))
		for slot, k := range table {
			e.Slots[slot] = e.IDs[usable[k]]
		}
	} else {
		for k, n := range randomShares(s, usable) {
			for range n {
				e.Slots = append(e.Slots, e.IDs[usable[k]])
			}
		}
	}
	e.Frontend.Slots = uint32(len(e.Slots))
	return e
}

// randomShares is how many slots each backend of usable (those that take
// new flows) takes in a random service's table: its weight divided by the
// weights' greatest common divisor, or, when those add up to more than
// maxRandomSlots, its share of maxRandomSlots (at least 1).
func randomShares(s *Service, usable []int) []int {
	g := uint(0)
	sum := 0
	for _, i := range usable {
		g = gcd(g, uint(s.Backends[i].Weight))
	}
	shares := make([]int, len(usable))
	for k, i := range usable {
		shares[k] = int(uint(s.Backends[i].Weight) / g)
		sum += shares[k]
	}
	if sum <= maxRandomSlots {
		return shares
	}
	for k := range shares {
		shares[k] = max(1, shares[k]*maxRandomSlots/sum)
	}
	return shares
}

func gcd(a, b uint) uint {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

func frontendKey(f Frontend) bpfobj.TypesLbFrontendKey {
	return bpfobj.TypesLbFrontendKey{Addr: bpfobj.Addr16(f.Addr), Port: bpfobj.NetworkOrder(f.Port), Proto: uint8(f.Protocol), Family: bpfobj.Family(f.Addr)}
}

// FlowHash is the hash the programs pick a Maglev slot by (lb_hash in
// bpf/lib/service.h): MurmurHash3 of the client's address (16 bytes, IPv4
// in the first 4), port and protocol. A flow goes to slot
// FlowHash(...) % table size.
func FlowHash(client netip.Addr, port uint16, proto Protocol) uint32 {
	a := bpfobj.Addr16(client)
	h := uint32(0)
	for i := 0; i < 16; i += 4 {
		h = mix(h, binary.NativeEndian.Uint32(a[i:]))
	}
	h = mix(h, uint32(port)<<8|uint32(proto))
	h ^= 20
	h ^= h >> 16
	h *= 0x85ebca6b
	h ^= h >> 13
	h *= 0xc2b2ae35
	h ^= h >> 16
	return h
}

func mix(h, k uint32) uint32 {
	k *= 0xcc9e2d51
	k = bits.RotateLeft32(k, 15)
	k *= 0x1b873593
	h ^= k
	h = bits.RotateLeft32(h, 13)
	return h*5 + 0xe6546b64
}
