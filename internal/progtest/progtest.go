// Package progtest runs BPF programs on crafted packets with
// BPF_PROG_TEST_RUN and measures what they cost.
package progtest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"reflect"
	"runtime"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Result is what one test run of a program returned.
type Result struct {
	Verdict  uint32        // the program's return value (TC_ACT_*, XDP_*)
	Packet   []byte        // the packet as the program left it
	Duration time.Duration // kernel-measured time of the run
}

// Run runs prog once on frame. ctx, if not nil, is the program's context
// (a struct __sk_buff for tc programs, struct xdp_md for XDP) — for example
// to set the ingress interface a tc program sees. A context given by
// pointer receives what the program left in it (the mark it set).
func Run(prog *ebpf.Program, frame []byte, ctx any) (Result, error) {
	out := make([]byte, len(frame)+256) // room for encapsulation
	var ctxIn, ctxOut []byte
	if ctx != nil {
		var buf bytes.Buffer
		if err := binary.Write(&buf, binary.NativeEndian, ctx); err != nil {
			return Result{}, fmt.Errorf("encode context: %w", err)
		}
		ctxIn = buf.Bytes()
		// The kernel writes its whole context back, or fails: room for
		// the largest (struct __sk_buff, 192 bytes on Linux 6.18).
		ctxOut = make([]byte, 512)
	}
	attr := progRunAttr{
		progFD:      uint32(prog.FD()),
		dataSizeIn:  uint32(len(frame)),
		dataSizeOut: uint32(len(out)),
		dataIn:      pointer(frame),
		dataOut:     pointer(out),
		repeat:      1,
		ctxSizeIn:   uint32(len(ctxIn)),
		ctxIn:       pointer(ctxIn),
		ctxSizeOut:  uint32(len(ctxOut)),
		ctxOut:      pointer(ctxOut),
	}
	for {
		_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_TEST_RUN, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
		runtime.KeepAlive(frame)
		runtime.KeepAlive(out)
		runtime.KeepAlive(ctxIn)
		runtime.KeepAlive(ctxOut)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return Result{}, fmt.Errorf("test run of %s: %w", prog, errno)
		}
		break
	}
	if v := reflect.ValueOf(ctx); v.Kind() == reflect.Pointer && attr.ctxSizeOut >= uint32(len(ctxIn)) {
		if err := binary.Read(bytes.NewReader(ctxOut[:len(ctxIn)]), binary.NativeEndian, ctx); err != nil {
			return Result{}, fmt.Errorf("decode context: %w", err)
		}
	}
	return Result{
		Verdict:  attr.retval,
		Packet:   out[:attr.dataSizeOut],
		Duration: time.Duration(attr.duration),
	}, nil
}

// progRunAttr is the BPF_PROG_TEST_RUN member of union bpf_attr. The
// library's Program.Run does not return the kernel's duration, which MeanCost
// needs, hence the direct syscall.
type progRunAttr struct {
	progFD      uint32
	retval      uint32
	dataSizeIn  uint32
	dataSizeOut uint32
	dataIn      uint64
	dataOut     uint64
	repeat      uint32
	duration    uint32
	ctxSizeIn   uint32
	ctxSizeOut  uint32
	ctxIn       uint64
	ctxOut      uint64
	flags       uint32
	cpu         uint32
	batchSize   uint32
	_           uint32
}

func pointer(b []byte) uint64 {
	if len(b) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(&b[0])))
}

// MeanCost runs prog once on each frame, rounds times over, and returns the
// mean kernel-measured time of a run. It never uses Repeat > 1: a program
// that rewrites the packet would see its own output on the next repeat, and
// one packet would mean one always-hot flow.
func MeanCost(prog *ebpf.Program, frames [][]byte, ctx any, rounds int) (time.Duration, error) {
	var total time.Duration
	n := 0
	for range rounds {
		for _, f := range frames {
			r, err := Run(prog, f, ctx)
			if err != nil {
				return 0, err
			}
			total += r.Duration
			n++
		}
	}
	if n == 0 {
		return 0, fmt.Errorf("no frames to run")
	}
	return total / time.Duration(n), nil
}

// SKB is the leading part of struct __sk_buff, as a BPF_PROG_TEST_RUN
// context for tc programs. The kernel takes Mark, Priority, IngressIfindex
// and Ifindex (the device the program sees, resolved in the calling thread's
// network namespace); the other fields must stay zero.
type SKB struct {
	Len, PktType, Mark, QueueMapping, Protocol uint32
	VlanPresent, VlanTCI, VlanProto, Priority  uint32
	IngressIfindex, Ifindex                    uint32
}

// Verdicts of tc programs.
const (
	TCActOK       = 0
	TCActShot     = 2
	TCActRedirect = 7
)
