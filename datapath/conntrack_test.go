package datapath

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/sluicedp/sluice/internal/batch"
	"github.com/sluicedp/sluice/internal/bpfobj"
)

// plantFlow writes a tracked flow of endpoint 1 with source port sport,
// expiring at expires from now.
func plantFlow(t *testing.T, dp *Datapath, sport uint16, expires time.Duration) bpfobj.TypesCtKey {
	t.Helper()
	k := bpfobj.TypesCtKey{Sport: sport, Dport: 80, Proto: 6, Family: 4}
	copy(k.Saddr[:], []byte{198, 18, 1, 1})
	copy(k.Daddr[:], []byte{198, 18, 1, 2})
	v := bpfobj.TypesCtEntry{Endpoint: 1, Expires: uint64(int64(monotonic()) + int64(expires))}
	if err := dp.st.Objs.Conntrack.Put(&k, &v); err != nil {
		t.Fatal(err)
	}
	return k
}

func tracked(t *testing.T, dp *Datapath, k bpfobj.TypesCtKey) bool {
	t.Helper()
	var v bpfobj.TypesCtEntry
	return dp.st.Objs.Conntrack.Lookup(&k, &v) == nil
}

// CollectFlows removes what expired and keeps the rest; CollectFlowsEvery
// does it on a ticker until its context ends or the handle closes.
func TestCollectFlows(t *testing.T) {
	dp := open(t, Config{})
	old, live := plantFlow(t, dp, 1, -time.Second), plantFlow(t, dp, 2, time.Hour)
	n, err := dp.CollectFlows(context.Background())
	if err != nil || n != 1 {
		t.Fatalf("collected %d, %v; want 1", n, err)
	}
	if tracked(t, dp, old) || !tracked(t, dp, live) {
		t.Fatalf("after collecting: expired one tracked %v, live one %v", tracked(t, dp, old), tracked(t, dp, live))
	}

	if err := dp.CollectFlowsEvery(context.Background(), 0, nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("interval 0: %v, want ErrInvalid", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- dp.CollectFlowsEvery(ctx, 10*time.Millisecond, func(err error) { t.Error(err) }) }()
	old = plantFlow(t, dp, 3, -time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for tracked(t, dp, old) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if tracked(t, dp, old) {
		t.Error("the collector left an expired flow for 10 s")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("cancelled: %v", err)
	}

	go func() { done <- dp.CollectFlowsEvery(context.Background(), 10*time.Millisecond, nil) }()
	time.Sleep(50 * time.Millisecond)
	dp.Close()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrClosed) {
			t.Errorf("after Close: %v, want os.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("the collector kept running after Close")
	}
}

// Usage counts every entry of conntrack, over several batches, against
// the map's size; on a closed handle it fails with os.ErrClosed.
func TestUsage(t *testing.T) {
	dp := open(t, Config{Limits: Limits{Conntrack: 16384}})
	const flows = batch.Size*2 + 17
	for i := range flows {
		plantFlow(t, dp, uint16(i+1), time.Hour)
	}
	got, err := dp.Usage()
	if err != nil {
		t.Fatal(err)
	}
	want := []MapUsage{{"conntrack", flows, 16384}, {"snat", 0, 16384}} // masquerading: half as many flows, two entries each
	if len(got) != len(want) {
		t.Fatalf("usage %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("usage of %s: %+v, want %+v", want[i].Map, got[i], want[i])
		}
	}
	if f := got[0].Fill(); f != float64(flows)/16384 {
		t.Errorf("conntrack fill %v, want %v", f, float64(flows)/16384)
	}
	dp.Close()
	if _, err := dp.Usage(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("after Close: %v, want os.ErrClosed", err)
	}
}
