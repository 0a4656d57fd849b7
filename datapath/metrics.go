package datapath

import (
	"fmt"

	"github.com/sluicedp/sluice/internal/bpfobj"
)

// MetricKey selects one counter: packets with one verdict in one direction.
type MetricKey struct {
	Reason    Reason // ReasonForwarded for packets let through
	Direction Direction
}

// MetricValue is a counter's total over all CPUs.
type MetricValue struct {
	Packets uint64
	Bytes   uint64
}

// Metrics returns the datapath's packet counters, summed over CPUs. Only
// counters that moved are present. On a closed Datapath it fails with an
// error matching os.ErrClosed.
func (dp *Datapath) Metrics() (map[MetricKey]MetricValue, error) {
	release, err := dp.st.Use()
	if err != nil {
		return nil, err
	}
	defer release()
	out := make(map[MetricKey]MetricValue)
	var (
		key     uint32
		percpu  []bpfobj.TypesMetricsValue
		entries = dp.st.Objs.Metrics.Iterate()
	)
	for entries.Next(&key, &percpu) {
		var sum MetricValue
		for _, v := range percpu {
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
		}
		if sum.Packets == 0 {
			continue
		}
		out[MetricKey{Reason: Reason(key & 0xff), Direction: Direction(key >> 8)}] = sum
	}
	if err := entries.Err(); err != nil {
		return nil, fmt.Errorf("read metrics: %w", err)
	}
	return out, nil
}
