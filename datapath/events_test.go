package datapath

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"

	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
)

func TestMain(m *testing.M) {
	testutil.Main(m, map[string]func(string) int{"reader": readerChild})
}

// readerChild, given "BPFFS NAME", opens that datapath and calls Events: it
// returns 1 when another reader holds the events, 2 on any other error, and
// otherwise prints "reading" and holds the reader until its stdin closes,
// then returns 0.
func readerChild(arg string) int {
	bpffs, name, _ := strings.Cut(arg, " ")
	if err := rlimit.RemoveMemlock(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx := context.Background()
	dp, err := Open(ctx, Config{Name: name, BPFFS: bpffs, MustExist: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer dp.Close()
	if _, err := dp.Events(ctx); errors.Is(err, ErrExists) {
		return 1
	} else if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Println("reading")
	os.Stdin.Read(make([]byte, 1))
	return 0
}

// startReaderChild runs readerChild on dp's pins in another process and
// returns once the child reads the events (nil) or has exited (its exit
// error); it is killed when the test ends.
func startReaderChild(t *testing.T, dp *Datapath) (*exec.Cmd, error) {
	t.Helper()
	cmd, err := testutil.Child("reader", filepath.Dir(dp.PinDir())+" "+dp.Name())
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	if line, _ := bufio.NewReader(stdout).ReadString('\n'); line == "reading\n" {
		return cmd, nil
	}
	err = cmd.Wait()
	if err == nil {
		err = errors.New("the child exited 0 without reading")
	}
	return cmd, err
}

// A record the reader cannot decode arrives as an *ErrorEvent, and the
// records after it still arrive.
func TestEventsUndecodable(t *testing.T) {
	dp := open(t, Config{Events: &EventConfig{Drops: true}})
	probe := loadProbe(t, dp)
	events, err := dp.Events(context.Background()) // ends with the datapath
	if err != nil {
		t.Fatal(err)
	}

	future := bpfobj.TypesEvent{Version: eventVersion + 1, Type: uint8(bpfobj.TypesEventTypeEVENT_DROP)}
	var raw bytes.Buffer
	if err := binary.Write(&raw, binary.NativeEndian, &future); err != nil {
		t.Fatal(err)
	}
	outputRecord(t, dp.st.Objs.Events, raw.Bytes())
	outputRecord(t, dp.st.Objs.Events, raw.Bytes()[:12])
	runProbe(t, probe.ProbeTc, ReasonPolicyDenied, Ingress, 0)

	ev := next(t, events)
	if e, ok := ev.(*ErrorEvent); !ok || e.Ended || !errors.Is(e.Err, ErrIncompatible) {
		t.Errorf("a record of another version: got %v, want an error event matching ErrIncompatible", ev)
	}
	ev = next(t, events)
	if e, ok := ev.(*ErrorEvent); !ok || e.Ended || e.Err == nil {
		t.Errorf("a short record: got %v, want an error event", ev)
	}
	ev = next(t, events)
	if d, ok := ev.(*DropEvent); !ok || d.Reason != ReasonPolicyDenied {
		t.Errorf("after the bad records: got %v, want the POLICY_DENIED drop", ev)
	}
}

// next returns the next event, or nil when the channel closed or none came
// within 5 seconds.
func next(t *testing.T, events <-chan Event) Event {
	t.Helper()
	select {
	case ev := <-events:
		return ev
	case <-time.After(5 * time.Second):
		t.Error("no event in 5 seconds")
		return nil
	}
}

// outputRecord writes raw into the ring buffer m with a program that copies
// it from its stack (bpf_ringbuf_output); the datapath's programs write only
// well-formed records.
func outputRecord(t *testing.T, m *ebpf.Map, raw []byte) {
	t.Helper()
	size := (len(raw) + 7) &^ 7
	padded := append(bytes.Clone(raw), make([]byte, size-len(raw))...)
	var insns asm.Instructions
	for off := 0; off < size; off += 4 {
		word := int32(binary.NativeEndian.Uint32(padded[off:]))
		insns = append(insns, asm.StoreImm(asm.RFP, int16(off-size), int64(word), asm.Word))
	}
	insns = append(insns,
		asm.LoadMapPtr(asm.R1, m.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, int32(-size)),
		asm.Mov.Imm(asm.R3, int32(len(raw))),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnRingbufOutput.Call(),
		asm.Mov.Imm(asm.R0, 0),
		asm.Return(),
	)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, Instructions: insns, License: "GPL"})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	if _, err := progtest.Run(prog, testFrame, nil); err != nil {
		t.Fatal(err)
	}
}

// fakeRing is a recordSource that returns its records and then err; when
// it has nothing, it waits for the deadline as the ring buffer's reader does.
type fakeRing struct {
	records  [][]byte
	err      error
	deadline time.Time
}

func (r *fakeRing) SetDeadline(t time.Time) { r.deadline = t }

func (r *fakeRing) Read() (ringbuf.Record, error) {
	if len(r.records) > 0 {
		rec := ringbuf.Record{RawSample: r.records[0]}
		r.records = r.records[1:]
		return rec, nil
	}
	if r.err != nil {
		return ringbuf.Record{}, r.err
	}
	time.Sleep(time.Until(r.deadline))
	return ringbuf.Record{}, os.ErrDeadlineExceeded
}

// A failed read of the ring buffer ends the stream with an *ErrorEvent;
// a failed read of the lost-record counters is reported once and the
// stream goes on.
func TestPumpEventsErrors(t *testing.T) {
	var drop bytes.Buffer
	if err := binary.Write(&drop, binary.NativeEndian, &bpfobj.TypesEvent{Version: eventVersion, Type: uint8(bpfobj.TypesEventTypeEVENT_DROP)}); err != nil {
		t.Fatal(err)
	}
	broken := errors.New("ring broken")
	ring := &fakeRing{records: [][]byte{{0xff}, drop.Bytes()}, err: broken}
	noneLost := func() (LostEvent, error) { return LostEvent{}, nil }
	out := make(chan Event, 16)
	pumpEvents(context.Background(), ring, noneLost, LostEvent{}, out)
	close(out)
	var got []Event
	for ev := range out {
		got = append(got, ev)
	}
	if len(got) != 3 {
		t.Fatalf("got %v, want an error, a drop and the error that ends the stream", got)
	}
	if ev, ok := got[0].(*ErrorEvent); !ok || ev.Ended {
		t.Errorf("a one-byte record: got %v, want an error event", got[0])
	}
	if _, ok := got[1].(*DropEvent); !ok {
		t.Errorf("got %v, want the drop", got[1])
	}
	if ev, ok := got[2].(*ErrorEvent); !ok || !ev.Ended || !errors.Is(ev.Err, broken) {
		t.Errorf("got %v, want an error event that ends the stream with the read error", got[2])
	}

	// The counters fail twice, then show one record lost.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	polls := 0
	lostCounts := func() (LostEvent, error) {
		if polls++; polls <= 2 {
			return LostEvent{}, errors.New("counters unreadable")
		}
		return LostEvent{RingFull: 1}, nil
	}
	out = make(chan Event)
	go pumpEvents(ctx, &fakeRing{}, lostCounts, LostEvent{}, out)
	ev := next(t, out)
	if e, ok := ev.(*ErrorEvent); !ok || e.Ended || !strings.Contains(e.Err.Error(), "counters unreadable") {
		t.Errorf("got %v, want the counters' error", ev)
	}
	ev = next(t, out)
	if l, ok := ev.(*LostEvent); !ok || l.RingFull != 1 {
		t.Errorf("got %v, want one record lost, and the counters' error only once", ev)
	}
	cancel()
}

// Two handles of one datapath in one process: while one reads the events,
// Events on the other fails with ErrExists; once it ends, the other may.
func TestEventsOneReaderAcrossHandles(t *testing.T) {
	dp := open(t, Config{})
	other, err := Open(context.Background(), Config{Name: dp.Name(), BPFFS: filepath.Dir(dp.PinDir()), MustExist: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := dp.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []*Datapath{other, dp} {
		if _, err := h.Events(context.Background()); !errors.Is(err, ErrExists) {
			t.Errorf("a second reader: %v, want ErrExists", err)
		}
	}
	cancel()
	for range events {
	}
	otherEvents, err := other.Events(context.Background())
	if err != nil {
		t.Fatalf("a reader after the first ended: %v", err)
	}
	// Closing its handle ends the reader and frees the events too.
	if err := other.Close(); err != nil {
		t.Fatal(err)
	}
	for range otherEvents {
	}
	if _, err := dp.Events(context.Background()); err != nil {
		t.Errorf("a reader after the other handle closed: %v", err)
	}
}

// Another process that opens the datapath cannot read its events while this
// one does, and the reverse; a reader's lock ends with its process.
func TestEventsOneReaderAcrossProcesses(t *testing.T) {
	dp := open(t, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := dp.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var exit *exec.ExitError
	if _, err := startReaderChild(t, dp); !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("a reader in another process while this one reads: %v, want exit status 1 (ErrExists)", err)
	}

	cancel()
	for range events {
	}
	child, err := startReaderChild(t, dp)
	if err != nil {
		t.Fatalf("the other process did not get the events once this reader ended: %v", err)
	}
	if _, err := dp.Events(context.Background()); !errors.Is(err, ErrExists) {
		t.Errorf("a reader here while another process reads: %v, want ErrExists", err)
	}
	if err := child.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	if _, err := dp.Events(context.Background()); err != nil {
		t.Errorf("a reader after the other process died: %v", err)
	}
}

// Events on a closed handle fails with os.ErrClosed, read-write and
// read-only, and a reader started while another goroutine closes the
// handle either fails or is ended by Close: the next handle can read.
func TestEventsAndClose(t *testing.T) {
	dp := open(t, Config{})
	ro, err := OpenReadOnly(context.Background(), Config{Name: dp.st.Name, BPFFS: filepath.Dir(dp.PinDir())})
	if err != nil {
		t.Fatal(err)
	}
	ro.Close()
	if _, err := ro.Events(context.Background()); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Events on a closed read-only handle: %v, want os.ErrClosed", err)
	}
	cfg := Config{Name: dp.st.Name, BPFFS: filepath.Dir(dp.PinDir())}
	dp.Close()
	if _, err := dp.Events(context.Background()); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Events on a closed handle: %v, want os.ErrClosed", err)
	}
	for round := range 60 {
		h, err := Open(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		started := make(chan (<-chan Event), 1)
		go func() {
			events, err := h.Events(context.Background())
			if err != nil {
				started <- nil
				return
			}
			started <- events
		}()
		if round%2 == 0 {
			time.Sleep(time.Duration(round) * 50 * time.Microsecond)
		}
		if err := h.Close(); err != nil {
			t.Fatal(err)
		}
		if events := <-started; events != nil {
			select {
			case _, ok := <-events:
				for ok {
					_, ok = <-events
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("round %d: a reader started during Close kept running", round)
			}
		}
		next, err := Open(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		events, err := next.Events(context.Background())
		if err != nil {
			t.Fatalf("round %d: the next handle cannot read: %v", round, err)
		}
		next.Close()
		for range events {
		}
	}
}
