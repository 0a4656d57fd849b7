package testutil

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
)

// ClusterOptions shape a Cluster; the zero value is three nodes on a
// 1500-byte underlay.
type ClusterOptions struct {
	Nodes       int // how many nodes; 3 when 0, at most 253
	UnderlayMTU int // MTU of the underlay (bridge ports and node devices); 1500 when 0
}

// Cluster is nodes joined by an underlay: each node a network namespace with its own
// private bpffs, one device "eth0" to an underlay bridge "br0" in a namespace of its own;
// one more namespace, Internet, on the same bridge, stands for everything outside the cluster.
//
// The underlay is 198.18.0.0/24 and fd00:1::/64: node i has .(i+1) and
// ::(i+1), the Internet .254 and ::fe. Node i's pods get 198.19.i.0/24 and
// fd00:10:0:i::/64, but nothing routes them: that is the datapath's job.
type Cluster struct {
	Underlay                   *NetNS     // holds br0, with one port per node ("node-I") and "internet"
	Internet                   *NetNS     // outside the cluster, device "eth0"
	InternetIPv4, InternetIPv6 netip.Addr // 198.18.0.254, fd00:1::fe
	Nodes                      []*ClusterNode
	ClusterCIDRs               []netip.Prefix // 198.19.0.0/16, fd00:10::/48: every node's pods
}

// ClusterNode is one node of a Cluster.
type ClusterNode struct {
	Name       string           // "node-0", "node-1", ...
	NS         *NetNS           // forwards IPv4 and IPv6, rp_filter off
	Device     string           // "eth0": the node's device to the underlay
	Ifindex    int              // of Device, in NS
	MAC        net.HardwareAddr // of Device
	IPv4, IPv6 netip.Addr       // underlay: 198.18.0.(i+1)/24, fd00:1::(i+1)/64
	PodCIDRs   []netip.Prefix   // 198.19.i.0/24 and fd00:10:0:i::/64
	BPFFS      string           // a private bpffs for this node's datapath
}

// String returns the node's name, for messages.
func (n *ClusterNode) String() string { return n.Name }

// Node returns node i.
func (c *Cluster) Node(i int) *ClusterNode { return c.Nodes[i] }

// The underlay's IPv6 /64 and the cluster's pod /48, as the upper 64 bits.
const (
	underlay6 = 0xfd00_0001_0000_0000
	pods6     = 0xfd00_0010_0000_0000
)

// nodeSysctls make a node a router that accepts packets whatever their
// source: the datapath, not the kernel, decides what is spoofed. They are
// set before the node has devices, so eth0 inherits rp_filter 0 from
// default (the effective value is the larger of all and the device's).
var nodeSysctls = [][2]string{
	{"net.ipv4.conf.all.rp_filter", "0"},
	{"net.ipv4.conf.default.rp_filter", "0"},
	{"net.ipv4.ip_forward", "1"},
	{"net.ipv6.conf.all.forwarding", "1"},
}

// underlaySysctls keep the bridge a plain switch: without IPv6 its devices
// send no duplicate address detection or multicast listener reports of
// their own into the underlay.
var underlaySysctls = [][2]string{
	{"net.ipv6.conf.all.disable_ipv6", "1"},
	{"net.ipv6.conf.default.disable_ipv6", "1"},
}

// NewCluster builds a Cluster and removes it when the test ends. When it
// returns, every port of the bridge forwards and every address is usable
// (no duplicate address detection); neighbours are still unresolved.
func NewCluster(t testing.TB, opts ClusterOptions) *Cluster {
	t.Helper()
	nodes, mtu := cmp.Or(opts.Nodes, 3), cmp.Or(opts.UnderlayMTU, 1500)
	if nodes < 1 || nodes > 253 {
		t.Fatalf("cluster of %d nodes: want 1 to 253", nodes)
	}
	c := &Cluster{
		Underlay:     NewNetNS(t),
		InternetIPv4: netip.AddrFrom4([4]byte{198, 18, 0, 254}),
		InternetIPv6: ipv6(underlay6, 0xfe),
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("198.19.0.0/16"), netip.PrefixFrom(ipv6(pods6, 0), 48)},
	}
	u, err := newUnderlay(c.Underlay, "br0", mtu)
	if err != nil {
		t.Fatal(err)
	}
	defer u.h.Close()

	for i := range nodes {
		n := &ClusterNode{
			Name:   fmt.Sprintf("node-%d", i),
			NS:     NewNetNS(t),
			Device: "eth0",
			IPv4:   netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}),
			IPv6:   ipv6(underlay6, uint64(i+1)),
			PodCIDRs: []netip.Prefix{
				netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(i), 0}), 24),
				netip.PrefixFrom(ipv6(pods6|uint64(i), 0), 64),
			},
			BPFFS: BPFFS(t),
		}
		if err := sysctl(n.NS, nodeSysctls); err != nil {
			t.Fatal(err)
		}
		if err := u.plug(n.Name, n.NS, n.Device, n.IPv4, n.IPv6); err != nil {
			t.Fatalf("%s: %v", n, err)
		}
		l, err := netdev.Get(n.NS.Handle, n.Device)
		if err != nil {
			t.Fatal(err)
		}
		n.Ifindex, n.MAC = l.Index, l.MAC
		c.Nodes = append(c.Nodes, n)
	}

	c.Internet = NewNetNS(t)
	if err := u.plug("internet", c.Internet, "eth0", c.InternetIPv4, c.InternetIPv6); err != nil {
		t.Fatalf("internet: %v", err)
	}
	if err := u.waitForwarding(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	return c
}

// ipv6 returns the address with the upper and lower 64 bits hi and lo.
func ipv6(hi, lo uint64) netip.Addr {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], hi)
	binary.BigEndian.PutUint64(b[8:], lo)
	return netip.AddrFrom16(b)
}

// underlay is the bridge of a Cluster while NewCluster builds it.
type underlay struct {
	ns    *NetNS
	h     *netlink.Handle // in ns
	br    netlink.Link
	mtu   int
	ports []int // ifindexes
}

// newUnderlay creates a bridge in ns that forwards on a port as soon as
// the port is up, and sets it up. Without multicast snooping it floods
// neighbour solicitations to every port, however late a node's listener
// report. Equivalent to: `ip -n NS link add NAME mtu MTU up type bridge
// mcast_snooping 0 stp_state 0 forward_delay 0`.
func newUnderlay(ns *NetNS, name string, mtu int) (*underlay, error) {
	if err := sysctl(ns, underlaySysctls); err != nil {
		return nil, err
	}
	h, err := netlink.NewHandleAt(ns.Handle)
	if err != nil {
		return nil, err
	}
	off := false
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}, MulticastSnooping: &off}
	if err = h.LinkAdd(br); err != nil {
		err = fmt.Errorf("add bridge %s: %w", name, err)
	} else if err = noForwardDelay(ns, br.Attrs().Index); err != nil {
		err = fmt.Errorf("bridge %s: %w", name, err)
	} else if err = h.LinkSetUp(br); err != nil {
		err = fmt.Errorf("set %s up: %w", name, err)
	}
	if err != nil {
		h.Close()
		return nil, err
	}
	return &underlay{ns: ns, h: h, br: br, mtu: mtu}, nil
}

// noForwardDelay turns STP off and the forward delay to 0 on the bridge
// with index ifindex, which netlink.Bridge cannot. With STP off, recent
// kernels forward at once anyway; older ones waited the forward delay (15s).
func noForwardDelay(ns *NetNS, ifindex int) error {
	return nsrun.Do(ns.Handle, func() error {
		req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_ACK)
		msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
		msg.Index = int32(ifindex)
		req.AddData(msg)
		info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
		info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("bridge"))
		data := info.AddRtAttr(nl.IFLA_INFO_DATA, nil)
		data.AddRtAttr(unix.IFLA_BR_STP_STATE, nl.Uint32Attr(0))
		data.AddRtAttr(unix.IFLA_BR_FORWARD_DELAY, nl.Uint32Attr(0))
		req.AddData(info)
		if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
			return fmt.Errorf("stp_state 0 forward_delay 0: %w", err)
		}
		return nil
	})
}

// plug connects ns to the bridge by a veth pair, port on the bridge and
// dev in ns with addresses v4/24 and v6/64, and waits until both ends
// carry packets.
func (u *underlay) plug(port string, ns *NetNS, dev string, v4, v6 netip.Addr) error {
	ifindex, _, err := netdev.Veth(netdev.VethPair{NS: u.ns.Handle, Name: port, PeerNS: ns.Handle, PeerName: dev, MTU: u.mtu, KeepDown: true})
	if err != nil {
		return err
	}
	l, err := u.h.LinkByIndex(ifindex)
	if err == nil {
		err = u.h.LinkSetMaster(l, u.br)
	}
	if err == nil {
		err = u.h.LinkSetUp(l)
	}
	if err != nil {
		return fmt.Errorf("bridge port %s: %w", port, err)
	}
	u.ports = append(u.ports, ifindex)
	for _, p := range []netip.Prefix{netip.PrefixFrom(v4, 24), netip.PrefixFrom(v6, 64)} {
		if err := netdev.AddAddr(ns.Handle, dev, p); err != nil {
			return err
		}
	}
	return errors.Join(netdev.WaitRunning(u.ns.Handle, port, 5*time.Second), netdev.WaitRunning(ns.Handle, dev, 5*time.Second))
}

// brStateForwarding is BR_STATE_FORWARDING of linux/if_bridge.h.
const brStateForwarding = 3

// waitForwarding waits until every port of the bridge forwards.
func (u *underlay) waitForwarding(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		states, err := portStates(u.ns)
		if err != nil {
			return err
		}
		var blocked []string
		for _, p := range u.ports {
			if states[p] != brStateForwarding {
				blocked = append(blocked, fmt.Sprintf("ifindex %d in state %d", p, states[p]))
			}
		}
		if len(blocked) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("bridge ports not forwarding after %v: %s", timeout, strings.Join(blocked, ", "))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// portStates returns the STP state of every bridge port in ns by ifindex,
// which netlink.Protinfo lacks. Equivalent to: `bridge -n NS link`.
func portStates(ns *NetNS) (map[int]uint8, error) {
	states := map[int]uint8{}
	return states, nsrun.Do(ns.Handle, func() error {
		req := nl.NewNetlinkRequest(unix.RTM_GETLINK, unix.NLM_F_DUMP)
		req.AddData(nl.NewIfInfomsg(unix.AF_BRIDGE))
		msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWLINK)
		if err != nil {
			return fmt.Errorf("dump bridge ports: %w", err)
		}
		for _, m := range msgs {
			info := nl.DeserializeIfInfomsg(m)
			attrs, err := nl.ParseRouteAttr(m[info.Len():])
			if err != nil {
				return err
			}
			for _, a := range attrs {
				if a.Attr.Type&^unix.NLA_F_NESTED != unix.IFLA_PROTINFO {
					continue
				}
				port, err := nl.ParseRouteAttr(a.Value)
				if err != nil {
					return err
				}
				for _, p := range port {
					if p.Attr.Type == unix.IFLA_BRPORT_STATE && len(p.Value) > 0 {
						states[int(info.Index)] = p.Value[0]
					}
				}
			}
		}
		return nil
	})
}

// sysctl sets each setting (a name as sysctl(8) spells it, and a value) in
// ns and reads it back. A file below /proc/sys/net shows the namespace of
// the thread that opens it, not the process's, so the writes run on a
// thread in ns. A write that reached another namespace could change the
// whole machine, so first a probe device that only ns has must show there.
func sysctl(ns *NetNS, settings [][2]string) error {
	if err := probeSysctl(ns); err != nil {
		return err
	}
	return nsrun.Do(ns.Handle, func() error {
		for _, s := range settings {
			path := "/proc/sys/" + strings.ReplaceAll(s[0], ".", "/")
			if err := os.WriteFile(path, []byte(s[1]), 0); err != nil {
				return fmt.Errorf("netns %s: sysctl %s=%s: %w", ns.Name, s[0], s[1], err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("netns %s: sysctl %s: %w", ns.Name, s[0], err)
			}
			if v := strings.TrimSpace(string(got)); v != s[1] {
				return fmt.Errorf("netns %s: sysctl %s is %s after writing %s", ns.Name, s[0], v, s[1])
			}
		}
		return nil
	})
}

// probeSysctl checks that a thread in ns sees ns's devices below
// /proc/sys/net, by a veth pair made for the purpose and deleted after.
func probeSysctl(ns *NetNS) error {
	h, err := netlink.NewHandleAt(ns.Handle)
	if err != nil {
		return err
	}
	defer h.Close()
	probe := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: Name("probe")}, PeerName: Name("probe")}
	if err := h.LinkAdd(probe); err != nil {
		return fmt.Errorf("netns %s: add probe device: %w", ns.Name, err)
	}
	defer h.LinkDel(probe)
	return nsrun.Do(ns.Handle, func() error {
		if _, err := os.Stat("/proc/sys/net/ipv4/conf/" + probe.Name); err != nil {
			return fmt.Errorf("netns %s: /proc/sys/net is not this namespace's in it, refusing to write sysctls: %w", ns.Name, err)
		}
		return nil
	})
}

// ListenTCP listens on addr (address and port; port 0 picks one) inside
// the namespace; the listener is closed when the test ends.
func (n *NetNS) ListenTCP(t testing.TB, addr netip.AddrPort) *net.TCPListener {
	t.Helper()
	var l *net.TCPListener
	n.Do(t, func() (err error) {
		// The socket stays in the namespace it was made in.
		l, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(addr))
		return err
	})
	t.Cleanup(func() { l.Close() })
	return l
}

// DialTCP connects from inside the namespace to addr, giving up after
// timeout, and closes the connection when the test ends. It returns the
// error, not fails the test, for tests that expect the connection to fail.
func (n *NetNS) DialTCP(t testing.TB, addr netip.AddrPort, timeout time.Duration) (*net.TCPConn, error) {
	t.Helper()
	var c net.Conn
	err := nsrun.Do(n.Handle, func() (err error) {
		// The socket stays in the namespace it was made in.
		c, err = (&net.Dialer{Timeout: timeout}).Dial("tcp", addr.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netns %s: %w", n.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn), nil
}
