package endpoint

import (
	"context"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ipcache"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
)

// verdictCase is a crafted frame from endpoint a and what from-endpoint
// must do with it.
type verdictCase struct {
	name    string
	frame   []byte
	verdict uint32
	reason  datapath.Reason // the drop reason, or ReasonForwarded
	dir     datapath.Direction
}

// check runs each case and checks the verdict and that the reason's counter
// grew by one.
func (w *progWorld) check(t *testing.T, from *Endpoint, cases []verdictCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := w.dp.Metrics()
			r := w.run(t, from, tc.frame)
			if r.Verdict != tc.verdict {
				t.Fatalf("verdict %d, want %d", r.Verdict, tc.verdict)
			}
			after, _ := w.dp.Metrics()
			key := datapath.MetricKey{Reason: tc.reason, Direction: tc.dir}
			// The workloads' own neighbour discovery may be forwarded
			// meanwhile; nothing they send is dropped.
			if got, want := after[key].Packets, before[key].Packets+1; got < want || (tc.reason != datapath.ReasonForwarded && got != want) {
				t.Errorf("%v %v counter went from %d to %d", tc.reason, tc.dir, before[key].Packets, got)
			}
		})
	}
}

// IPv6 sources that skip the anti-spoofing check (link-local, unspecified)
// may only reach the link; every other source must be the endpoint's, to
// multicast destinations too.
func TestFromEndpointIPv6Sources(t *testing.T) {
	w := newProgWorld(t)
	a, b := w.a, w.b
	icmp := &packet.ICMP{Type: 135} // neighbour solicitation
	from := func(src, dst string) []byte {
		return packet.Build(&packet.Ethernet{Src: a.MAC, Dst: a.HostMAC},
			&packet.IPv6{Src: netip.MustParseAddr(src), Dst: netip.MustParseAddr(dst), HopLimit: 255}, icmp)
	}
	eg := datapath.Egress
	w.check(t, a, []verdictCase{
		{"link-local to all nodes", from("fe80::1", "ff02::1"), progtest.TCActOK, datapath.ReasonForwarded, eg},
		{"link-local to link-local", from("fe80::1", "fe80::2"), progtest.TCActOK, datapath.ReasonForwarded, eg},
		{"unspecified to solicited-node", from("::", "ff02::1:ff00:11"), progtest.TCActOK, datapath.ReasonForwarded, eg},
		{"own address to site multicast", from(a.IPv6.String(), "ff05::1"), progtest.TCActOK, datapath.ReasonForwarded, eg},
		{"another endpoint's address to all nodes", from(b.IPv6.String(), "ff02::1"), progtest.TCActShot, datapath.ReasonSpoofedSourceIP, eg},
		{"spoofed address to global multicast", from("fd00:1::99", "ff0e::1"), progtest.TCActShot, datapath.ReasonSpoofedSourceIP, eg},
		{"link-local to another endpoint", from("fe80::1", b.IPv6.String()), progtest.TCActShot, datapath.ReasonSpoofedSourceIP, eg},
		{"unspecified to link-local", from("::", "fe80::2"), progtest.TCActShot, datapath.ReasonSpoofedSourceIP, eg},
		{"unspecified to another endpoint", from("::", b.IPv6.String()), progtest.TCActShot, datapath.ReasonSpoofedSourceIP, eg},
	})
}

// Header lengths are checked against each other and the packet.
func TestFromEndpointLengths(t *testing.T) {
	w := newProgWorld(t)
	a, b := w.a, w.b
	udp := &packet.UDP{SrcPort: 1, DstPort: 2}
	patch := func(f []byte, off int, v ...byte) []byte {
		f = append([]byte(nil), f...)
		copy(f[off:], v)
		return f
	}
	ipv4 := frame(a, b.IPv4, udp) // 14 + 20 + 8 bytes
	ipv6 := frame(a, b.IPv6, udp)
	padded := append(append([]byte(nil), ipv4...), make([]byte, 18)...) // to 60 bytes, as on the wire
	eg := datapath.Egress
	w.check(t, a, []verdictCase{
		{"IPv4 header of 60 bytes in a 28-byte packet", patch(ipv4, 14, 0x4f), progtest.TCActShot, datapath.ReasonMalformed, eg},
		{"IPv4 total length 2000 in a short packet", patch(ipv4, 16, 0x07, 0xd0), progtest.TCActShot, datapath.ReasonMalformed, eg},
		{"IPv4 total length below its header", patch(ipv4, 16, 0, 19), progtest.TCActShot, datapath.ReasonMalformed, eg},
		{"IPv4 version 6", patch(ipv4, 14, 0x65), progtest.TCActShot, datapath.ReasonMalformed, eg},
		{"IPv4 with Ethernet padding", padded, progtest.TCActRedirect, datapath.ReasonForwarded, eg},
		{"IPv6 payload length 2000 in a short packet", patch(ipv6, 18, 0x07, 0xd0), progtest.TCActShot, datapath.ReasonMalformed, eg},
		{"IPv6 version 4", patch(ipv6, 14, 0x40), progtest.TCActShot, datapath.ReasonMalformed, eg},
	})
}

// IP-in-IP, IPv6-in-IP and GRE from an endpoint are dropped: nothing checks
// the inner source, which anyone that decapsulates would take as given.
func TestFromEndpointTunnels(t *testing.T) {
	w := newProgWorld(t)
	a, b := w.a, w.b
	spoofed4 := &packet.IPv4{Src: b.IPv4, Dst: b.IPv4}
	spoofed6 := &packet.IPv6{Src: b.IPv6, Dst: b.IPv6}
	udp := &packet.UDP{SrcPort: 1, DstPort: 2}
	eth := &packet.Ethernet{Src: a.MAC, Dst: a.HostMAC}
	// A destination-options header in front of IPv6-in-IPv6.
	dstopts := packet.Build(eth, &packet.IPv6{Src: a.IPv6, Dst: b.IPv6, NextHeader: 60},
		packet.Payload([]byte{41, 0, 1, 4, 0, 0, 0, 0}), spoofed6, udp)
	eg := datapath.Egress
	w.check(t, a, []verdictCase{
		{"IPv4 in IPv4", packet.Build(eth, &packet.IPv4{Src: a.IPv4, Dst: b.IPv4, Protocol: 4}, spoofed4, udp), progtest.TCActShot, datapath.ReasonTunneled, eg},
		{"IPv6 in IPv4", packet.Build(eth, &packet.IPv4{Src: a.IPv4, Dst: b.IPv4, Protocol: 41}, spoofed6, udp), progtest.TCActShot, datapath.ReasonTunneled, eg},
		{"GRE over IPv4", packet.Build(eth, &packet.IPv4{Src: a.IPv4, Dst: b.IPv4, Protocol: 47}, packet.Payload([]byte{0, 0, 8, 0}), spoofed4, udp), progtest.TCActShot, datapath.ReasonTunneled, eg},
		{"IPv6 in IPv6", packet.Build(eth, &packet.IPv6{Src: a.IPv6, Dst: b.IPv6, NextHeader: 41}, spoofed6, udp), progtest.TCActShot, datapath.ReasonTunneled, eg},
		{"IPv4 in IPv6", packet.Build(eth, &packet.IPv6{Src: a.IPv6, Dst: b.IPv6, NextHeader: 4}, spoofed4, udp), progtest.TCActShot, datapath.ReasonTunneled, eg},
		{"IPv6 in IPv6 behind destination options", dstopts, progtest.TCActShot, datapath.ReasonTunneled, eg},
		{"UDP behind destination options", packet.Build(eth, &packet.IPv6{Src: a.IPv6, Dst: b.IPv6, NextHeader: 60},
			packet.Payload([]byte{17, 0, 1, 4, 0, 0, 0, 0}), udp), progtest.TCActRedirect, datapath.ReasonForwarded, eg},
	})
}

// A VLAN tag in the frame is refused (the kernel's own tag offload is tested
// with real traffic in TestVLANFromEndpoint).
func TestFromEndpointVLANInFrame(t *testing.T) {
	w := newProgWorld(t)
	a, b := w.a, w.b
	inner := frame(a, b.IPv4, &packet.UDP{SrcPort: 1, DstPort: 2})
	tagged := func(tpid uint16) []byte {
		f := append([]byte(nil), inner[:12]...)
		f = binary.BigEndian.AppendUint16(f, tpid)
		f = binary.BigEndian.AppendUint16(f, 100) // VLAN ID
		return append(f, inner[12:]...)
	}
	eg := datapath.Egress
	w.check(t, a, []verdictCase{
		{"802.1Q", tagged(0x8100), progtest.TCActShot, datapath.ReasonVLANTagged, eg},
		{"802.1ad", tagged(0x88a8), progtest.TCActShot, datapath.ReasonVLANTagged, eg},
	})
}

// The TTL is lowered only for a packet that is delivered to an endpoint;
// one that goes to the stack keeps it, or the stack's own forwarding would
// lower it a second time.
func TestFromEndpointTTLOnlyOnDelivery(t *testing.T) {
	w := newProgWorld(t)
	a := w.a
	st := core.Of(w.dp)
	// An ipcache entry that points to an interface with no endpoint (one
	// being deleted, say).
	orphan := netip.MustParseAddr("198.18.1.77")
	k := ipcache.Key(netip.PrefixFrom(orphan, 32))
	v := bpfobj.TypesIpcacheValue{Identity: 2000, Ifindex: 999999}
	if err := st.Objs.Ipcache.Put(&k, &v); err != nil {
		t.Fatal(err)
	}
	r := w.run(t, a, frame(a, orphan, &packet.UDP{SrcPort: 1, DstPort: 2}))
	if r.Verdict != progtest.TCActOK || r.Packet[14+8] != 64 {
		t.Errorf("verdict %d TTL %d, want the stack (0) and TTL 64 unchanged", r.Verdict, r.Packet[14+8])
	}
}

// A destination endpoint that is not ready, or whose interface is gone, is
// a drop with a reason, not a redirect into nothing counted as delivered.
func TestFromEndpointUndeliverable(t *testing.T) {
	w := newProgWorld(t)
	a, b := w.a, w.b
	st := core.Of(w.dp)
	// Ghost endpoint 77, with counters of its own: b's count what the
	// node sends it meanwhile.
	const ghostID = 77
	zero := make([]bpfobj.TypesEndpointCounters, ebpf.MustPossibleCPU())
	if err := st.Objs.EpCounters.Put(uint32(ghostID), zero); err != nil {
		t.Fatal(err)
	}
	put := func(addr netip.Addr, ifindex int, ready bool) {
		t.Helper()
		ghost := *b
		ghost.ID, ghost.HostIfindex, ghost.IPv4 = ghostID, ifindex, addr
		info := endpointInfo(&ghost, ready)
		if err := st.Objs.Endpoints.Put(uint32(ifindex), &info); err != nil {
			t.Fatal(err)
		}
		k := ipcache.Key(netip.PrefixFrom(addr, 32))
		v := bpfobj.TypesIpcacheValue{Identity: 2000, Ifindex: uint32(ifindex)}
		if err := st.Objs.Ipcache.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	gone, notReady := netip.MustParseAddr("198.18.1.78"), netip.MustParseAddr("198.18.1.79")
	put(gone, 999998, true)
	put(notReady, b.HostIfindex+1000, false)
	before, _ := ReadCounters(w.dp, ghostID)
	udp := &packet.UDP{SrcPort: 1, DstPort: 2}
	in := datapath.Ingress
	w.check(t, a, []verdictCase{
		{"interface gone", frame(a, gone, udp), progtest.TCActShot, datapath.ReasonRedirectFailed, in},
		{"endpoint not ready", frame(a, notReady, udp), progtest.TCActShot, datapath.ReasonEndpointNotReady, in},
	})
	if after, _ := ReadCounters(w.dp, ghostID); after.PacketsIn != before.PacketsIn {
		t.Errorf("packets in went from %d to %d for packets that were dropped", before.PacketsIn, after.PacketsIn)
	}
}

// A Delete killed once it marked the record Deleting leaves the endpoint's
// tracked flows behind; Reconcile finishes it, flows included, so an
// endpoint that gets the ID and addresses later inherits none.
func TestReconcileSweepsFlowsOfKilledDelete(t *testing.T) {
	w := newProgWorld(t)
	st := core.Of(w.dp)
	// A flow of each endpoint, as from-endpoint tracks it.
	for _, ep := range []*Endpoint{w.a, w.b} {
		if r := w.run(t, ep, frame(ep, netip.MustParseAddr("198.19.0.1"), &packet.UDP{SrcPort: 1, DstPort: 2})); r.Verdict != progtest.TCActOK {
			t.Fatalf("endpoint %d: verdict %d", ep.ID, r.Verdict)
		}
	}
	// Killed right after the record said Deleting.
	rec, err := lookupRecord(st, w.a.ID)
	if err != nil {
		t.Fatal(err)
	}
	rec.State = ledger.Deleting
	if err := ledger.Put(st.Objs.Ledger, rec); err != nil {
		t.Fatal(err)
	}
	if n, err := w.dp.Reconcile(context.Background()); err != nil || n != 1 {
		t.Fatalf("Reconcile undid %d, %v; want 1", n, err)
	}
	flows, err := w.dp.Flows()
	if err != nil {
		t.Fatal(err)
	}
	left := map[uint16]int{}
	for _, f := range flows {
		left[f.Endpoint]++
	}
	if left[w.a.ID] != 0 || left[w.b.ID] != 1 {
		t.Errorf("flows after Reconcile: %v; want none of endpoint %d and the one of endpoint %d", left, w.a.ID, w.b.ID)
	}
}
