package datapath

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/packet"
)

// Event is a record from the datapath: a *DropEvent, a *TraceEvent or a
// *LostEvent.
type Event interface {
	fmt.Stringer
	event()
}

// Packet is what an event tells about the packet it concerns.
type Packet struct {
	Direction Direction
	Ifindex   uint32        // interface the packet was on, in the datapath's namespace
	Endpoint  uint32        // endpoint ID, 0 when none
	Length    uint32        // length of the whole packet
	Time      time.Duration // CLOCK_MONOTONIC when it was seen
	Head      []byte        // the first bytes of the packet (at most 128)
}

// Summary describes the packet's headers on one line.
func (p *Packet) Summary() string { return packet.Describe(p.Head) }

func (p *Packet) String() string {
	s := fmt.Sprintf("%s ifindex=%d", p.Direction, p.Ifindex)
	if p.Endpoint != 0 {
		s += fmt.Sprintf(" endpoint=%d", p.Endpoint)
	}
	return s + fmt.Sprintf(" len=%d: %s", p.Length, p.Summary())
}

// DropEvent reports a packet the datapath dropped, and why.
type DropEvent struct {
	Reason Reason
	Packet
}

func (e *DropEvent) String() string { return fmt.Sprintf("drop %s %s", e.Reason, &e.Packet) }
func (*DropEvent) event()           {}

// TraceEvent reports a packet passing a trace point.
type TraceEvent struct {
	Point TracePoint
	Packet
}

func (e *TraceEvent) String() string { return fmt.Sprintf("trace %s %s", e.Point, &e.Packet) }
func (*TraceEvent) event()           {}

// LostEvent reports records the datapath could not send since the last
// report: the ring buffer was full, or the rate limit held them back.
type LostEvent struct {
	RingFull    uint64
	RateLimited uint64
}

func (e *LostEvent) String() string {
	return fmt.Sprintf("lost %d records (ring full) and %d (rate limited)", e.RingFull, e.RateLimited)
}
func (*LostEvent) event() {}

// SetEventConfig switches events on or off and sets their rate limit, for
// packets from now on. It returns ErrInvalid for a bad config, and for a
// rate and burst whose records could overflow the datapath's ring buffer
// (sized at its first Open from the CPU count and the event config then).
func (dp *Datapath) SetEventConfig(cfg EventConfig) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	ring := uint64(dp.st.Objs.Events.MaxEntries())
	if need := ringBytes(cfg, cpus()); cfg.RatePerCPU != 0 && need > ring {
		return fmt.Errorf("events at %d/s and bursts of %d per CPU on %d CPUs need a ring of %d bytes, this datapath's has %d: %w",
			cfg.RatePerCPU, cfg.Burst, cpus(), need, ring, ErrInvalid)
	}
	var v bpfobj.TypesEventSettings
	if cfg.Drops {
		v.Flags |= eventFlagDrops
	}
	if cfg.Traces {
		v.Flags |= eventFlagTraces
	}
	v.Rate, v.Burst = cfg.RatePerCPU, cfg.Burst
	if err := dp.st.Objs.EventConfig.Put(uint32(0), &v); err != nil {
		return fmt.Errorf("set event config: %w", err)
	}
	return nil
}

// EventConfig returns the event settings in force.
func (dp *Datapath) EventConfig() (EventConfig, error) {
	var v bpfobj.TypesEventSettings
	if err := dp.st.Objs.EventConfig.Lookup(uint32(0), &v); err != nil {
		return EventConfig{}, fmt.Errorf("read event config: %w", err)
	}
	return EventConfig{
		Drops:      v.Flags&eventFlagDrops != 0,
		Traces:     v.Flags&eventFlagTraces != 0,
		RatePerCPU: v.Rate,
		Burst:      v.Burst,
	}, nil
}

const eventVersion = uint8(bpfobj.TypesEventVersionEVENT_VERSION)

// The ring buffer's size: a power of two from minRing to maxRing bytes.
const (
	minRing = 1 << 20
	maxRing = 1 << 28
)

// recordBytes is what one event takes in the ring buffer: the record and
// the ring's 8-byte header, rounded up to 8 bytes.
var recordBytes = uint64(binary.Size(bpfobj.TypesEvent{})+8+7) &^ 7

// ringBytes is the ring size that holds what cfg lets ncpu CPUs send before
// a reader catches up: every CPU's burst at once, and 100 ms of every
// CPU's rate.
func ringBytes(cfg EventConfig, ncpu int) uint64 {
	need := uint64(ncpu) * (uint64(cfg.Burst) + uint64(cfg.RatePerCPU)/10) * recordBytes
	size := uint64(minRing)
	for size < need && size < maxRing {
		size <<= 1
	}
	return size
}

// cpus is how many CPUs the kernel may run programs on.
func cpus() int {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return runtime.NumCPU()
	}
	return n
}

const (
	eventFlagDrops  = uint32(bpfobj.TypesEventFlagEVENT_FLAG_DROPS)
	eventFlagTraces = uint32(bpfobj.TypesEventFlagEVENT_FLAG_TRACES)
)

// lostPoll is how often Events checks the lost-record counters.
const lostPoll = 250 * time.Millisecond

// Events streams the datapath's events until ctx ends or the datapath is
// closed, then closes the channel. Records lost since the call are reported as *LostEvent. One reader
// at a time: a ring buffer hands each record to one consumer, so a second
// call while one runs returns ErrExists.
func (dp *Datapath) Events(ctx context.Context) (<-chan Event, error) {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	if dp.stopEvents != nil {
		return nil, fmt.Errorf("events: a reader is running already: %w", ErrExists)
	}
	rd, err := ringbuf.NewReader(dp.st.Objs.Events)
	if err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	last, err := dp.lostCounts()
	if err != nil {
		rd.Close()
		return nil, err
	}

	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	dp.stopEvents = func() { cancel(); <-done }
	out := make(chan Event, 64)
	stopRead := context.AfterFunc(ctx, func() { rd.Close() })
	go func() {
		defer func() {
			stopRead()
			rd.Close()
			close(out)
			dp.mu.Lock()
			dp.stopEvents = nil
			dp.mu.Unlock()
			cancel()
			close(done)
		}()
		send := func(ev Event) bool {
			select {
			case out <- ev:
				return true
			case <-ctx.Done():
				return false
			}
		}
		nextCheck := time.Now().Add(lostPoll)
		for {
			rd.SetDeadline(nextCheck)
			rec, err := rd.Read()
			switch {
			case err == nil:
				if ev, err := decodeEvent(rec.RawSample); err == nil && !send(ev) {
					return
				}
			case errors.Is(err, os.ErrDeadlineExceeded):
			default: // closed: ctx ended
				return
			}
			if ctx.Err() != nil {
				return
			}
			if time.Now().Before(nextCheck) {
				continue
			}
			nextCheck = time.Now().Add(lostPoll)
			now, err := dp.lostCounts()
			if err != nil {
				continue
			}
			if lost := (LostEvent{now.RingFull - last.RingFull, now.RateLimited - last.RateLimited}); lost != (LostEvent{}) {
				last = now
				if !send(&lost) {
					return
				}
			}
		}
	}()
	return out, nil
}

// Lost returns how many records the datapath could not send since it was
// created.
func (dp *Datapath) Lost() (LostEvent, error) { return dp.lostCounts() }

func (dp *Datapath) lostCounts() (LostEvent, error) {
	var out LostEvent
	for key, dst := range map[uint32]*uint64{
		uint32(bpfobj.TypesEventLostCauseLOST_RING_FULL):    &out.RingFull,
		uint32(bpfobj.TypesEventLostCauseLOST_RATE_LIMITED): &out.RateLimited,
	} {
		var percpu []uint64
		if err := dp.st.Objs.EventLost.Lookup(key, &percpu); err != nil {
			return LostEvent{}, fmt.Errorf("read lost-event counters: %w", err)
		}
		for _, n := range percpu {
			*dst += n
		}
	}
	return out, nil
}

func decodeEvent(raw []byte) (Event, error) {
	var rec bpfobj.TypesEvent
	if err := binary.Read(bytes.NewReader(raw), binary.NativeEndian, &rec); err != nil {
		return nil, fmt.Errorf("decode event: %w", err)
	}
	if rec.Version != eventVersion {
		return nil, fmt.Errorf("decode event: record version %d, this build reads %d: %w", rec.Version, eventVersion, ErrIncompatible)
	}
	p := Packet{
		Direction: Direction(rec.Dir),
		Ifindex:   rec.Ifindex,
		Endpoint:  rec.Endpoint,
		Length:    rec.PktLen,
		Time:      time.Duration(rec.TimeNs),
		Head:      append([]byte(nil), rec.Packet[:min(int(rec.CapLen), len(rec.Packet))]...),
	}
	switch bpfobj.TypesEventType(rec.Type) {
	case bpfobj.TypesEventTypeEVENT_DROP:
		return &DropEvent{Reason: Reason(rec.Code), Packet: p}, nil
	case bpfobj.TypesEventTypeEVENT_TRACE:
		return &TraceEvent{Point: TracePoint(rec.Code), Packet: p}, nil
	}
	return nil, fmt.Errorf("decode event: unknown type %d", rec.Type)
}
