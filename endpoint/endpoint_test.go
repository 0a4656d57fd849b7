package endpoint_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
)

var (
	podCIDR4 = netip.MustParsePrefix("198.18.1.0/24")
	podCIDR6 = netip.MustParsePrefix("fd00:1::/64")
)

// node is a datapath in a namespace of its own, unloaded when the test ends.
type node struct {
	dp       *datapath.Datapath
	ns       *testutil.NetNS
	bpffs    string
	unloaded bool // the test unloaded it itself
}

func newNode(t testing.TB) *node {
	t.Helper()
	testutil.Privileged(t)
	return newNodeAt(t, testutil.BPFFS(t))
}

// newNodeAt makes a node whose pins go to the BPF filesystem at bpffs.
func newNodeAt(t testing.TB, bpffs string) *node {
	t.Helper()
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	n := &node{ns: ns, bpffs: bpffs}
	n.dp = n.open(t)
	t.Cleanup(func() {
		if n.unloaded {
			return
		}
		if err := n.dp.Unload(); err != nil { // n.dp: a test may re-open it
			t.Error(err)
		}
	})
	return n
}

func (n *node) open(t testing.TB) *datapath.Datapath {
	t.Helper()
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name:   "node",
		NetNS:  n.ns.Path,
		BPFFS:  n.bpffs,
		Node:   datapath.Node{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}},
		Limits: datapath.Limits{Conntrack: 4096}, // small, quick to make
	})
	if err != nil {
		t.Fatal(err)
	}
	return dp
}

// reopen closes the node's datapath handle and opens it again.
func (n *node) reopen(t testing.TB) {
	t.Helper()
	n.dp.Close()
	n.dp = n.open(t)
}

// spec returns the spec of endpoint i: addresses .10+i and ::10+i, its own
// new namespace.
func spec(i int) endpoint.Spec {
	return endpoint.Spec{
		ID:       uint16(i),
		IPv4:     netip.AddrFrom4([4]byte{198, 18, 1, byte(10 + i)}),
		IPv6:     netip.MustParseAddr(fmt.Sprintf("fd00:1::%x", 0x10+i)),
		Identity: datapath.Identity(1000 + i),
		Labels:   map[string]string{"app": fmt.Sprintf("web-%d", i)},
		NetNS:    testutil.Name("sluice-t-"),
	}
}

// create creates an endpoint and deletes it when the test ends.
func (n *node) create(t testing.TB, s endpoint.Spec) *endpoint.Endpoint {
	t.Helper()
	ep, err := endpoint.Create(context.Background(), n.dp, s)
	if err != nil {
		t.Fatalf("create endpoint %d: %v", s.ID, err)
	}
	t.Cleanup(func() {
		if err := endpoint.Delete(context.Background(), n.dp, s.ID); err != nil {
			t.Errorf("delete endpoint %d: %v", s.ID, err)
		}
	})
	return ep
}

// ping sends one echo request from the endpoint's namespace to `to` and
// reports whether the reply came back.
func ping(t testing.TB, from *endpoint.Endpoint, to netip.Addr) bool {
	t.Helper()
	return pingFrom(t, from, netip.Addr{}, to)
}

// pingFrom is ping from the source address src (the route's when invalid).
// A failure to send at all fails the test.
func pingFrom(t testing.TB, from *endpoint.Endpoint, src, to netip.Addr) bool {
	t.Helper()
	// Opened for each ping: a handle kept open would keep the namespace,
	// and the endpoint's veth pair with it, alive after Delete.
	ns, err := netns.GetFromName(from.NetNS)
	if err != nil {
		t.Errorf("ping from endpoint %d: %v", from.ID, err)
		return false
	}
	defer ns.Close()
	return testutil.Ping(t, ns, to, testutil.PingOptions{Src: src}) > 0
}

// inNS runs fn with the calling thread in the endpoint's namespace: sockets
// made there stay there.
func inNS(ep *endpoint.Endpoint, fn func() error) error {
	h, err := netns.GetFromName(ep.NetNS)
	if err != nil {
		return err
	}
	defer h.Close()
	return nsrun.Do(h, fn)
}

// echoTCPUDP checks that a TCP connection and a UDP datagram from one
// endpoint reach the other and come back.
func echoTCPUDP(from, to *endpoint.Endpoint, addr netip.Addr) error {
	var (
		ln net.Listener
		pc net.PacketConn
	)
	if err := inNS(to, func() (err error) {
		if ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, 0).String()); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp", netip.AddrPortFrom(addr, 0).String())
		return err
	}); err != nil {
		return err
	}
	defer ln.Close()
	defer pc.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.Copy(c, c)
			c.Close()
		}
	}()
	go func() {
		buf := make([]byte, 64)
		n, peer, err := pc.ReadFrom(buf)
		if err == nil {
			pc.WriteTo(buf[:n], peer)
		}
	}()

	var tcp, udp net.Conn
	if err := inNS(from, func() (err error) {
		d := net.Dialer{Timeout: 10 * time.Second}
		if tcp, err = d.Dial("tcp", ln.Addr().String()); err != nil {
			return err
		}
		udp, err = d.Dial("udp", pc.LocalAddr().String())
		return err
	}); err != nil {
		return err
	}
	defer tcp.Close()
	defer udp.Close()
	for _, c := range []net.Conn{tcp, udp} {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte("hello")); err != nil {
			return err
		}
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
			return fmt.Errorf("%s echo: %q, %v", c.LocalAddr().Network(), buf, err)
		}
	}
	return nil
}

func TestTwoEndpoints(t *testing.T) {
	n := newNode(t)
	var forward []byte
	n.ns.Do(t, func() (err error) {
		forward, err = os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		return err
	})
	if strings.TrimSpace(string(forward)) != "0" {
		t.Fatalf("the node forwards IPv4 (%q): the test could not tell BPF from the stack", forward)
	}
	a, b := n.create(t, spec(1)), n.create(t, spec(2))

	for _, pair := range [][2]*endpoint.Endpoint{{a, b}, {b, a}} {
		from, to := pair[0], pair[1]
		for _, addr := range []netip.Addr{to.IPv4, to.IPv6} {
			if !ping(t, from, addr) {
				t.Errorf("ping %d -> %s: no reply", from.ID, addr)
			}
			if err := echoTCPUDP(from, to, addr); err != nil {
				t.Errorf("TCP/UDP %d -> %s: %v", from.ID, addr, err)
			}
		}
	}

	// The host ends have no addresses and the node does not forward: only
	// the datapath's redirect can have delivered these, and it counted them.
	// ReadAllCounters, read first, has every endpoint, each no further
	// than ReadCounters after it.
	all, err := endpoint.ReadAllCounters(n.dp)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 2 {
		t.Errorf("ReadAllCounters: %v, want endpoints %d and %d", all, a.ID, b.ID)
	}
	for _, ep := range []*endpoint.Endpoint{a, b} {
		c, err := endpoint.ReadCounters(n.dp, ep.ID)
		if err != nil {
			t.Fatal(err)
		}
		if c.PacketsIn < 6 || c.PacketsOut < 6 || c.BytesIn == 0 || c.BytesOut == 0 {
			t.Errorf("endpoint %d counters %+v: want at least 6 packets each way", ep.ID, c)
		}
		if got := all[ep.ID]; got.PacketsIn < 6 || got.PacketsOut < 6 || got.PacketsIn > c.PacketsIn || got.PacketsOut > c.PacketsOut {
			t.Errorf("endpoint %d: ReadAllCounters %+v, ReadCounters %+v", ep.ID, got, c)
		}
	}
	m, err := n.dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	if m[datapath.MetricKey{Reason: datapath.ReasonForwarded, Direction: datapath.Ingress}].Packets < 12 {
		t.Errorf("forwarded-to-endpoint counter: %v", m)
	}
}

func TestTenEndpoints(t *testing.T) {
	n := newNode(t)
	var eps []*endpoint.Endpoint
	for i := 1; i <= 10; i++ {
		eps = append(eps, n.create(t, spec(i)))
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(eps)*len(eps)) // a ping and an echo error per pair
	for _, from := range eps {
		for _, to := range eps {
			if from == to {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if !ping(t, from, to.IPv4) {
					errs <- fmt.Errorf("ping %d -> %d: no reply", from.ID, to.ID)
				}
				if err := echoTCPUDP(from, to, to.IPv4); err != nil {
					errs <- fmt.Errorf("TCP/UDP %d -> %d: %w", from.ID, to.ID, err)
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestSpoofedSource(t *testing.T) {
	n := newNode(t)
	a, b := n.create(t, spec(1)), n.create(t, spec(2))
	if !ping(t, a, b.IPv4) {
		t.Fatal("no ping before spoofing")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	events, err := n.dp.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// A second address inside the workload, not the endpoint's.
	workload := testutil.OpenNetNS(t, a.NetNS)
	spoofed := netip.MustParseAddr("198.18.1.200")
	workload.AddAddr(t, "eth0", spoofed.String()+"/32")
	if pingFrom(t, a, spoofed, b.IPv4) {
		t.Fatal("a ping from a spoofed source got through")
	}
	wantDrop(t, events, datapath.ReasonSpoofedSourceIP, a.ID, spoofed.String()+" > "+b.IPv4.String())

	// Another MAC on the workload's interface.
	workload.Do(t, func() error {
		eth0, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return netlink.LinkSetHardwareAddr(eth0, net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99})
	})
	if ping(t, a, b.IPv4) {
		t.Fatal("a ping from a spoofed MAC got through")
	}
	wantDrop(t, events, datapath.ReasonSpoofedSourceMAC, a.ID, "")

	m, err := n.dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []datapath.Reason{datapath.ReasonSpoofedSourceIP, datapath.ReasonSpoofedSourceMAC} {
		if m[datapath.MetricKey{Reason: r, Direction: datapath.Egress}].Packets == 0 {
			t.Errorf("no %s drop counted: %v", r, m)
		}
	}
}

// wantDrop reads events until a drop with the reason from the endpoint
// arrives; its summary must contain summary.
func wantDrop(t *testing.T, events <-chan datapath.Event, reason datapath.Reason, id uint16, summary string) {
	t.Helper()
	for ev := range events {
		if d, ok := ev.(*datapath.DropEvent); ok && d.Reason == reason && d.Endpoint == uint32(id) {
			if !strings.Contains(d.Summary(), summary) {
				t.Errorf("drop event %v: want %q in it", d, summary)
			}
			return
		}
	}
	t.Errorf("no %s drop event from endpoint %d", reason, id)
}

// openLegacy opens a datapath in legacy tc mode in a namespace of its own;
// the caller unloads it.
func openLegacy(t *testing.T) (*datapath.Datapath, *testutil.NetNS) {
	t.Helper()
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name: "node", NetNS: ns.Path, BPFFS: testutil.BPFFS(t), TCAttach: datapath.AttachLegacy,
		Node:   datapath.Node{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}},
		Limits: datapath.Limits{Conntrack: 4096},
	})
	if err != nil {
		t.Fatal(err)
	}
	return dp, ns
}

// Unload deletes the endpoints with the datapath; endpoints made in legacy
// tc mode forward as in tcx mode.
func TestLegacyModeAndUnload(t *testing.T) {
	dp, ns := openLegacy(t)
	var eps []*endpoint.Endpoint
	for i := 1; i <= 2; i++ {
		ep, err := endpoint.Create(context.Background(), dp, spec(i))
		if err != nil {
			dp.Unload()
			t.Fatal(err)
		}
		eps = append(eps, ep)
	}
	if !ping(t, eps[0], eps[1].IPv4) {
		t.Error("no ping in legacy mode")
	}
	var names []string
	ns.Do(t, func() error {
		filters, err := netlink.FilterList(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: eps[0].HostIfindex}}, netlink.HANDLE_MIN_INGRESS)
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok {
				names = append(names, bf.Name)
			}
		}
		return err
	})
	if !slices.Contains(names, "sluice/node/endpoint-1") {
		t.Errorf("no legacy filter on %s, only %q", eps[0].HostIfName, names)
	}
	if err := dp.Unload(); err != nil {
		t.Fatal(err)
	}
	for _, ep := range eps {
		if _, err := os.Stat(filepath.Join("/run/netns", ep.NetNS)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("namespace %s left after Unload", ep.NetNS)
		}
		if _, err := netdev.Get(ns.Handle, ep.HostIfName); err == nil {
			t.Errorf("device %s left after Unload", ep.HostIfName)
		}
	}
}

func TestGetListUpdate(t *testing.T) {
	n := newNode(t)
	a, b := n.create(t, spec(2)), n.create(t, spec(1))
	got, err := endpoint.Get(n.dp, a.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.IPv4 != a.IPv4 || got.HostIfindex != a.HostIfindex || got.MAC.String() != a.MAC.String() ||
		got.Labels["app"] != "web-2" || !got.OwnsNetNS || got.Gateway4 != netip.MustParseAddr("198.18.1.1") {
		t.Errorf("Get = %+v, want %+v", got, a)
	}
	list, err := endpoint.List(n.dp)
	if err != nil || len(list) != 2 || list[0].ID != b.ID || list[1].ID != a.ID {
		t.Errorf("List = %v, %v", list, err)
	}
	if _, err := endpoint.Get(n.dp, 99); !errors.Is(err, datapath.ErrNotFound) {
		t.Errorf("Get(99): %v, want ErrNotFound", err)
	}

	up, err := endpoint.Update(context.Background(), n.dp, a.ID, endpoint.Changes{Identity: 5000, Labels: map[string]string{}})
	if err != nil {
		t.Fatal(err)
	}
	if up.Identity != 5000 || len(up.Labels) != 0 || up.IPv4 != a.IPv4 {
		t.Errorf("Update returned %+v", up)
	}
	if got, _ := endpoint.Get(n.dp, a.ID); got.Identity != 5000 {
		t.Errorf("after Update, Get has identity %d", got.Identity)
	}
	if _, err := endpoint.Update(context.Background(), n.dp, a.ID, endpoint.Changes{Identity: datapath.IdentityWorld}); !errors.Is(err, datapath.ErrInvalid) {
		t.Errorf("Update to a reserved identity: %v, want ErrInvalid", err)
	}
	if _, err := endpoint.Update(context.Background(), n.dp, a.ID, endpoint.Changes{Labels: map[string]string{"big": strings.Repeat("x", 2100)}}); !errors.Is(err, datapath.ErrInvalid) {
		t.Errorf("Update with huge labels: %v, want ErrInvalid", err)
	}
	if got, _ := endpoint.Get(n.dp, a.ID); got.Identity != 5000 || len(got.Labels) != 0 {
		t.Errorf("a refused Update changed the endpoint: %+v", got)
	}
	if _, err := endpoint.Update(context.Background(), n.dp, 99, endpoint.Changes{Identity: 5000}); !errors.Is(err, datapath.ErrNotFound) {
		t.Errorf("Update(99): %v, want ErrNotFound", err)
	}
	if !ping(t, a, b.IPv4) {
		t.Error("no ping after Update")
	}
}

// The datapath keeps forwarding after Close, and a re-opened datapath finds
// its endpoints.
func TestReopen(t *testing.T) {
	n := newNode(t)
	a, b := n.create(t, spec(1)), n.create(t, spec(2))
	if err := n.dp.Close(); err != nil {
		t.Fatal(err)
	}
	if !ping(t, a, b.IPv4) {
		t.Error("no ping with the datapath closed")
	}
	again, err := datapath.Open(context.Background(), datapath.Config{
		Name: "node", NetNS: n.ns.Path, BPFFS: filepath.Dir(n.dp.PinDir()),
		Node: datapath.Node{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}},
	})
	if err != nil {
		t.Fatal(err)
	}
	n.dp = again // the cleanups delete and unload through it
	list, err := endpoint.List(again)
	if err != nil || len(list) != 2 {
		t.Fatalf("List after re-open = %v, %v", list, err)
	}
	if c, err := endpoint.ReadCounters(again, b.ID); err != nil || c.PacketsIn == 0 {
		t.Errorf("counters after re-open: %+v, %v", c, err)
	}
}

func TestCreateErrors(t *testing.T) {
	n := newNode(t)
	taken := n.create(t, spec(1))
	existingNS := testutil.NewNetNS(t)
	dummyNS := n.ns

	for _, tc := range []struct {
		name   string
		mutate func(*endpoint.Spec)
		want   error
	}{
		{"ID 0", func(s *endpoint.Spec) { s.ID = 0 }, datapath.ErrInvalid},
		{"identity 0", func(s *endpoint.Spec) { s.Identity = 0 }, datapath.ErrInvalid},
		{"reserved identity", func(s *endpoint.Spec) { s.Identity = datapath.IdentityHost }, datapath.ErrInvalid},
		{"no address", func(s *endpoint.Spec) { s.IPv4, s.IPv6 = netip.Addr{}, netip.Addr{} }, datapath.ErrInvalid},
		{"IPv4 outside the pod CIDRs", func(s *endpoint.Spec) { s.IPv4 = netip.MustParseAddr("198.19.0.5") }, datapath.ErrInvalid},
		{"IPv6 in the IPv4 field", func(s *endpoint.Spec) { s.IPv4 = netip.MustParseAddr("fd00:1::5") }, datapath.ErrInvalid},
		{"IPv4 in the IPv6 field", func(s *endpoint.Spec) { s.IPv6 = netip.MustParseAddr("198.18.1.5") }, datapath.ErrInvalid},
		{"the gateway's address", func(s *endpoint.Spec) { s.IPv4 = netip.MustParseAddr("198.18.1.1") }, datapath.ErrInvalid},
		{"broadcast address", func(s *endpoint.Spec) { s.IPv4 = netip.MustParseAddr("198.18.1.255") }, datapath.ErrInvalid},
		{"multicast MAC", func(s *endpoint.Spec) { s.MAC = net.HardwareAddr{1, 0, 0, 0, 0, 1} }, datapath.ErrInvalid},
		{"interface name too long", func(s *endpoint.Spec) { s.IfName = "a-very-long-name0" }, datapath.ErrInvalid},
		{"host name with a slash", func(s *endpoint.Spec) { s.HostIfName = "a/b" }, datapath.ErrInvalid},
		{"both NetNS and Interface", func(s *endpoint.Spec) { s.Interface = "x" }, datapath.ErrInvalid},
		{"neither NetNS nor Interface", func(s *endpoint.Spec) { s.NetNS = "" }, datapath.ErrInvalid},
		{"MTU too small", func(s *endpoint.Spec) { s.MTU = 10 }, datapath.ErrInvalid},
		{"huge labels", func(s *endpoint.Spec) { s.Labels = map[string]string{"x": strings.Repeat("y", 2100)} }, datapath.ErrInvalid},
		{"duplicate ID", func(s *endpoint.Spec) { s.ID = taken.ID }, datapath.ErrExists},
		{"duplicate IPv4", func(s *endpoint.Spec) { s.IPv4 = taken.IPv4 }, datapath.ErrExists},
		{"duplicate IPv6", func(s *endpoint.Spec) { s.IPv6 = taken.IPv6 }, datapath.ErrExists},
		{"host interface taken", func(s *endpoint.Spec) { s.HostIfName = taken.HostIfName }, datapath.ErrExists},
		{"missing netns path", func(s *endpoint.Spec) { s.NetNS = "/run/netns/sluice-t-missing" }, datapath.ErrNotFound},
		{"adopt a missing interface", func(s *endpoint.Spec) {
			s.NetNS, s.Interface, s.MAC = "", "nosuchif", net.HardwareAddr{2, 0, 0, 0, 0, 7}
		}, datapath.ErrNotFound},
		{"adopt a non-veth", func(s *endpoint.Spec) {
			s.NetNS, s.Interface, s.MAC = "", "lo", net.HardwareAddr{2, 0, 0, 0, 0, 7}
		}, datapath.ErrInvalid},
		{"adopt without a MAC", func(s *endpoint.Spec) { s.NetNS, s.Interface = "", "lo" }, datapath.ErrInvalid},
		{"IPv6 with an MTU below 1280", func(s *endpoint.Spec) { s.MTU = 1000 }, datapath.ErrInvalid},
		{"interface name taken in the netns", func(s *endpoint.Spec) { s.NetNS, s.IfName = existingNS.Path, "lo" }, datapath.ErrExists},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := spec(5)
			tc.mutate(&s)
			before := snapshot(t, n, dummyNS)
			ep, err := endpoint.Create(context.Background(), n.dp, s)
			if err == nil {
				endpoint.Delete(context.Background(), n.dp, ep.ID)
				t.Fatalf("Create accepted it")
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("Create: %v, want %v", err, tc.want)
			}
			if after := snapshot(t, n, dummyNS); after != before {
				t.Errorf("a failed Create left something behind:\nbefore %s\nafter  %s", before, after)
			}
			if s.NetNS != "" && !strings.Contains(s.NetNS, "/") {
				if _, err := os.Stat(filepath.Join("/run/netns", s.NetNS)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("a failed Create left namespace %s behind", s.NetNS)
				}
			}
		})
	}
}

// snapshot describes what Create could leave behind in the node: endpoints,
// devices, link pins. (Namespaces are checked by name: tests of other
// packages make and remove theirs meanwhile.)
func snapshot(t *testing.T, n *node, nodeNS *testutil.NetNS) string {
	t.Helper()
	list, err := endpoint.List(n.dp)
	if err != nil {
		t.Fatal(err)
	}
	var links []netlink.Link
	nodeNS.Do(t, func() (err error) {
		links, err = netlink.LinkList()
		return err
	})
	pins, _ := os.ReadDir(filepath.Join(n.dp.PinDir(), "links"))
	return fmt.Sprintf("endpoints=%d devices=%d pins=%d", len(list), len(links), len(pins))
}

// Delete leaves no device, namespace, map entry or link; 100 rounds of
// Create and Delete leak no file descriptor.
func TestDeleteLeavesNothing(t *testing.T) {
	n := newNode(t)
	// The first Create loads the endpoint programs, which stay loaded.
	n.create(t, spec(1))
	before := snapshot(t, n, n.ns)
	fds := openFDs(t)
	for i := range 100 {
		s := spec(3)
		s.ID = uint16(100 + i%3)
		ep, err := endpoint.Create(context.Background(), n.dp, s)
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		if err := endpoint.Delete(context.Background(), n.dp, ep.ID); err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		if err := endpoint.Delete(context.Background(), n.dp, ep.ID); err != nil {
			t.Fatalf("round %d: a second Delete: %v", i, err)
		}
		if _, err := os.Stat(filepath.Join("/run/netns", s.NetNS)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("round %d: namespace %s left: %v", i, s.NetNS, err)
		}
	}
	if after := snapshot(t, n, n.ns); after != before {
		t.Errorf("before %s\nafter  %s", before, after)
	}
	if _, err := endpoint.ReadCounters(n.dp, 100); !errors.Is(err, datapath.ErrNotFound) {
		t.Errorf("counters left after Delete: %v", err)
	}
	if got := openFDs(t); got != fds {
		t.Errorf("%d open files before, %d after 100 rounds", fds, got)
	}
}

func openFDs(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// A CNI plugin made the veth pair and configured the workload; the endpoint
// adopts the host end, forwards for it, and leaves the pair on Delete.
func TestAdoptInterface(t *testing.T) {
	n := newNode(t)
	b := n.create(t, spec(2))
	workload := testutil.NewNetNS(t)
	mac := net.HardwareAddr{0x02, 0xcc, 0, 0, 0, 1}
	hostIf, _, err := netdev.Veth(netdev.VethPair{NS: n.ns.Handle, Name: "cni-host0", PeerNS: workload.Handle, PeerName: "eth0", PeerMAC: mac})
	if err != nil {
		t.Fatal(err)
	}
	host, err := netdev.Get(n.ns.Handle, "cni-host0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddr("198.18.1.50")
	if err := netdev.AddAddr(workload.Handle, "eth0", netip.PrefixFrom(addr, 32)); err != nil {
		t.Fatal(err)
	}
	if err := netdev.DefaultRoute(workload.Handle, "eth0", netip.MustParseAddr("198.18.1.1"), host.MAC); err != nil {
		t.Fatal(err)
	}

	ep, err := endpoint.Create(context.Background(), n.dp, endpoint.Spec{ID: 50, IPv4: addr, MAC: mac, Identity: 2000, Interface: "cni-host0"})
	if err != nil {
		t.Fatal(err)
	}
	if !ep.Adopted() || ep.HostIfindex != hostIf || ep.Gateway4 != netip.MustParseAddr("198.18.1.1") || ep.HostMAC.String() != host.MAC.String() {
		t.Errorf("adopted endpoint %+v", ep)
	}
	if testutil.Ping(t, workload.Handle, b.IPv4, testutil.PingOptions{}) == 0 {
		t.Error("no ping from the adopted workload")
	}
	if !ping(t, b, addr) {
		t.Error("no ping to the adopted workload")
	}
	if err := endpoint.Delete(context.Background(), n.dp, ep.ID); err != nil {
		t.Fatal(err)
	}
	if l, err := netdev.Get(n.ns.Handle, "cni-host0"); err != nil || l.Index != hostIf {
		t.Errorf("Delete removed the adopted interface: %v", err)
	}
	if testutil.Ping(t, workload.Handle, b.IPv4, testutil.PingOptions{}) != 0 {
		t.Error("the deleted endpoint's workload still reaches the other endpoint")
	}
}

// Creates from many goroutines take turns; each gets its endpoint.
func TestConcurrentCreate(t *testing.T) {
	n := newNode(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 1; i <= 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := endpoint.Create(context.Background(), n.dp, spec(i)); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	list, err := endpoint.List(n.dp)
	if err != nil || len(list) != 8 {
		t.Fatalf("List after 8 concurrent creates: %d endpoints, %v", len(list), err)
	}
	// Unload (the test's cleanup) deletes them.
}
