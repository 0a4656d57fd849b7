// Package testutil builds private worlds for tests that need a real kernel:
// network namespaces joined by veth pairs, a private bpffs and a private
// cgroup v2 sub-tree. Everything it makes is removed by t.Cleanup, also when
// the test fails. Nothing is ever attached to the root network namespace.
package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/bpffs"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
)

// Privileged makes sure the test can load BPF programs and create network
// namespaces. Where it cannot, the test fails when the CI environment
// variable is set (CI must never silently skip) and is skipped otherwise.
func Privileged(t testing.TB) {
	t.Helper()
	unavailable := func(format string, args ...any) {
		t.Helper()
		msg := fmt.Sprintf(format, args...)
		if os.Getenv("CI") != "" {
			t.Fatalf("CI is set, but %s", msg)
		}
		t.Skipf("skipping: %s (run as root on Linux >= 6.1)", msg)
	}
	if os.Geteuid() != 0 {
		unavailable("the test needs root")
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		unavailable("cannot raise RLIMIT_MEMLOCK: %v", err)
	}
	if err := features.HaveProgramType(ebpf.SchedCLS); err != nil {
		unavailable("the kernel cannot load tc programs: %v", err)
	}
}

// Require fails (in CI) or skips the test when the kernel lacks a feature
// that err reports missing.
func Require(t testing.TB, feature string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("CI is set, but the kernel lacks %s: %v", feature, err)
	}
	t.Skipf("skipping: the kernel lacks %s: %v", feature, err)
}

// Name returns a short unique name with prefix, fit for a namespace or an
// interface (at most 15 bytes when prefix is at most 7).
func Name(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// NetNS is a network namespace made for one test.
type NetNS struct {
	Name   string         // as in `ip netns exec NAME`
	Path   string         // /run/netns/NAME
	Handle netns.NsHandle // open until the test ends
}

// NewNetNS creates a named network namespace with its loopback up, and
// deletes it when the test ends.
func NewNetNS(t testing.TB) *NetNS {
	t.Helper()
	name := Name("sluice-t-")
	h, err := nsrun.New(name)
	if err != nil {
		t.Fatal(err)
	}
	ns := &NetNS{Name: name, Path: filepath.Join("/run/netns", name), Handle: h}
	t.Cleanup(func() {
		h.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	if err := netdev.SetUp(h, "lo"); err != nil {
		t.Fatal(err)
	}
	return ns
}

// OpenNetNS opens the existing namespace named name, one the code under
// test made, and closes the handle when the test ends; the namespace itself
// it leaves alone.
func OpenNetNS(t testing.TB, name string) *NetNS {
	t.Helper()
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("open netns %s: %v", name, err)
	}
	t.Cleanup(func() { h.Close() })
	return &NetNS{Name: name, Path: filepath.Join("/run/netns", name), Handle: h}
}

// Do runs fn inside the namespace and fails the test on error.
func (n *NetNS) Do(t testing.TB, fn func() error) {
	t.Helper()
	if err := nsrun.Do(n.Handle, fn); err != nil {
		t.Fatalf("in netns %s: %v", n.Name, err)
	}
}

// Exec runs a command inside the namespace and returns its combined output.
// It uses nsenter, not `ip netns exec`, which would hide the host's cgroup
// mounts behind a fresh /sys. A missing command, nsenter or the one asked
// for, is named in the error.
func (n *NetNS) Exec(args ...string) (string, error) {
	for _, tool := range []string{"nsenter", args[0]} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", fmt.Errorf("%s: the test needs the %s command: %w", strings.Join(args, " "), tool, err)
		}
	}
	cmd := exec.Command("nsenter", append([]string{"--net=" + n.Path, "--"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Veth connects two namespaces with a veth pair named nameA (in a) and nameB
// (in b), sets both ends up, and returns their interface indexes. The pair
// goes away with its namespaces.
func Veth(t testing.TB, a *NetNS, nameA string, b *NetNS, nameB string) (ifindexA, ifindexB int) {
	t.Helper()
	ifindexA, ifindexB, err := netdev.Veth(netdev.VethPair{NS: a.Handle, Name: nameA, PeerNS: b.Handle, PeerName: nameB})
	if err != nil {
		t.Fatal(err)
	}
	return ifindexA, ifindexB
}

// AddAddr adds an address in CIDR form ("198.18.0.1/24") to a device inside
// the namespace. Equivalent to: `ip -n NS addr add CIDR dev DEV`.
func (n *NetNS) AddAddr(t testing.TB, dev, cidr string) {
	t.Helper()
	if err := netdev.AddAddr(n.Handle, dev, netip.MustParsePrefix(cidr)); err != nil {
		t.Fatal(err)
	}
}

// BPFFS mounts a private BPF filesystem in a temporary directory and
// unmounts it when the test ends.
func BPFFS(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "bpffs")
	if err := bpffs.Ensure(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// Cgroup creates a private cgroup v2 directory below the machine's cgroup v2
// mount and removes it when the test ends. Never the root cgroup.
func Cgroup(t testing.TB) string {
	t.Helper()
	root, err := cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, Name("sluice-t-"))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := os.Remove(dir); err != nil {
			t.Errorf("remove cgroup %s: %v", dir, err)
		}
	})
	return dir
}

func cgroup2Mount() (string, error) {
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[2] == "cgroup2" {
			return f[1], nil
		}
	}
	return "", errors.New("no cgroup v2 mount found")
}

// Pair is two namespaces joined by a veth pair with IPv4 and IPv6 addresses
// on both ends: A has 198.18.0.1/24 and fd00::1/64 on "veth0", B has
// 198.18.0.2/24 and fd00::2/64 on "veth1".
type Pair struct {
	A, B       *NetNS
	IfA, IfB   int // interface indexes, each in its own namespace
	IPA, IPB   netip.Addr
	IP6A, IP6B netip.Addr

	t testing.TB // the test Ping reports to
}

// NewPair builds a Pair.
func NewPair(t testing.TB) *Pair {
	t.Helper()
	p := &Pair{
		A: NewNetNS(t), B: NewNetNS(t),
		IPA: netip.MustParseAddr("198.18.0.1"), IPB: netip.MustParseAddr("198.18.0.2"),
		IP6A: netip.MustParseAddr("fd00::1"), IP6B: netip.MustParseAddr("fd00::2"),
		t: t,
	}
	p.IfA, p.IfB = Veth(t, p.A, "veth0", p.B, "veth1")
	p.A.AddAddr(t, "veth0", "198.18.0.1/24")
	p.A.AddAddr(t, "veth0", "fd00::1/64")
	p.B.AddAddr(t, "veth1", "198.18.0.2/24")
	p.B.AddAddr(t, "veth1", "fd00::2/64")
	return p
}

// Ping sends count echo requests from A to B's IPv4 address and reports
// whether any reply came back. A failure to send at all fails the test.
func (p *Pair) Ping(count int) bool {
	p.t.Helper()
	return Ping(p.t, p.A.Handle, p.IPB, PingOptions{Count: count}) > 0
}
