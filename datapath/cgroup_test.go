package datapath_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
)

// The socket programs act on the sockets of the processes in a cgroup, so
// the client of these tests is another process: this test binary again,
// started inside the test's cgroup (or outside it) by runSockClient. It is
// caught here, before TestMain, whose roles (events_test.go) it is not
// one of.
const sockClientEnv = "SLUICE_TEST_SOCK_CLIENT"

func init() {
	if arg, ok := os.LookupEnv(sockClientEnv); ok {
		os.Exit(sockClientMain(arg))
	}
}

// sockRequest is what the client does: from the namespace at NetNS it
// sends "hello" to To over Proto ("tcp" or "udp"; Connect: a connected UDP
// socket) and reads the answer, each step bounded by Timeout.
type sockRequest struct {
	NetNS   string
	Proto   string
	Connect bool
	To      netip.AddrPort
	Timeout time.Duration
}

// sockResult is what the client saw: its socket's peer (getpeername, on a
// connected socket), the answer and where it came from (recvfrom, UDP), or
// the error and its errno.
type sockResult struct {
	Peer, From netip.AddrPort
	Reply      string
	Err        string
	Errno      syscall.Errno
}

func sockClientMain(arg string) int {
	var req sockRequest
	if err := json.Unmarshal([]byte(arg), &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var res sockResult
	ns, err := netns.GetFromPath(req.NetNS)
	if err == nil {
		err = nsrun.Do(ns, func() error { return sockClient(req, &res) })
		ns.Close()
	}
	if err != nil {
		res.Err = err.Error()
		errors.As(err, &res.Errno)
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	return 0
}

// sockClient talks to req.To with plain system calls, so that each call
// the socket programs hook (connect, sendto, recvfrom, getpeername) is
// made once and visibly.
func sockClient(req sockRequest, res *sockResult) error {
	domain, typ := unix.AF_INET6, unix.SOCK_DGRAM
	if req.To.Addr().Is4() {
		domain = unix.AF_INET
	}
	if req.Proto == "tcp" {
		typ = unix.SOCK_STREAM
	}
	fd, err := unix.Socket(domain, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval(req.Timeout.Nanoseconds())
	for _, opt := range []int{unix.SO_SNDTIMEO, unix.SO_RCVTIMEO} { // SO_SNDTIMEO bounds connect
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
			return fmt.Errorf("setsockopt: %w", err)
		}
	}
	to := sockaddr(req.To)
	msg := []byte("hello")
	if req.Proto == "tcp" || req.Connect {
		if err := unix.Connect(fd, to); err != nil {
			return fmt.Errorf("connect: %w", err)
		}
		peer, err := unix.Getpeername(fd)
		if err != nil {
			return fmt.Errorf("getpeername: %w", err)
		}
		res.Peer = addrPort(peer)
		if _, err := unix.Write(fd, msg); err != nil {
			return fmt.Errorf("send: %w", err)
		}
	} else if err := unix.Sendto(fd, msg, 0, to); err != nil {
		return fmt.Errorf("sendto: %w", err)
	}
	buf := make([]byte, 64)
	n, from, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return fmt.Errorf("receive: %w", err)
	}
	res.Reply = string(buf[:n])
	if from != nil { // none for TCP
		res.From = addrPort(from)
	}
	return nil
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

func addrPort(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// runSockClient runs the client in a process of its own, cloned straight
// into cgroup (CLONE_INTO_CGROUP) unless cgroup is empty: then it stays in
// the test's own cgroup.
func runSockClient(t *testing.T, cgroup string, req sockRequest) sockResult {
	t.Helper()
	arg, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	// A race-enabled binary sleeps a second at exit unless told not to.
	cmd.Env = append(os.Environ(), sockClientEnv+"="+string(arg), "GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if cgroup != "" {
		dir, err := os.Open(cgroup)
		if err != nil {
			t.Fatal(err)
		}
		defer dir.Close()
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	}
	out, err := cmd.Output() // waits: the process has left the cgroup when it returns
	if err != nil {
		t.Fatalf("client: %v: %s", err, stderr.Bytes())
	}
	var res sockResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("client said %q: %v (%s)", out, err, stderr.Bytes())
	}
	return res
}

// cgroup2Mount returns where the cgroup v2 hierarchy is mounted (what
// `mount -t cgroup2` lists), or "" when it is not; a hybrid layout has it
// beside the v1 controllers, at /sys/fs/cgroup/unified.
func cgroup2Mount() (string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	unescape := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	for _, line := range strings.Split(string(data), "\n") {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
		fields, fs, ok := strings.Cut(line, " - ")
		f := strings.Fields(fields)
		if ok && len(f) >= 5 && strings.HasPrefix(fs, "cgroup2 ") {
			return unescape.Replace(f[4]), nil
		}
	}
	return "", nil
}

// newCgroup makes a private cgroup below the cgroup v2 mount, never the root
// one, and removes it when the test ends (after the datapath that uses it
// is unloaded: cleanups run last first). It skips the test where there is
// no cgroup v2 at all, and fails then under CI.
func newCgroup(t *testing.T) string {
	t.Helper()
	root, err := cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	if root == "" {
		testutil.Require(t, "a cgroup v2 mount", errors.New("no cgroup2 in /proc/self/mountinfo"))
	}
	dir := filepath.Join(root, testutil.Name("sluice-test-"))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		// A process that exited a moment ago may still be leaving it.
		deadline := time.Now().Add(5 * time.Second)
		for {
			err := unix.Rmdir(dir)
			if err == nil || errors.Is(err, unix.ENOENT) {
				return
			}
			if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
				t.Errorf("remove cgroup %s: %v", dir, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	return dir
}

// be16 is a port as the service maps hold it: in network order.
func be16(port uint16) uint16 {
	return binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, port))
}

// addr16 is an address as the service maps hold it: IPv4 in the first 4
// bytes.
func addr16(a netip.Addr) [16]byte {
	if a.Is4() {
		var out [16]byte
		b := a.As4()
		copy(out[:], b[:])
		return out
	}
	return a.As16()
}

func family(a netip.Addr) uint8 {
	if a.Is4() {
		return 4
	}
	return 6
}

var (
	sockPodCIDR4 = netip.MustParsePrefix("198.18.1.0/24")
	sockPodCIDR6 = netip.MustParsePrefix("fd00:1::/64")

	frontend4  = netip.MustParseAddrPort("198.18.200.1:80")
	frontend6  = netip.MustParseAddrPort("[fd00:200::1]:80")
	noBackend4 = netip.MustParseAddrPort("198.18.200.2:80")
)

const backendPort = 8080

// openSock opens a datapath in a namespace of its own, with the socket
// programs on cgroup, and unloads it when the test ends.
func openSock(t *testing.T, ns *testutil.NetNS, bpffs, cgroup string) (*datapath.Datapath, error) {
	t.Helper()
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name:   "sock",
		NetNS:  ns.Path,
		BPFFS:  bpffs,
		Node:   datapath.Node{PodCIDRs: []netip.Prefix{sockPodCIDR4, sockPodCIDR6}},
		Limits: datapath.Limits{Conntrack: 4096},
		Cgroup: cgroup,
	})
	if errors.Is(err, ebpf.ErrNotSupported) {
		testutil.RequireSince(t, "cgroup socket address hooks", 5, 8, err)
	}
	return dp, err
}

// sockWorld is a datapath whose socket programs run in a private cgroup,
// two endpoints (a client and a server with echo servers on its addresses,
// port 8080), and three frontends translated at socket level:
// 198.18.200.1:80 (service 1, backend 1: the server's IPv4 address),
// [fd00:200::1]:80 (service 2, backend 2: its IPv6 address), each for TCP
// and UDP, and 198.18.200.2:80 TCP (service 3, no backend).
type sockWorld struct {
	dp             *datapath.Datapath
	cgroup         string
	client, server *endpoint.Endpoint
	clientNS       string // the client's namespace, as a path
	echo           map[netip.Addr]*echoServer
}

func newSockWorld(t *testing.T) *sockWorld {
	t.Helper()
	testutil.Privileged(t)
	w := &sockWorld{cgroup: newCgroup(t), echo: map[netip.Addr]*echoServer{}}
	dp, err := openSock(t, testutil.NewNetNS(t), testutil.BPFFS(t), w.cgroup)
	if err != nil {
		t.Fatal(err)
	}
	w.dp = dp
	t.Cleanup(func() {
		if err := dp.Unload(); err != nil {
			t.Error(err)
		}
	})
	for i, ep := range []**endpoint.Endpoint{&w.client, &w.server} {
		id := 11 + i
		*ep, err = endpoint.Create(context.Background(), dp, endpoint.Spec{
			ID:       uint16(id),
			IPv4:     netip.AddrFrom4([4]byte{198, 18, 1, byte(id)}),
			IPv6:     netip.MustParseAddr(fmt.Sprintf("fd00:1::%d", id)),
			Identity: datapath.Identity(1000 + id),
			NetNS:    testutil.Name("sluice-t-"),
		})
		if err != nil {
			t.Fatalf("create endpoint %d: %v", id, err)
		}
	}
	w.clientNS = filepath.Join("/run/netns", w.client.NetNS)
	for _, a := range []netip.Addr{w.server.IPv4, w.server.IPv6} {
		w.echo[a] = startEcho(t, w.server, netip.AddrPortFrom(a, backendPort))
	}

	st := core.Of(dp)
	put := func(name string, k, v any) {
		t.Helper()
		if err := st.Map(name).Put(k, v); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	active := uint8(bpfobj.TypesLbBackendStateLB_ACTIVE)
	for id, b := range map[uint32]netip.Addr{1: w.server.IPv4, 2: w.server.IPv6} {
		put(bpfobj.EndpointMapLbBackends, id, bpfobj.TypesLbBackend{
			Addr: addr16(b), Port: be16(backendPort), Family: family(b), State: active, Service: id, Counter: id,
		})
		put(bpfobj.EndpointMapLbSlots, bpfobj.TypesLbSlotKey{Table: 2 * id}, bpfobj.TypesLbSlotBlock{Backend: [16]uint32{id}})
		put(bpfobj.EndpointMapLbCounters, id, make([]bpfobj.TypesLbBackendCounters, ebpf.MustPossibleCPU()))
	}
	frontend := func(fe netip.AddrPort, proto uint8, service, slots uint32) {
		put(bpfobj.EndpointMapLbFrontends,
			bpfobj.TypesLbFrontendKey{Addr: addr16(fe.Addr()), Port: be16(fe.Port()), Proto: proto, Family: family(fe.Addr())},
			bpfobj.TypesLbFrontend{Service: service, Table: 2 * service, Slots: slots, Flags: uint32(bpfobj.TypesLbFlagLB_F_SOCKET)})
	}
	for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		frontend(frontend4, proto, 1, 1)
		frontend(frontend6, proto, 2, 1)
	}
	frontend(noBackend4, unix.IPPROTO_TCP, 3, 0)
	return w
}

// flows is how many flows the datapath sent to backend id.
func (w *sockWorld) flows(t *testing.T, id uint32) uint64 {
	t.Helper()
	var per []bpfobj.TypesLbBackendCounters
	if err := core.Of(w.dp).Map(bpfobj.EndpointMapLbCounters).Lookup(id, &per); err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, c := range per {
		n += c.Flows
	}
	return n
}

// echoServer answers "echo:" and what it read, over TCP and UDP on one
// address and port, and tells from whom it read.
type echoServer struct {
	clients chan netip.AddrPort
}

func startEcho(t *testing.T, ep *endpoint.Endpoint, addr netip.AddrPort) *echoServer {
	t.Helper()
	var (
		ln net.Listener
		pc net.PacketConn
	)
	h, err := netns.GetFromName(ep.NetNS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	err = nsrun.Do(h, func() (err error) { // the sockets stay in the namespace
		if ln, err = net.Listen("tcp", addr.String()); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp", addr.String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{clients: make(chan netip.AddrPort, 64)}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		pc.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 64)
			if n, err := c.Read(buf); err == nil {
				s.clients <- c.RemoteAddr().(*net.TCPAddr).AddrPort()
				c.Write(append([]byte("echo:"), buf[:n]...))
			}
			c.Close()
		}
	})
	wg.Go(func() {
		buf := make([]byte, 64)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			s.clients <- from.(*net.UDPAddr).AddrPort()
			pc.WriteTo(append([]byte("echo:"), buf[:n]...), from)
		}
	})
	return s
}

// served returns the clients the server answered since the last call.
func (s *echoServer) served() []netip.AddrPort {
	var out []netip.AddrPort
	for {
		select {
		case c := <-s.clients:
			out = append(out, c)
		default:
			return out
		}
	}
}

// mapped is ap with its IPv4 address mapped to IPv6 (::ffff:a.b.c.d).
func mapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(ap.Addr().As16()), ap.Port())
}

// A process in the cgroup that connects or sends to a frontend reaches the
// backend, and sees the frontend as its peer and as the source of the
// answers: TCP, UDP connected and not, IPv4, IPv6, and IPv4 mapped to an
// IPv6 socket.
func TestSocketLB(t *testing.T) {
	w := newSockWorld(t)
	families := []struct {
		name    string
		to      netip.AddrPort
		backend uint32
		server  netip.Addr
		client  netip.Addr
	}{
		{"ipv4", frontend4, 1, w.server.IPv4, w.client.IPv4},
		{"ipv6", frontend6, 2, w.server.IPv6, w.client.IPv6},
		{"ipv4-mapped", mapped(frontend4), 1, w.server.IPv4, w.client.IPv4},
	}
	for _, fam := range families {
		for _, kind := range []struct {
			name    string
			proto   string
			connect bool
		}{{"tcp", "tcp", true}, {"udp", "udp", false}, {"udp-connected", "udp", true}} {
			t.Run(fam.name+"/"+kind.name, func(t *testing.T) {
				echo := w.echo[fam.server]
				echo.served()
				flows := w.flows(t, fam.backend)
				res := runSockClient(t, w.cgroup, sockRequest{
					NetNS: w.clientNS, Proto: kind.proto, Connect: kind.connect, To: fam.to, Timeout: 5 * time.Second,
				})
				if res.Err != "" {
					t.Fatalf("client: %s", res.Err)
				}
				if res.Reply != "echo:hello" {
					t.Errorf("answer %q, want %q", res.Reply, "echo:hello")
				}
				if kind.connect && res.Peer != fam.to {
					t.Errorf("getpeername: %v, want the frontend %v", res.Peer, fam.to)
				}
				if kind.proto == "udp" && res.From != fam.to {
					t.Errorf("recvfrom: the answer came from %v, want the frontend %v", res.From, fam.to)
				}
				served := echo.served()
				if len(served) != 1 || served[0].Addr() != fam.client {
					t.Errorf("the backend served %v, want one client at %v", served, fam.client)
				}
				if got := w.flows(t, fam.backend); got != flows+1 {
					t.Errorf("backend %d counted %d flows, want %d", fam.backend, got, flows+1)
				}
			})
		}
	}

	// No backend takes new flows: connect fails, with EPERM.
	res := runSockClient(t, w.cgroup, sockRequest{NetNS: w.clientNS, Proto: "tcp", To: noBackend4, Timeout: 5 * time.Second})
	if res.Errno != unix.EPERM {
		t.Errorf("connect to a frontend without backends: %q, want EPERM", res.Err)
	}
}

// A process outside the cgroup has nothing translated at socket level: what
// it sends to the frontend goes to the frontend's address, which nothing
// answers here (the frontends are not translated per packet).
func TestSocketLBOutsideCgroup(t *testing.T) {
	w := newSockWorld(t)
	for _, c := range []struct {
		proto   string
		to      netip.AddrPort
		backend uint32
		server  netip.Addr
	}{
		{"tcp", frontend4, 1, w.server.IPv4},
		{"udp", frontend4, 1, w.server.IPv4},
		{"tcp", frontend6, 2, w.server.IPv6},
		{"udp", frontend6, 2, w.server.IPv6},
	} {
		t.Run(c.proto+"/"+c.to.String(), func(t *testing.T) {
			echo := w.echo[c.server]
			echo.served()
			flows := w.flows(t, c.backend)
			res := runSockClient(t, "", sockRequest{NetNS: w.clientNS, Proto: c.proto, To: c.to, Timeout: time.Second})
			if res.Err == "" {
				t.Errorf("the client outside the cgroup got %q from %v (peer %v)", res.Reply, res.From, res.Peer)
			}
			if served := echo.served(); len(served) != 0 {
				t.Errorf("the backend served %v", served)
			}
			if got := w.flows(t, c.backend); got != flows {
				t.Errorf("backend %d counted %d flows, want %d", c.backend, got, flows)
			}
		})
	}
}

// sockLinks describes the pinned links of the socket programs.
type sockLinks map[string]*link.Info // by program name

// readSockLinks reads the pinned links of the named programs.
func readSockLinks(t *testing.T, linksDir string, names []string) sockLinks {
	t.Helper()
	out := sockLinks{}
	for _, name := range names {
		l, err := link.LoadPinnedLink(filepath.Join(linksDir, "cgroup-"+name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Fatalf("link of %s: %v", name, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[name] = info
	}
	return out
}

var sockPrograms = []string{
	bpfobj.SockProgConnect4, bpfobj.SockProgConnect6, bpfobj.SockProgSendmsg4, bpfobj.SockProgSendmsg6,
	bpfobj.SockProgRecvmsg4, bpfobj.SockProgRecvmsg6, bpfobj.SockProgGetpeername4, bpfobj.SockProgGetpeername6,
}

// attachedTo returns how many programs are attached to the cgroup, all
// hooks of the socket programs together.
func attachedTo(t *testing.T, cgroup string) int {
	t.Helper()
	spec, err := bpfobj.LoadSock()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	n := 0
	for _, p := range spec.Programs {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(dir.Fd()), Attach: p.AttachType})
		if err != nil {
			t.Fatal(err)
		}
		n += len(res.Programs)
	}
	return n
}

func cgroupIno(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// expectLinks checks that every socket program has its link, on cgroup,
// and that nothing else is pinned beside them but extra.
func expectLinks(t *testing.T, linksDir, cgroup string, extra ...string) sockLinks {
	t.Helper()
	links := readSockLinks(t, linksDir, sockPrograms)
	ino := cgroupIno(t, cgroup)
	for _, name := range sockPrograms {
		info := links[name]
		if info == nil || info.Cgroup() == nil || info.Cgroup().CgroupId != ino {
			t.Errorf("%s: link %+v, want one on %s", name, info, cgroup)
		}
	}
	entries, err := os.ReadDir(linksDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(sockPrograms)+len(extra) {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("pinned in %s: %v, want the %d socket program links and %v", linksDir, names, len(sockPrograms), extra)
	}
	return links
}

// Re-opening on the same cgroup swaps the programs of the pinned links in
// place; on another cgroup it moves them; a failure half-way leaves the
// links as they were; Unload detaches them.
func TestSocketAttach(t *testing.T) {
	testutil.Privileged(t)
	cgA, cgB := newCgroup(t), newCgroup(t)
	ns, bpffs := testutil.NewNetNS(t), testutil.BPFFS(t)
	var dp *datapath.Datapath
	open := func(cgroup string) error {
		t.Helper()
		if dp != nil {
			dp.Close()
		}
		var err error
		dp, err = openSock(t, ns, bpffs, cgroup)
		return err
	}
	if err := open(cgA); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Whatever handle the test left: one that leaves the links as
		// they are, to unload them with the rest.
		if dp != nil {
			dp.Close()
		}
		if err := open(""); err != nil {
			t.Error(err)
			return
		}
		if err := dp.Unload(); err != nil {
			t.Error(err)
		}
	})
	linksDir := filepath.Join(dp.PinDir(), "links")
	first := expectLinks(t, linksDir, cgA)
	if n := attachedTo(t, cgA); n != len(sockPrograms) {
		t.Errorf("%d programs on the cgroup, want %d", n, len(sockPrograms))
	}

	if err := open(cgA); err != nil {
		t.Fatal(err)
	}
	again := expectLinks(t, linksDir, cgA)
	for _, name := range sockPrograms {
		if again[name].ID != first[name].ID || again[name].Program == first[name].Program {
			t.Errorf("%s after re-opening: link %d running program %d, want link %d running a new program (not %d)",
				name, again[name].ID, again[name].Program, first[name].ID, first[name].Program)
		}
	}

	if err := open(cgB); err != nil {
		t.Fatal(err)
	}
	onB := expectLinks(t, linksDir, cgB)
	if a, b := attachedTo(t, cgA), attachedTo(t, cgB); a != 0 || b != len(sockPrograms) {
		t.Errorf("after moving: %d programs on the old cgroup, %d on the new, want 0 and %d", a, b, len(sockPrograms))
	}

	// The last program's pin is taken by a map: every attach fails there,
	// after the others were moved or updated.
	last := bpfobj.SockProgGetpeername6
	lastPin := filepath.Join(linksDir, "cgroup-"+last)
	if err := attach.Detach(lastPin); err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(lastPin); err != nil {
		t.Fatal(err)
	}
	for _, cg := range []string{cgA, cgB} { // moving, updating in place
		if err := open(cg); err == nil {
			t.Fatalf("opening with %s succeeded with a map where a link goes", cg)
		}
		dp = nil
		others := sockPrograms[:len(sockPrograms)-1]
		links := readSockLinks(t, linksDir, others)
		for _, name := range others {
			if got, want := links[name], onB[name]; got == nil || got.ID != want.ID || got.Program != want.Program {
				t.Errorf("after a failed open with %s: %s has link %+v, want link %d running program %d as before",
					filepath.Base(cg), name, got, want.ID, want.Program)
			}
		}
		if a, b := attachedTo(t, cgA), attachedTo(t, cgB); a != 0 || b != len(sockPrograms)-1 {
			t.Errorf("after a failed open with %s: %d programs on A, %d on B, want 0 and %d", filepath.Base(cg), a, b, len(sockPrograms)-1)
		}
		if entries, _ := os.ReadDir(linksDir); len(entries) != len(sockPrograms) {
			t.Errorf("after a failed open with %s: %d pins in %s, want %d", filepath.Base(cg), len(entries), linksDir, len(sockPrograms))
		}
	}
	if err := m.Unpin(); err != nil {
		t.Fatal(err)
	}

	for _, bad := range []string{t.TempDir(), filepath.Join(cgA, "missing")} {
		if err := open(bad); !errors.Is(err, datapath.ErrInvalid) {
			t.Errorf("open with cgroup %s: %v, want ErrInvalid", bad, err)
		}
		dp = nil
	}

	if err := open(cgB); err != nil {
		t.Fatal(err)
	}
	expectLinks(t, linksDir, cgB)
	if err := dp.Unload(); err != nil {
		t.Fatal(err)
	}
	if a, b := attachedTo(t, cgA), attachedTo(t, cgB); a != 0 || b != 0 {
		t.Errorf("after Unload: %d programs on A, %d on B, want none", a, b)
	}
}
