package service_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/service"
)

// BenchmarkConnRate measures how many TCP connections a second one client
// opens to a ClusterIP, one after another, through sluice's per-packet
// translation (service.TCOnly) and through the DNAT rules kube-proxy would
// write for iptables-legacy, iptables-nft and nftables, with 1 and with
// 10,000 services of 10 backends present. The measured service is the last
// of the set: in kube-proxy's iptables rules it is the last of the
// KUBE-SERVICES chain a new connection's first packet walks.
//
// Both set-ups have the same shape: a client namespace and a server
// namespace, each joined by a veth pair to a namespace in the middle. For
// sluice that is the node namespace of a datapath whose client and server
// endpoints they are (the services are Sync'ed); for the tools it is a
// router namespace with forwarding on and kube-proxy's rules, the same
// services' as in BenchmarkControlPlane, loaded into it with
// iptables-legacy-restore, iptables-nft-restore or `nft -f`. Every
// backend is the server's address: the 10 backends of a service are its
// ports 9001 to 9010, each answered by a listener.
//
// A connection is connect, write one byte, accept, read the byte and
// write it back on the server's end, read it at the client, close. One Go
// thread in the client namespace drives both ends with non-blocking
// sockets and poll (the server's listening sockets were made in its
// namespace), so a connection costs the datapath's work, the stacks' and
// a few system calls, without waking another thread. The client end is
// closed with SO_LINGER 0 (a reset: no TIME_WAIT on either end, which the
// sub-benchmark checks) and every connection of a sub-benchmark has its
// own source port, bound explicitly: none reuses a flow a conntrack table
// still holds, so each is a new flow to sluice and to netfilter. Ports
// repeat only after 64,512 connections, which a sub-benchmark logs. Each
// run (op) is 200 connections; 500 untimed ones first check that every
// backend port answers.
//
// Each sub-benchmark reports conn/s, the rate of its median run (ns/op is
// the mean run, which a machine busy with other work now and then skews),
// and, for the tools, x-sluice: sluice's rate in the same run over the
// tool's, so how many times longer a connection takes through the tool. It
// logs the mean rate too and, with 10,000 services, the rate as a share of
// the rate with one. Before it measures it waits, for at most 10s, until
// the CPUs are nearly idle (the kernel frees the previous sub-benchmark's
// namespaces and rules in the background).
//
// All namespaces are made for the benchmark and deleted after it; nothing
// touches the root namespace's firewall, routes or devices. A tool that is
// not installed (apt-get install -y iptables nftables) skips its
// sub-benchmark. Setting up is not timed, but takes most of the run: `nft
// -f` of kube-proxy's table for 10,000 services keeps the kernel busy for
// a minute or more. Run it as root:
//
//	go test -run '^$' -bench ConnRate -benchtime 50x -timeout 30m ./service
func BenchmarkConnRate(b *testing.B) {
	testutil.Privileged(b)
	r := &crResults{rate: map[string]float64{}}
	for _, n := range []int{1, 10000} {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			b.Run("sluice", func(b *testing.B) { r.sluice(b, n) })
			b.Run("iptables-legacy", func(b *testing.B) { r.iptables(b, "iptables-legacy", n) })
			b.Run("iptables-nft", func(b *testing.B) { r.iptables(b, "iptables-nft", n) })
			b.Run("nft", func(b *testing.B) { r.nft(b, n) })
		})
	}
}

const (
	crPerOp     = 200  // connections a run
	crWarmup    = 500  // untimed connections before the runs
	crFirstPort = 1024 // source ports go from here to 65535
	crTimeout   = 5 * time.Second
	crSlow      = 200 * time.Millisecond // a connection this long lost a packet
)

// crServices returns n ClusterIP services, 198.19.0.0 + i + 1 port 80/TCP,
// each balanced at random over server's ports10, translated per packet.
func crServices(n int, server netip.Addr) []service.Service {
	svcs := make([]service.Service, n)
	for i := range svcs {
		bs := make([]service.Backend, len(ports10))
		for j, p := range ports10 {
			bs[j] = service.Backend{Addr: server, Port: p, Weight: 1}
		}
		svcs[i] = service.Service{
			Frontend: service.Frontend{Addr: cpAddr(cpServiceCIDR, i+1), Port: cpPort, Protocol: service.TCP},
			Backends: bs,
			Reach:    service.TCOnly,
		}
	}
	return svcs
}

// crResults keeps each sub-benchmark's rate, by name, for the ratios.
type crResults struct {
	rate map[string]float64
}

// sluice measures a datapath whose client endpoint connects to a server
// endpoint through the last of n services.
func (r *crResults) sluice(b *testing.B, n int) {
	nd := newNodeWith(b, datapath.Config{Limits: datapath.Limits{
		Services: 16384, Backends: 131072,
		Conntrack: 1 << 18, // every connection of the run kept: three entries each
	}})
	svcs := crServices(n, nd.a.IPv4)
	if _, err := service.Sync(context.Background(), nd.dp, "", svcs); err != nil {
		b.Fatal(err)
	}
	r.measure(b, testutil.OpenNetNS(b, nd.client.NetNS), testutil.OpenNetNS(b, nd.a.NetNS), nd.a.IPv4, svcs[n-1].Frontend)
}

// iptables measures a router whose nat table tool-restore loaded with
// kube-proxy's rules for n services.
func (r *crResults) iptables(b *testing.B, tool string, n int) {
	restore := cpNeed(b, tool+"-restore")
	rt := crRouted(b)
	svcs := crServices(n, rt.serverIP)
	rules := cpFile(b, b.TempDir(), "load.rules", func(w *bufio.Writer) { writeIPTablesFull(w, svcs) })
	newNSShell(b, rt.router).mustRun(b, rules, restore, "-w")
	r.measure(b, rt.client, rt.server, rt.serverIP, svcs[n-1].Frontend)
}

// nft measures a router with kube-proxy's nftables table for n services.
func (r *crResults) nft(b *testing.B, n int) {
	nft := cpNeed(b, "nft")
	rt := crRouted(b)
	svcs := crServices(n, rt.serverIP)
	rules := cpFile(b, b.TempDir(), "load.nft", func(w *bufio.Writer) { writeNFTFull(w, svcs) })
	newNSShell(b, rt.router).mustRun(b, "", nft, "-f", rules)
	r.measure(b, rt.client, rt.server, rt.serverIP, svcs[n-1].Frontend)
}

// measure serves on serverIP inside server, checks that connections from
// client to fe reach every backend, then times crPerOp connections a run
// and reports the rate.
func (r *crResults) measure(b *testing.B, client, server *testutil.NetNS, serverIP netip.Addr, fe service.Frontend) {
	srv := crServe(b, server, serverIP)
	c := newCRClient(b, client, netip.AddrPortFrom(fe.Addr, fe.Port), srv)
	if err := c.open(crWarmup); err != nil {
		b.Fatal(err)
	}
	if counts, ok := srv.reached(); !ok {
		b.Fatalf("%d connections to %v: each backend port accepted %v, want all of them some", crWarmup, fe, counts)
	}
	c.slow = 0
	crSettle(b)
	var runs []time.Duration
	for b.Loop() {
		start := time.Now()
		if err := c.open(crPerOp); err != nil {
			b.Fatal(err)
		}
		runs = append(runs, time.Since(start))
	}
	// The median run's rate: the machine may be busy with other work now
	// and then, and a mean would count it.
	slices.Sort(runs)
	rate := crPerOp / runs[len(runs)/2].Seconds()
	r.rate[b.Name()] = rate
	b.ReportMetric(rate, "conn/s")
	msg := fmt.Sprintf("%.0f conn/s in the median run, %.0f over all %d connections",
		rate, float64(b.N*crPerOp)/b.Elapsed().Seconds(), b.N*crPerOp)
	if s, ok := r.rate[path.Dir(b.Name())+"/sluice"]; ok && !strings.HasSuffix(b.Name(), "/sluice") {
		b.ReportMetric(s/rate, "x-sluice")
		msg += fmt.Sprintf("; sluice's %.0f is %.2fx", s, s/rate)
	}
	if one, ok := r.rate[strings.Replace(b.Name(), "/services=10000/", "/services=1/", 1)]; ok && strings.Contains(b.Name(), "/services=10000/") {
		msg += fmt.Sprintf("; %.0f%% of the rate with one service", 100*rate/one)
	}
	if c.slow > 0 {
		msg += fmt.Sprintf("; %d connections took over %v (a lost packet resent)", c.slow, crSlow)
	}
	if c.wrapped {
		msg += "; source ports were used twice, so some flows were reopened"
	}
	if tw := crTimeWait(b, client) + crTimeWait(b, server); tw > 0 {
		msg += fmt.Sprintf("; %d sockets in TIME_WAIT", tw)
	}
	b.Log(msg)
}

// crTimeWait returns how many TCP sockets are in TIME_WAIT in ns.
func crTimeWait(b *testing.B, ns *testutil.NetNS) int {
	b.Helper()
	tw := -1
	ns.Do(b, func() error {
		// /proc/thread-self/net is the namespace of this thread.
		data, err := os.ReadFile("/proc/thread-self/net/sockstat")
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) >= 7 && f[0] == "TCP:" && f[5] == "tw" {
				tw, err = strconv.Atoi(f[6])
				return err
			}
		}
		return fmt.Errorf("no TCP line in sockstat: %q", data)
	})
	return tw
}

// crRoutedNet is a client and a server namespace joined through a router
// namespace that forwards between them: client eth0 198.18.10.2/24 —
// 198.18.10.1/24 to-client, router, to-server 198.18.11.1/24 — server eth0
// 198.18.11.2/24. Client and server route everything through the router.
type crRoutedNet struct {
	client, router, server *testutil.NetNS
	serverIP               netip.Addr
}

func crRouted(b *testing.B) *crRoutedNet {
	b.Helper()
	rt := &crRoutedNet{
		client: testutil.NewNetNS(b), router: testutil.NewNetNS(b), server: testutil.NewNetNS(b),
		serverIP: netip.MustParseAddr("198.18.11.2"),
	}
	for _, l := range []struct {
		ns         *testutil.NetNS
		dev, addr  string
		routerDev  string
		routerAddr string
	}{
		{rt.client, "eth0", "198.18.10.2/24", "to-client", "198.18.10.1/24"},
		{rt.server, "eth0", "198.18.11.2/24", "to-server", "198.18.11.1/24"},
	} {
		testutil.Veth(b, l.ns, l.dev, rt.router, l.routerDev)
		l.ns.AddAddr(b, l.dev, l.addr)
		rt.router.AddAddr(b, l.routerDev, l.routerAddr)
		gw, err := netdev.Get(rt.router.Handle, l.routerDev)
		if err != nil {
			b.Fatal(err)
		}
		if err := netdev.DefaultRoute(l.ns.Handle, l.dev, netip.MustParsePrefix(l.routerAddr).Addr(), gw.MAC); err != nil {
			b.Fatal(err)
		}
		for _, w := range []struct {
			ns  *testutil.NetNS
			dev string
		}{{l.ns, l.dev}, {rt.router, l.routerDev}} {
			if err := netdev.WaitRunning(w.ns.Handle, w.dev, crTimeout); err != nil {
				b.Fatal(err)
			}
		}
	}
	crForward(b, rt.router)
	return rt
}

// crForward turns IPv4 forwarding on in ns, and fails if the root
// namespace's setting changed with it. Equivalent to:
// `ip netns exec NS sysctl -w net.ipv4.ip_forward=1`.
func crForward(b *testing.B, ns *testutil.NetNS) {
	b.Helper()
	const knob = "/proc/sys/net/ipv4/ip_forward"
	root, err := os.ReadFile(knob) // this goroutine's thread is in the root namespace
	if err != nil {
		b.Fatal(err)
	}
	var got []byte
	ns.Do(b, func() error {
		// /proc/sys/net is the namespace of the thread that opens it.
		if err := os.WriteFile(knob, []byte("1\n"), 0o644); err != nil {
			return err
		}
		got, err = os.ReadFile(knob)
		return err
	})
	if strings.TrimSpace(string(got)) != "1" {
		b.Fatalf("%s in netns %s is %q after writing 1", knob, ns.Name, got)
	}
	if now, err := os.ReadFile(knob); err != nil || string(now) != string(root) {
		b.Fatalf("%s in the root namespace went from %q to %q (%v)", knob, root, now, err)
	}
}

// crServer is the listening sockets of the server, one on each port of
// ports10, non-blocking, made inside the server's namespace. Their
// connections are accepted and answered by the client's thread (see
// crClient).
type crServer struct {
	fds      []int   // as ports10
	accepted []int64 // connections each accepted, counted by the client thread
}

// crServe listens on addr at ports10 inside ns until the benchmark ends.
func crServe(b *testing.B, ns *testutil.NetNS, addr netip.Addr) *crServer {
	b.Helper()
	s := &crServer{accepted: make([]int64, len(ports10))}
	b.Cleanup(func() {
		for _, fd := range s.fds {
			unix.Close(fd)
		}
	})
	for _, port := range ports10 {
		ns.Do(b, func() error {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("socket: %w", err)
			}
			s.fds = append(s.fds, fd)
			if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: addr.As4(), Port: int(port)}); err != nil {
				return fmt.Errorf("bind %v:%d: %w", addr, port, err)
			}
			if err := unix.Listen(fd, 128); err != nil {
				return fmt.Errorf("listen on %v:%d: %w", addr, port, err)
			}
			return nil
		})
	}
	return s
}

// reached returns how many connections each port accepted, and whether
// every port accepted some.
func (s *crServer) reached() ([]int64, bool) {
	return s.accepted, !slices.Contains(s.accepted, 0)
}

// crClient makes connections to dst one after another and answers them on
// the server's sockets, all from one thread inside the client namespace
// that lives as long as the benchmark. One thread drives both ends, with
// non-blocking sockets and poll, so that a connection costs the kernel's
// work and a few system calls, and no wake-up of another thread: on a
// veth the packets are handled as they are sent, by the sending thread.
type crClient struct {
	reqs chan int   // connections to open
	errs chan error // open's answer to each request
	dst  unix.SockaddrInet4
	srv  *crServer

	// Used by the client thread only, read between requests.
	port    int  // the next source port
	wrapped bool // ports were used twice
	slow    int  // connections slower than crSlow
	polls   []unix.PollFd
}

func newCRClient(b *testing.B, ns *testutil.NetNS, dst netip.AddrPort, srv *crServer) *crClient {
	b.Helper()
	c := &crClient{
		reqs: make(chan int), errs: make(chan error),
		dst: unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}, srv: srv,
		port: crFirstPort, polls: make([]unix.PollFd, len(srv.fds)),
	}
	for i, fd := range srv.fds {
		c.polls[i] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
	}
	stopped := make(chan error, 1)
	go func() {
		stopped <- nsrun.Do(ns.Handle, func() error {
			// Sockets belong to the namespace of the thread that makes
			// them: make sure it is the client's.
			here, err := netns.Get()
			if err != nil {
				return fmt.Errorf("namespace of the client thread: %w", err)
			}
			inside := here.Equal(ns.Handle)
			here.Close()
			for n := range c.reqs {
				if !inside {
					c.errs <- fmt.Errorf("the client thread is not in netns %s", ns.Name)
					continue
				}
				c.errs <- c.dial(n)
			}
			return nil
		})
	}()
	b.Cleanup(func() {
		close(c.reqs)
		if err := <-stopped; err != nil {
			b.Error(err)
		}
	})
	return c
}

// open makes n connections, one after another, on the client thread.
func (c *crClient) open(n int) error {
	c.reqs <- n
	return <-c.errs
}

// dial does open's work; it runs on the client thread.
func (c *crClient) dial(n int) error {
	for i := range n {
		start := time.Now()
		port := c.port
		if c.port++; c.port > 65535 {
			c.port, c.wrapped = crFirstPort, true
		}
		if err := c.conn(port, byte(i)); err != nil {
			return fmt.Errorf("connection %d from port %d to %v:%d: %w", i, port, netip.AddrFrom4(c.dst.Addr), c.dst.Port, err)
		}
		if time.Since(start) > crSlow {
			c.slow++
		}
	}
	return nil
}

// conn makes one connection from port: connect, write the byte, accept the
// connection on the server socket it came to, read the byte there and
// write it back, read it at the client, then close the client end with a
// reset (SO_LINGER 0) and the server end after it.
func (c *crClient) conn(port int, v byte) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	sfd := -1
	defer func() {
		unix.Close(fd)
		if sfd >= 0 {
			unix.Close(sfd)
		}
	}()
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
		return fmt.Errorf("SO_LINGER: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port}); err != nil {
		return fmt.Errorf("bind: %w", err)
	}
	if err := unix.Connect(fd, &c.dst); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		return fmt.Errorf("connect: %w", err)
	}
	if err := crWait(fd, unix.POLLOUT); err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	e, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return fmt.Errorf("SO_ERROR: %w", err)
	}
	if e != 0 {
		return fmt.Errorf("connect: %w", unix.Errno(e))
	}
	buf := []byte{v}
	if _, err := unix.Write(fd, buf); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if sfd, err = c.accept(); err != nil {
		return fmt.Errorf("accept: %w", err)
	}
	if err := crRead(sfd, buf); err != nil {
		return fmt.Errorf("server read: %w", err)
	}
	if _, err := unix.Write(sfd, buf); err != nil {
		return fmt.Errorf("server write: %w", err)
	}
	buf[0] = ^v
	if err := crRead(fd, buf); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if buf[0] != v {
		return errors.New("the answer is not the byte sent")
	}
	return nil
}

// accept waits for a connection on any server socket and accepts it.
func (c *crClient) accept() (int, error) {
	for i := range c.polls {
		c.polls[i].Revents = 0
	}
	if err := crPoll(c.polls); err != nil {
		return -1, err
	}
	for i, p := range c.polls {
		if p.Revents&unix.POLLIN == 0 {
			continue
		}
		fd, _, err := unix.Accept4(int(p.Fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err != nil {
			return -1, err
		}
		c.srv.accepted[i]++
		return fd, nil
	}
	return -1, fmt.Errorf("poll: no listener ready")
}

// crRead reads len(buf) bytes, at most crTimeout after it starts to wait.
func crRead(fd int, buf []byte) error {
	for len(buf) > 0 {
		if err := crWait(fd, unix.POLLIN); err != nil {
			return err
		}
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrUnexpectedEOF
		}
		buf = buf[n:]
	}
	return nil
}

// crWait waits until fd has one of events.
func crWait(fd int, events int16) error {
	return crPoll([]unix.PollFd{{Fd: int32(fd), Events: events}})
}

// crPoll polls fds for at most crTimeout (again after a signal: the Go
// runtime preempts with SIGURG).
func crPoll(fds []unix.PollFd) error {
	deadline := time.Now().Add(crTimeout)
	for {
		n, err := unix.Poll(fds, int(time.Until(deadline).Milliseconds()))
		switch {
		case errors.Is(err, unix.EINTR) && time.Now().Before(deadline):
			continue
		case err != nil:
			return fmt.Errorf("poll: %w", err)
		case n == 0:
			return fmt.Errorf("nothing after %v: %w", crTimeout, os.ErrDeadlineExceeded)
		}
		return nil
	}
}

// crSettle waits, untimed, until the CPUs are nearly idle, for at most 10s.
// Unlike cpSettle it gives up soon: the connection rate suffers less from a
// busy CPU than a rule load, and the benchmark must stay short.
func crSettle(b *testing.B) {
	b.Helper()
	const (
		idle   = 0.10 // busy share of all CPUs that counts as idle
		every  = 250 * time.Millisecond
		atMost = 10 * time.Second
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
	if d := time.Since(start); d > time.Second {
		b.Logf("waited %v for the CPUs to settle", d.Round(100*time.Millisecond))
	}
}
