package service_test

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/policy"
	"github.com/sluicedp/sluice/service"
)

// BenchmarkServicePath measures what from-endpoint costs a packet the
// client sends to a frontend translated at tc (path=service: 10 backends,
// random, on endpoint a), beside the same packets sent to a backend
// directly (path=direct), with policy on both ends (the client's egress
// and a's ingress allow the flows): new flows (the conntrack emptied before
// each pass) and established ones, over 4096 distinct flows (client source
// ports), one run per packet. Each figure is the mean of the passes, in ns
// per packet and as a multiple of an empty tc program run on the same
// frames in the same pass (x-empty).
//
//	go test -run '^$' -bench ServicePath -benchtime 3x ./service
func BenchmarkServicePath(b *testing.B) {
	n := newNodeWith(b, datapath.Config{Limits: datapath.Limits{Conntrack: 65536}}) // room for every flow
	ctx := context.Background()
	allow := []policy.Port{{Protocol: policy.TCP, Port: ports10[0], EndPort: ports10[len(ports10)-1]}}
	if _, err := policy.Apply(ctx, n.dp, n.client.ID, policy.Policy{Egress: []policy.Rule{{
		Peers: []policy.Peer{{Identity: n.a.Identity}}, Ports: allow}}}); err != nil {
		b.Fatal(err)
	}
	if _, err := policy.Apply(ctx, n.dp, n.a.ID, policy.Policy{Ingress: []policy.Rule{{
		Peers: []policy.Peer{{Identity: n.client.Identity}}, Ports: allow}}}); err != nil {
		b.Fatal(err)
	}
	fe := netip.AddrPortFrom(fe4, 80)
	upsert(b, n.dp, service.Service{
		Frontend: service.Frontend{Addr: fe.Addr(), Port: fe.Port(), Protocol: service.TCP},
		Backends: backends(n.a, false, ports10...),
		Reach:    service.TCOnly,
	})

	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	prog := fromEndpoint(b, n)

	var toService, direct [][]byte
	for i := range 4096 {
		client := netip.AddrPortFrom(n.client.IPv4, uint16(10000+i))
		be := netip.AddrPortFrom(n.a.IPv4, ports10[i%len(ports10)])
		toService = append(toService, flowFrame(n.client, service.TCP, client, fe, packet.SYN, 0, false))
		direct = append(direct, flowFrame(n.client, service.TCP, client, be, packet.SYN, 0, false))
	}
	skb := &progtest.SKB{Ifindex: uint32(n.client.HostIfindex)}

	for _, path := range []struct {
		name   string
		frames [][]byte
	}{{"service", toService}, {"direct", direct}} {
		for _, fresh := range []bool{true, false} {
			flows := "established"
			if fresh {
				flows = "new"
			}
			b.Run(fmt.Sprintf("path=%s/flows=%s", path.name, flows), func(b *testing.B) {
				// One pass first, each frame checked: every flow is
				// delivered, and now established.
				clearConntrack(b, n.dp)
				var cost, base time.Duration
				err := nsrun.Do(n.ns.Handle, func() error {
					for i, f := range path.frames {
						r, err := progtest.Run(prog, f, skb)
						if err != nil {
							return err
						}
						if r.Verdict != progtest.TCActRedirect {
							return fmt.Errorf("flow %d: verdict %d, not delivered", i, r.Verdict)
						}
					}
					for range b.N {
						if fresh {
							if err := emptyConntrack(n.dp); err != nil {
								return err
							}
						}
						c, err := progtest.MeanCost(prog, path.frames, skb, 1)
						if err != nil {
							return err
						}
						e, err := progtest.MeanCost(empty, path.frames, skb, 1)
						if err != nil {
							return err
						}
						cost, base = cost+c, base+e
					}
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
				ns := func(d time.Duration) float64 { return float64(d) / float64(b.N) }
				b.ReportMetric(ns(cost), "ns/pkt")
				b.ReportMetric(ns(base), "empty-ns/pkt")
				b.ReportMetric(ns(cost)/ns(base), "x-empty")
			})
		}
	}
}
