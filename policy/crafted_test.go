package policy_test

import (
	"encoding/binary"
	"testing"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/policy"
)

// TestCraftedFrames is the table of every frame shape we know of, each
// with the verdict the datapath owes it: the place to add the next one.
// Endpoint b takes UDP 53 from a and nothing else, so a shape that
// misleads the parser about ports or protocol shows as a wrong verdict.
func TestCraftedFrames(t *testing.T) {
	n := newNode(t)
	a, b, c := n.a, n.b, n.c
	apply(t, n, b, policy.Policy{Ingress: []policy.Rule{{Peers: fromID(a.Identity), Ports: []policy.Port{{Protocol: policy.UDP, Port: 53}}}}})
	e := eth(a, false)
	udp := func(dport uint16) *packet.UDP { return &packet.UDP{SrcPort: 4000, DstPort: dport} }
	v4 := func(l ...packet.Layer) []byte {
		return packet.Build(append([]packet.Layer{e, &packet.IPv4{Src: a.IPv4, Dst: b.IPv4}}, l...)...)
	}
	v6 := func(next uint8, l ...packet.Layer) []byte {
		return packet.Build(append([]packet.Layer{e, &packet.IPv6{Src: a.IPv6, Dst: b.IPv6, NextHeader: next}}, l...)...)
	}
	patch := func(f []byte, off int, v ...byte) []byte {
		f = append([]byte(nil), f...)
		copy(f[off:], v)
		return f
	}
	tag := func(f []byte, tpids ...uint16) []byte {
		out := append([]byte(nil), f[:12]...)
		for _, tpid := range tpids {
			out = binary.BigEndian.AppendUint16(out, tpid)
			out = binary.BigEndian.AppendUint16(out, 100)
		}
		return append(out, f[12:]...)
	}
	// withOptions is an IPv4 packet whose header carries four NOP options.
	withOptions := func(dport uint16) []byte {
		f := v4(udp(dport))
		ip := append([]byte(nil), f[14:34]...)
		ip[0] = 0x46
		binary.BigEndian.PutUint16(ip[2:], uint16(len(f)-14+4))
		ip[10], ip[11] = 0, 0
		out := append(append(append([]byte(nil), f[:14]...), ip...), 1, 1, 1, 1)
		out = append(out, f[34:]...)
		sum := uint32(0)
		for i := 14; i < 38; i += 2 {
			sum += uint32(binary.BigEndian.Uint16(out[i:]))
		}
		for sum > 0xffff {
			sum = sum&0xffff + sum>>16
		}
		binary.BigEndian.PutUint16(out[24:], ^uint16(sum))
		return out
	}
	// ext is an IPv6 extension header (8 bytes) whose next header is next.
	ext := func(next uint8) packet.Payload { return packet.Payload{next, 0, 1, 4, 0, 0, 0, 0} }
	spoofed4 := &packet.IPv4{Src: c.IPv4, Dst: b.IPv4}
	spoofed6 := &packet.IPv6{Src: c.IPv6, Dst: b.IPv6}
	// An UDP-encapsulated (VXLAN) Ethernet frame with a forged inner source.
	vxlan := append([]byte{8, 0, 0, 0, 0, 0, 100, 0}, packet.Build(&packet.Ethernet{Src: c.MAC, Dst: b.MAC}, spoofed4, udp(53))...)

	const (
		malformed = datapath.ReasonMalformed
		tunneled  = datapath.ReasonTunneled
		policyDen = datapath.ReasonPolicyDenied
	)
	n.crafted(t, []step{
		// Layer 2.
		{name: "802.1Q tag", from: a, frame: tag(v4(udp(53)), 0x8100), verdict: dr, reason: datapath.ReasonVLANTagged, dir: out},
		{name: "QinQ tags", from: a, frame: tag(v4(udp(53)), 0x88a8, 0x8100), verdict: dr, reason: datapath.ReasonVLANTagged, dir: out},
		// IPv4 headers.
		{name: "IPv4 options, port 53", from: a, frame: withOptions(53), verdict: red, reason: fwd, dir: out},
		{name: "IPv4 options, port 54", from: a, frame: withOptions(54), verdict: dr, reason: policyDen, dir: in},
		{name: "IHL 15 in a short packet", from: a, frame: patch(v4(udp(53)), 14, 0x4f), verdict: dr, reason: malformed, dir: out},
		{name: "IHL 4", from: a, frame: patch(v4(udp(53)), 14, 0x44), verdict: dr, reason: malformed, dir: out},
		{name: "total length past the packet", from: a, frame: patch(v4(udp(53)), 16, 0x07, 0xd0), verdict: dr, reason: malformed, dir: out},
		{name: "total length inside the header", from: a, frame: patch(v4(udp(53)), 16, 0, 19), verdict: dr, reason: malformed, dir: out},
		// IPv6 extension header chains.
		{name: "four extension headers, port 53", from: a, frame: v6(0, packet.Payload(append(append(append(ext(60), ext(60)...), ext(60)...), ext(17)...)), udp(53)),
			verdict: red, reason: fwd, dir: out},
		{name: "four extension headers, port 54", from: a, frame: v6(0, packet.Payload(append(append(append(ext(60), ext(60)...), ext(60)...), ext(17)...)), udp(54)),
			verdict: dr, reason: policyDen, dir: in},
		{name: "five extension headers", from: a, frame: v6(0, packet.Payload(append(append(append(append(ext(60), ext(60)...), ext(60)...), ext(60)...), ext(17)...)), udp(53)),
			verdict: dr, reason: malformed, dir: out},
		{name: "extension header cut short", from: a, frame: v6(60, packet.Payload{17, 4}), verdict: dr, reason: malformed, dir: out},
		// Tunnels with a forged inner source.
		{name: "IPv4 in IPv4", from: a, frame: v4(spoofed4, udp(53)), verdict: dr, reason: tunneled, dir: out},
		{name: "GRE", from: a, frame: packet.Build(e, &packet.IPv4{Src: a.IPv4, Dst: b.IPv4, Protocol: 47}, packet.Payload{0, 0, 8, 0}, spoofed4, udp(53)),
			verdict: dr, reason: tunneled, dir: out},
		{name: "EtherIP", from: a, frame: packet.Build(e, &packet.IPv4{Src: a.IPv4, Dst: b.IPv4, Protocol: 97}, packet.Payload{0x30, 0},
			&packet.Ethernet{Src: c.MAC, Dst: b.MAC}, spoofed4, udp(53)), verdict: dr, reason: tunneled, dir: out},
		{name: "IPv6 in IPv6 behind a routing header", from: a, frame: v6(43, packet.Payload{41, 0, 4, 0, 0, 0, 0, 0}, spoofed6, udp(53)),
			verdict: dr, reason: tunneled, dir: out},
		{name: "IPv4 in IPv6 behind a fragment header", from: a, frame: v6(44, packet.Payload{4, 0, 0, 0, 0, 0, 0, 1}, spoofed4, udp(53)),
			verdict: dr, reason: tunneled, dir: out},
		{name: "VXLAN (UDP) to port 4789: policy decides", from: a, frame: v4(udp(4789), packet.Payload(vxlan)), verdict: dr, reason: policyDen, dir: in},
		// ICMP errors quoting a flow that is not between their own ends.
		{name: "a's flow to b", from: a, frame: v4(udp(53)), verdict: red, reason: fwd, dir: out},
		{name: "c quotes a's flow to b, to b", from: c, frame: unreachable(eth(c, false), c.IPv4, b.IPv4, a.IPv4, b.IPv4, 4000, 53),
			verdict: dr, reason: datapath.ReasonICMPUnrelated, dir: in},
		{name: "c quotes a's flow to b, to a", from: c, frame: unreachable(eth(c, false), c.IPv4, a.IPv4, a.IPv4, b.IPv4, 4000, 53),
			verdict: red, reason: fwd, dir: out}, // a takes anything: policy allows it, as a new flow
	})
	// Fragments in every order.
	frag := func(id uint16, off uint16, more bool, l ...packet.Layer) []byte {
		ip := &packet.IPv4{Src: a.IPv4, Dst: b.IPv4, ID: id, FragOffset: off, MoreFragments: more}
		if off != 0 {
			ip.Protocol = packet.ProtoUDP
		}
		return packet.Build(append([]packet.Layer{e, ip}, l...)...)
	}
	body := packet.Payload(make([]byte, 16))
	n.crafted(t, []step{
		{name: "last fragment first", from: a, frame: frag(21, 4, false, body), verdict: dr, reason: datapath.ReasonFragNoFirst, dir: out},
		{name: "middle fragment first", from: a, frame: frag(21, 2, true, body), verdict: dr, reason: datapath.ReasonFragNoFirst, dir: out},
		{name: "then the first", from: a, frame: frag(21, 0, true, udp(53), body), verdict: red, reason: fwd, dir: out},
		{name: "then the middle again", from: a, frame: frag(21, 2, true, body), verdict: red, reason: fwd, dir: out},
		{name: "then the last again", from: a, frame: frag(21, 4, false, body), verdict: red, reason: fwd, dir: out},
		{name: "the first again (a duplicate)", from: a, frame: frag(21, 0, true, udp(53), body), verdict: red, reason: fwd, dir: out},
		{name: "a first fragment to 54 under the same ID", from: a, frame: frag(21, 0, true, udp(54), body), verdict: dr, reason: policyDen, dir: in},
		{name: "its later fragment follows it", from: a, frame: frag(21, 4, false, body), verdict: dr, reason: policyDen, dir: in},
		{name: "an unfragmented packet with the same ID", from: a, frame: packet.Build(e, &packet.IPv4{Src: a.IPv4, Dst: b.IPv4, ID: 21}, udp(53)),
			verdict: red, reason: fwd, dir: out},
	})
}
