package service_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/service"
)

// BenchmarkControlPlane compares how long sluice takes to program N
// ClusterIP services of 10 backends each with how long the programs
// kube-proxy drives take to load the same services: iptables-legacy-restore
// and iptables-nft-restore fed what kube-proxy's iptables proxier writes,
// and `nft -f` fed what its nftables proxier writes.
//
// sync-N loads N services into an empty datapath or table (what was there
// is removed between runs, untimed). change-10000 changes one backend of
// one service out of 10,000, alternating between two versions so that
// every run changes something: sluice with Upsert and with a Sync of the
// whole set, the tools with the partial sync kube-proxy does (iptables:
// `iptables-restore --noflush --counters` of the top-level chains, every
// KUBE-SERVICES rule and the changed service's chains; nftables: a
// transaction that rewrites the changed service's chains, timed as ns/op,
// and the two `nft --json list` runs kube-proxy makes before it, timed
// apart as list-ns/op).
//
// A change is made each way, untimed, before the timed runs, so that they
// all find the state a long-running controller would; and before a timed
// run the benchmark collects garbage and waits for the CPUs to be idle.
//
// A tool is timed as the wall time of its process, run inside a private
// network namespace made for the benchmark and deleted after it; the root
// namespace's firewall is never touched. Its CPU time in user space and in
// the kernel is reported too (user-ns/op, sys-ns/op). A tool that is not
// installed skips its sub-benchmark. Each tool sub-benchmark reports and
// logs its time over sluice's (x-sluice; in change-10000 also over the
// whole-set Sync's, x-sluice-sync). Run it as root:
//
//	go test -run '^$' -bench ControlPlane -benchtime 1x -timeout 60m ./service
//
// That takes about five minutes on two cores, most of them nft loading
// 10,000 services (once timed, once to set up change-10000). The tools come
// from `apt-get install -y iptables nftables`.
func BenchmarkControlPlane(b *testing.B) {
	testutil.Privileged(b)
	r := &cpResults{nsPerOp: map[string]float64{}}
	for _, n := range []int{1000, 10000} {
		svcs := cpServices(n)
		b.Run(fmt.Sprintf("sync-%d", n), func(b *testing.B) {
			b.Run("sluice", func(b *testing.B) { r.sluiceSync(b, svcs) })
			b.Run("iptables-legacy", func(b *testing.B) { r.iptablesLoad(b, "iptables-legacy", svcs) })
			b.Run("iptables-nft", func(b *testing.B) { r.iptablesLoad(b, "iptables-nft", svcs) })
			b.Run("nft", func(b *testing.B) { r.nftLoad(b, svcs) })
		})
	}

	// Service cpChanged's last backend moves to a spare address and back.
	svcs := cpServices(10000)
	changed := slices.Clone(svcs)
	changed[cpChanged] = cpChange(svcs[cpChanged])
	versions := [2][]service.Service{changed, svcs}
	b.Run("change-10000", func(b *testing.B) {
		b.Run("sluice", func(b *testing.B) { r.sluiceUpsert(b, versions) })
		b.Run("sluice-sync", func(b *testing.B) { r.sluiceResync(b, versions) })
		b.Run("iptables-legacy", func(b *testing.B) { r.iptablesChange(b, "iptables-legacy", versions) })
		b.Run("iptables-nft", func(b *testing.B) { r.iptablesChange(b, "iptables-nft", versions) })
		b.Run("nft", func(b *testing.B) { r.nftChange(b, versions) })
	})
}

// The benchmark's services: ClusterIPs from the service CIDR, backends
// from the cluster CIDR (kube-proxy's --cluster-cidr, used to tell local
// traffic from outside traffic). Beyond 65,000 backends, addresses repeat
// in other services, as when one pod backs several.
var (
	cpServiceCIDR = netip.MustParsePrefix("198.19.0.0/16")
	cpClusterCIDR = netip.MustParsePrefix("198.18.0.0/16")
	cpSpare       = netip.MustParseAddr("198.18.255.250") // no service's backend
)

const (
	cpBackends    = 10
	cpPort        = 80
	cpBackendPort = 8080
	cpChanged     = 4321 // the service change-10000 changes
)

// cpServices returns n services of cpBackends backends each: service i has
// ClusterIP 198.19.0.0 + i + 1, port 80/TCP.
func cpServices(n int) []service.Service {
	svcs := make([]service.Service, n)
	for i := range svcs {
		bs := make([]service.Backend, cpBackends)
		for j := range bs {
			bs[j] = service.Backend{Addr: cpAddr(cpClusterCIDR, 1+(i*cpBackends+j)%65000), Port: cpBackendPort, Weight: 1}
		}
		svcs[i] = service.Service{
			Frontend: service.Frontend{Addr: cpAddr(cpServiceCIDR, i+1), Port: cpPort, Protocol: service.TCP},
			Backends: bs,
		}
	}
	return svcs
}

// cpChange returns svc with its last backend moved to the spare address.
func cpChange(svc service.Service) service.Service {
	svc.Backends = slices.Clone(svc.Backends)
	svc.Backends[len(svc.Backends)-1].Addr = cpSpare
	return svc
}

func cpAddr(p netip.Prefix, i int) netip.Addr {
	a := p.Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v += uint32(i)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// cpResults keeps each sub-benchmark's time per operation, by name, for
// the ratios.
type cpResults struct {
	nsPerOp map[string]float64
}

// sluice records a sluice sub-benchmark's time: the benchmark timer's.
func (r *cpResults) sluice(b *testing.B) {
	r.nsPerOp[b.Name()] = float64(b.Elapsed().Nanoseconds()) / float64(b.N)
}

// tool reports a tool's time per run: the wall time of its processes as
// ns/op, their CPU time in user space and in the kernel, and the wall time
// over sluice's (x-sluice; in change-10000 over Upsert's, and over Sync's
// as x-sluice-sync).
func (r *cpResults) tool(b *testing.B, u cpUsage, runs int) {
	per := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(runs) }
	ns := per(u.wall)
	b.ReportMetric(ns, "ns/op")
	b.ReportMetric(per(u.user), "user-ns/op")
	b.ReportMetric(per(u.sys), "sys-ns/op")
	msg := fmt.Sprintf("%v a run", time.Duration(ns).Round(time.Millisecond))
	for _, ref := range []string{"sluice", "sluice-sync"} {
		if s, ok := r.nsPerOp[path.Dir(b.Name())+"/"+ref]; ok && s > 0 {
			b.ReportMetric(ns/s, "x-"+ref)
			msg += fmt.Sprintf(", %.1fx %s's %v", ns/s, ref, time.Duration(s).Round(time.Microsecond))
		}
	}
	b.Log(msg)
}

// cpDatapath opens a datapath in a namespace of its own, as newNodeWith
// does but without endpoints, sized for 10,000 services of 10 backends.
func cpDatapath(b *testing.B) *datapath.Datapath {
	b.Helper()
	ns := testutil.NewNetNS(b)
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name:   "node",
		NetNS:  ns.Path,
		BPFFS:  testutil.BPFFS(b),
		Node:   datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}},
		Limits: datapath.Limits{Services: 16384, Backends: 131072, Conntrack: 4096},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := dp.Unload(); err != nil {
			b.Error(err)
		}
	})
	return dp
}

// sluiceSync times Sync of svcs into an empty datapath.
func (r *cpResults) sluiceSync(b *testing.B, svcs []service.Service) {
	dp := cpDatapath(b)
	ctx := context.Background()
	for b.Loop() {
		b.StopTimer()
		if _, err := service.Sync(ctx, dp, "", nil); err != nil {
			b.Fatal(err)
		}
		cpSettle(b)
		b.StartTimer()
		out, err := service.Sync(ctx, dp, "", svcs)
		if err != nil {
			b.Fatal(err)
		}
		if len(out.Added) != len(svcs) {
			b.Fatalf("Sync added %d services, want %d", len(out.Added), len(svcs))
		}
	}
	r.sluice(b)
}

// sluiceUpsert times the Upsert of one service whose backend changed, with
// versions[1] in the datapath to start with.
func (r *cpResults) sluiceUpsert(b *testing.B, versions [2][]service.Service) {
	dp := cpDatapath(b)
	ctx := context.Background()
	if _, err := service.Sync(ctx, dp, "", versions[1]); err != nil {
		b.Fatal(err)
	}
	for range 10 {
		for _, v := range versions {
			if _, err := service.Upsert(ctx, dp, v[cpChanged]); err != nil {
				b.Fatal(err)
			}
		}
	}
	cpSettle(b)
	i := 0
	for b.Loop() {
		ch, err := service.Upsert(ctx, dp, versions[i%2][cpChanged])
		if err != nil {
			b.Fatal(err)
		}
		if len(ch.Added) != 1 || len(ch.Removed) != 1 {
			b.Fatalf("Upsert changed %+v, want one backend added and one removed", ch)
		}
		i++
	}
	r.sluice(b)
}

// sluiceResync times a Sync of the whole set with one service changed.
func (r *cpResults) sluiceResync(b *testing.B, versions [2][]service.Service) {
	dp := cpDatapath(b)
	ctx := context.Background()
	for _, v := range [3][]service.Service{versions[1], versions[0], versions[1]} {
		if _, err := service.Sync(ctx, dp, "", v); err != nil {
			b.Fatal(err)
		}
	}
	cpSettle(b)
	i := 0
	for b.Loop() {
		out, err := service.Sync(ctx, dp, "", versions[i%2])
		if err != nil {
			b.Fatal(err)
		}
		if len(out.Changed) != 1 || out.Unchanged != len(versions[0])-1 {
			b.Fatalf("Sync changed %d services and left %d, want 1 and %d", len(out.Changed), out.Unchanged, len(versions[0])-1)
		}
		i++
	}
	r.sluice(b)
}

// iptablesLoad times a full restore of the nat table, without --noflush,
// into an empty table, by tool (iptables-legacy or iptables-nft).
// Equivalent to: `iptables-legacy-restore -w < FILE`.
func (r *cpResults) iptablesLoad(b *testing.B, tool string, svcs []service.Service) {
	restore, save := cpNeed(b, tool+"-restore"), cpNeed(b, tool+"-save")
	ns := testutil.NewNetNS(b)
	sh := newNSShell(b, ns)
	dir := b.TempDir()
	empty := cpFile(b, dir, "empty.rules", func(w *bufio.Writer) { w.WriteString("*nat\nCOMMIT\n") })
	load := cpFile(b, dir, "load.rules", func(w *bufio.Writer) { writeIPTablesFull(w, svcs) })
	var took cpUsage
	runs := 0
	for b.Loop() {
		b.StopTimer()
		sh.mustRun(b, empty, restore, "-w")
		cpSettle(b)
		b.StartTimer()
		took.add(sh.mustRun(b, load, restore, "-w"))
		runs++
	}
	r.tool(b, took, runs)
	cpCheck(b, ns, len(svcs), "\n:KUBE-SVC-", save, "-t", "nat")
}

// iptablesChange times kube-proxy's partial sync of one changed service:
// `iptables-restore -w --noflush --counters` of its input, with the whole
// set of versions[1] loaded first.
func (r *cpResults) iptablesChange(b *testing.B, tool string, versions [2][]service.Service) {
	restore, save := cpNeed(b, tool+"-restore"), cpNeed(b, tool+"-save")
	ns := testutil.NewNetNS(b)
	sh := newNSShell(b, ns)
	dir := b.TempDir()
	load := cpFile(b, dir, "load.rules", func(w *bufio.Writer) { writeIPTablesFull(w, versions[1]) })
	var partial [2]string
	for v := range partial {
		partial[v] = cpFile(b, dir, fmt.Sprintf("partial%d.rules", v), func(w *bufio.Writer) { writeIPTablesPartial(w, versions[v], cpChanged) })
	}
	args := []string{restore, "-w", "--noflush", "--counters"}
	sh.mustRun(b, load, restore, "-w")
	// Once each way, untimed, so that every timed run finds what kube-proxy
	// would: the filter chains there and the other version's chain stale.
	sh.mustRun(b, partial[0], args...)
	sh.mustRun(b, partial[1], args...)
	cpSettle(b)
	var took cpUsage
	runs := 0
	for b.Loop() {
		took.add(sh.mustRun(b, partial[runs%2], args...))
		runs++
	}
	r.tool(b, took, runs)
	cpCheck(b, ns, len(versions[1]), "\n:KUBE-SVC-", save, "-t", "nat")
}

// nftLoad times kube-proxy's first full sync in nftables mode into an
// empty namespace. Equivalent to: `nft -f FILE`.
func (r *cpResults) nftLoad(b *testing.B, svcs []service.Service) {
	nft := cpNeed(b, "nft")
	ns := testutil.NewNetNS(b)
	sh := newNSShell(b, ns)
	dir := b.TempDir()
	empty := cpFile(b, dir, "empty.nft", func(w *bufio.Writer) {
		w.WriteString("add table ip kube-proxy\ndelete table ip kube-proxy\n")
	})
	load := cpFile(b, dir, "load.nft", func(w *bufio.Writer) { writeNFTFull(w, svcs) })
	var took cpUsage
	runs := 0
	for b.Loop() {
		b.StopTimer()
		sh.mustRun(b, "", nft, "-f", empty)
		cpSettle(b)
		b.StartTimer()
		took.add(sh.mustRun(b, "", nft, "-f", load))
		runs++
	}
	r.tool(b, took, runs)
	cpCheck(b, ns, len(svcs), "/tcp/http {", nft, "list", "chains", "ip")
}

// nftChange times kube-proxy's partial sync of one changed service in
// nftables mode, `nft -f FILE`, with the whole set of versions[1] loaded
// first. Before each such transaction kube-proxy lists the chains and sets
// of the family to find stale ones (`nft --json list chains ip`, `nft
// --json list sets ip`): these two runs are timed apart, as list-ns/op.
func (r *cpResults) nftChange(b *testing.B, versions [2][]service.Service) {
	nft := cpNeed(b, "nft")
	ns := testutil.NewNetNS(b)
	sh := newNSShell(b, ns)
	dir := b.TempDir()
	load := cpFile(b, dir, "load.nft", func(w *bufio.Writer) { writeNFTFull(w, versions[1]) })
	var partial [2]string
	for v := range partial {
		partial[v] = cpFile(b, dir, fmt.Sprintf("partial%d.nft", v), func(w *bufio.Writer) {
			writeNFTPartial(w, versions[v], versions[1-v], cpChanged)
		})
	}
	sh.mustRun(b, "", nft, "-f", load)
	sh.mustRun(b, "", nft, "-f", partial[0])
	sh.mustRun(b, "", nft, "-f", partial[1])
	cpSettle(b)
	var took, list cpUsage
	runs := 0
	for b.Loop() {
		b.StopTimer()
		list.add(sh.mustRun(b, "", nft, "--json", "list", "chains", "ip"))
		list.add(sh.mustRun(b, "", nft, "--json", "list", "sets", "ip"))
		b.StartTimer()
		took.add(sh.mustRun(b, "", nft, "-f", partial[runs%2]))
		runs++
	}
	r.tool(b, took, runs)
	perList := float64(list.wall.Nanoseconds()) / float64(runs)
	b.ReportMetric(perList, "list-ns/op")
	if s, ok := r.nsPerOp[path.Dir(b.Name())+"/sluice"]; ok && s > 0 {
		total := float64(took.wall.Nanoseconds())/float64(runs) + perList
		b.Logf("with the lists: %v a run, %.1fx sluice's", time.Duration(total).Round(time.Millisecond), total/s)
	}
	cpCheck(b, ns, len(versions[1]), "/tcp/http {", nft, "list", "chains", "ip")
}

// cpSettle collects garbage and waits, untimed, until the CPUs are nearly
// idle: the kernel frees the tables of a deleted namespace, or of a
// deleted table, in the background, and for 10,000 services that keeps a
// CPU busy for many seconds after the sub-benchmark that made them ended.
// A run of 1x times one operation, which a collection or a busy CPU would
// otherwise distort.
func cpSettle(b *testing.B) {
	b.Helper()
	runtime.GC()
	const (
		idle    = 0.10 // busy share of all CPUs that counts as idle
		every   = 250 * time.Millisecond
		atMost  = time.Minute
		noticed = time.Second
	)
	start := time.Now()
	busy0, total0 := cpCPUTimes(b)
	for {
		time.Sleep(every)
		busy, total := cpCPUTimes(b)
		if total == total0 || float64(busy-busy0)/float64(total-total0) < idle {
			break
		}
		busy0, total0 = busy, total
		if time.Since(start) > atMost {
			b.Logf("the CPUs are still busy after %v; measuring anyway", atMost)
			return
		}
	}
	if d := time.Since(start); d > noticed {
		b.Logf("waited %v for the CPUs to settle", d.Round(100*time.Millisecond))
	}
}

// cpCPUTimes returns the time all CPUs spent busy and in total, in ticks,
// from the first line of /proc/stat; time stolen by the hypervisor counts
// as neither.
func cpCPUTimes(b *testing.B) (busy, total uint64) {
	b.Helper()
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	line, _, _ := strings.Cut(string(data), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		b.Fatalf("/proc/stat begins with %q", line)
	}
	// user nice system idle iowait irq softirq
	for i, s := range f[1:8] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			b.Fatalf("/proc/stat: %v", err)
		}
		total += v
		if i != 3 && i != 4 {
			busy += v
		}
	}
	return busy, total
}

// cpNeed returns the path of a tool, or skips the benchmark without it.
func cpNeed(b *testing.B, tool string) string {
	b.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		b.Skipf("skipping: %s is not installed (apt-get install -y iptables nftables): %v", tool, err)
	}
	return p
}

// cpFile writes a file in dir with fill and returns its path.
func cpFile(b *testing.B, dir, name string, fill func(*bufio.Writer)) string {
	b.Helper()
	p := filepath.Join(dir, name)
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	fill(w)
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	return p
}

// cpCheck lists the namespace's rules with args, through nsenter (not the
// shell the tools ran in), and fails unless it holds want of sub: proof
// that the tools programmed the private namespace.
func cpCheck(b *testing.B, ns *testutil.NetNS, want int, sub string, args ...string) {
	b.Helper()
	out, err := ns.Exec(args...)
	if err != nil {
		b.Fatal(err)
	}
	if got := strings.Count(out, sub); got != want {
		b.Fatalf("%s in netns %s: %d of %q, want %d", strings.Join(args, " "), ns.Name, got, sub, want)
	}
}

// nsShell runs commands inside a network namespace from one OS thread that
// entered it, so that a command is timed alone, without nsenter.
type nsShell struct {
	reqs    chan nsCmd
	stopped chan struct{}
	err     error // why it stopped; read after stopped is closed
}

type nsCmd struct {
	args  []string
	stdin string // a file, or none when empty
	reply chan nsResult
}

type nsResult struct {
	use cpUsage
	err error
}

// cpUsage is what processes took: wall time, from start to exit, and CPU
// time in user space and in the kernel.
type cpUsage struct {
	wall, user, sys time.Duration
}

func (u *cpUsage) add(v cpUsage) {
	u.wall += v.wall
	u.user += v.user
	u.sys += v.sys
}

func newNSShell(b *testing.B, ns *testutil.NetNS) *nsShell {
	b.Helper()
	s := &nsShell{reqs: make(chan nsCmd), stopped: make(chan struct{})}
	go func() {
		defer close(s.stopped)
		s.err = nsrun.Do(ns.Handle, func() error {
			// nsrun.Do entered the namespace or did not call us; check
			// anyway, this thread is about to run firewall tools.
			here, err := netns.Get()
			if err != nil {
				return fmt.Errorf("namespace of the shell thread: %w", err)
			}
			inside := here.Equal(ns.Handle)
			here.Close()
			if !inside {
				return fmt.Errorf("the shell thread is not in netns %s", ns.Name)
			}
			for c := range s.reqs {
				c.reply <- c.run()
			}
			return nil
		})
	}()
	b.Cleanup(func() {
		close(s.reqs)
		<-s.stopped
		if s.err != nil {
			b.Error(s.err)
		}
	})
	return s
}

// run runs args in the namespace, with stdin from a file unless it is
// empty, and returns what the process took.
func (s *nsShell) run(stdin string, args ...string) (cpUsage, error) {
	c := nsCmd{args: args, stdin: stdin, reply: make(chan nsResult, 1)}
	select {
	case s.reqs <- c:
	case <-s.stopped:
		return cpUsage{}, fmt.Errorf("%s: the namespace shell stopped: %w", strings.Join(args, " "), s.err)
	}
	r := <-c.reply
	return r.use, r.err
}

func (s *nsShell) mustRun(b *testing.B, stdin string, args ...string) cpUsage {
	b.Helper()
	use, err := s.run(stdin, args...)
	if err != nil {
		b.Fatal(err)
	}
	return use
}

// run runs on the shell's thread: the child inherits its namespace.
func (c nsCmd) run() nsResult {
	cmd := exec.Command(c.args[0], c.args[1:]...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if c.stdin != "" {
		f, err := os.Open(c.stdin)
		if err != nil {
			return nsResult{err: err}
		}
		defer f.Close()
		cmd.Stdin = f
	}
	start := time.Now()
	err := cmd.Run()
	use := cpUsage{wall: time.Since(start)}
	if ps := cmd.ProcessState; ps != nil {
		use.user, use.sys = ps.UserTime(), ps.SystemTime()
	}
	if err != nil {
		tail := out.Bytes()
		if len(tail) > 2000 {
			tail = tail[:2000]
		}
		return nsResult{use, fmt.Errorf("%s: %w: %s", strings.Join(c.args, " "), err, tail)}
	}
	return nsResult{use, nil}
}

// What kube-proxy writes. Both generators follow kube-proxy's proxiers
// (pkg/proxy/iptables/proxier.go and pkg/proxy/nftables/proxier.go) for
// IPv4 ClusterIP services of one TCP port named "http" in namespace
// "bench", with --cluster-cidr set (local traffic is told by source
// address), the default masquerade bit 14, NodePorts on every local
// address, and more than 1,000 endpoints ("large cluster mode": no
// per-endpoint comments). Services are written in slice order, where
// kube-proxy takes its map's.

// kpHash is kube-proxy's name hash: base32 of SHA-256.
func kpHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return base32.StdEncoding.EncodeToString(h[:])
}

const kpMasqMark = "0x4000"

// kpPortName is service i's ServicePortName, as kube-proxy prints it.
func kpPortName(i int) string { return fmt.Sprintf("bench/svc-%d:http", i) }

func kpSVCChain(i int) string { return "KUBE-SVC-" + kpHash(kpPortName(i) + "tcp")[:16] }

func kpSEPChain(i int, ep netip.AddrPort) string {
	return "KUBE-SEP-" + kpHash(kpPortName(i) + "tcp" + ep.String())[:16]
}

// writeIPTablesFull writes the whole nat table for svcs, for a restore
// without --noflush: the built-in chains, their jumps to kube-proxy's and
// every service's chains and rules.
func writeIPTablesFull(w *bufio.Writer, svcs []service.Service) {
	w.WriteString("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n")
	kpNATTopChains(w)
	for i := range svcs {
		kpIPTablesChains(w, i, &svcs[i])
	}
	w.WriteString(`-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES` + "\n")
	w.WriteString(`-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES` + "\n")
	w.WriteString(`-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING` + "\n")
	kpNATTopRules(w)
	for i := range svcs {
		kpServicesRule(w, i, &svcs[i])
		kpIPTablesRules(w, i, &svcs[i])
	}
	kpNodePortsRule(w)
	w.WriteString("COMMIT\n")
}

// writeIPTablesPartial writes what kube-proxy restores with --noflush in a
// partial sync after service changed: its filter chains, the nat table's
// top-level chains with every service's KUBE-SERVICES rule, and the chains
// of the changed service only. The chain of a backend that went stays, as
// kube-proxy in large cluster mode deletes stale chains only once per
// sync period (after an iptables-save).
func writeIPTablesPartial(w *bufio.Writer, svcs []service.Service, changed int) {
	w.WriteString("*filter\n")
	for _, c := range []string{"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"} {
		fmt.Fprintf(w, ":%s - [0:0]\n", c)
	}
	w.WriteString(`-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP` + "\n")
	w.WriteString("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n")
	fmt.Fprintf(w, `-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark %s/%s -j ACCEPT`+"\n", kpMasqMark, kpMasqMark)
	w.WriteString(`-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT` + "\n")
	w.WriteString("COMMIT\n*nat\n")
	kpNATTopChains(w)
	kpIPTablesChains(w, changed, &svcs[changed])
	kpNATTopRules(w)
	for i := range svcs {
		kpServicesRule(w, i, &svcs[i])
		if i == changed {
			kpIPTablesRules(w, i, &svcs[i])
		}
	}
	kpNodePortsRule(w)
	w.WriteString("COMMIT\n")
}

func kpNATTopChains(w *bufio.Writer) {
	for _, c := range []string{"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"} {
		fmt.Fprintf(w, ":%s - [0:0]\n", c)
	}
}

func kpNATTopRules(w *bufio.Writer) {
	fmt.Fprintf(w, "-A KUBE-POSTROUTING -m mark ! --mark %s/%s -j RETURN\n", kpMasqMark, kpMasqMark)
	fmt.Fprintf(w, "-A KUBE-POSTROUTING -j MARK --xor-mark %s\n", kpMasqMark)
	w.WriteString(`-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully` + "\n")
	fmt.Fprintf(w, "-A KUBE-MARK-MASQ -j MARK --or-mark %s\n", kpMasqMark)
}

func kpNodePortsRule(w *bufio.Writer) {
	w.WriteString(`-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS` + "\n")
}

func kpIPTablesChains(w *bufio.Writer, i int, svc *service.Service) {
	fmt.Fprintf(w, ":%s - [0:0]\n", kpSVCChain(i))
	for _, be := range svc.Backends {
		fmt.Fprintf(w, ":%s - [0:0]\n", kpSEPChain(i, be.AddrPort()))
	}
}

// kpServicesRule is service i's jump from KUBE-SERVICES.
func kpServicesRule(w *bufio.Writer, i int, svc *service.Service) {
	fmt.Fprintf(w, "-A KUBE-SERVICES -m comment --comment \"%s cluster IP\" -m tcp -p tcp -d %s --dport %d -j %s\n",
		kpPortName(i), svc.Frontend.Addr, svc.Frontend.Port, kpSVCChain(i))
}

// kpIPTablesRules are the rules of service i's KUBE-SVC and KUBE-SEP
// chains: masquerade traffic from outside the cluster, pick a backend at
// random with -m statistic, mark hairpin traffic and DNAT.
func kpIPTablesRules(w *bufio.Writer, i int, svc *service.Service) {
	svcChain, fe := kpSVCChain(i), svc.Frontend
	fmt.Fprintf(w, "-A %s -m comment --comment \"%s cluster IP\" -m tcp -p tcp -d %s --dport %d ! -s %s -j KUBE-MARK-MASQ\n",
		svcChain, kpPortName(i), fe.Addr, fe.Port, cpClusterCIDR)
	n := len(svc.Backends)
	for j, be := range svc.Backends {
		if j < n-1 {
			fmt.Fprintf(w, "-A %s -m statistic --mode random --probability %0.10f -j %s\n", svcChain, 1.0/float64(n-j), kpSEPChain(i, be.AddrPort()))
		} else {
			fmt.Fprintf(w, "-A %s -j %s\n", svcChain, kpSEPChain(i, be.AddrPort()))
		}
	}
	for _, be := range svc.Backends {
		sep := kpSEPChain(i, be.AddrPort())
		fmt.Fprintf(w, "-A %s -s %s -j KUBE-MARK-MASQ\n", sep, be.Addr)
		fmt.Fprintf(w, "-A %s -m tcp -p tcp -j DNAT --to-destination %s\n", sep, be.AddrPort())
	}
}

// kpNFTName is kube-proxy's nftables chain name: a prefix, a hash of the
// name and the name.
func kpNFTName(prefix, name string) string { return prefix + kpHash(name)[:8] + "-" + name }

func kpNFTServiceChain(i int) string {
	return kpNFTName("service-", fmt.Sprintf("bench/svc-%d/tcp/http", i))
}

func kpNFTEndpointChain(i int, ep netip.AddrPort) string {
	return kpNFTName("endpoint-", fmt.Sprintf("bench/svc-%d/tcp/http__%s/%d", i, ep.Addr(), ep.Port()))
}

// writeNFTFull writes kube-proxy's first full sync in nftables mode: its
// table, base chains, sets and maps, then every service.
func writeNFTFull(w *bufio.Writer, svcs []service.Service) {
	const t = "ip kube-proxy"
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	p(`add table %s { comment "rules for kube-proxy" ; }`, t)
	base := []struct{ name, typ, hook, prio string }{
		{"filter-prerouting", "filter", "prerouting", "-110"},
		{"filter-input", "filter", "input", "-110"},
		{"filter-forward", "filter", "forward", "-110"},
		{"filter-output", "filter", "output", "-110"},
		{"filter-output-post-dnat", "filter", "output", "-90"},
		{"nat-prerouting", "nat", "prerouting", "-100"},
		{"nat-output", "nat", "output", "-100"},
		{"nat-postrouting", "nat", "postrouting", "100"},
	}
	// On its first sync kube-proxy adds and deletes every base chain, to
	// recreate them whatever their properties were.
	for _, c := range base {
		p("add chain %s %s", t, c.name)
		p("delete chain %s %s", t, c.name)
	}
	for _, c := range base {
		p("add chain %s %s { type %s hook %s priority %s ; }", t, c.name, c.typ, c.hook, c.prio)
		p("flush chain %s %s", t, c.name)
	}
	made := map[string]bool{}
	ensure := func(chain string) {
		if !made[chain] {
			made[chain] = true
			p("add chain %s %s", t, chain)
			p("flush chain %s %s", t, chain)
		}
	}
	for _, j := range []struct{ dst, src, extra string }{
		{"nodeport-endpoints-check", "filter-input", "ct state new "},
		{"service-endpoints-check", "filter-input", "ct state new "},
		{"service-endpoints-check", "filter-forward", "ct state new "},
		{"service-endpoints-check", "filter-output", "ct state new "},
		{"firewall-check", "filter-prerouting", "ct state new "},
		{"firewall-check", "filter-output", "ct state new "},
		{"services", "nat-output", ""},
		{"services", "nat-prerouting", ""},
		{"masquerading", "nat-postrouting", ""},
		{"cluster-ips-check", "filter-forward", "ct state new "},
		{"cluster-ips-check", "filter-output-post-dnat", "ct state new "},
	} {
		ensure(j.dst)
		p("add rule %s %s %sjump %s", t, j.src, j.extra, j.dst)
	}
	for _, c := range []string{"services", "cluster-ips-check", "masquerading", "mark-for-masquerade"} {
		ensure(c)
	}
	p("add rule %s mark-for-masquerade mark set mark or %s", t, kpMasqMark)
	p("add rule %s masquerading mark and %s == 0 return", t, kpMasqMark)
	p("add rule %s masquerading mark set mark xor %s", t, kpMasqMark)
	p("add rule %s masquerading masquerade fully-random", t)
	p(`add set %s cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }`, t)
	p(`add rule %s cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"`, t)
	p(`add rule %s cluster-ips-check ip daddr { %s } drop comment "Drop traffic to unallocated ClusterIPs"`, t, cpServiceCIDR)
	p(`add set %s nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }`, t)
	p("delete set %s nodeport-ips", t)
	p(`add map %s no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }`, t)
	p(`add map %s no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }`, t)
	p(`add chain %s reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }`, t)
	p("flush chain %s reject-chain", t)
	p("add rule %s reject-chain reject", t)
	p("add rule %s service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services", t)
	p("add rule %s nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports", t)
	p(`add map %s firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }`, t)
	ensure("firewall-check")
	p("add rule %s firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips", t)
	p(`add map %s service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }`, t)
	p(`add map %s service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }`, t)
	p("add rule %s services ip daddr . meta l4proto . th dport vmap @service-ips", t)
	p("add rule %s services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports", t)
	p("flush set %s cluster-ips", t)
	for _, m := range []string{"service-ips", "firewall-ips", "no-endpoint-services", "no-endpoint-nodeports", "service-nodeports"} {
		p("flush map %s %s", t, m)
	}
	for i := range svcs {
		kpNFTService(w, i, &svcs[i], true)
	}
}

// writeNFTPartial writes kube-proxy's partial sync after service changed
// from was to svcs[changed]: its chains made and flushed, its rules
// written again, and the chains of backends it no longer has flushed
// (deleted a second later in another transaction, untimed here). Its map
// elements are unchanged and not written.
func writeNFTPartial(w *bufio.Writer, svcs, was []service.Service, changed int) {
	kpNFTService(w, changed, &svcs[changed], false)
	for _, old := range was[changed].Backends {
		if !slices.ContainsFunc(svcs[changed].Backends, func(be service.Backend) bool { return be.AddrPort() == old.AddrPort() }) {
			fmt.Fprintf(w, "flush chain ip kube-proxy %s\n", kpNFTEndpointChain(changed, old.AddrPort()))
		}
	}
}

// kpNFTService writes service i's chains and rules, and with elements its
// entries in cluster-ips and service-ips.
func kpNFTService(w *bufio.Writer, i int, svc *service.Service, elements bool) {
	const t = "ip kube-proxy"
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	svcChain, fe := kpNFTServiceChain(i), svc.Frontend
	eps := make([]string, len(svc.Backends))
	for j, be := range svc.Backends {
		eps[j] = kpNFTEndpointChain(i, be.AddrPort())
		p("add chain %s %s", t, eps[j])
		p("flush chain %s %s", t, eps[j])
	}
	p("add chain %s %s", t, svcChain)
	p("flush chain %s %s", t, svcChain)
	if elements {
		p("add element %s cluster-ips { %s }", t, fe.Addr)
		p("add element %s service-ips { %s . tcp . %d : goto %s }", t, fe.Addr, fe.Port, svcChain)
	}
	p("add rule %s %s ip daddr %s tcp dport %d ip saddr != %s jump mark-for-masquerade", t, svcChain, fe.Addr, fe.Port, cpClusterCIDR)
	var vmap strings.Builder
	for j, ep := range eps {
		if j > 0 {
			vmap.WriteString(", ")
		}
		fmt.Fprintf(&vmap, "%d : goto %s", j, ep)
	}
	p("add rule %s %s numgen random mod %d vmap { %s }", t, svcChain, len(eps), vmap.String())
	for j, be := range svc.Backends {
		p("add rule %s %s ip saddr %s jump mark-for-masquerade", t, eps[j], be.Addr)
		p("add rule %s %s meta l4proto tcp dnat to %s", t, eps[j], be.AddrPort())
	}
}
