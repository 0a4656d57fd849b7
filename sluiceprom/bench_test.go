package sluiceprom_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"net/netip"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/policy"
	"github.com/sluicedp/sluice/service"
	"github.com/sluicedp/sluice/sluiceprom"
)

// BenchmarkScrape measures one scrape of /metrics (promhttp, text format)
// of a datapath with N endpoints, each with a policy of two rules in each
// direction, and N services of two backends each: ms/scrape, the series
// it returns, and their bytes. Making 10,000 endpoints takes a minute or
// two; the scrape is what is timed.
//
//	go test -run '^$' -bench Scrape -benchtime 3x ./...
func BenchmarkScrape(b *testing.B) {
	for _, n := range []int{100, 10000} {
		b.Run(fmt.Sprintf("endpoints=%d/services=%d", n, n), func(b *testing.B) {
			dp := scrapeWorld(b, n)
			reg := prometheus.NewRegistry()
			reg.MustRegister(sluiceprom.New(dp, sluiceprom.Options{}))
			handler := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
			var bytes, series int
			b.ResetTimer()
			for range b.N {
				rec := httptest.NewRecorder()
				handler.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
				if rec.Code != 200 {
					b.Fatalf("scrape: HTTP %d: %s", rec.Code, rec.Body)
				}
				bytes = rec.Body.Len()
			}
			b.StopTimer()
			families, err := reg.Gather()
			if err != nil {
				b.Fatal(err)
			}
			for _, f := range families {
				series += len(f.Metric)
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/scrape")
			b.ReportMetric(float64(series), "series")
			b.ReportMetric(float64(bytes), "bytes/scrape")
		})
	}
}

// scrapeWorld makes a datapath with n endpoints (all in one workload
// namespace, each its own veth pair), each with a policy, and n services.
func scrapeWorld(b *testing.B, n int) *datapath.Datapath {
	testutil.Privileged(b)
	ctx := context.Background()
	node := testutil.NewNetNS(b)
	dp, err := datapath.Open(ctx, datapath.Config{
		Name: "node", NetNS: node.Path, BPFFS: testutil.BPFFS(b),
		Node: datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.0.0/16")}},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.Unload() })
	workloads := testutil.NewNetNS(b)
	addr := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, byte(1 + i/250), byte(1 + i%250)}) }
	rules := []policy.Rule{
		{Action: policy.Allow, Peers: []policy.Peer{{Identity: 1000}}, Ports: []policy.Port{{Protocol: policy.TCP, Port: 80}}},
		{Action: policy.Deny, Ports: []policy.Port{{Protocol: policy.UDP, Port: 19}}},
	}
	for i := range n {
		id := uint16(i + 1)
		if _, err := endpoint.Create(ctx, dp, endpoint.Spec{ID: id, IPv4: addr(i), Identity: 1000,
			NetNS: workloads.Path, IfName: fmt.Sprintf("w%d", id)}); err != nil {
			b.Fatal(err)
		}
		if _, err := policy.Apply(ctx, dp, id, policy.Policy{Ingress: rules, Egress: rules}); err != nil {
			b.Fatal(err)
		}
	}
	// No Delete of each endpoint at the end: Unload takes the datapath
	// apart, and the namespaces go with their veth pairs.
	var svcs []service.Service
	for i := range n {
		svcs = append(svcs, service.Service{
			Frontend: service.Frontend{Addr: netip.AddrFrom4([4]byte{198, 19, byte(i / 250), byte(1 + i%250)}), Port: 80, Protocol: service.TCP},
			Backends: []service.Backend{{Addr: addr(i), Port: 8080, Weight: 1}, {Addr: addr((i + 1) % n), Port: 8080, Weight: 1}},
		})
	}
	if _, err := service.Sync(ctx, dp, "bench", svcs); err != nil {
		b.Fatal(err)
	}
	return dp
}
