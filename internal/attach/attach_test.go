package attach_test

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
)

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
					testutil.Require(t, mode.String(), err)
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

	// ping from inside the private cgroup
	pingInCgroup := func() bool {
		_, err := p.A.Exec("sh", "-c", "echo $$ > "+cg+"/cgroup.procs && exec ping -c 1 -W 1 -q "+p.IPB.String())
		return err == nil
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
