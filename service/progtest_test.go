package service_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/service"
)

// fromEndpoint returns the node's from-endpoint program.
func fromEndpoint(t testing.TB, n *node) *ebpf.Program {
	t.Helper()
	progs, err := core.Of(n.dp).EndpointPrograms()
	if err != nil {
		t.Fatal(err)
	}
	return progs.FromEndpoint
}

// runFrom runs prog on frame as if ep's workload had sent it: inside the
// node's namespace, where the context's ifindex (ep's host veth) resolves.
func runFrom(t testing.TB, n *node, prog *ebpf.Program, ep *endpoint.Endpoint, frame []byte) progtest.Result {
	t.Helper()
	var r progtest.Result
	err := nsrun.Do(n.ns.Handle, func() (err error) {
		r, err = progtest.Run(prog, frame, &progtest.SKB{Ifindex: uint32(ep.HostIfindex)})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// clearConntrack empties the datapath's conntrack map: what comes next is
// a new flow.
func clearConntrack(t testing.TB, dp *datapath.Datapath) {
	t.Helper()
	if err := emptyConntrack(dp); err != nil {
		t.Fatal(err)
	}
}

// emptyConntrack is clearConntrack for a goroutine other than the test's.
func emptyConntrack(dp *datapath.Datapath) error {
	m := core.Of(dp).Map(bpfobj.EndpointMapConntrack)
	var (
		k, v []byte
		keys [][]byte
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, append([]byte(nil), k...))
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list conntrack: %w", err)
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete from conntrack: %w", err)
		}
	}
	return nil
}

// flowFrame is a TCP or UDP frame ep's workload sends from src to dst, with
// payload bytes of payload. A UDP frame over IPv4 with noSum carries
// checksum 0 (none); every other checksum is right.
func flowFrame(ep *endpoint.Endpoint, proto service.Protocol, src, dst netip.AddrPort, tcpFlags uint8, payload int, noSum bool) []byte {
	eth := &packet.Ethernet{Src: ep.MAC, Dst: ep.HostMAC}
	var ip packet.Layer = &packet.IPv4{Src: src.Addr(), Dst: dst.Addr()}
	l4off := 14 + 20
	if src.Addr().Is6() {
		ip = &packet.IPv6{Src: src.Addr(), Dst: dst.Addr()}
		l4off = 14 + 40
	}
	var l4 packet.Layer = &packet.UDP{SrcPort: src.Port(), DstPort: dst.Port()}
	if proto == service.TCP {
		l4 = &packet.TCP{SrcPort: src.Port(), DstPort: dst.Port(), Seq: 1, Flags: tcpFlags}
	}
	body := make([]byte, payload)
	for i := range body {
		body[i] = byte(i*7 + 3)
	}
	f := packet.Build(eth, ip, l4, packet.Payload(body))
	if noSum && proto == service.UDP && src.Addr().Is4() {
		f[l4off+6], f[l4off+7] = 0, 0
	}
	return f
}

// l4Packet is what parseL4 reads of a frame.
type l4Packet struct {
	EthSrc, EthDst [6]byte
	Src, Dst       netip.AddrPort
	Proto          service.Protocol
	Sum            uint16 // the L4 checksum field as it is
}

// parseL4 reads the MACs, addresses, ports and protocol of an IPv4 or IPv6
// frame carrying TCP or UDP (no IPv4 options, no IPv6 extension headers)
// and checks its checksums as a receiver would: the IPv4 header's, and the
// L4 one over the pseudo header and the whole segment. A UDP checksum of 0
// over IPv4 means none and passes; over IPv6 it is an error.
func parseL4(frame []byte) (l4Packet, error) {
	var p l4Packet
	if len(frame) < 14 {
		return p, fmt.Errorf("frame of %d bytes", len(frame))
	}
	copy(p.EthDst[:], frame[0:6])
	copy(p.EthSrc[:], frame[6:12])
	var (
		pseudo uint32
		seg    []byte
	)
	ip := frame[14:]
	switch et := binary.BigEndian.Uint16(frame[12:14]); et {
	case packet.EtherTypeIPv4:
		if len(ip) < 20 || ip[0] != 0x45 {
			return p, fmt.Errorf("not a 20-byte IPv4 header: % x", ip[:min(len(ip), 20)])
		}
		if s := fold(sum16(ip[:20], 0)); s != 0xffff {
			return p, fmt.Errorf("IPv4 header checksum %#04x wrong: want %#04x",
				binary.BigEndian.Uint16(ip[10:12]), internetSum(ip[:20], 10, 0))
		}
		tot := int(binary.BigEndian.Uint16(ip[2:4]))
		if tot < 20 || tot > len(ip) {
			return p, fmt.Errorf("IPv4 total length %d, %d bytes there", tot, len(ip))
		}
		p.Proto = service.Protocol(ip[9])
		p.Src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[12:16])), 0)
		p.Dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[16:20])), 0)
		seg = ip[20:tot]
		pseudo = sum16(ip[12:20], uint32(p.Proto)+uint32(len(seg)))
	case packet.EtherTypeIPv6:
		if len(ip) < 40 || ip[0]>>4 != 6 {
			return p, fmt.Errorf("not an IPv6 header: % x", ip[:min(len(ip), 40)])
		}
		plen := int(binary.BigEndian.Uint16(ip[4:6]))
		if 40+plen > len(ip) {
			return p, fmt.Errorf("IPv6 payload length %d, %d bytes there", plen, len(ip)-40)
		}
		p.Proto = service.Protocol(ip[6])
		p.Src = netip.AddrPortFrom(netip.AddrFrom16([16]byte(ip[8:24])), 0)
		p.Dst = netip.AddrPortFrom(netip.AddrFrom16([16]byte(ip[24:40])), 0)
		seg = ip[40 : 40+plen]
		pseudo = sum16(ip[8:40], uint32(p.Proto)+uint32(len(seg)))
	default:
		return p, fmt.Errorf("EtherType %#04x", et)
	}
	sumOff := 0
	switch p.Proto {
	case service.TCP:
		sumOff = 16
	case service.UDP:
		sumOff = 6
	default:
		return p, fmt.Errorf("IP protocol %d", p.Proto)
	}
	if len(seg) < sumOff+2 {
		return p, fmt.Errorf("%v header cut short: %d bytes", p.Proto, len(seg))
	}
	p.Src = netip.AddrPortFrom(p.Src.Addr(), binary.BigEndian.Uint16(seg[0:2]))
	p.Dst = netip.AddrPortFrom(p.Dst.Addr(), binary.BigEndian.Uint16(seg[2:4]))
	p.Sum = binary.BigEndian.Uint16(seg[sumOff:])
	if p.Proto == service.UDP && p.Sum == 0 {
		if p.Src.Addr().Is4() {
			return p, nil
		}
		return p, errors.New("UDP checksum 0 over IPv6")
	}
	if s := fold(sum16(seg, pseudo)); s != 0xffff {
		return p, fmt.Errorf("%v checksum %#04x wrong: want %#04x", p.Proto, p.Sum, internetSum(seg, sumOff, pseudo))
	}
	return p, nil
}

// sum16 adds b as big-endian 16-bit words (an odd last byte padded with
// zero) to sum, without folding.
func sum16(b []byte, sum uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

// internetSum is the checksum b should carry at off, computed afresh.
func internetSum(b []byte, off int, pseudo uint32) uint16 {
	return ^fold(sum16(b[off+2:], sum16(b[:off], pseudo))) // the field itself counts as 0
}

// TestProgTranslate runs from-endpoint on crafted frames from the client to
// a frontend translated at tc, TCP and UDP over IPv4 and IPv6: each comes
// out to the backend's address and port, from the client as it was, with
// valid checksums (a UDP checksum of 0 stays 0). The backend's reply, run
// through from-endpoint of the backend's endpoint (which delivers it to the
// client), comes out from the frontend with valid checksums.
func TestProgTranslate(t *testing.T) {
	n := newNode(t)
	prog := fromEndpoint(t, n)
	cases := []struct {
		name  string
		v6    bool
		proto service.Protocol
		noSum bool
	}{
		{"ipv4/tcp", false, service.TCP, false},
		{"ipv4/udp", false, service.UDP, false},
		{"ipv4/udp-checksum-0", false, service.UDP, true},
		{"ipv6/tcp", true, service.TCP, false},
		{"ipv6/udp", true, service.UDP, false},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// A frontend of its own per case: fresh counters, no
			// conntrack shared with another case.
			fe := netip.AddrPortFrom(frontendAddr(c.v6), uint16(80+i))
			be := netip.AddrPortFrom(addrOf(n.a, c.v6), 8080)
			client := netip.AddrPortFrom(addrOf(n.client, c.v6), uint16(40000+i))
			svc := service.Service{
				Frontend: service.Frontend{Addr: fe.Addr(), Port: fe.Port(), Protocol: c.proto},
				Backends: []service.Backend{{Addr: be.Addr(), Port: be.Port(), Weight: 1}},
				Reach:    service.TCOnly,
			}
			upsert(t, n.dp, svc)

			// 5 bytes of payload: an odd length, the checksum's last
			// word padded.
			r := runFrom(t, n, prog, n.client, flowFrame(n.client, c.proto, client, fe, packet.SYN, 5, c.noSum))
			if r.Verdict != progtest.TCActRedirect {
				t.Fatalf("request: verdict %d, want %d (delivered to the backend's endpoint)", r.Verdict, progtest.TCActRedirect)
			}
			got, err := parseL4(r.Packet)
			if err != nil {
				t.Fatalf("request out: %v\n% x", err, r.Packet)
			}
			if got.Src != client || got.Dst != be || got.Proto != c.proto {
				t.Errorf("request out %v %v -> %v, want %v -> %v", got.Proto, got.Src, got.Dst, client, be)
			}
			if [6]byte(n.a.MAC) != got.EthDst || [6]byte(n.a.HostMAC) != got.EthSrc {
				t.Errorf("request out from MAC %x to %x, want %v to %v", got.EthSrc, got.EthDst, n.a.HostMAC, n.a.MAC)
			}
			if c.noSum && got.Sum != 0 {
				t.Errorf("request out: UDP checksum %#04x, want 0 as it came in", got.Sum)
			}
			counters, err := service.ReadCounters(n.dp, svc.Frontend)
			if err != nil {
				t.Fatal(err)
			}
			if len(counters) != 1 || counters[0].Flows != 1 || counters[0].Packets != 1 {
				t.Errorf("backend counters %+v, want one flow of one packet", counters)
			}

			flags := uint8(packet.SYN | packet.ACK)
			r = runFrom(t, n, prog, n.a, flowFrame(n.a, c.proto, be, client, flags, 5, c.noSum))
			if r.Verdict != progtest.TCActRedirect {
				t.Fatalf("reply: verdict %d, want %d (delivered to the client)", r.Verdict, progtest.TCActRedirect)
			}
			got, err = parseL4(r.Packet)
			if err != nil {
				t.Fatalf("reply out: %v\n% x", err, r.Packet)
			}
			if got.Src != fe || got.Dst != client {
				t.Errorf("reply out %v -> %v, want %v -> %v", got.Src, got.Dst, fe, client)
			}
			if [6]byte(n.client.MAC) != got.EthDst {
				t.Errorf("reply out to MAC %x, want the client's %v", got.EthDst, n.client.MAC)
			}
			if c.noSum && got.Sum != 0 {
				t.Errorf("reply out: UDP checksum %#04x, want 0 as it came in", got.Sum)
			}
		})
	}
}

// TestProgNoBackend: a frame to a frontend whose every backend is
// terminating is dropped (TC_ACT_SHOT) and counted as NO_BACKEND.
func TestProgNoBackend(t *testing.T) {
	n := newNode(t)
	prog := fromEndpoint(t, n)
	for _, v6 := range []bool{false, true} {
		for _, proto := range []service.Protocol{service.TCP, service.UDP} {
			t.Run(fmt.Sprintf("ipv6=%v/%v", v6, proto), func(t *testing.T) {
				fe := netip.AddrPortFrom(frontendAddr(v6), 80)
				b := backends(n.a, v6, 8080, 8081)
				for i := range b {
					b[i].State = service.Terminating
				}
				upsert(t, n.dp, service.Service{
					Frontend: service.Frontend{Addr: fe.Addr(), Port: fe.Port(), Protocol: proto},
					Backends: b,
					Reach:    service.TCOnly,
				})
				before := dropped(t, n.dp, datapath.ReasonNoBackend)
				client := netip.AddrPortFrom(addrOf(n.client, v6), 40000)
				r := runFrom(t, n, prog, n.client, flowFrame(n.client, proto, client, fe, packet.SYN, 5, false))
				if r.Verdict != progtest.TCActShot {
					t.Errorf("verdict %d, want %d (TC_ACT_SHOT)", r.Verdict, progtest.TCActShot)
				}
				if after := dropped(t, n.dp, datapath.ReasonNoBackend); after != before+1 {
					t.Errorf("NO_BACKEND drops %d, then %d; want one more", before, after)
				}
			})
		}
	}
}

// TestProgChecksumCheck: parseL4, which the program tests rely on, passes
// the frames flowFrame builds and catches a changed address, port or
// payload byte whose checksum was not updated.
func TestProgChecksumCheck(t *testing.T) {
	ep := &endpoint.Endpoint{Spec: endpoint.Spec{MAC: []byte{2, 0, 0, 0, 0, 2}}, HostMAC: []byte{2, 0, 0, 0, 0, 1}}
	for _, src := range []netip.AddrPort{netip.MustParseAddrPort("198.18.1.11:40000"), netip.MustParseAddrPort("[fd00:1::11]:40000")} {
		dst := netip.AddrPortFrom(frontendAddr(src.Addr().Is6()), 80)
		for _, proto := range []service.Protocol{service.TCP, service.UDP} {
			for _, payload := range []int{0, 1, 5, 64} {
				f := flowFrame(ep, proto, src, dst, packet.SYN, payload, false)
				if _, err := parseL4(f); err != nil {
					t.Fatalf("%v %v, %d bytes: %v", src, proto, payload, err)
				}
				ipOff, l4Off := 14, 14+20
				if src.Addr().Is6() {
					l4Off = 14 + 40
				}
				for _, off := range []int{ipOff + 12 + 3, l4Off + 1, len(f) - 1} {
					if off == len(f)-1 && payload == 0 {
						continue
					}
					bad := append([]byte(nil), f...)
					bad[off] ^= 0x40
					if _, err := parseL4(bad); err == nil {
						t.Errorf("%v %v, %d bytes: byte %d changed, checksums pass", src, proto, payload, off)
					}
				}
			}
		}
	}
	f := flowFrame(ep, service.UDP, netip.MustParseAddrPort("198.18.1.11:40000"), netip.AddrPortFrom(fe4, 80), 0, 5, true)
	if p, err := parseL4(f); err != nil || p.Sum != 0 {
		t.Errorf("IPv4 UDP without a checksum: %+v, %v", p, err)
	}
}

// TestProgReverseFromHost: the reply of a service flow whose backend is off
// the node comes to the client through the host stack, where from-host
// (tc egress of the client's host veth) makes it come from the frontend,
// with valid checksums.
func TestProgReverseFromHost(t *testing.T) {
	n := newNode(t)
	progs, err := core.Of(n.dp).EndpointPrograms()
	if err != nil {
		t.Fatal(err)
	}
	for i, v6 := range []bool{false, true} {
		for j, proto := range []service.Protocol{service.TCP, service.UDP} {
			t.Run(fmt.Sprintf("ipv6=%v/%v", v6, proto), func(t *testing.T) {
				fe := netip.AddrPortFrom(frontendAddr(v6), uint16(80+2*i+j))
				be := netip.MustParseAddrPort("198.18.3.1:8080")
				if v6 {
					be = netip.MustParseAddrPort("[fd00:3::1]:8080")
				}
				client := netip.AddrPortFrom(addrOf(n.client, v6), uint16(41000+2*i+j))
				upsert(t, n.dp, service.Service{
					Frontend: service.Frontend{Addr: fe.Addr(), Port: fe.Port(), Protocol: proto},
					Backends: []service.Backend{{Addr: be.Addr(), Port: be.Port(), Weight: 1}},
					Reach:    service.TCOnly,
				})
				r := runFrom(t, n, progs.FromEndpoint, n.client, flowFrame(n.client, proto, client, fe, packet.SYN, 5, false))
				if got, err := parseL4(r.Packet); r.Verdict != progtest.TCActOK || err != nil || got.Dst != be {
					t.Fatalf("request: verdict %d, out to %v (%v); want %d (to the stack), to %v", r.Verdict, got.Dst, err, progtest.TCActOK, be)
				}
				// The host stack delivers the reply: from the
				// client's gateway MAC to the client's.
				host := &endpoint.Endpoint{Spec: endpoint.Spec{MAC: n.client.HostMAC}, HostMAC: n.client.MAC}
				r = runFrom(t, n, progs.FromHost, n.client, flowFrame(host, proto, be, client, packet.SYN|packet.ACK, 5, false))
				if r.Verdict != progtest.TCActOK {
					t.Fatalf("reply: verdict %d, want %d", r.Verdict, progtest.TCActOK)
				}
				got, err := parseL4(r.Packet)
				if err != nil {
					t.Fatalf("reply out: %v\n% x", err, r.Packet)
				}
				if got.Src != fe || got.Dst != client {
					t.Errorf("reply out %v -> %v, want %v -> %v", got.Src, got.Dst, fe, client)
				}
			})
		}
	}
}

// A rejected packet is answered and counted once, as a NO_BACKEND drop:
// not as forwarded too.
func TestRejectCountsOnce(t *testing.T) {
	n := newNode(t)
	prog := fromEndpoint(t, n)
	noBackend := datapath.MetricKey{Reason: datapath.ReasonNoBackend, Direction: datapath.Egress}
	forwarded := datapath.MetricKey{Reason: datapath.ReasonForwarded, Direction: datapath.Egress}
	for _, v6 := range []bool{false, true} {
		fe := service.Frontend{Addr: frontendAddr(v6), Port: 80, Protocol: service.TCP}
		upsert(t, n.dp, service.Service{Frontend: fe, Backends: []service.Backend{}, Reach: service.TCOnly, NoBackend: service.Reject})
		// The client's own neighbour discovery may be forwarded while a
		// try runs: one try of three with nothing else forwarded shows it.
		clean := false
		for try := range 3 {
			src := netip.AddrPortFrom(addrOf(n.client, v6), uint16(40000+try))
			before, err := n.dp.Metrics()
			if err != nil {
				t.Fatal(err)
			}
			r := runFrom(t, n, prog, n.client, flowFrame(n.client, service.TCP, src, netip.AddrPortFrom(fe.Addr, fe.Port), packet.SYN, 0, false))
			after, err := n.dp.Metrics()
			if err != nil {
				t.Fatal(err)
			}
			if r.Verdict != progtest.TCActRedirect || after[noBackend].Packets != before[noBackend].Packets+1 {
				t.Fatalf("ipv6=%v: verdict %d, NO_BACKEND %d then %d", v6, r.Verdict, before[noBackend].Packets, after[noBackend].Packets)
			}
			if after[forwarded].Packets == before[forwarded].Packets {
				clean = true
				break
			}
		}
		if !clean {
			t.Errorf("ipv6=%v: every rejected packet counted as forwarded too", v6)
		}
	}
}

// A rejected packet is answered with a port unreachable that quotes it
// whole (up to 576 bytes in all for IPv4, 1280 for IPv6): past IPv4
// options and IPv6 extension headers to its ports, which the sender's
// socket needs to see the refusal. The answer's checksums are right.
func TestRejectQuotesThePacket(t *testing.T) {
	n := newNode(t)
	prog := fromEndpoint(t, n)
	for _, tc := range []struct {
		name    string
		v6      bool
		payload int
	}{
		{"IPv4", false, 10}, {"IPv4, long", false, 1000},
		{"IPv6 behind destination options", true, 10}, {"IPv6, long", true, 2000},
	} {
		fe := service.Frontend{Addr: frontendAddr(tc.v6), Port: 80, Protocol: service.UDP}
		upsert(t, n.dp, service.Service{Frontend: fe, Backends: []service.Backend{}, Reach: service.TCOnly, NoBackend: service.Reject})
		src := addrOf(n.client, tc.v6)
		e := &packet.Ethernet{Src: n.client.MAC, Dst: n.client.HostMAC}
		udp := &packet.UDP{SrcPort: 4000, DstPort: 80}
		body := packet.Payload(make([]byte, tc.payload))
		frame := packet.Build(e, &packet.IPv4{Src: src, Dst: fe.Addr}, udp, body)
		if tc.v6 {
			frame = packet.Build(e, &packet.IPv6{Src: src, Dst: fe.Addr, NextHeader: 60}, packet.Payload{17, 0, 1, 4, 0, 0, 0, 0}, udp, body)
		}
		r := runFrom(t, n, prog, n.client, frame)
		out := r.Packet
		if r.Verdict != progtest.TCActRedirect || len(out) < 14+48 {
			t.Errorf("%s: verdict %d, %d bytes", tc.name, r.Verdict, len(out))
			continue
		}
		original := frame[14:]
		var icmp, quote []byte
		var pseudo uint32
		if tc.v6 {
			ip := out[14:54]
			icmp, pseudo = out[54:], sum16(ip[8:40], uint32(len(out)-54)+58)
			if ip[6] != 58 || !bytes.Equal(ip[24:40], src.AsSlice()) || icmp[0] != 1 || icmp[1] != 4 {
				t.Errorf("%s: not a port unreachable to the client: % x", tc.name, out[14:62])
			}
		} else {
			ip := out[14:34]
			if fold(sum16(ip, 0)) != 0xffff || ip[9] != 1 || !bytes.Equal(ip[16:20], src.AsSlice()) {
				t.Errorf("%s: IPv4 header % x", tc.name, ip)
			}
			icmp = out[34:]
			if icmp[0] != 3 || icmp[1] != 3 {
				t.Errorf("%s: ICMP type %d code %d", tc.name, icmp[0], icmp[1])
			}
		}
		if fold(sum16(icmp, pseudo)) != 0xffff {
			t.Errorf("%s: ICMP checksum %#04x wrong: want %#04x", tc.name, binary.BigEndian.Uint16(icmp[2:]), internetSum(icmp, 2, pseudo))
		}
		quote = icmp[8:]
		limit := 576 - 28
		if tc.v6 {
			limit = 1280 - 48
		}
		if want := original[:min(len(original), limit)]; !bytes.Equal(quote, want) {
			t.Errorf("%s: quoted %d bytes, want the first %d of the packet", tc.name, len(quote), len(want))
		}
	}
}
