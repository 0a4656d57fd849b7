package packet

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// Describe summarizes the head of an Ethernet frame on one line, in the
// spirit of tcpdump: "198.18.0.2:40000 > 198.18.0.3:80 TCP [S]". It never
// fails: what it cannot parse it says so.
func Describe(frame []byte) string {
	if len(frame) < 14 {
		return fmt.Sprintf("truncated frame (%d bytes)", len(frame))
	}
	et := binary.BigEndian.Uint16(frame[12:14])
	p := frame[14:]
	switch et {
	case EtherTypeARP:
		return describeARP(p)
	case EtherTypeIPv4:
		return describeIPv4(p)
	case EtherTypeIPv6:
		return describeIPv6(p)
	}
	return fmt.Sprintf("%s > %s ethertype %#04x", net.HardwareAddr(frame[6:12]), net.HardwareAddr(frame[0:6]), et)
}

func describeARP(p []byte) string {
	if len(p) < 28 {
		return "ARP (truncated)"
	}
	sender, _ := netip.AddrFromSlice(p[14:18])
	target, _ := netip.AddrFromSlice(p[24:28])
	switch binary.BigEndian.Uint16(p[6:8]) {
	case 1:
		return fmt.Sprintf("ARP who-has %s tell %s", target, sender)
	case 2:
		return fmt.Sprintf("ARP %s is-at %s", sender, net.HardwareAddr(p[8:14]))
	}
	return fmt.Sprintf("ARP op %d %s > %s", binary.BigEndian.Uint16(p[6:8]), sender, target)
}

func describeIPv4(p []byte) string {
	if len(p) < 20 || p[0]>>4 != 4 || int(p[0]&0x0f)*4 < 20 {
		return "IPv4 (truncated or malformed)"
	}
	src, _ := netip.AddrFromSlice(p[12:16])
	dst, _ := netip.AddrFromSlice(p[16:20])
	ihl := int(p[0]&0x0f) * 4
	if len(p) < ihl {
		return fmt.Sprintf("%s > %s IPv4 (truncated)", src, dst)
	}
	return describeL4(src, dst, p[9], p[ihl:])
}

func describeIPv6(p []byte) string {
	if len(p) < 40 || p[0]>>4 != 6 {
		return "IPv6 (truncated or malformed)"
	}
	src, _ := netip.AddrFromSlice(p[8:24])
	dst, _ := netip.AddrFromSlice(p[24:40])
	return describeL4(src, dst, p[6], p[40:])
}

func describeL4(src, dst netip.Addr, proto uint8, p []byte) string {
	switch proto {
	case ProtoTCP, ProtoUDP:
		name := "UDP"
		if proto == ProtoTCP {
			name = "TCP"
		}
		if len(p) < 4 {
			return fmt.Sprintf("%s > %s %s (truncated)", src, dst, name)
		}
		s := netip.AddrPortFrom(src, binary.BigEndian.Uint16(p[0:2]))
		d := netip.AddrPortFrom(dst, binary.BigEndian.Uint16(p[2:4]))
		out := fmt.Sprintf("%s > %s %s", s, d, name)
		if proto == ProtoTCP && len(p) >= 14 {
			out += " [" + tcpFlags(p[13]) + "]"
		}
		return out
	case ProtoICMP, ProtoICMPv6:
		name := "ICMP"
		if proto == ProtoICMPv6 {
			name = "ICMPv6"
		}
		if len(p) < 2 {
			return fmt.Sprintf("%s > %s %s (truncated)", src, dst, name)
		}
		return fmt.Sprintf("%s > %s %s %s", src, dst, name, icmpName(proto, p[0], p[1]))
	}
	return fmt.Sprintf("%s > %s proto %d", src, dst, proto)
}

func tcpFlags(f uint8) string {
	var b strings.Builder
	for _, fl := range []struct {
		bit  uint8
		name byte
	}{{SYN, 'S'}, {FIN, 'F'}, {RST, 'R'}, {PSH, 'P'}, {ACK, '.'}} {
		if f&fl.bit != 0 {
			b.WriteByte(fl.name)
		}
	}
	return b.String()
}

func icmpName(proto, typ, code uint8) string {
	switch {
	case proto == ProtoICMP && typ == ICMPEchoRequest, proto == ProtoICMPv6 && typ == ICMPv6EchoRequest:
		return "echo request"
	case proto == ProtoICMP && typ == ICMPEchoReply, proto == ProtoICMPv6 && typ == ICMPv6EchoReply:
		return "echo reply"
	}
	return fmt.Sprintf("type %d code %d", typ, code)
}
