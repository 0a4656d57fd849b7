package endpoint

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
)

// BenchmarkCreateDelete creates 100 endpoints, each in a namespace of its
// own, then deletes them, and reports the median and 99th percentile of
// each call.
//
//	go test -run '^$' -bench CreateDelete -benchtime 1x ./endpoint
func BenchmarkCreateDelete(b *testing.B) {
	w := newProgWorld(b)
	const n = 100
	var creates, deletes []time.Duration
	for range b.N {
		for i := range n {
			s := Spec{
				ID:       uint16(100 + i),
				IPv4:     netip.AddrFrom4([4]byte{198, 18, 1, byte(100 + i)}),
				Identity: 1000,
				NetNS:    testutil.Name("sluice-b-"),
			}
			start := time.Now()
			if _, err := Create(context.Background(), w.dp, s); err != nil {
				b.Fatal(err)
			}
			creates = append(creates, time.Since(start))
		}
		for i := range n {
			start := time.Now()
			if err := Delete(context.Background(), w.dp, uint16(100+i)); err != nil {
				b.Fatal(err)
			}
			deletes = append(deletes, time.Since(start))
		}
	}
	report := func(name string, d []time.Duration) {
		slices.Sort(d)
		b.ReportMetric(float64(d[len(d)/2].Microseconds())/1000, name+"-p50-ms")
		b.ReportMetric(float64(d[len(d)*99/100].Microseconds())/1000, name+"-p99-ms")
	}
	report("create", creates)
	report("delete", deletes)
}

// BenchmarkFromEndpoint measures what from-endpoint costs a packet, beside an
// empty tc program run on the same packets in the same run: one run per
// packet (Repeat = 1), over 256 distinct flows, for delivery to a local
// endpoint and for a packet handed to the stack.
//
//	go test -run '^$' -bench FromEndpoint ./endpoint
func BenchmarkFromEndpoint(b *testing.B) {
	w := newProgWorld(b)
	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	// Events stay on (drops only), as by default; this path drops nothing.
	prog := w.prog

	flows := func(dst netip.Addr) [][]byte {
		var out [][]byte
		for port := range 256 {
			out = append(out, frame(w.a, dst, &packet.UDP{SrcPort: uint16(10000 + port), DstPort: 53}))
		}
		return out
	}
	for _, tc := range []struct {
		name   string
		frames [][]byte
	}{
		{"local", flows(w.b.IPv4)},
		{"stack", flows(netip.MustParseAddr("198.18.200.1"))},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := &progtest.SKB{Ifindex: uint32(w.a.HostIfindex)}
			var ours, base time.Duration
			err := nsrun.Do(w.nodeNS, func() (err error) {
				for range b.N {
					// Interleave, so both see the same machine.
					o, err := progtest.MeanCost(prog, tc.frames, ctx, 4)
					if err != nil {
						return err
					}
					e, err := progtest.MeanCost(empty, tc.frames, ctx, 4)
					if err != nil {
						return err
					}
					ours += o
					base += e
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			ns := func(d time.Duration) float64 { return float64(d) / float64(b.N) }
			b.ReportMetric(ns(ours), "ns/pkt")
			b.ReportMetric(ns(base), "empty-ns/pkt")
			b.ReportMetric(ns(ours)-ns(base), "added-ns/pkt")
			b.ReportMetric(ns(ours)/ns(base), "x-empty")
		})
	}
}
