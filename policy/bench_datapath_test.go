package policy_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/policy"
)

// rules returns n rules of identity and port, the last one allowing
// identity allow to TCP port 80: the others never match it.
func rules(n int, allow datapath.Identity) []policy.Rule {
	out := make([]policy.Rule, 0, n)
	for i := range n - 1 {
		out = append(out, policy.Rule{
			Peers: []policy.Peer{{Identity: 20000 + datapath.Identity(i%5000)}},
			Ports: []policy.Port{{Protocol: policy.TCP, Port: uint16(1000 + i/5000)}},
		})
	}
	return append(out, policy.Rule{Peers: []policy.Peer{{Identity: allow}}, Ports: []policy.Port{{Protocol: policy.TCP, Port: 80}}})
}

// BenchmarkPolicyPath measures what from-endpoint costs a packet from a to
// b, local delivery with conntrack and policy on both ends (a's egress, b's
// ingress), for policies of 1 to 100,000 rules, beside an empty tc program
// in the same run: new flows (the conntrack emptied before each pass) and
// established ones, over 4096 distinct flows, one run per packet.
//
//	go test -run '^$' -bench PolicyPath -benchtime 3x ./policy
func BenchmarkPolicyPath(b *testing.B) {
	n := newNodeWith(b, datapath.Limits{Conntrack: 65536}) // room for every flow

	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	st := core.Of(n.dp)
	progs, err := st.EndpointPrograms()
	if err != nil {
		b.Fatal(err)
	}
	var frames [][]byte
	for i := range 4096 {
		frames = append(frames, packet.Build(
			&packet.Ethernet{Src: n.a.MAC, Dst: n.a.HostMAC},
			&packet.IPv4{Src: n.a.IPv4, Dst: n.b.IPv4},
			&packet.TCP{SrcPort: uint16(10000 + i), DstPort: 80, Flags: packet.SYN},
		))
	}
	ctx := &progtest.SKB{Ifindex: uint32(n.a.HostIfindex)}
	clear := func() {
		var k []byte
		var keys [][]byte
		it := st.Objs.Conntrack.Iterate()
		var v []byte
		for it.Next(&k, &v) {
			keys = append(keys, append([]byte(nil), k...))
		}
		for _, k := range keys {
			st.Objs.Conntrack.Delete(k)
		}
	}
	for _, size := range []int{1, 100, 10_000, 100_000} {
		// Up to MaxRules a direction: the rest on the other end.
		in, out := size, 0
		if size > policy.MaxRules {
			in, out = size/2, size-size/2
		}
		if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, policy.Policy{Ingress: rules(in, 1001)}); err != nil {
			b.Fatal(err)
		}
		var egress []policy.Rule
		if out > 0 {
			egress = rules(out, 1002)
		}
		if _, err := policy.Apply(context.Background(), n.dp, n.a.ID, policy.Policy{Egress: egress}); err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("rules=%d", size), func(b *testing.B) {
			var newFlow, established, base time.Duration
			err := nsrun.Do(n.ns.Handle, func() error {
				for range b.N {
					clear()
					nw, err := progtest.MeanCost(progs.FromEndpoint, frames, ctx, 1)
					if err != nil {
						return err
					}
					est, err := progtest.MeanCost(progs.FromEndpoint, frames, ctx, 1)
					if err != nil {
						return err
					}
					e, err := progtest.MeanCost(empty, frames, ctx, 1)
					if err != nil {
						return err
					}
					newFlow, established, base = newFlow+nw, established+est, base+e
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			r, _ := progtest.Run(progs.FromEndpoint, frames[0], ctx)
			if r.Verdict != progtest.TCActRedirect {
				b.Fatalf("verdict %d: the flow is not delivered", r.Verdict)
			}
			ns := func(d time.Duration) float64 { return float64(d) / float64(b.N) }
			b.ReportMetric(ns(newFlow), "new-ns/pkt")
			b.ReportMetric(ns(established), "est-ns/pkt")
			b.ReportMetric(ns(base), "empty-ns/pkt")
			b.ReportMetric(ns(newFlow)/ns(base), "new-x-empty")
			b.ReportMetric(ns(established)/ns(base), "est-x-empty")
		})
	}
}

// BenchmarkApply measures Apply of a 10,000-rule policy from none, and of a
// one-rule change to it.
//
//	go test -run '^$' -bench Apply -benchtime 10x ./policy
func BenchmarkApply(b *testing.B) {
	n := newNode(b)
	big := policy.Policy{Ingress: rules(10_000, 1001)}
	changed := policy.Policy{Ingress: append(rules(10_000, 1001)[:9_999:9_999], policy.Rule{
		Peers: []policy.Peer{{Identity: 1001}}, Ports: []policy.Port{{Protocol: policy.TCP, Port: 81}}})}
	b.Run("full=10000", func(b *testing.B) {
		for b.Loop() {
			if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, big); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			policy.Delete(context.Background(), n.dp, n.b.ID)
			b.StartTimer()
		}
	})
	if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, big); err != nil {
		b.Fatal(err)
	}
	b.Run("one-rule-change=10000", func(b *testing.B) {
		flip := false
		for b.Loop() {
			p := big
			if flip = !flip; flip {
				p = changed
			}
			if _, err := policy.Apply(context.Background(), n.dp, n.b.ID, p); err != nil {
				b.Fatal(err)
			}
		}
	})
}
