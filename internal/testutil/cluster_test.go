package testutil

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestCluster(t *testing.T) {
	Privileged(t)
	rootBefore := readSysctls(t, nil)
	c := NewCluster(t, ClusterOptions{})

	// The node sysctls reached the nodes, and only them.
	if got := readSysctls(t, nil); got != rootBefore {
		t.Errorf("root namespace sysctls changed: %s, were %s", got, rootBefore)
	}
	want := "0 0 1 1 0" // eth0 inherits rp_filter 0

	if len(c.Nodes) != 3 {
		t.Fatalf("%d nodes, want 3", len(c.Nodes))
	}
	bpffs := map[string]bool{}
	for i, n := range c.Nodes {
		if c.Node(i) != n || n.String() != fmt.Sprintf("node-%d", i) {
			t.Errorf("node %d is %s", i, c.Node(i))
		}
		if got := readSysctls(t, n.NS); got != want {
			t.Errorf("%s: sysctls %s, want %s", n, got, want)
		}
		l, err := netlink.NewHandleAt(n.NS.Handle)
		if err != nil {
			t.Fatal(err)
		}
		dev, err := l.LinkByName(n.Device)
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		if dev.Attrs().Index != n.Ifindex || dev.Attrs().HardwareAddr.String() != n.MAC.String() {
			t.Errorf("%s: %s has ifindex %d and MAC %s, the node says %d and %s", n, n.Device, dev.Attrs().Index, dev.Attrs().HardwareAddr, n.Ifindex, n.MAC)
		}
		var fs unix.Statfs_t
		if err := unix.Statfs(n.BPFFS, &fs); err != nil || fs.Type != unix.BPF_FS_MAGIC || bpffs[n.BPFFS] {
			t.Errorf("%s: bpffs %s is no private bpffs (%v)", n, n.BPFFS, err)
		}
		bpffs[n.BPFFS] = true
		for _, p := range n.PodCIDRs {
			if !c.ClusterCIDRs[0].Overlaps(p) && !c.ClusterCIDRs[1].Overlaps(p) {
				t.Errorf("%s: pod CIDR %s is outside the cluster's %v", n, p, c.ClusterCIDRs)
			}
		}
	}
	n0 := c.Node(0)
	if n0.IPv4.String() != "198.18.0.1" || n0.IPv6.String() != "fd00:1::1" ||
		c.Node(2).PodCIDRs[0].String() != "198.19.2.0/24" || c.Node(2).PodCIDRs[1].String() != "fd00:10:0:2::/64" ||
		c.InternetIPv4.String() != "198.18.0.254" || c.InternetIPv6.String() != "fd00:1::fe" {
		t.Errorf("address plan: node-0 %s %s, node-2 pods %v, internet %s %s", n0.IPv4, n0.IPv6, c.Node(2).PodCIDRs, c.InternetIPv4, c.InternetIPv6)
	}

	// node-0 reaches everyone else on the underlay, both families, with
	// no request lost (neighbour resolution queues the first).
	var wg sync.WaitGroup
	for _, dst := range []netip.Addr{c.Node(1).IPv4, c.Node(1).IPv6, c.Node(2).IPv4, c.Node(2).IPv6, c.InternetIPv4, c.InternetIPv6} {
		wg.Go(func() {
			if got := Ping(t, n0.NS.Handle, dst, PingOptions{Count: 3}); got != 3 {
				t.Errorf("ping %s from node-0: %d replies, want 3", dst, got)
			}
		})
	}
	wg.Wait()

	// A TCP connection from node-2 to the internet carries bytes both ways.
	for _, dst := range []netip.Addr{c.InternetIPv4, c.InternetIPv6} {
		l := c.Internet.ListenTCP(t, netip.AddrPortFrom(dst, 0))
		go func() {
			s, err := l.Accept()
			if err != nil {
				return
			}
			defer s.Close()
			b, _ := io.ReadAll(s)
			s.Write([]byte(strings.ToUpper(string(b))))
		}()
		conn, err := c.Node(2).NS.DialTCP(t, netip.MustParseAddrPort(l.Addr().String()), 2*time.Second)
		if err != nil {
			t.Errorf("dial the internet at %s from node-2: %v", l.Addr(), err)
			continue
		}
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if local := netip.MustParseAddrPort(conn.LocalAddr().String()).Addr(); local != c.Node(2).IPv4 && local != c.Node(2).IPv6 {
			t.Errorf("connection to %s from %s, not node-2's address", dst, local)
		}
		if _, err := conn.Write([]byte("hello from node-2")); err != nil {
			t.Errorf("write to %s: %v", dst, err)
			continue
		}
		conn.CloseWrite()
		if got, err := io.ReadAll(conn); string(got) != "HELLO FROM NODE-2" {
			t.Errorf("read from %s: %q, %v", dst, got, err)
		}
	}
}

func TestClusterMTU(t *testing.T) {
	Privileged(t)
	c := NewCluster(t, ClusterOptions{Nodes: 2, UnderlayMTU: 1400})
	check := func(ns *NetNS, dev string) {
		t.Helper()
		h, err := netlink.NewHandleAt(ns.Handle)
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		l, err := h.LinkByName(dev)
		if err != nil {
			t.Fatal(err)
		}
		if mtu := l.Attrs().MTU; mtu != 1400 {
			t.Errorf("%s has MTU %d, want 1400", dev, mtu)
		}
	}
	for _, n := range c.Nodes {
		check(n.NS, n.Device)
	}
	check(c.Internet, "eth0")
	for _, dev := range []string{"br0", "node-0", "node-1", "internet"} {
		check(c.Underlay, dev)
	}
}

// readSysctls returns the values of the node sysctls and eth0's rp_filter
// ("-" when missing) as one string, read in ns
// (the test's own namespace when nil).
func readSysctls(t *testing.T, ns *NetNS) string {
	t.Helper()
	var vals []string
	read := func() error {
		for _, name := range []string{
			"net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter",
			"net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.eth0.rp_filter",
		} {
			b, err := os.ReadFile("/proc/sys/" + strings.ReplaceAll(name, ".", "/"))
			if os.IsNotExist(err) {
				b = []byte("-")
			} else if err != nil {
				return err
			}
			vals = append(vals, strings.TrimSpace(string(b)))
		}
		return nil
	}
	if ns == nil {
		if err := read(); err != nil {
			t.Fatal(err)
		}
	} else {
		ns.Do(t, read)
	}
	return strings.Join(vals, " ")
}
