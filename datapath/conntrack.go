package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/bpfobj"
)

// Flow is a connection the datapath tracks, as the endpoint it belongs to
// saw its first packet.
type Flow struct {
	Src, Dst netip.AddrPort // ports: TCP, UDP, SCTP; the ICMP echo identifier as Src's port (a request) or Dst's (a reply)
	Protocol uint8
	// Direction is the endpoint's: Egress for a flow it opened, Ingress
	// for one opened towards it. A flow between two local endpoints is
	// tracked once for each.
	Direction  Direction
	Endpoint   uint16
	Remote     Identity // the other side's identity when the flow began
	Rule       int      // the policy rule that allowed it; -1: none
	Expires    time.Time
	Packets    uint64 // both ways, approximate
	Bytes      uint64
	Replied    bool // a packet went the other way
	Closing    bool // TCP: reset, or both sides sent a FIN
	HalfClosed bool // TCP: one side sent a FIN, the other may go on sending
	Audited    bool // policy would have denied it (audit mode)
	// Service is the ID of the service the flow was translated for (its
	// replies come from the frontend), 0 for none; Backend the backend it
	// goes to. A translated flow has one more entry, with ToFrontend set,
	// keyed as the client sent it: Dst is the frontend.
	Service    uint16
	Backend    uint32
	ToFrontend bool
}

func (f Flow) String() string {
	return fmt.Sprintf("%s %s > %s proto %d endpoint %d remote %s packets %d", f.Direction, f.Src, f.Dst, f.Protocol, f.Endpoint, f.Remote, f.Packets)
}

// Flows returns every tracked flow, expired ones included until
// CollectFlows removes them (Expires says which).
func (dp *Datapath) Flows() ([]Flow, error) {
	release, err := dp.st.Use()
	if err != nil {
		return nil, err
	}
	defer release()
	var (
		out []Flow
		k   bpfobj.TypesCtKey
		v   bpfobj.TypesCtEntry
	)
	now, wall := monotonic(), time.Now()
	it := dp.st.Objs.Conntrack.Iterate()
	for it.Next(&k, &v) {
		out = append(out, flowOf(&k, &v, now, wall))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list flows: %w", err)
	}
	return out, nil
}

// CollectFlows removes the tracked flows whose lifetime is over, and the
// masquerading translations whose lifetime is over, and returns how many
// it removed. The programs treat an expired flow as gone already;
// collecting frees its room (conntrack is an LRU and makes room by itself
// when full, evicting the least recently used, live or not; the
// masquerading map is not, and refuses new flows when full). An entry is
// read again just before it is deleted, and kept if a packet renewed it
// meanwhile. CollectFlowsEvery runs it periodically.
func (dp *Datapath) CollectFlows(ctx context.Context) (int, error) {
	release, err := dp.st.Use()
	if err != nil {
		return 0, err
	}
	defer release()
	n, err := collect(ctx, dp.st.Objs.Conntrack, func(v *bpfobj.TypesCtEntry) uint64 { return v.Expires })
	if err != nil {
		return n, fmt.Errorf("collect flows: %w", err)
	}
	k, err := collect(ctx, dp.st.Objs.Snat, func(v *bpfobj.TypesSnatEntry) uint64 { return v.Expires })
	if err != nil {
		return n + k, fmt.Errorf("collect masqueraded flows: %w", err)
	}
	return n + k, nil
}

// collect deletes the entries of m whose expiry (in monotonic
// nanoseconds) has passed, and returns how many.
func collect[V any](ctx context.Context, m *ebpf.Map, expires func(*V) uint64) (int, error) {
	var (
		k       []byte
		v       V
		expired [][]byte
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		if expires(&v) < monotonic() {
			expired = append(expired, slices.Clone(k))
		}
	}
	if err := it.Err(); err != nil {
		return 0, err
	}
	n := 0
	for _, k := range expired {
		if err := ctx.Err(); err != nil {
			return n, err
		}
		// An entry renewed since the scan is live: the programs created
		// it again or a packet moved its expiry.
		if err := m.Lookup(k, &v); err != nil || expires(&v) >= monotonic() {
			continue
		}
		err := m.Delete(k)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		if err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// CollectFlowsEvery calls CollectFlows every interval until ctx is done or
// the handle is closed, and returns then (nil when ctx ended it,
// os.ErrClosed when Close did). A library has no daemon of its own: the
// program that embeds the datapath runs this in a goroutine of its own, as
// a node agent runs Cilium's conntrack collector. An error of one round
// does not stop the next; onError, if not nil, is told of it.
func (dp *Datapath) CollectFlowsEvery(ctx context.Context, interval time.Duration, onError func(error)) error {
	if interval <= 0 {
		return fmt.Errorf("collect flows every %v: the interval must be positive: %w", interval, ErrInvalid)
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		_, err := dp.CollectFlows(ctx)
		if errors.Is(err, os.ErrClosed) {
			return err
		}
		if err != nil && ctx.Err() == nil && onError != nil {
			onError(err)
		}
	}
}

// monotonic is CLOCK_MONOTONIC in nanoseconds, the clock of
// bpf_ktime_get_ns.
func monotonic() uint64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}

func flowOf(k *bpfobj.TypesCtKey, v *bpfobj.TypesCtEntry, now uint64, wall time.Time) Flow {
	addr := func(b [16]byte) netip.Addr {
		if k.Family == 4 {
			return netip.AddrFrom4([4]byte(b[:4]))
		}
		return netip.AddrFrom16(b)
	}
	f := Flow{
		Src:      netip.AddrPortFrom(addr(k.Saddr), be16(k.Sport)),
		Dst:      netip.AddrPortFrom(addr(k.Daddr), be16(k.Dport)),
		Protocol: k.Proto,
		Endpoint: v.Endpoint,
		Remote:   Identity(v.Policy.Identity),
		Rule:     int(int16(v.Policy.Rule)),
		Expires:  wall.Add(time.Duration(int64(v.Expires) - int64(now))),
		Packets:  v.Packets,
		Bytes:    v.Bytes,
		Replied:  v.Flags&uint8(bpfobj.TypesCtFlagCT_F_SEEN_REPLY) != 0,
		Audited:  v.Policy.Audited != 0,
	}
	fin := uint8(bpfobj.TypesCtFlagCT_F_FIN | bpfobj.TypesCtFlagCT_F_FIN_REPLY)
	f.Closing = v.Flags&uint8(bpfobj.TypesCtFlagCT_F_RST) != 0 || v.Flags&fin == fin
	f.HalfClosed = !f.Closing && v.Flags&fin != 0
	f.Direction = Egress
	switch k.Dir {
	case uint8(bpfobj.TypesCtDirCT_INGRESS):
		f.Direction = Ingress
	case uint8(bpfobj.TypesCtDirCT_SERVICE):
		f.ToFrontend = true
	}
	f.Service, f.Backend = v.Service.Id, v.Service.Backend
	return f
}

// be16 reads a __be16 field: the bytes as they were on the wire, in a
// native integer.
func be16(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}
