package endpoint

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
)

// progWorld is a datapath with two real endpoints whose from-endpoint
// program is run on crafted packets inside the node's namespace, where the
// context's ifindex resolves.
type progWorld struct {
	dp     *datapath.Datapath
	nodeNS netns.NsHandle
	a, b   *Endpoint
	prog   *ebpf.Program // from-endpoint
}

func newProgWorld(t testing.TB) *progWorld {
	t.Helper()
	testutil.Privileged(t)
	node := testutil.NewNetNS(t)
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name: "node", NetNS: node.Path, BPFFS: testutil.BPFFS(t),
		Node:   datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24"), netip.MustParsePrefix("fd00:1::/64")}},
		Limits: datapath.Limits{Conntrack: 4096},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Unload() })
	w := &progWorld{dp: dp, nodeNS: node.Handle}
	for i, ep := range []**Endpoint{&w.a, &w.b} {
		s := Spec{
			ID:       uint16(i + 1),
			IPv4:     netip.AddrFrom4([4]byte{198, 18, 1, byte(10 + i)}),
			IPv6:     netip.AddrFrom16([16]byte{0xfd, 0, 0, 1, 15: byte(0x10 + i)}),
			Identity: datapath.Identity(1000 + i),
			NetNS:    testutil.Name("sluice-t-"),
		}
		if *ep, err = Create(context.Background(), dp, s); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { Delete(context.Background(), dp, s.ID) })
	}
	progs, err := core.Of(dp).EndpointPrograms()
	if err != nil {
		t.Fatal(err)
	}
	w.prog = progs.FromEndpoint
	return w
}

// run runs from-endpoint on frame as if it came from ep.
func (w *progWorld) run(t testing.TB, ep *Endpoint, frame []byte) progtest.Result {
	t.Helper()
	var r progtest.Result
	err := nsrun.Do(w.nodeNS, func() (err error) {
		r, err = progtest.Run(w.prog, frame, &progtest.SKB{Ifindex: uint32(ep.HostIfindex)})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// frame is a packet the workload of ep would send to dst.
func frame(ep *Endpoint, dst netip.Addr, l4 packet.Layer) []byte {
	eth := &packet.Ethernet{Src: ep.MAC, Dst: ep.HostMAC}
	if dst.Is4() {
		return packet.Build(eth, &packet.IPv4{Src: ep.IPv4, Dst: dst, TTL: 64}, l4)
	}
	return packet.Build(eth, &packet.IPv6{Src: ep.IPv6, Dst: dst, HopLimit: 64}, l4)
}

func TestFromEndpointProgram(t *testing.T) {
	w := newProgWorld(t)
	a, b := w.a, w.b
	udp := &packet.UDP{SrcPort: 4000, DstPort: 53}
	outside := netip.MustParseAddr("198.18.200.1")

	withSrcIP := func(src string) []byte {
		return packet.Build(&packet.Ethernet{Src: a.MAC, Dst: a.HostMAC}, &packet.IPv4{Src: netip.MustParseAddr(src), Dst: b.IPv4}, udp)
	}
	withSrcMAC := packet.Build(&packet.Ethernet{Src: net.HardwareAddr{2, 9, 9, 9, 9, 9}, Dst: a.HostMAC}, &packet.IPv4{Src: a.IPv4, Dst: b.IPv4}, udp)
	arp := func(sender netip.Addr) []byte {
		return packet.Build(&packet.Ethernet{Src: a.MAC, Dst: net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
			&packet.ARP{Op: 1, SenderMAC: a.MAC, SenderIP: sender, TargetIP: a.Gateway4})
	}
	other := packet.Build(&packet.Ethernet{Src: a.MAC, Dst: a.HostMAC, EtherType: 0x88cc}, packet.Payload(make([]byte, 46)))

	eg := datapath.Egress
	w.check(t, a, []verdictCase{
		{"IPv4 to a local endpoint", frame(a, b.IPv4, udp), progtest.TCActRedirect, datapath.ReasonForwarded, eg},
		{"IPv6 to a local endpoint", frame(a, b.IPv6, udp), progtest.TCActRedirect, datapath.ReasonForwarded, eg},
		{"IPv4 elsewhere", frame(a, outside, udp), progtest.TCActOK, datapath.ReasonForwarded, eg},
		{"ARP for the gateway", arp(a.IPv4), progtest.TCActOK, datapath.ReasonForwarded, eg},
		{"spoofed source IP", withSrcIP("198.18.1.99"), progtest.TCActShot, datapath.ReasonSpoofedSourceIP, eg},
		{"another endpoint's IP", withSrcIP(b.IPv4.String()), progtest.TCActShot, datapath.ReasonSpoofedSourceIP, eg},
		{"spoofed source MAC", withSrcMAC, progtest.TCActShot, datapath.ReasonSpoofedSourceMAC, eg},
		{"ARP with a spoofed sender", arp(b.IPv4), progtest.TCActShot, datapath.ReasonSpoofedSourceIP, eg},
		// (BPF_PROG_TEST_RUN refuses frames with a truncated IP header, so
		// the malformed case here is a header that lies about its length.)
		{"IPv4 header length 4", badIHL(frame(a, b.IPv4, udp)), progtest.TCActShot, datapath.ReasonMalformed, eg},
		{"LLDP", other, progtest.TCActShot, datapath.ReasonUnsupportedL3, eg},
		// The workloads' own neighbour discovery may be forwarded
		// meanwhile; nothing they send is dropped.
	})

	t.Run("unknown interface", func(t *testing.T) {
		var r progtest.Result
		err := nsrun.Do(w.nodeNS, func() (err error) {
			r, err = progtest.Run(w.prog, frame(a, b.IPv4, udp), &progtest.SKB{Ifindex: 1})
			return err
		})
		if err != nil || r.Verdict != progtest.TCActShot {
			t.Errorf("verdict %d (%v), want a drop", r.Verdict, err)
		}
	})
}

// A packet delivered to a local endpoint is rewritten as a router would:
// MACs of the last hop, TTL lowered, checksum still right.
func TestFromEndpointRewrite(t *testing.T) {
	w := newProgWorld(t)
	a, b := w.a, w.b
	in := frame(a, b.IPv4, &packet.ICMP{Type: packet.ICMPEchoRequest, ID: 7, Seq: 1})
	r := w.run(t, a, in)
	if r.Verdict != progtest.TCActRedirect {
		t.Fatalf("verdict %d, want a redirect", r.Verdict)
	}
	out := r.Packet
	if got := net.HardwareAddr(out[0:6]); got.String() != b.MAC.String() {
		t.Errorf("destination MAC %s, want the endpoint's %s", got, b.MAC)
	}
	if got := net.HardwareAddr(out[6:12]); got.String() != b.HostMAC.String() {
		t.Errorf("source MAC %s, want the gateway's %s", got, b.HostMAC)
	}
	if out[14+8] != 63 {
		t.Errorf("TTL %d, want 63", out[14+8])
	}
	if sum := ipChecksum(out[14:34]); sum != 0 {
		t.Errorf("IPv4 header checksum does not verify: %#x", sum)
	}
	if string(out[34:]) != string(in[34:]) {
		t.Error("the payload changed")
	}

	in6 := frame(a, b.IPv6, &packet.UDP{SrcPort: 1, DstPort: 2})
	r = w.run(t, a, in6)
	if r.Verdict != progtest.TCActRedirect || r.Packet[14+7] != 63 {
		t.Errorf("IPv6: verdict %d hop limit %d, want a redirect and 63", r.Verdict, r.Packet[14+7])
	}

	c, err := ReadCounters(w.dp, b.ID)
	if err != nil || c.PacketsIn < 2 {
		t.Errorf("endpoint %d counters %+v (%v), want at least the 2 packets in", b.ID, c, err)
	}
}

func ipChecksum(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(h[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// badIHL returns f with an IPv4 header length of 16 bytes, below the minimum.
func badIHL(f []byte) []byte {
	f = append([]byte(nil), f...)
	f[14] = 0x44
	return f
}
