package sluiceprom_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/policy"
	"github.com/sluicedp/sluice/service"
	"github.com/sluicedp/sluice/sluiceprom"
)

// scrape gets /metrics from srv and parses it, by family name.
func scrape(t *testing.T, srv *httptest.Server) (map[string]*dto.MetricFamily, int) {
	t.Helper()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, resp.StatusCode
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return families, resp.StatusCode
}

// value returns the value of the series of family name with exactly the
// labels (besides datapath, which every series must carry as "node"), and
// whether there is one.
func value(t *testing.T, families map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	t.Helper()
	f := families[name]
	if f == nil {
		return 0, false
	}
	for _, m := range f.Metric {
		var got []string
		for _, l := range m.Label {
			if l.GetName() == "datapath" {
				if l.GetValue() != "node" {
					t.Errorf("%s: datapath=%q, want node", name, l.GetValue())
				}
				continue
			}
			got = append(got, l.GetName()+"="+l.GetValue())
		}
		if !slices.Equal(got, labels) {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		}
	}
	return 0, false
}

// A scrape over HTTP shows what the datapath counted: five datagrams a
// policy denies are five drops with POLICY_DENIED and five flows of the
// deny rule; two datagrams through a service frontend are two packets and
// one flow of its backend; the endpoints' counters, the map usage and
// lost events agree with the library's own reads. Once the handle is
// closed, a scrape fails.
func TestCollector(t *testing.T) {
	testutil.Privileged(t)
	ctx := context.Background()
	node, bpffs := testutil.NewNetNS(t), testutil.BPFFS(t)
	dp, err := datapath.Open(ctx, datapath.Config{
		Name: "node", NetNS: node.Path, BPFFS: bpffs,
		Node: datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Unload() })
	a, err := endpoint.Create(ctx, dp, endpoint.Spec{ID: 1, IPv4: netip.MustParseAddr("198.18.1.10"), Identity: 1000, NetNS: testutil.Name("sluice-t-")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { endpoint.Delete(ctx, dp, a.ID) })
	b, err := endpoint.Create(ctx, dp, endpoint.Spec{ID: 2, IPv4: netip.MustParseAddr("198.18.1.11"), Identity: 1001, NetNS: testutil.Name("sluice-t-")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { endpoint.Delete(ctx, dp, b.ID) })
	udp := func(port uint16) []policy.Port { return []policy.Port{{Protocol: policy.UDP, Port: port}} }
	if _, err := policy.Apply(ctx, dp, b.ID, policy.Policy{Ingress: []policy.Rule{
		{Action: policy.Allow, Ports: udp(9)},
		{Action: policy.Deny, Ports: udp(19)},
	}}); err != nil {
		t.Fatal(err)
	}
	fe := service.Frontend{Addr: netip.MustParseAddr("198.18.200.1"), Port: 9, Protocol: service.UDP}
	if _, err := service.Upsert(ctx, dp, service.Service{Frontend: fe,
		Backends: []service.Backend{{Addr: b.IPv4, Port: 9, Weight: 1}}, Reach: service.TCOnly}); err != nil {
		t.Fatal(err)
	}
	bNS := testutil.OpenNetNS(t, b.NetNS)
	sink := bNS.ListenUDP(t, netip.AddrPortFrom(b.IPv4, 9))
	aNS := testutil.OpenNetNS(t, a.NetNS)
	send := func(to netip.AddrPort, n int) {
		aNS.Do(t, func() error {
			c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
			if err != nil {
				return err
			}
			defer c.Close()
			for range n {
				if _, err := c.Write([]byte("x")); err != nil {
					return err
				}
			}
			return nil
		})
	}
	send(netip.AddrPortFrom(b.IPv4, 19), 5)
	send(netip.AddrPortFrom(fe.Addr, fe.Port), 2)
	if got := testutil.Receive(sink, 2, 2*time.Second); len(got) != 2 {
		t.Fatalf("the backend received %d datagrams through the frontend, want 2", len(got))
	}

	// The drops are counted in softirq, maybe on another CPU than the
	// one that sent them: wait for all five.
	denied := datapath.MetricKey{Reason: datapath.ReasonPolicyDenied, Direction: datapath.Ingress}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		m, err := dp.Metrics()
		if err != nil {
			t.Fatal(err)
		}
		if m[denied].Packets >= 5 || time.Now().After(deadline) {
			break
		}
	}

	// The collector reads through a handle of its own, as an exporter
	// beside the program that owns the datapath would.
	reader, err := datapath.OpenReadOnly(ctx, datapath.Config{Name: "node", BPFFS: bpffs, MustExist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(sluiceprom.New(reader, sluiceprom.Options{}))
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	t.Cleanup(srv.Close)
	families, status := scrape(t, srv)
	if status != http.StatusOK {
		t.Fatalf("scrape: HTTP %d", status)
	}

	backend := netip.AddrPortFrom(b.IPv4, 9).String()
	for _, want := range []struct {
		name   string
		labels []string
		value  float64
	}{
		{"sluice_drop_packets_total", []string{"direction=ingress", "reason=POLICY_DENIED"}, 5},
		{"sluice_policy_rule_flows_total", []string{"direction=ingress", "endpoint=2", "rule=1"}, 5},
		{"sluice_policy_rule_flows_total", []string{"direction=ingress", "endpoint=2", "rule=0"}, 1},
		{"sluice_service_backend_packets_total", []string{"backend=" + backend, "frontend=" + fe.String()}, 2},
		{"sluice_service_backend_flows_total", []string{"backend=" + backend, "frontend=" + fe.String()}, 1},
		{"sluice_map_capacity", []string{"map=conntrack"}, float64(dp.Limits().Conntrack)},
		{"sluice_events_lost_total", []string{"cause=ring_full"}, 0},
	} {
		if got, ok := value(t, families, want.name, want.labels...); !ok || got != want.value {
			t.Errorf("%s%v = %v (present %v), want %v", want.name, want.labels, got, ok, want.value)
		}
	}

	// What only the library knows exactly: the scrape must agree with it.
	// The endpoints' counters may move in between (neighbour discovery),
	// never back.
	for _, ep := range []*endpoint.Endpoint{a, b} {
		after, err := endpoint.ReadCounters(dp, ep.ID)
		if err != nil {
			t.Fatal(err)
		}
		id := fmt.Sprint(ep.ID)
		got, _ := value(t, families, "sluice_endpoint_packets_total", "direction=egress", "endpoint="+id)
		if got > float64(after.PacketsOut) {
			t.Errorf("endpoint %s egress packets %v, the library counts %d", id, got, after.PacketsOut)
		}
	}
	if got, _ := value(t, families, "sluice_endpoint_packets_total", "direction=egress", "endpoint=1"); got < 7 {
		t.Errorf("endpoint 1 sent at least 7 packets, the scrape says %v", got)
	}
	entries, ok := value(t, families, "sluice_map_entries", "map=conntrack")
	fill, _ := value(t, families, "sluice_map_fill_ratio", "map=conntrack")
	if !ok || entries < 2 || fill != entries/float64(dp.Limits().Conntrack) {
		t.Errorf("conntrack: %v entries (present %v), fill %v", entries, ok, fill)
	}
	for name, f := range families {
		if !strings.HasPrefix(name, "sluice_") || f.GetHelp() == "" {
			t.Errorf("family %s: not sluice's, or without help", name)
		}
	}

	reader.Close()
	if _, status := scrape(t, srv); status != http.StatusInternalServerError {
		t.Errorf("scrape of a closed datapath: HTTP %d, want 500", status)
	}
}
