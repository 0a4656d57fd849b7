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

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/icmpecho"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
)

// pingChildEnv, when set to "NETNS-PATH ADDRESS", makes the test binary a
// child that pings ADDRESS once from the namespace and exits: 0 for a
// reply, 1 for none, 2 when it could not ping.
const pingChildEnv = "SLUICE_ATTACH_TEST_PING"

func TestMain(m *testing.M) {
	if arg := os.Getenv(pingChildEnv); arg != "" {
		os.Exit(pingChild(arg))
	}
	os.Exit(m.Run())
}

func pingChild(arg string) int {
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
// this test binary again, as pingChild. The test process itself stays out
// of the cgroup, and a cgroup v2 domain takes only whole processes.
func cgroupPing(cgroup, nsPath string, dst netip.Addr) (bool, error) {
	dir, err := os.Open(cgroup)
	if err != nil {
		return false, err
	}
	defer dir.Close()
	exe, err := os.Executable()
	if err != nil {
		return false, err
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), pingChildEnv+"="+nsPath+" "+dst.String())
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
