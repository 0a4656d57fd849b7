// Package packet builds and describes Ethernet frames: crafted frames for
// BPF_PROG_TEST_RUN and tests, one-line summaries for datapath events.
package packet

import (
	"encoding/binary"
	"net"
	"net/netip"
)

// EtherTypes and IP protocol numbers the datapath handles.
const (
	EtherTypeIPv4 = 0x0800
	EtherTypeARP  = 0x0806
	EtherTypeIPv6 = 0x86dd

	ProtoICMP   = 1
	ProtoTCP    = 6
	ProtoUDP    = 17
	ProtoICMPv6 = 58
)

// A Layer is one header of a frame. Build asks each layer to put itself in
// front of the bytes of the layers after it.
type Layer interface {
	// prepend returns the layer's header followed by payload. outer is the
	// layer before it (for L4 pseudo-headers), inner the one after it (to
	// infer a protocol number); either may be nil.
	prepend(payload []byte, outer, inner Layer) []byte
}

// Build serializes layers, outermost first, filling in lengths, protocol
// numbers and checksums: Build(&Ethernet{...}, &IPv4{...}, &UDP{...}, Payload("hi")).
func Build(layers ...Layer) []byte {
	var b []byte
	for i := len(layers) - 1; i >= 0; i-- {
		var outer, inner Layer
		if i > 0 {
			outer = layers[i-1]
		}
		if i+1 < len(layers) {
			inner = layers[i+1]
		}
		b = layers[i].prepend(b, outer, inner)
	}
	return b
}

// Payload is raw bytes at the end of a frame.
type Payload []byte

func (p Payload) prepend(payload []byte, _, _ Layer) []byte {
	return append(append([]byte{}, p...), payload...)
}

// Ethernet is an Ethernet II header. EtherType is inferred from the next
// layer when zero.
type Ethernet struct {
	Src, Dst  net.HardwareAddr
	EtherType uint16
}

func (e *Ethernet) prepend(payload []byte, _, inner Layer) []byte {
	et := e.EtherType
	if et == 0 {
		switch inner.(type) {
		case *IPv4:
			et = EtherTypeIPv4
		case *IPv6:
			et = EtherTypeIPv6
		case *ARP:
			et = EtherTypeARP
		}
	}
	h := make([]byte, 14, 14+len(payload))
	copy(h[0:6], mac(e.Dst))
	copy(h[6:12], mac(e.Src))
	binary.BigEndian.PutUint16(h[12:14], et)
	return append(h, payload...)
}

func mac(m net.HardwareAddr) []byte {
	if len(m) == 6 {
		return m
	}
	return make([]byte, 6)
}

// ARP is an Ethernet/IPv4 ARP packet. Op is 1 (request) or 2 (reply).
type ARP struct {
	Op                   uint16
	SenderMAC, TargetMAC net.HardwareAddr
	SenderIP, TargetIP   netip.Addr
}

func (a *ARP) prepend(payload []byte, _, _ Layer) []byte {
	h := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint16(h[0:2], 1) // Ethernet
	binary.BigEndian.PutUint16(h[2:4], EtherTypeIPv4)
	h[4], h[5] = 6, 4
	binary.BigEndian.PutUint16(h[6:8], a.Op)
	copy(h[8:14], mac(a.SenderMAC))
	copy(h[14:18], ip4(a.SenderIP))
	copy(h[18:24], mac(a.TargetMAC))
	copy(h[24:28], ip4(a.TargetIP))
	return append(h, payload...)
}

func ip4(a netip.Addr) []byte {
	if a.Is4() {
		b := a.As4()
		return b[:]
	}
	return make([]byte, 4)
}

// IPv4 is an IPv4 header without options. Protocol is inferred from the next
// layer when zero; TTL defaults to 64. A fragment has its offset (in
// 8-byte units) and says whether more follow.
type IPv4 struct {
	Src, Dst      netip.Addr
	Protocol      uint8
	TTL           uint8
	ID            uint16
	FragOffset    uint16
	MoreFragments bool
	TOS           uint8 // DSCP and ECN
}

func (ip *IPv4) prepend(payload []byte, _, inner Layer) []byte {
	h := make([]byte, 20, 20+len(payload))
	h[0] = 0x45
	h[1] = ip.TOS
	binary.BigEndian.PutUint16(h[2:4], uint16(20+len(payload)))
	binary.BigEndian.PutUint16(h[4:6], ip.ID)
	frag := ip.FragOffset & 0x1fff
	if ip.MoreFragments {
		frag |= 0x2000
	}
	binary.BigEndian.PutUint16(h[6:8], frag)
	h[8] = ip.TTL
	if h[8] == 0 {
		h[8] = 64
	}
	h[9] = ip.Protocol
	if h[9] == 0 {
		h[9] = l4Proto(inner, false)
	}
	copy(h[12:16], ip4(ip.Src))
	copy(h[16:20], ip4(ip.Dst))
	binary.BigEndian.PutUint16(h[10:12], checksum(h, 0))
	return append(h, payload...)
}

// IPv6 is an IPv6 header without extension headers. NextHeader is inferred
// from the next layer when zero; HopLimit defaults to 64.
type IPv6 struct {
	Src, Dst   netip.Addr
	NextHeader uint8
	HopLimit   uint8
}

func (ip *IPv6) prepend(payload []byte, _, inner Layer) []byte {
	h := make([]byte, 40, 40+len(payload))
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:6], uint16(len(payload)))
	h[6] = ip.NextHeader
	if h[6] == 0 {
		h[6] = l4Proto(inner, true)
	}
	h[7] = ip.HopLimit
	if h[7] == 0 {
		h[7] = 64
	}
	s, d := ip.Src.As16(), ip.Dst.As16()
	copy(h[8:24], s[:])
	copy(h[24:40], d[:])
	return append(h, payload...)
}

func l4Proto(inner Layer, v6 bool) uint8 {
	switch inner.(type) {
	case *TCP:
		return ProtoTCP
	case *UDP:
		return ProtoUDP
	case *ICMP:
		if v6 {
			return ProtoICMPv6
		}
		return ProtoICMP
	}
	return 0
}

// UDP is a UDP header; its checksum is computed when it follows an IP layer.
type UDP struct {
	SrcPort, DstPort uint16
}

func (u *UDP) prepend(payload []byte, outer, _ Layer) []byte {
	h := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(h[0:2], u.SrcPort)
	binary.BigEndian.PutUint16(h[2:4], u.DstPort)
	binary.BigEndian.PutUint16(h[4:6], uint16(8+len(payload)))
	b := append(h, payload...)
	sum := checksum(b, pseudoSum(outer, ProtoUDP, len(b)))
	if sum == 0 {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(b[6:8], sum)
	return b
}

// TCP flags.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	PSH = 0x08
	ACK = 0x10
)

// TCP is a TCP header without options.
type TCP struct {
	SrcPort, DstPort uint16
	Seq, Ack         uint32
	Flags            uint8
	Window           uint16
}

func (t *TCP) prepend(payload []byte, outer, _ Layer) []byte {
	h := make([]byte, 20, 20+len(payload))
	binary.BigEndian.PutUint16(h[0:2], t.SrcPort)
	binary.BigEndian.PutUint16(h[2:4], t.DstPort)
	binary.BigEndian.PutUint32(h[4:8], t.Seq)
	binary.BigEndian.PutUint32(h[8:12], t.Ack)
	h[12] = 5 << 4
	h[13] = t.Flags
	w := t.Window
	if w == 0 {
		w = 65535
	}
	binary.BigEndian.PutUint16(h[14:16], w)
	b := append(h, payload...)
	binary.BigEndian.PutUint16(b[16:18], checksum(b, pseudoSum(outer, ProtoTCP, len(b))))
	return b
}

// ICMP is an ICMP (after IPv4) or ICMPv6 (after IPv6) header with the echo
// identifier and sequence number in its rest-of-header.
type ICMP struct {
	Type, Code uint8
	ID, Seq    uint16
}

// Echo request types.
const (
	ICMPEchoRequest   = 8
	ICMPEchoReply     = 0
	ICMPv6EchoRequest = 128
	ICMPv6EchoReply   = 129
)

func (c *ICMP) prepend(payload []byte, outer, _ Layer) []byte {
	h := make([]byte, 8, 8+len(payload))
	h[0], h[1] = c.Type, c.Code
	binary.BigEndian.PutUint16(h[4:6], c.ID)
	binary.BigEndian.PutUint16(h[6:8], c.Seq)
	b := append(h, payload...)
	var initial uint32
	if _, v6 := outer.(*IPv6); v6 {
		initial = pseudoSum(outer, ProtoICMPv6, len(b))
	}
	binary.BigEndian.PutUint16(b[2:4], checksum(b, initial))
	return b
}

// pseudoSum is the partial sum of the IPv4 or IPv6 pseudo-header.
func pseudoSum(outer Layer, proto uint8, length int) uint32 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
	}
	switch ip := outer.(type) {
	case *IPv4:
		add(ip4(ip.Src))
		add(ip4(ip.Dst))
	case *IPv6:
		s, d := ip.Src.As16(), ip.Dst.As16()
		add(s[:])
		add(d[:])
	default:
		return 0
	}
	return sum + uint32(proto) + uint32(length)
}

// checksum is the Internet checksum of b, starting from a partial sum.
func checksum(b []byte, sum uint32) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = (sum >> 16) + (sum & 0xffff)
	}
	return ^uint16(sum)
}
