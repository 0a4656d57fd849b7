// Package sluiceprom exports a sluice datapath's counters to Prometheus:
// a prometheus.Collector that any program embedding sluice registers,
// which reads the datapath's maps at each scrape.
//
// It is a module of its own, so that the library does not depend on the
// Prometheus client. The series, each labelled with the datapath's name
// (datapath="..."):
//
//	sluice_forwarded_packets_total{direction}           packets let through
//	sluice_forwarded_bytes_total{direction}
//	sluice_drop_packets_total{reason,direction}         packets dropped, by datapath.Reason
//	sluice_drop_bytes_total{reason,direction}
//	sluice_endpoint_packets_total{endpoint,direction}   what each endpoint sent (egress) and received (ingress)
//	sluice_endpoint_bytes_total{endpoint,direction}
//	sluice_service_backend_packets_total{frontend,backend}  translated to each backend per packet
//	sluice_service_backend_bytes_total{frontend,backend}
//	sluice_service_backend_flows_total{frontend,backend}    new flows sent to each backend
//	sluice_policy_rule_flows_total{endpoint,direction,rule} new flows each rule decided
//	sluice_map_entries{map}                              conntrack and masquerading entries
//	sluice_map_capacity{map}
//	sluice_map_fill_ratio{map}                           entries over capacity
//	sluice_events_lost_total{cause}                      event records not sent: ring_full, rate_limited
//
// Reasons and directions are the names the CLI and events use
// (POLICY_DENIED, egress). An endpoint is its ID, a rule its index in
// its direction of the endpoint's policy, a frontend and a backend their
// address, port (and protocol, for the frontend).
package sluiceprom

import (
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/policy"
	"github.com/sluicedp/sluice/service"
)

// DefaultUsageInterval is Options.UsageInterval's default.
const DefaultUsageInterval = 30 * time.Second

// Options tune a Collector; the zero value is the default.
type Options struct {
	// UsageInterval is how old the map usage (sluice_map_*) a scrape
	// reports may be. Counting reads the conntrack and masquerading maps
	// whole, at a cost that grows with their capacity (about 13 ms for
	// the default conntrack room on one machine), so a scrape counts
	// again only once the last count is older than this.
	// DefaultUsageInterval when 0; negative: count at every scrape.
	UsageInterval time.Duration
}

// Collector is a prometheus.Collector of one datapath's counters.
type Collector struct {
	dp   *datapath.Datapath
	opts Options

	mu        sync.Mutex
	usage     []datapath.MapUsage // the last count
	usageTime time.Time           // when it was made

	forwardedPackets, forwardedBytes *prometheus.Desc
	dropPackets, dropBytes           *prometheus.Desc
	endpointPackets, endpointBytes   *prometheus.Desc
	backendPackets, backendBytes     *prometheus.Desc
	backendFlows                     *prometheus.Desc
	ruleFlows                        *prometheus.Desc
	mapEntries, mapCapacity, mapFill *prometheus.Desc
	eventsLost                       *prometheus.Desc
}

// New returns a Collector of dp's counters. A read-only handle
// (datapath.OpenReadOnly) will do: an exporter can run beside the
// program that owns the datapath. A scrape that fails to read a part of
// the datapath (a closed handle) fails with the error.
func New(dp *datapath.Datapath, opts Options) *Collector {
	if opts.UsageInterval == 0 {
		opts.UsageInterval = DefaultUsageInterval
	}
	labels := prometheus.Labels{"datapath": dp.Name()}
	desc := func(name, help string, variable ...string) *prometheus.Desc {
		return prometheus.NewDesc("sluice_"+name, help, variable, labels)
	}
	return &Collector{
		dp:               dp,
		opts:             opts,
		forwardedPackets: desc("forwarded_packets_total", "Packets the datapath let through.", "direction"),
		forwardedBytes:   desc("forwarded_bytes_total", "Bytes of the packets the datapath let through.", "direction"),
		dropPackets:      desc("drop_packets_total", "Packets the datapath dropped, by reason.", "reason", "direction"),
		dropBytes:        desc("drop_bytes_total", "Bytes of the packets the datapath dropped, by reason.", "reason", "direction"),
		endpointPackets:  desc("endpoint_packets_total", "Packets an endpoint sent (egress) and was delivered (ingress).", "endpoint", "direction"),
		endpointBytes:    desc("endpoint_bytes_total", "Bytes an endpoint sent (egress) and was delivered (ingress).", "endpoint", "direction"),
		backendPackets:   desc("service_backend_packets_total", "Packets translated to a service backend per packet.", "frontend", "backend"),
		backendBytes:     desc("service_backend_bytes_total", "Bytes translated to a service backend per packet.", "frontend", "backend"),
		backendFlows:     desc("service_backend_flows_total", "New flows sent to a service backend, per packet or per socket.", "frontend", "backend"),
		ruleFlows:        desc("policy_rule_flows_total", "New flows a rule of an endpoint's policy decided.", "endpoint", "direction", "rule"),
		mapEntries:       desc("map_entries", "Entries in a map that traffic fills.", "map"),
		mapCapacity:      desc("map_capacity", "The most entries a map that traffic fills holds.", "map"),
		mapFill:          desc("map_fill_ratio", "Entries over capacity of a map that traffic fills.", "map"),
		eventsLost:       desc("events_lost_total", "Event records the datapath could not send.", "cause"),
	}
}

// Describe sends the descriptions of every series the Collector makes.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.forwardedPackets, c.forwardedBytes, c.dropPackets, c.dropBytes,
		c.endpointPackets, c.endpointBytes, c.backendPackets, c.backendBytes, c.backendFlows,
		c.ruleFlows, c.mapEntries, c.mapCapacity, c.mapFill, c.eventsLost,
	} {
		ch <- d
	}
}

// Collect reads the datapath's counters and sends them. What it cannot
// read is sent as an invalid metric carrying the error, which fails the
// scrape.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	fail := func(d *prometheus.Desc, err error) { ch <- prometheus.NewInvalidMetric(d, err) }

	if metrics, err := c.dp.Metrics(); err != nil {
		fail(c.dropPackets, err)
	} else {
		for k, v := range metrics {
			dir := k.Direction.String()
			if k.Reason == datapath.ReasonForwarded {
				counter(c.forwardedPackets, v.Packets, dir)
				counter(c.forwardedBytes, v.Bytes, dir)
				continue
			}
			counter(c.dropPackets, v.Packets, k.Reason.String(), dir)
			counter(c.dropBytes, v.Bytes, k.Reason.String(), dir)
		}
	}

	if err := c.collectEndpoints(counter); err != nil {
		fail(c.endpointPackets, err)
	}

	if all, err := service.ReadAllCounters(c.dp); err != nil {
		fail(c.backendPackets, err)
	} else {
		for fe, backends := range all {
			for _, b := range backends {
				labels := []string{fe.String(), b.Backend.String()}
				counter(c.backendPackets, b.Packets, labels...)
				counter(c.backendBytes, b.Bytes, labels...)
				counter(c.backendFlows, b.Flows, labels...)
			}
		}
	}

	if err := c.collectRules(counter); err != nil {
		fail(c.ruleFlows, err)
	}

	if usage, err := c.mapUsage(); err != nil {
		fail(c.mapEntries, err)
	} else {
		for _, u := range usage {
			gauge(c.mapEntries, float64(u.Entries), u.Map)
			gauge(c.mapCapacity, float64(u.Capacity), u.Map)
			gauge(c.mapFill, u.Fill(), u.Map)
		}
	}

	if lost, err := c.dp.Lost(); err != nil {
		fail(c.eventsLost, err)
	} else {
		counter(c.eventsLost, lost.RingFull, "ring_full")
		counter(c.eventsLost, lost.RateLimited, "rate_limited")
	}
}

// collectEndpoints sends each endpoint's counters.
func (c *Collector) collectEndpoints(counter func(*prometheus.Desc, uint64, ...string)) error {
	all, err := endpoint.ReadAllCounters(c.dp)
	if err != nil {
		return err
	}
	for id, n := range all {
		ep := strconv.Itoa(int(id))
		counter(c.endpointPackets, n.PacketsOut, ep, datapath.Egress.String())
		counter(c.endpointBytes, n.BytesOut, ep, datapath.Egress.String())
		counter(c.endpointPackets, n.PacketsIn, ep, datapath.Ingress.String())
		counter(c.endpointBytes, n.BytesIn, ep, datapath.Ingress.String())
	}
	return nil
}

// collectRules sends the counters of each rule of each endpoint's policy.
func (c *Collector) collectRules(counter func(*prometheus.Desc, uint64, ...string)) error {
	all, err := policy.ReadAllCounters(c.dp)
	if err != nil {
		return err
	}
	for id, n := range all {
		ep := strconv.Itoa(int(id))
		for dir, rules := range map[datapath.Direction][]uint64{datapath.Ingress: n.Ingress, datapath.Egress: n.Egress} {
			for rule, flows := range rules {
				counter(c.ruleFlows, flows, ep, dir.String(), strconv.Itoa(rule))
			}
		}
	}
	return nil
}

// mapUsage returns the last count of the maps' usage, counting again when
// it is older than the interval.
func (c *Collector) mapUsage() ([]datapath.MapUsage, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.usage != nil && time.Since(c.usageTime) < c.opts.UsageInterval {
		return c.usage, nil
	}
	usage, err := c.dp.Usage()
	if err != nil {
		return nil, err
	}
	c.usage, c.usageTime = usage, time.Now()
	return usage, nil
}
