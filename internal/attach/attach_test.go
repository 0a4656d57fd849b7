package attach_test

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/icmpecho"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
)

func TestMain(m *testing.M) {
	testutil.Main(m, map[string]func(string) int{"echo": echoChild})
}

// echoChild, given "NETNS-PATH ADDRESS", pings ADDRESS once from the
// namespace: it returns 0 for a reply, 1 for none, 2 when it could not ping.
func echoChild(arg string) int {
	path, dst, _ := strings.Cut(arg, " ")
	ns, err := netns.GetFromPath(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	replies, err := icmpecho.Ping(ns, netip.MustParseAddr(dst), icmpecho.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if replies == 0 {
		return 1
	}
	return 0
}

// cgroupPing pings dst once from the network namespace at nsPath in a
// process that starts inside the cgroup (clone3 with CLONE_INTO_CGROUP):
// this test binary again, as echoChild. The test process itself stays out
// of the cgroup, and a cgroup v2 domain takes only whole processes.
func cgroupPing(cgroup, nsPath string, dst netip.Addr) (bool, error) {
	dir, err := os.Open(cgroup)
	if err != nil {
		return false, err
	}
	defer dir.Close()
	cmd, err := testutil.Child("echo", nsPath+" "+dst.String())
	if err != nil {
		return false, err
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return true, nil
	case errors.As(err, &exit) && exit.ExitCode() == 1:
		return false, nil
	}
	return false, fmt.Errorf("ping %s from cgroup %s: %w: %s", dst, cgroup, err, out)
}

// constProg returns a program of type typ that always returns verdict.
func constProg(t *testing.T, typ ebpf.ProgramType, attachType ebpf.AttachType, verdict int32) *ebpf.Program {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       typ,
		AttachType: attachType,
		License:    "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, verdict),
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

const (
	tcOK   = 0
	tcShot = 2
)

func TestTC(t *testing.T) {
	testutil.Privileged(t)
	for _, mode := range []attach.Mode{attach.TCX, attach.Legacy} {
		t.Run(mode.String(), func(t *testing.T) {
			p := testutil.NewPair(t)
			pin := filepath.Join(testutil.BPFFS(t), "link")
			pass := constProg(t, ebpf.SchedCLS, ebpf.AttachNone, tcOK)
			shot := constProg(t, ebpf.SchedCLS, ebpf.AttachNone, tcShot)

			if !p.Ping(1) {
				t.Fatal("no ping before anything is attached")
			}
			attachB := func(prog *ebpf.Program) {
				t.Helper()
				var got attach.Mode
				err := nsrun.Do(p.B.Handle, func() (err error) {
					got, err = attach.TC(p.IfB, attach.Ingress, prog, mode, pin, "sluice/test/x")
					return err
				})
				if errors.Is(err, ebpf.ErrNotSupported) {
					testutil.RequireSince(t, "tcx", 6, 6, err)
				}
				if err != nil {
					t.Fatal(err)
				}
				if got != mode {
					t.Errorf("attached with mode %s, want %s", got, mode)
				}
			}
			attachB(pass)
			if !p.Ping(1) {
				t.Fatal("a pass program dropped the ping")
			}
			attachB(shot) // swaps the program in place
			if p.Ping(2) {
				t.Fatal("ping answered through a drop program")
			}
			p.B.Do(t, func() error {
				filters, err := netlink.FilterList(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: p.IfB}}, netlink.HANDLE_MIN_INGRESS)
				if mode == attach.Legacy && len(filters) != 1 {
					t.Errorf("%d legacy filters after two attaches, want 1", len(filters))
				}
				return err
			})

			if err := attach.Detach(pin); err != nil {
				t.Fatal(err)
			}
			p.B.Do(t, func() error { return attach.RemoveLegacy("sluice/test/") })
			if !p.Ping(1) {
				t.Fatal("no ping after detaching")
			}
		})
	}
}

func TestXDP(t *testing.T) {
	testutil.Privileged(t)
	p := testutil.NewPair(t)
	pin := filepath.Join(testutil.BPFFS(t), "xdp")
	drop := constProg(t, ebpf.XDP, ebpf.AttachNone, 1 /* XDP_DROP */)
	pass := constProg(t, ebpf.XDP, ebpf.AttachNone, 2 /* XDP_PASS */)
	do := func(prog *ebpf.Program) {
		p.B.Do(t, func() error { return attach.XDP(p.IfB, prog, link.XDPGenericMode, pin) })
	}
	// Resolve the neighbour first: the drop program would make it fail.
	if !p.Ping(1) {
		t.Fatal("no ping before attaching")
	}
	do(drop)
	if p.Ping(2) {
		t.Fatal("ping answered through XDP_DROP")
	}
	do(pass)
	if !p.Ping(1) {
		t.Fatal("no ping after swapping in XDP_PASS")
	}
	if err := attach.Detach(pin); err != nil {
		t.Fatal(err)
	}
}

func TestCgroup(t *testing.T) {
	testutil.Privileged(t)
	p := testutil.NewPair(t)
	cg := testutil.Cgroup(t)
	pin := filepath.Join(testutil.BPFFS(t), "cgroup")
	deny := constProg(t, ebpf.CGroupSKB, ebpf.AttachCGroupInetEgress, 0)

	// ping from a process started inside the private cgroup
	pingInCgroup := func() bool {
		t.Helper()
		replied, err := cgroupPing(cg, p.A.Path, p.IPB)
		if err != nil {
			t.Fatal(err)
		}
		return replied
	}
	if !pingInCgroup() {
		t.Fatal("no ping from the cgroup before attaching")
	}
	if err := attach.Cgroup(cg, ebpf.AttachCGroupInetEgress, deny, pin); err != nil {
		t.Fatal(err)
	}
	if pingInCgroup() {
		t.Fatal("ping left a cgroup whose egress program denies all")
	}
	if !p.Ping(1) {
		t.Fatal("the cgroup program affected a process outside the cgroup")
	}
	if err := attach.Detach(pin); err != nil {
		t.Fatal(err)
	}
	if !pingInCgroup() {
		t.Fatal("no ping from the cgroup after detaching")
	}
}

// tcNext lets the packet go on to the next filter or program: TC_ACT_UNSPEC
// for cls_bpf, TCX_NEXT for tcx.
const tcNext = -1

// counting is a tc program that counts the packets it sees and returns
// tcNext, so that it hides nothing from the programs after it.
type counting struct {
	name string
	prog *ebpf.Program
	m    *ebpf.Map
}

func countProg(t *testing.T, name string) *counting {
	t.Helper()
	return countProgReturning(t, name, tcNext)
}

// countProgReturning is countProg with the verdict it returns.
func countProgReturning(t *testing.T, name string, verdict int32) *counting {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, verdict).WithSymbol("out"),
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	return &counting{name: name, prog: prog, m: m}
}

func (c *counting) count(t *testing.T) uint64 {
	t.Helper()
	var n uint64
	if err := c.m.Lookup(uint32(0), &n); err != nil {
		t.Fatalf("count of %s: %v", c.name, err)
	}
	return n
}

// expectRuns pings from A to B three times and checks that every program in
// run saw the echo requests and replies and that those in idle saw nothing.
func expectRuns(t *testing.T, p *testutil.Pair, when string, run, idle []*counting) {
	t.Helper()
	before := make(map[*counting]uint64)
	for _, c := range append(run, idle...) {
		before[c] = c.count(t)
	}
	if !p.Ping(3) {
		t.Errorf("no ping %s", when)
	}
	for _, c := range run {
		if got := c.count(t) - before[c]; got < 3 {
			t.Errorf("%s: %s saw %d packets of 3 pings", when, c.name, got)
		}
	}
	for _, c := range idle {
		if got := c.count(t) - before[c]; got != 0 {
			t.Errorf("%s: %s saw %d packets, want none", when, c.name, got)
		}
	}
}

// attachSluice attaches prog the way a datapath does, as "sluice/test/x",
// to hook of B's device.
func attachSluice(p *testutil.Pair, hook attach.Hook, prog *ebpf.Program, mode attach.Mode, pin string) error {
	return nsrun.Do(p.B.Handle, func() error {
		_, err := attach.TC(p.IfB, hook, prog, mode, pin, "sluice/test/x")
		return err
	})
}

// addFilter adds, in B's namespace, a direct-action cls_bpf filter running
// c to hook of B's device, creating the clsact qdisc first if need be: what
// `tc filter add dev veth1 ingress prio PRIO handle HANDLE bpf da` does.
func addFilter(t *testing.T, p *testutil.Pair, hook attach.Hook, prio uint16, handle uint32, name string, c *counting) {
	t.Helper()
	parent := uint32(netlink.HANDLE_MIN_INGRESS)
	if hook == attach.Egress {
		parent = netlink.HANDLE_MIN_EGRESS
	}
	p.B.Do(t, func() error {
		err := netlink.QdiscAdd(&netlink.GenericQdisc{
			QdiscAttrs: netlink.QdiscAttrs{LinkIndex: p.IfB, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
			QdiscType:  "clsact",
		})
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return err
		}
		return netlink.FilterAdd(&netlink.BpfFilter{
			FilterAttrs:  netlink.FilterAttrs{LinkIndex: p.IfB, Parent: parent, Priority: prio, Handle: handle, Protocol: unix.ETH_P_ALL},
			Fd:           c.prog.FD(),
			Name:         name,
			DirectAction: true,
		})
	})
}

// Another tool's cls_bpf filters, at sluice's priority and beside sluice's
// own, keep their place and keep running through sluice's legacy attach,
// re-attach and detach. Ones at both of sluice's handles make the attach
// fail instead of being replaced.
func TestLegacyLeavesForeignFilters(t *testing.T) {
	testutil.Privileged(t)
	p := testutil.NewPair(t)
	first := countProg(t, "foreign filter at prio 1")
	beside := countProg(t, "foreign filter beside sluice's")
	inSlot := countProg(t, "foreign filter in sluice's slot")
	inOther := countProg(t, "foreign filter in sluice's other slot")
	ours, swapped := countProg(t, "sluice's program"), countProg(t, "sluice's second program")

	addFilter(t, p, attach.Ingress, 1, 1, "other/first", first)
	addFilter(t, p, attach.Ingress, 2, 1, "other/beside", beside)
	addFilter(t, p, attach.Egress, attach.LegacyPriority, attach.LegacyHandle, "other/slot", inSlot)
	addFilter(t, p, attach.Egress, attach.LegacyPriority, attach.LegacyHandle+1, "other/slot2", inOther)
	foreign := []*counting{first, beside, inSlot, inOther}
	expectRuns(t, p, "before attaching", foreign, []*counting{ours, swapped})

	if err := attachSluice(p, attach.Ingress, ours.prog, attach.Legacy, ""); err != nil {
		t.Fatal(err)
	}
	expectRuns(t, p, "after attaching", append(foreign, ours), []*counting{swapped})
	if err := attachSluice(p, attach.Ingress, swapped.prog, attach.Legacy, ""); err != nil {
		t.Fatal(err)
	}
	expectRuns(t, p, "after attaching again", append(foreign, swapped), []*counting{ours})

	err := attachSluice(p, attach.Egress, ours.prog, attach.Legacy, "")
	if !errors.Is(err, unix.EEXIST) {
		t.Errorf("attaching where other filters hold both of sluice's handles: got %v, want EEXIST", err)
	}

	p.B.Do(t, func() error { return attach.DetachLegacy(p.IfB, attach.Ingress, "sluice/test/x") })
	p.B.Do(t, func() error { return attach.RemoveLegacy("sluice/") })
	expectRuns(t, p, "after detaching", foreign, []*counting{ours, swapped})
}

// A filter of sluice's at another priority, where an older sluice put it,
// gives way to the one at LegacyPriority once that runs.
func TestLegacyMovesOwnFilter(t *testing.T) {
	testutil.Privileged(t)
	p := testutil.NewPair(t)
	old, ours := countProg(t, "filter at the old priority"), countProg(t, "sluice's program")
	addFilter(t, p, attach.Ingress, 0xc5a1, 0xc5a1, "sluice/test/x", old)

	if err := attachSluice(p, attach.Ingress, ours.prog, attach.Legacy, ""); err != nil {
		t.Fatal(err)
	}
	expectRuns(t, p, "after attaching", []*counting{ours}, []*counting{old})
	p.B.Do(t, func() error {
		filters, err := netlink.FilterList(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: p.IfB}}, netlink.HANDLE_MIN_INGRESS)
		if len(filters) != 1 || filters[0].Attrs().Priority != attach.LegacyPriority || filters[0].Attrs().Handle != attach.LegacyHandle {
			t.Errorf("filters after attaching: %v, want one at prio %#x handle %#x", filters, attach.LegacyPriority, attach.LegacyHandle)
		}
		return err
	})
}

// A tcx program another tool attached keeps running through sluice's attach,
// re-attach and detach on the same hook.
func TestTCXLeavesForeignProgram(t *testing.T) {
	testutil.Privileged(t)
	p := testutil.NewPair(t)
	pin := filepath.Join(testutil.BPFFS(t), "link")
	foreign := countProg(t, "foreign tcx program")
	ours, swapped := countProg(t, "sluice's program"), countProg(t, "sluice's second program")

	var other link.Link
	err := nsrun.Do(p.B.Handle, func() (err error) {
		other, err = link.AttachTCX(link.TCXOptions{Interface: p.IfB, Program: foreign.prog, Attach: ebpf.AttachTCXIngress})
		return err
	})
	if errors.Is(err, ebpf.ErrNotSupported) {
		testutil.RequireSince(t, "tcx", 6, 6, err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })

	if err := attachSluice(p, attach.Ingress, ours.prog, attach.TCX, pin); err != nil {
		t.Fatal(err)
	}
	expectRuns(t, p, "after attaching", []*counting{foreign, ours}, []*counting{swapped})
	if err := attachSluice(p, attach.Ingress, swapped.prog, attach.TCX, pin); err != nil {
		t.Fatal(err)
	}
	expectRuns(t, p, "after attaching again", []*counting{foreign, swapped}, []*counting{ours})
	if err := attach.Detach(pin); err != nil {
		t.Fatal(err)
	}
	expectRuns(t, p, "after detaching", []*counting{foreign}, []*counting{ours, swapped})

	info, err := foreign.prog.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	p.B.Do(t, func() error {
		res, err := link.QueryPrograms(link.QueryOptions{Target: p.IfB, Attach: ebpf.AttachTCXIngress})
		if err == nil && (len(res.Programs) != 1 || res.Programs[0].ID != id) {
			t.Errorf("tcx programs after detaching: %v, want only the foreign one (%d)", res.Programs, id)
		}
		return err
	})
}

// sluice's program runs first on its hook, in both modes: a program another
// tool put there before, which ends the walk with "pass", does not skip it,
// and in tcx mode attaching again puts it back in front of one attached
// since.
func TestRunsFirst(t *testing.T) {
	testutil.Privileged(t)
	const pass = 0 // TC_ACT_OK: ends the walk
	t.Run("legacy", func(t *testing.T) {
		p := testutil.NewPair(t)
		before, ours := countProgReturning(t, "foreign filter that passes", pass), countProg(t, "sluice's program")
		addFilter(t, p, attach.Ingress, 1, 1, "other/pass", before)
		if err := attachSluice(p, attach.Ingress, ours.prog, attach.Legacy, ""); err != nil {
			t.Fatal(err)
		}
		expectRuns(t, p, "after attaching", []*counting{ours, before}, nil)
		after := countProgReturning(t, "foreign filter that passes, added later", pass)
		addFilter(t, p, attach.Ingress, 1, 2, "other/later", after)
		expectRuns(t, p, "after another filter at priority 1", []*counting{after}, []*counting{ours, before})
		if err := attachSluice(p, attach.Ingress, ours.prog, attach.Legacy, ""); err != nil {
			t.Fatal(err)
		}
		expectRuns(t, p, "after attaching again", []*counting{ours, after}, []*counting{before})
		p.B.Do(t, func() error {
			filters, err := netlink.FilterList(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: p.IfB}}, netlink.HANDLE_MIN_INGRESS)
			if len(filters) != 3 {
				t.Errorf("%d filters after attaching again, want 3 (the replaced one deleted): %v", len(filters), filters)
			}
			return err
		})
	})
	t.Run("tcx", func(t *testing.T) {
		p := testutil.NewPair(t)
		pin := filepath.Join(testutil.BPFFS(t), "link")
		first, later := countProgReturning(t, "foreign program that passes", pass), countProgReturning(t, "foreign program put in front later", pass)
		ours := countProg(t, "sluice's program")
		attachHead := func(c *counting) {
			t.Helper()
			var l link.Link
			err := nsrun.Do(p.B.Handle, func() (err error) {
				l, err = link.AttachTCX(link.TCXOptions{Interface: p.IfB, Program: c.prog, Attach: ebpf.AttachTCXIngress, Anchor: link.Head()})
				return err
			})
			if errors.Is(err, ebpf.ErrNotSupported) {
				testutil.RequireSince(t, "tcx", 6, 6, err)
			}
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
		}
		attachHead(first)
		if err := attachSluice(p, attach.Ingress, ours.prog, attach.TCX, pin); err != nil {
			t.Fatal(err)
		}
		expectRuns(t, p, "after attaching", []*counting{ours, first}, nil)
		attachHead(later)
		expectRuns(t, p, "after another program went in front", []*counting{later}, []*counting{ours, first})
		if err := attachSluice(p, attach.Ingress, ours.prog, attach.TCX, pin); err != nil {
			t.Fatal(err)
		}
		expectRuns(t, p, "after attaching again", []*counting{ours, later}, []*counting{first})
		p.B.Do(t, func() error {
			res, err := link.QueryPrograms(link.QueryOptions{Target: p.IfB, Attach: ebpf.AttachTCXIngress})
			if err == nil && len(res.Programs) != 3 {
				t.Errorf("%d tcx programs after attaching again, want 3 (the replaced link detached)", len(res.Programs))
			}
			return err
		})
	})
}
