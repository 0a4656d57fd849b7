package node_test

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/clustertest"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
)

// markForwarded is bpf/lib/mark.h's MARK_FORWARDED.
const markForwarded = 0x0C00

// What from-endpoint sends to another node carries the forwarded mark,
// and to-netdev lets a packet with it go untouched, the mark cleared; a
// pod's packet to the world carries no mark and is masqueraded. In each
// routing mode, with BPF_PROG_TEST_RUN.
func TestForwardedMark(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Routing: mode, Nodes: 2, Endpoints: 1})
			n0, ep, peer := c.Nodes[0], c.Endpoint(0, 0), c.Endpoint(1, 0)
			fromEndpoint, toNetdev := egressPrograms(t, n0)
			internet, err := netdev.Get(c.Internet.Handle, "eth0")
			if err != nil {
				t.Fatal(err)
			}
			syn := func(src, dst netip.Addr, srcMAC, dstMAC []byte) []byte {
				return packet.Build(&packet.Ethernet{Src: srcMAC, Dst: dstMAC},
					&packet.IPv4{Src: src, Dst: dst, TTL: 64},
					&packet.TCP{SrcPort: 40000, DstPort: 80, Seq: 1, Flags: packet.SYN})
			}
			err = nsrun.Do(n0.NS.Handle, func() error {
				for _, tc := range []struct {
					name    string
					dst     netip.Addr
					verdict uint32
					mark    uint32
				}{
					{"to another node's pod", peer.IPv4, progtest.TCActRedirect, markForwarded},
					{"to the world", c.InternetIPv4, progtest.TCActOK, 0},
				} {
					ctx := &progtest.SKB{Ifindex: uint32(ep.HostIfindex)}
					r, err := progtest.Run(fromEndpoint, syn(ep.IPv4, tc.dst, ep.MAC, ep.HostMAC), ctx)
					if err != nil {
						return err
					}
					if r.Verdict != tc.verdict || ctx.Mark != tc.mark {
						t.Errorf("from-endpoint, %s: verdict %d, mark %#x; want %d, %#x", tc.name, r.Verdict, ctx.Mark, tc.verdict, tc.mark)
					}
				}
				world := syn(ep.IPv4, c.InternetIPv4, n0.MAC, internet.MAC)
				for _, mark := range []uint32{markForwarded, 0} {
					ctx := &progtest.SKB{Ifindex: uint32(n0.Ifindex), Mark: mark}
					r, err := progtest.Run(toNetdev, world, ctx)
					if err != nil {
						return err
					}
					src, _ := netip.AddrFromSlice(r.Packet[14+12 : 14+16])
					want := n0.IPv4 // masqueraded
					if mark == markForwarded {
						want = ep.IPv4 // let go as it was
					}
					if r.Verdict != progtest.TCActOK || src != want || ctx.Mark != 0 {
						t.Errorf("to-netdev, mark %#x: verdict %d, source %s, mark %#x after; want %d, %s, 0",
							mark, r.Verdict, src, ctx.Mark, progtest.TCActOK, want)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// egressPrograms returns node n's from-endpoint and to-netdev programs, the
// two a pod's packet leaving the node runs through.
func egressPrograms(t testing.TB, n *clustertest.Node) (fromEndpoint, toNetdev *ebpf.Program) {
	t.Helper()
	st := core.Of(n.DP)
	progs, err := st.EndpointPrograms()
	if err != nil {
		t.Fatal(err)
	}
	toNetdev, err = st.NodeProgram(bpfobj.HostProgToNetdev)
	if err != nil {
		t.Fatal(err)
	}
	return progs.FromEndpoint, toNetdev
}
