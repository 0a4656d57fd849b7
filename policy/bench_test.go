package policy

import (
	"fmt"
	"testing"

	"github.com/sluicedp/sluice/datapath"
)

// BenchmarkCompile compiles and resolves policies of identity and port
// rules; more than MaxRules go half to each direction.
func BenchmarkCompile(b *testing.B) {
	for _, n := range []int{1, 100, 10_000, 100_000} {
		var p Policy
		for i := range n {
			r := Rule{
				Peers: []Peer{{Identity: datapath.MinIdentity + datapath.Identity(i%1000)}},
				Ports: []Port{{Protocol: TCP, Port: uint16(1 + i/1000)}},
			}
			if n > MaxRules && i%2 == 1 {
				p.Egress = append(p.Egress, r)
			} else {
				p.Ingress = append(p.Ingress, r)
			}
		}
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			for b.Loop() {
				c, err := Compile(p)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.Resolve(1, nil); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/rule")
		})
	}
}
