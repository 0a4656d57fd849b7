package bpfobj_test

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/bpftest"
	"github.com/sluicedp/sluice/internal/testutil"
)

// objects are the BPF objects whose programs the suite loads, by name.
var objects = map[string]func() (*ebpf.CollectionSpec, error){
	"endpoint":    bpfobj.LoadEndpoint,
	"host":        bpfobj.LoadHost,
	"overlay":     bpfobj.LoadOverlay,
	"sock":        bpfobj.LoadSock,
	"sockdestroy": bpfobj.LoadSockDestroy,
	"probe":       bpftest.LoadProbe,
}

// newer are the programs that need a newer kernel than the oldest one
// sluice supports, by object/program: the Linux version that brought what
// they use. An older kernel refuses them with ErrNotSupported, and the
// datapath does without them.
var newer = map[string][2]int{
	"sockdestroy/destroy_udp": {6, 5}, // the bpf_sock_destroy kfunc
}

// TestProgramStats loads every program on the running kernel and reports
// what the verifier made of it: the instructions it processed and how long
// the load took, so that growth shows as it happens. A program the kernel
// refuses fails the test with the verifier's log. Run with -v to see the
// table (make test does).
func TestProgramStats(t *testing.T) {
	testutil.Privileged(t)
	var u unix.Utsname
	unix.Uname(&u)
	var rows []string
	for name, load := range objects {
		spec, err := load()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone // private maps, nothing pinned
		}
		maps, err := ebpf.NewCollectionWithOptions(&ebpf.CollectionSpec{Maps: spec.Maps, Types: spec.Types}, ebpf.CollectionOptions{})
		if err != nil {
			t.Fatalf("%s: create maps: %v", name, err)
		}
		defer maps.Close()
		for pname, prog := range spec.Programs {
			one := &ebpf.CollectionSpec{Maps: spec.Maps, Programs: map[string]*ebpf.ProgramSpec{pname: prog}, Types: spec.Types}
			start := time.Now()
			coll, err := ebpf.NewCollectionWithOptions(one, ebpf.CollectionOptions{MapReplacements: maps.Maps})
			took := time.Since(start)
			if err != nil {
				if v, ok := newer[name+"/"+pname]; ok && errors.Is(err, ebpf.ErrNotSupported) && !testutil.KernelAtLeast(v[0], v[1]) {
					rows = append(rows, fmt.Sprintf("%-12s %-16s %-14s %6d %9s %9s", name, pname, prog.Type, len(prog.Instructions), "-",
						fmt.Sprintf("needs %d.%d", v[0], v[1])))
					continue
				}
				t.Errorf("%s/%s: %+v", name, pname, err)
				continue
			}
			verified := "?"
			if info, err := coll.Programs[pname].Info(); err == nil {
				if n, ok := info.VerifiedInstructions(); ok {
					verified = fmt.Sprint(n)
				}
			}
			coll.Close()
			rows = append(rows, fmt.Sprintf("%-12s %-16s %-14s %6d %9s %9.1f", name, pname, prog.Type, len(prog.Instructions), verified, float64(took.Microseconds())/1000))
		}
	}
	sort.Strings(rows)
	t.Logf("BPF programs on Linux %s:\n%-12s %-16s %-14s %6s %9s %9s\n%s", unix.ByteSliceToString(u.Release[:]),
		"object", "program", "type", "insns", "verified", "load ms", strings.Join(rows, "\n"))
}

// Every drop, trace and policy-verdict site of a program shares one copy of
// the event code: the program holds a single ring-buffer reservation, not
// one per call site.
func TestEventCodeShared(t *testing.T) {
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		t.Fatal(err)
	}
	for name, prog := range spec.Programs {
		reserves := 0
		for _, ins := range prog.Instructions {
			if ins.IsBuiltinCall() && ins.Constant == int64(asm.FnRingbufReserve) {
				reserves++
			}
		}
		if reserves != 1 {
			t.Errorf("%s reserves ring-buffer records at %d places, want 1", name, reserves)
		}
	}
}

// Hash maps whose values BPF reads are not preallocated: in a preallocated
// hash, a deleted or replaced element is reused at once, and a program on
// another CPU still holding it reads another entry's fields.
func TestHashMapsNotPreallocated(t *testing.T) {
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		t.Fatal(err)
	}
	for name, m := range spec.Maps {
		if (m.Type == ebpf.Hash || m.Type == ebpf.PerCPUHash) && m.Flags&unix.BPF_F_NO_PREALLOC == 0 {
			t.Errorf("map %s is a preallocated %s", name, m.Type)
		}
	}
}
