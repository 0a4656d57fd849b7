package wireguard

import (
	"bytes"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/testutil"
)

func TestParseKey(t *testing.T) {
	k, err := NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseKey(k.String())
	if err != nil || got != k {
		t.Fatalf("ParseKey(%q) = %v, %v; want %v", k.String(), got, err, k)
	}
	for _, bad := range []string{
		"",
		"not base64!",
		"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==",     // 31 bytes
		"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==", // 33 bytes
	} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) succeeded", bad)
		}
	}
}

// TestPublic checks Public against the test vectors of RFC 7748, section 6.1.
func TestPublic(t *testing.T) {
	for _, v := range []struct{ private, public string }{
		{"77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a", "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"}, // Alice
		{"5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb", "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"}, // Bob
	} {
		if got := hexKey(t, v.private).Public(); got != hexKey(t, v.public) {
			t.Errorf("public key of %s = %x, want %s", v.private, got, v.public)
		}
	}
}

func hexKey(t *testing.T, s string) Key {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != 32 {
		t.Fatalf("bad key %q: %v", s, err)
	}
	return Key(b)
}

func TestNewPrivateKey(t *testing.T) {
	a, errA := NewPrivateKey()
	b, errB := NewPrivateKey()
	if err := errors.Join(errA, errB); err != nil {
		t.Fatal(err)
	}
	if a == b {
		t.Fatalf("two new keys are both %v", a)
	}
	if a[0]&7 != 0 || a[31]&128 != 0 || a[31]&64 == 0 {
		t.Errorf("key %x is not clamped", a)
	}
}

func TestSockaddr(t *testing.T) {
	for _, c := range []struct {
		ap   string
		want []byte // family in host order, then port in network order
		back string // what parseSockaddr returns
	}{
		{"198.18.0.2:51871", join(native(unix.AF_INET), []byte{0xca, 0x9f, 198, 18, 0, 2}, make([]byte, 8)), "198.18.0.2:51871"},
		{"[::ffff:198.18.0.2]:51871", join(native(unix.AF_INET), []byte{0xca, 0x9f, 198, 18, 0, 2}, make([]byte, 8)), "198.18.0.2:51871"},
		{"[fd00:1::2]:51871", join(native(unix.AF_INET6), []byte{0xca, 0x9f}, make([]byte, 4),
			[]byte{0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2}, make([]byte, 4)), "[fd00:1::2]:51871"},
	} {
		got, err := sockaddr(netip.MustParseAddrPort(c.ap))
		if err != nil || !bytes.Equal(got, c.want) {
			t.Errorf("sockaddr(%s) = %x, %v; want %x", c.ap, got, err, c.want)
			continue
		}
		back, err := parseSockaddr(got)
		if err != nil || back.String() != c.back {
			t.Errorf("parseSockaddr(sockaddr(%s)) = %v, %v; want %s", c.ap, back, err, c.back)
		}
	}
	for _, bad := range []netip.AddrPort{{}, netip.MustParseAddrPort("[fe80::1%eth0]:1")} {
		if b, err := sockaddr(bad); err == nil {
			t.Errorf("sockaddr(%v) = %x, want an error", bad, b)
		}
	}
	for _, bad := range [][]byte{nil, {2}, native(unix.AF_INET), join(native(unix.AF_INET6), make([]byte, 14)), join(native(unix.AF_UNIX), make([]byte, 26))} {
		if ap, err := parseSockaddr(bad); err == nil {
			t.Errorf("parseSockaddr(%x) = %v, want an error", bad, ap)
		}
	}
}

func native(family uint16) []byte { return nl.Uint16Attr(family) }

func join(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// TestParseDevice feeds parseDevice a dump as the kernel splits one: a
// peer's allowed IPs continued in the next message under its key alone.
func TestParseDevice(t *testing.T) {
	self, a, b := key(t), key(t), key(t)
	selfPublic, bPublic := self.Public(), b.Public()
	handshake := time.Unix(1700000000, 123456789)
	peerA := peer(t, Peer{PublicKey: a.Public(), Endpoint: netip.MustParseAddrPort("198.18.0.2:51871"), AllowedIPs: prefixes("198.19.1.0/24")})
	ts := join(nl.Uint64Attr(uint64(handshake.Unix())), nl.Uint64Attr(uint64(handshake.Nanosecond())))
	peerA.AddRtAttr(unix.WGPEER_A_LAST_HANDSHAKE_TIME, ts)
	peerA.AddRtAttr(unix.WGPEER_A_RX_BYTES, nl.Uint64Attr(1000))
	peerA.AddRtAttr(unix.WGPEER_A_TX_BYTES, nl.Uint64Attr(2000))
	peerB := peer(t, Peer{PublicKey: b.Public(), Endpoint: netip.MustParseAddrPort("[fd00:1::3]:51871"), AllowedIPs: prefixes("198.19.2.0/24")})
	peerB2 := nl.NewRtAttr(unix.NLA_F_NESTED, nil)
	peerB2.AddRtAttr(unix.WGPEER_A_PUBLIC_KEY, bPublic[:])
	allowed := peerB2.AddRtAttr(unix.NLA_F_NESTED|unix.WGPEER_A_ALLOWEDIPS, nil)
	ip := allowed.AddRtAttr(unix.NLA_F_NESTED, nil)
	ip.AddRtAttr(unix.WGALLOWEDIP_A_FAMILY, nl.Uint16Attr(unix.AF_INET6))
	ip.AddRtAttr(unix.WGALLOWEDIP_A_IPADDR, netip.MustParseAddr("fd00:10:0:2::").AsSlice())
	ip.AddRtAttr(unix.WGALLOWEDIP_A_CIDR_MASK, nl.Uint8Attr(64))

	header := (&nl.Genlmsg{Command: unix.WG_CMD_GET_DEVICE, Version: unix.WG_GENL_VERSION}).Serialize()
	first := join(header,
		nl.NewRtAttr(unix.WGDEVICE_A_IFINDEX, nl.Uint32Attr(7)).Serialize(),
		nl.NewRtAttr(unix.WGDEVICE_A_PRIVATE_KEY, self[:]).Serialize(),
		nl.NewRtAttr(unix.WGDEVICE_A_PUBLIC_KEY, selfPublic[:]).Serialize(),
		nl.NewRtAttr(unix.WGDEVICE_A_LISTEN_PORT, nl.Uint16Attr(DefaultPort)).Serialize(),
		peersAttr(peerA, peerB).Serialize())
	second := join(header,
		nl.NewRtAttr(unix.WGDEVICE_A_IFINDEX, nl.Uint32Attr(7)).Serialize(),
		peersAttr(peerB2).Serialize())

	got, err := parseDevice([][]byte{first, second})
	if err != nil {
		t.Fatal(err)
	}
	want := Device{Ifindex: 7, PublicKey: self.Public(), Port: DefaultPort, Peers: []PeerStatus{
		{Peer: Peer{PublicKey: a.Public(), Endpoint: netip.MustParseAddrPort("198.18.0.2:51871"), AllowedIPs: prefixes("198.19.1.0/24")},
			LastHandshake: handshake, RxBytes: 1000, TxBytes: 2000},
		{Peer: Peer{PublicKey: b.Public(), Endpoint: netip.MustParseAddrPort("[fd00:1::3]:51871"), AllowedIPs: prefixes("198.19.2.0/24", "fd00:10:0:2::/64")}},
	}}
	if !equalDevice(got, want) {
		t.Errorf("parseDevice:\n got %+v\nwant %+v", got, want)
	}
}

func key(t *testing.T) Key {
	t.Helper()
	k, err := NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func peer(t *testing.T, p Peer) *nl.RtAttr {
	t.Helper()
	a, err := peerAttr(p, unix.WGPEER_F_REPLACE_ALLOWEDIPS)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func prefixes(s ...string) []netip.Prefix {
	var ps []netip.Prefix
	for _, p := range s {
		ps = append(ps, netip.MustParsePrefix(p))
	}
	return ps
}

func equalDevice(a, b Device) bool {
	return a.Ifindex == b.Ifindex && a.PublicKey == b.PublicKey && a.Port == b.Port &&
		slices.EqualFunc(a.Peers, b.Peers, func(p, q PeerStatus) bool {
			return p.PublicKey == q.PublicKey && p.Endpoint == q.Endpoint && slices.Equal(p.AllowedIPs, q.AllowedIPs) &&
				p.LastHandshake.Equal(q.LastHandshake) && p.RxBytes == q.RxBytes && p.TxBytes == q.TxBytes
		})
}

// TestPeerAttrs spreads a peer with more allowed IPs than one attribute
// can hold over several, each of which the kernel would take.
func TestPeerAttrs(t *testing.T) {
	p := Peer{PublicKey: key(t).Public(), Endpoint: netip.MustParseAddrPort("[fd00:1::2]:51871")}
	for i := range 2500 {
		p.AllowedIPs = append(p.AllowedIPs, netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x10, 7: 1, 14: byte(i >> 8), 15: byte(i)}), 128))
	}
	attrs, err := peerAttrs(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(attrs) != 3 {
		t.Fatalf("%d attributes, want 3", len(attrs))
	}
	var ips []netip.Prefix
	for i, a := range attrs {
		b := a.Serialize()
		if len(b) > 0xffff {
			t.Fatalf("attribute %d is %d bytes, more than a 16-bit length holds", i, len(b))
		}
		got, err := parsePeer(b[unix.SizeofRtAttr:])
		if err != nil {
			t.Fatal(err)
		}
		flags, err := peerFlags(b[unix.SizeofRtAttr:])
		if err != nil {
			t.Fatal(err)
		}
		wantFlags, wantEndpoint := uint32(0), netip.AddrPort{}
		if i == 0 {
			wantFlags, wantEndpoint = unix.WGPEER_F_REPLACE_ALLOWEDIPS, p.Endpoint
		}
		if got.PublicKey != p.PublicKey || got.Endpoint != wantEndpoint || flags != wantFlags {
			t.Errorf("attribute %d: key %v, endpoint %v, flags %#x; want %v, %v, %#x", i, got.PublicKey, got.Endpoint, flags, p.PublicKey, wantEndpoint, wantFlags)
		}
		ips = append(ips, got.AllowedIPs...)
	}
	if !slices.Equal(ips, p.AllowedIPs) {
		t.Errorf("the attributes hold %d allowed IPs, want the %d of the peer in order", len(ips), len(p.AllowedIPs))
	}
}

// peerFlags returns the WGPEER_A_FLAGS of a peer's attributes b.
func peerFlags(b []byte) (uint32, error) {
	attrs, err := nl.ParseRouteAttr(b)
	for _, a := range attrs {
		if a.Attr.Type == unix.WGPEER_A_FLAGS {
			return native32(a.Value), nil
		}
	}
	return 0, err
}

// TestSupported runs everywhere: it must say yes where the kernel has
// WireGuard, and no, with errors.ErrUnsupported, where it does not.
func TestSupported(t *testing.T) {
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	err := Supported(ns.Handle)
	if errors.Is(err, errors.ErrUnsupported) {
		testutil.RequireConfig(t, "CONFIG_WIREGUARD") // skips where the kernel says it has none
		t.Fatalf("the kernel should have WireGuard, but: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	out, err := ns.Exec("ip", "-o", "link", "show")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, "wgprobe") {
		t.Errorf("Supported left its probe device behind:\n%s", out)
	}
}

// TestEnsureNotWireGuard runs everywhere: the name is taken by a veth.
func TestEnsureNotWireGuard(t *testing.T) {
	testutil.Privileged(t)
	a, b := testutil.NewNetNS(t), testutil.NewNetNS(t)
	testutil.Veth(t, a, "veth0", b, "veth1")
	if _, _, err := Ensure(a.Handle, "veth0", DefaultPort, 1420); !errors.Is(err, unix.EEXIST) {
		t.Fatalf("Ensure on a veth: %v, want EEXIST", err)
	}
}

// requireWireGuard skips the test where the kernel has no WireGuard (the
// host) and fails it in the VM when WireGuard does not work.
func requireWireGuard(t *testing.T) {
	t.Helper()
	testutil.Privileged(t)
	testutil.RequireConfig(t, "CONFIG_WIREGUARD")
}

// node is one end of a tunnel: a namespace with a veth to the other end
// and a WireGuard device "wg0" on it, addressed inside the tunnel.
type node struct {
	ns                   *testutil.NetNS
	ifindex              int
	public               Key
	underlay4, underlay6 netip.Addr // on the veth
	inner4, inner6       netip.Addr // on wg0
	rx4, rx6             *net.UDPConn
}

// The port the nodes receive test datagrams on, inside the tunnel.
const probePort = 7777

// newTunnel makes two nodes, i = 0 and 1, joined by a veth with
// 198.18.0.(i+1)/24 and fd00:1::(i+1)/64, each with "wg0" from Ensure
// holding 198.19.i.1/16 and fd00:10:0:i::1/48. They are not peers yet.
func newTunnel(t *testing.T) (a, b *node) {
	t.Helper()
	requireWireGuard(t)
	a, b = &node{ns: testutil.NewNetNS(t)}, &node{ns: testutil.NewNetNS(t)}
	testutil.Veth(t, a.ns, "veth0", b.ns, "veth0")
	for i, n := range []*node{a, b} {
		n.underlay4 = netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)})
		n.underlay6 = netip.AddrFrom16([16]byte{0xfd, 0, 0, 1, 15: byte(i + 1)})
		n.inner4 = netip.AddrFrom4([4]byte{198, 19, byte(i), 1})
		n.inner6 = netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x10, 0, 0, 0, byte(i), 15: 1})
		n.ns.AddAddr(t, "veth0", netip.PrefixFrom(n.underlay4, 24).String())
		n.ns.AddAddr(t, "veth0", netip.PrefixFrom(n.underlay6, 64).String())
		var err error
		if n.ifindex, n.public, err = Ensure(n.ns.Handle, "wg0", DefaultPort, 1420); err != nil {
			t.Fatal(err)
		}
		n.ns.AddAddr(t, "wg0", netip.PrefixFrom(n.inner4, 16).String())
		n.ns.AddAddr(t, "wg0", netip.PrefixFrom(n.inner6, 48).String())
		n.rx4 = n.ns.ListenUDP(t, netip.AddrPortFrom(n.inner4, probePort))
		n.rx6 = n.ns.ListenUDP(t, netip.AddrPortFrom(n.inner6, probePort))
	}
	return a, b
}

// peerOf is n as its peer sees it: at its IPv4 or IPv6 underlay address,
// owning its tunnel addresses.
func peerOf(n *node, v6 bool) Peer {
	endpoint := netip.AddrPortFrom(n.underlay4, DefaultPort)
	if v6 {
		endpoint = netip.AddrPortFrom(n.underlay6, DefaultPort)
	}
	return Peer{PublicKey: n.public, Endpoint: endpoint, AllowedIPs: []netip.Prefix{
		netip.PrefixFrom(n.inner4, 32), netip.PrefixFrom(n.inner6, 128),
	}}
}

// connect makes a and b peers of each other over the IPv4 or IPv6 underlay.
func connect(t *testing.T, a, b *node, v6 bool) {
	t.Helper()
	if err := SetPeer(a.ns.Handle, "wg0", peerOf(b, v6)); err != nil {
		t.Fatal(err)
	}
	if err := SetPeer(b.ns.Handle, "wg0", peerOf(a, v6)); err != nil {
		t.Fatal(err)
	}
}

// deliver sends UDP datagrams from from's tunnel address of dst's family
// to dst until one arrives at to from that address or wait passes, and
// reports whether one did. The payload is new each time, so a late
// datagram of an earlier call does not count.
func deliver(t *testing.T, from, to *node, dst netip.Addr, wait time.Duration) bool {
	t.Helper()
	src, rx := from.inner4, to.rx4
	if dst.Is6() {
		src, rx = from.inner6, to.rx6
	}
	var tx *net.UDPConn
	from.ns.Do(t, func() (err error) {
		// The socket stays in the namespace it was made in.
		tx, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, probePort)))
		return err
	})
	defer tx.Close()
	payload := []byte(testutil.Name("probe-"))
	buf := make([]byte, 1500)
	for deadline := time.Now().Add(wait); time.Now().Before(deadline); {
		// Without a peer for dst the device refuses the datagram
		// (ENOKEY): that is not delivered either.
		tx.Write(payload)
		rx.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		for {
			n, addr, err := rx.ReadFromUDPAddrPort(buf)
			if err != nil {
				break
			}
			if bytes.Equal(buf[:n], payload) && addr.Addr() == src {
				return true
			}
		}
	}
	return false
}

// peerStatus returns the peer with key of the device wg0 of n.
func peerStatus(t *testing.T, n *node, key Key) (PeerStatus, bool) {
	t.Helper()
	d, err := Get(n.ns.Handle, "wg0")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range d.Peers {
		if p.PublicKey == key {
			return p, true
		}
	}
	return PeerStatus{}, false
}

func TestTunnel(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		name := map[bool]string{false: "IPv4 underlay", true: "IPv6 underlay"}[v6]
		t.Run(name, func(t *testing.T) {
			start := time.Now()
			a, b := newTunnel(t)
			connect(t, a, b, v6)
			for _, dst := range []netip.Addr{b.inner4, b.inner6} {
				if !deliver(t, a, b, dst, 5*time.Second) {
					t.Fatalf("nothing from %v reached %v over the tunnel", a.inner4, dst)
				}
			}
			if !deliver(t, b, a, a.inner4, 5*time.Second) {
				t.Fatalf("nothing from %v reached %v over the tunnel", b.inner4, a.inner4)
			}

			d, err := Get(a.ns.Handle, "wg0")
			if err != nil {
				t.Fatal(err)
			}
			if d.Ifindex != a.ifindex || d.PublicKey != a.public || d.Port != DefaultPort || len(d.Peers) != 1 {
				t.Fatalf("Get = %+v; want ifindex %d, key %v, port %d, one peer", d, a.ifindex, a.public, DefaultPort)
			}
			want := peerOf(b, v6)
			got := d.Peers[0]
			if got.PublicKey != want.PublicKey || got.Endpoint != want.Endpoint || !slices.Equal(got.AllowedIPs, want.AllowedIPs) {
				t.Errorf("peer = %+v, want %+v", got.Peer, want)
			}
			for _, n := range []struct {
				node *node
				peer Key
			}{{a, b.public}, {b, a.public}} {
				p, ok := peerStatus(t, n.node, n.peer)
				if !ok {
					t.Fatalf("%v has no peer %v", n.node.inner4, n.peer)
				}
				if p.LastHandshake.Before(start.Add(-time.Second)) || p.LastHandshake.After(time.Now().Add(time.Second)) {
					t.Errorf("%v: last handshake at %v, want since %v", n.node.inner4, p.LastHandshake, start)
				}
				if p.RxBytes == 0 || p.TxBytes == 0 {
					t.Errorf("%v: rx %d bytes, tx %d bytes, want both > 0", n.node.inner4, p.RxBytes, p.TxBytes)
				}
			}
			var rpFilter []byte
			a.ns.Do(t, func() (err error) {
				rpFilter, err = os.ReadFile("/proc/sys/net/ipv4/conf/wg0/rp_filter")
				return err
			})
			if strings.TrimSpace(string(rpFilter)) != "0" {
				t.Errorf("rp_filter of wg0 is %q, want 0", rpFilter)
			}
		})
	}
}

func TestSetPeerReplaces(t *testing.T) {
	a, b := newTunnel(t)
	connect(t, a, b, false)
	// A peer that exists only on paper: SetPeer of b must leave it be.
	other := Peer{PublicKey: key(t).Public(), AllowedIPs: prefixes("198.19.9.0/24")}
	if err := SetPeer(a.ns.Handle, "wg0", other); err != nil {
		t.Fatal(err)
	}
	if !deliver(t, a, b, b.inner4, 5*time.Second) {
		t.Fatal("the tunnel does not work to begin with")
	}

	// b moves to other tunnel addresses: b.inner4 is no longer routed to it.
	moved := peerOf(b, true)
	moved.AllowedIPs = prefixes("198.19.1.2/32", "fd00:10:0:1::/64")
	if err := SetPeer(a.ns.Handle, "wg0", moved); err != nil {
		t.Fatal(err)
	}
	p, ok := peerStatus(t, a, b.public)
	if !ok || p.Endpoint != moved.Endpoint || !slices.Equal(p.AllowedIPs, moved.AllowedIPs) {
		t.Fatalf("after SetPeer, peer = %+v, want %+v", p.Peer, moved)
	}
	if deliver(t, a, b, b.inner4, time.Second) {
		t.Error("a datagram to an address no longer allowed reached b")
	}
	if !deliver(t, a, b, b.inner6, 5*time.Second) {
		t.Error("nothing reached b at an address still allowed, over its new endpoint")
	}
	if p, ok := peerStatus(t, a, other.PublicKey); !ok || !slices.Equal(p.AllowedIPs, other.AllowedIPs) {
		t.Errorf("the other peer is %+v (there: %v), want %+v", p.Peer, ok, other)
	}
}

func TestRemovePeer(t *testing.T) {
	a, b := newTunnel(t)
	connect(t, a, b, false)
	if !deliver(t, a, b, b.inner4, 5*time.Second) {
		t.Fatal("the tunnel does not work to begin with")
	}
	if err := RemovePeer(a.ns.Handle, "wg0", b.public); err != nil {
		t.Fatal(err)
	}
	d, err := Get(a.ns.Handle, "wg0")
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Peers) != 0 {
		t.Fatalf("after RemovePeer, peers = %+v", d.Peers)
	}
	if deliver(t, a, b, b.inner4, time.Second) {
		t.Error("a datagram reached a removed peer")
	}
	if err := RemovePeer(a.ns.Handle, "wg0", b.public); err != nil {
		t.Errorf("removing a peer that is gone: %v", err)
	}
}

func TestEnsureKeepsKey(t *testing.T) {
	a, _ := newTunnel(t)
	ifindex, public, err := Ensure(a.ns.Handle, "wg0", DefaultPort+1, 1380)
	if err != nil {
		t.Fatal(err)
	}
	if ifindex != a.ifindex || public != a.public {
		t.Fatalf("second Ensure = %d, %v; first %d, %v", ifindex, public, a.ifindex, a.public)
	}
	d, err := Get(a.ns.Handle, "wg0")
	if err != nil {
		t.Fatal(err)
	}
	if d.PublicKey != a.public || d.Port != DefaultPort+1 {
		t.Errorf("Get = key %v, port %d; want %v, %d", d.PublicKey, d.Port, a.public, DefaultPort+1)
	}
	l, err := netdev.Get(a.ns.Handle, "wg0")
	if err != nil {
		t.Fatal(err)
	}
	if l.MTU != 1380 || !l.Up {
		t.Errorf("wg0 has MTU %d, up %v; want 1380, up", l.MTU, l.Up)
	}
}

func TestGetErrors(t *testing.T) {
	a, _ := newTunnel(t)
	if _, err := Get(a.ns.Handle, "missing0"); !errors.Is(err, unix.ENODEV) {
		t.Errorf("Get of a missing device: %v, want ENODEV", err)
	}
	if _, err := Get(a.ns.Handle, "veth0"); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Errorf("Get of a veth: %v, want EOPNOTSUPP", err)
	}
}

// TestGetSplitPeer gives a peer more allowed IPs than one dump message
// holds (at most 32 KiB, about 40 bytes each), so the kernel splits the
// peer over several messages and Get must put it back together.
func TestGetSplitPeer(t *testing.T) {
	a, b := newTunnel(t)
	p := peerOf(b, false)
	base := b.inner6.As16()
	for i := range 3000 {
		ip := base
		ip[13], ip[14], ip[15] = 0xff, byte(i>>8), byte(i)
		p.AllowedIPs = append(p.AllowedIPs, netip.PrefixFrom(netip.AddrFrom16(ip), 128))
	}
	if err := SetPeer(a.ns.Handle, "wg0", p); err != nil {
		t.Fatal(err)
	}
	d, err := Get(a.ns.Handle, "wg0")
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Peers) != 1 || d.Peers[0].Endpoint != p.Endpoint {
		t.Fatalf("Get = %d peers, want one, with endpoint %v", len(d.Peers), p.Endpoint)
	}
	got := slices.SortedFunc(slices.Values(d.Peers[0].AllowedIPs), netip.Prefix.Compare)
	want := slices.SortedFunc(slices.Values(p.AllowedIPs), netip.Prefix.Compare)
	if !slices.Equal(got, want) {
		t.Errorf("Get returned %d allowed IPs, want the %d set", len(got), len(want))
	}
}
