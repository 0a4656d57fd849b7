package bpfobj

import (
	"encoding/binary"
	"net/netip"
)

// Addr16 is an address as the maps keep it: 16 bytes, IPv4 in the first 4.
func Addr16(a netip.Addr) [16]byte {
	if a.Is4() {
		var out [16]byte
		b := a.As4()
		copy(out[:], b[:])
		return out
	}
	return a.As16()
}

// Family is an address's family as the maps keep it: 4 or 6.
func Family(a netip.Addr) uint8 {
	if a.Is4() {
		return 4
	}
	return 6
}

// NetworkOrder is a port as the maps keep it: network byte order in a
// native uint16.
func NetworkOrder(port uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], port)
	return binary.NativeEndian.Uint16(b[:])
}
