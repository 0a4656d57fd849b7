package datapath

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/packet"
)

// Event is a record from the datapath: a *DropEvent, a *TraceEvent or a
// *LostEvent; or an *ErrorEvent from the reader.
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

// PolicyEvent reports the policy verdict on a new flow of an endpoint.
type PolicyEvent struct {
	Verdict  Verdict
	Remote   Identity // the identity of the other side
	Rule     int      // index of the rule that decided, in its direction; -1: none (no policy, or no rule matched)
	Protocol uint8    // IP protocol number
	Port     uint16   // destination port; for ICMP and ICMPv6, type << 8 | code
	Packet
}

func (e *PolicyEvent) String() string {
	rule := "no rule"
	if e.Rule >= 0 {
		rule = fmt.Sprintf("rule %d", e.Rule)
	}
	return fmt.Sprintf("policy %s %s remote=%s proto=%d port=%d (%s) %s", e.Verdict, e.Direction, e.Remote, e.Protocol, e.Port, rule, &e.Packet)
}
func (*PolicyEvent) event() {}

// Verdict is what policy decided for a new flow.
type Verdict uint8

const (
	VerdictAllowed = Verdict(bpfobj.TypesPolicyVerdictPOLICY_ALLOWED)
	VerdictDenied  = Verdict(bpfobj.TypesPolicyVerdictPOLICY_DENIED)
	VerdictAudited = Verdict(bpfobj.TypesPolicyVerdictPOLICY_AUDITED) // denied, let through in audit mode
)

func (v Verdict) String() string {
	switch v {
	case VerdictAllowed:
		return "allowed"
	case VerdictDenied:
		return "denied"
	case VerdictAudited:
		return "audited"
	}
	return fmt.Sprintf("verdict %d", uint8(v))
}

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

// ErrorEvent reports what the Events reader failed to do: decode a record or
// read the lost-record counters, after which it goes on, or read the ring
// buffer, which ends the stream (Ended): the channel closes after it.
type ErrorEvent struct {
	Err   error
	Ended bool
}

func (e *ErrorEvent) String() string {
	if e.Ended {
		return fmt.Sprintf("error, events end: %v", e.Err)
	}
	return fmt.Sprintf("error: %v", e.Err)
}
func (*ErrorEvent) event() {}

// SetEventConfig switches events on or off and sets their rate limit, for
// packets from now on. It returns ErrInvalid for a bad config, and for a
// rate and burst whose records could overflow the datapath's ring buffer
// (sized at its first Open from the CPU count and the event config then).
func (dp *Datapath) SetEventConfig(ctx context.Context, cfg EventConfig) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	release, err := dp.st.Lock(ctx)
	if err != nil {
		return fmt.Errorf("set event config: %w", err)
	}
	defer release()
	return dp.setEventConfig(cfg)
}

// setEventConfig is SetEventConfig under the lock, which Open holds.
func (dp *Datapath) setEventConfig(cfg EventConfig) error {
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
	if cfg.PolicyVerdicts {
		v.Flags |= eventFlagPolicy
	}
	v.Rate, v.Burst = cfg.RatePerCPU, cfg.Burst
	if err := dp.st.Objs.EventConfig.Put(uint32(0), &v); err != nil {
		return fmt.Errorf("set event config: %w", err)
	}
	return nil
}

// EventConfig returns the event settings in force.
func (dp *Datapath) EventConfig() (EventConfig, error) {
	release, err := dp.st.Use()
	if err != nil {
		return EventConfig{}, err
	}
	defer release()
	var v bpfobj.TypesEventSettings
	if err := dp.st.Objs.EventConfig.Lookup(uint32(0), &v); err != nil {
		return EventConfig{}, fmt.Errorf("read event config: %w", err)
	}
	return EventConfig{
		Drops:          v.Flags&eventFlagDrops != 0,
		Traces:         v.Flags&eventFlagTraces != 0,
		PolicyVerdicts: v.Flags&eventFlagPolicy != 0,
		RatePerCPU:     v.Rate,
		Burst:          v.Burst,
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
	eventFlagPolicy = uint32(bpfobj.TypesEventFlagEVENT_FLAG_POLICY)
)

// lostPoll is how often Events checks the lost-record counters.
const lostPoll = 250 * time.Millisecond

// Events streams the datapath's events until ctx ends or the datapath is
// closed, then closes the channel. Records lost since the call are reported
// as *LostEvent. What the reader fails to do is reported as *ErrorEvent: a
// record it cannot decode (one of another EVENT_VERSION matches
// ErrIncompatible) and a failed read of the lost-record counters, after
// which the stream goes on, and a failed read of the ring buffer, which is
// the last event before the channel closes. A channel that closes without
// such an event ended because ctx ended or the datapath was closed.
//
// A ring buffer hands each record to one consumer, so a datapath has one
// reader at a time, across its handles and processes: while one runs,
// Events on any handle in any process fails with ErrExists. On a closed
// handle, or one being closed, it fails with an error matching
// os.ErrClosed; Close ends the reader it started.
func (dp *Datapath) Events(ctx context.Context) (<-chan Event, error) {
	dp.mu.Lock()
	defer dp.mu.Unlock()
	// A Close that began stops only the reader it saw: none may start
	// after it.
	if dp.closing {
		return nil, fmt.Errorf("events of datapath %s: %w", dp.st.Name, os.ErrClosed)
	}
	release, err := dp.st.Use()
	if err != nil {
		return nil, err
	}
	defer release()
	unlock, err := lockReader(dp.st.Dir)
	if err != nil {
		return nil, err
	}
	rd, err := ringbuf.NewReader(dp.st.Objs.Events)
	if err != nil {
		unlock()
		return nil, fmt.Errorf("events: %w", err)
	}
	last, err := dp.lostCounts()
	if err != nil {
		rd.Close()
		unlock()
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
			dp.mu.Lock()
			dp.stopEvents = nil
			dp.mu.Unlock()
			// Free for the next reader before the consumer sees the end.
			unlock()
			close(out)
			cancel()
			close(done)
		}()
		pumpEvents(ctx, rd, dp.lostCounts, last, out)
	}()
	return out, nil
}

// recordSource is what pumpEvents reads records from: a *ringbuf.Reader.
type recordSource interface {
	SetDeadline(time.Time)
	Read() (ringbuf.Record, error)
}

// pumpEvents sends the events read from src to out, and increases of the
// lost-record counters over last, until ctx ends or a read fails.
func pumpEvents(ctx context.Context, src recordSource, lostCounts func() (LostEvent, error), last LostEvent, out chan<- Event) {
	send := func(ev Event) bool {
		select {
		case out <- ev:
			return true
		case <-ctx.Done():
			return false
		}
	}
	lostFailed := false
	nextCheck := time.Now().Add(lostPoll)
	for {
		src.SetDeadline(nextCheck)
		rec, err := src.Read()
		switch {
		case err == nil:
			ev, err := decodeEvent(rec.RawSample)
			if err != nil {
				ev = &ErrorEvent{Err: err}
			}
			if !send(ev) {
				return
			}
		case errors.Is(err, os.ErrDeadlineExceeded):
		case ctx.Err() != nil: // the reader was closed because ctx ended
			return
		default:
			send(&ErrorEvent{Err: fmt.Errorf("read events: %w", err), Ended: true})
			return
		}
		if ctx.Err() != nil {
			return
		}
		if time.Now().Before(nextCheck) {
			continue
		}
		nextCheck = time.Now().Add(lostPoll)
		now, err := lostCounts()
		if err != nil {
			// Reported once, not at every poll, until a read works again.
			if !lostFailed && !send(&ErrorEvent{Err: err}) {
				return
			}
			lostFailed = true
			continue
		}
		lostFailed = false
		if lost := (LostEvent{now.RingFull - last.RingFull, now.RateLimited - last.RateLimited}); lost != (LostEvent{}) {
			last = now
			if !send(&lost) {
				return
			}
		}
	}
}

// readerDir names the directory in a datapath's pin directory that the
// running Events reader holds an exclusive flock on. bpffs takes directories
// but no regular files, and the pin directory's own lock is the writers'
// (core.LockDir), held only while they change the pins.
const readerDir = "events-reader"

// lockReader takes the reader lock of the datapath pinned in dir, without
// waiting: it fails with ErrExists while another reader, in this process or
// another, holds it. The lock goes with the file descriptor, so it is also
// released when the process dies.
func lockReader(dir string) (unlock func(), err error) {
	path := filepath.Join(dir, readerDir)
	for {
		if err := os.Mkdir(path, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("events: create reader lock: %w", err)
		}
		// O_CLOEXEC: a child process must not keep the lock after the reader ends.
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) {
			continue // removed since the Mkdir
		}
		if err != nil {
			return nil, fmt.Errorf("events: open %s: %w", path, err)
		}
		// flock locks belong to the open file description, so two handles of
		// one process exclude each other as two processes do.
		err = unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if errors.Is(err, unix.EWOULDBLOCK) {
			unix.Close(fd)
			return nil, fmt.Errorf("events of datapath %s: another reader holds them: %w", filepath.Base(dir), ErrExists)
		}
		if err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("events: lock %s: %w", path, err)
		}
		// A lock on a directory removed meanwhile would exclude nobody.
		if sameFile(fd, path) {
			return func() { unix.Close(fd) }, nil
		}
		unix.Close(fd)
	}
}

// sameFile reports whether fd is the file at path.
func sameFile(fd int, path string) bool {
	var a, b unix.Stat_t
	return unix.Fstat(fd, &a) == nil && unix.Stat(path, &b) == nil && a.Dev == b.Dev && a.Ino == b.Ino
}

// Lost returns how many records the datapath could not send since it was
// created.
func (dp *Datapath) Lost() (LostEvent, error) { return dp.lostCounts() }

func (dp *Datapath) lostCounts() (LostEvent, error) {
	release, err := dp.st.Use()
	if err != nil {
		return LostEvent{}, err
	}
	defer release()
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
	case bpfobj.TypesEventTypeEVENT_POLICY:
		return &PolicyEvent{Verdict: Verdict(rec.Code), Remote: Identity(rec.Identity), Rule: int(int16(rec.Rule)),
			Protocol: rec.Proto, Port: rec.Port, Packet: p}, nil
	}
	return nil, fmt.Errorf("decode event: unknown type %d", rec.Type)
}
