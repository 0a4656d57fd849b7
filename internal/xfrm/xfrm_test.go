package xfrm

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
)

const port = 4242

// world is two namespaces, A and B, joined by a veth pair: A has
// 198.18.0.1/24 and fd00:1::1/64 on veth0, B 198.18.0.2/24 and fd00:1::2/64
// on veth1. A knows B as node 7, B knows A as node 9.
type world struct {
	a, b     *testutil.NetNS
	ifA      int // veth0, in A
	a4, b4   netip.Addr
	a6, b6   netip.Addr
	decrypts *ebpf.Map // see markESP
}

func newWorld(t *testing.T) *world {
	t.Helper()
	testutil.Privileged(t)
	w := &world{
		a: testutil.NewNetNS(t), b: testutil.NewNetNS(t),
		a4: netip.MustParseAddr("198.18.0.1"), b4: netip.MustParseAddr("198.18.0.2"),
		a6: netip.MustParseAddr("fd00:1::1"), b6: netip.MustParseAddr("fd00:1::2"),
	}
	w.ifA, _ = testutil.Veth(t, w.a, "veth0", w.b, "veth1")
	w.a.AddAddr(t, "veth0", "198.18.0.1/24")
	w.a.AddAddr(t, "veth0", "fd00:1::1/64")
	w.b.AddAddr(t, "veth1", "198.18.0.2/24")
	w.b.AddAddr(t, "veth1", "fd00:1::2/64")
	return w
}

// espWorld is a world whose kernel has ESP, with InstallBase done on both
// sides and B's device marking ESP from A as the datapath would.
func espWorld(t *testing.T) *world {
	t.Helper()
	testutil.RequireConfig(t, "CONFIG_INET_ESP")
	w := newWorld(t)
	must(t, InstallBase(w.a.Handle, []netip.Addr{w.a4, w.a6}))
	must(t, InstallBase(w.b.Handle, []netip.Addr{w.b4, w.b6}))
	w.decrypts = markESP(t, w.b, "veth1", DecryptMark(9))
	return w
}

func (w *world) addrs(six bool) (a, b netip.Addr) {
	if six {
		return w.a6, w.b6
	}
	return w.a4, w.b4
}

// peers returns B as A sees it, and A as B sees it.
func (w *world) peers(six bool) (ofA, ofB Peer) {
	a, b := w.addrs(six)
	return Peer{Node: 7, Local: a, Remote: b}, Peer{Node: 9, Local: b, Remote: a}
}

// install installs k on both sides.
func (w *world) install(t *testing.T, six bool, k Key) {
	t.Helper()
	pa, pb := w.peers(six)
	must(t, Install(w.a.Handle, pa, k))
	must(t, Install(w.b.Handle, pb, k))
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func family(six bool) string {
	if six {
		return "IPv6"
	}
	return "IPv4"
}

func randomKey(spi uint8) Key {
	k := Key{SPI: spi, AEAD: AESGCM, Key: make([]byte, 20), ICVBits: 128}
	rand.Read(k.Key)
	return k
}

func TestSupported(t *testing.T) {
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	start := time.Now()
	err := Supported(ns.Handle)
	t.Logf("Supported took %v: %v", time.Since(start), err)
	if errors.Is(err, errors.ErrUnsupported) {
		testutil.RequireConfig(t, "CONFIG_INET_ESP") // skips where the kernel says it has no ESP
		t.Fatalf("the kernel should have ESP: %v", err)
	}
	must(t, err)
	h := xfrmHandle(t, ns)
	if states, err := h.XfrmStateList(netlink.FAMILY_ALL); err != nil || len(states) != 0 {
		t.Errorf("the probe left %d states (%v)", len(states), err)
	}
}

// The policies need no ESP: this runs on any kernel.
func TestBasePolicies(t *testing.T) {
	w := newWorld(t)
	locals := []netip.Addr{w.a4, w.a6}
	must(t, InstallBase(w.a.Handle, locals))
	must(t, InstallBase(w.a.Handle, locals))
	h := xfrmHandle(t, w.a)
	kinds := map[policyKind]int{}
	for _, pol := range list(t, h.XfrmPolicyList) {
		kinds[kindOf(&pol)]++
	}
	if want := (map[policyKind]int{blockPolicyKind: 2, basePolicyKind: 4}); !maps.Equal(kinds, want) {
		t.Errorf("policies by kind: %v, want %v", kinds, want)
	}

	c4 := listen(t, w.b, w.b4)
	c6 := listen(t, w.b, w.b6)
	for _, six := range []bool{false, true} {
		a, b := w.addrs(six)
		c := c4
		if six {
			c = c6
		}
		if err := send(w.a, a, b, EncryptMark(3, 7), []byte("marked")); !errors.Is(err, unix.EPERM) {
			t.Errorf("%s: a packet marked for a peer without a policy: %v, want EPERM", family(six), err)
		}
		if _, _, ok := w.deliver(t, c, six, 0); !ok {
			t.Errorf("%s: unmarked traffic does not pass", family(six))
		}
	}
	if n := xfrmStat(t, w.a)["XfrmOutPolBlock"]; n < 2 {
		t.Errorf("XfrmOutPolBlock = %d, want 2 or more", n)
	}

	foreign := &netlink.XfrmPolicy{
		Src: prefix("198.18.0.1/32"), Dst: prefix("198.18.0.99/32"), Dir: netlink.XFRM_DIR_IN, Priority: 2975,
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: net.IPv4zero.To4(), Dst: w.a4.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 7, Optional: 1}},
	}
	must(t, h.XfrmPolicyAdd(foreign))
	must(t, RemoveAll(w.a.Handle))
	left := list(t, h.XfrmPolicyList)
	if len(left) != 1 || left[0].Dst.String() != "198.18.0.99/32" {
		t.Errorf("RemoveAll left %d policies, want only the foreign one", len(left))
	}
	if _, _, ok := w.deliver(t, c4, false, EncryptMark(3, 7)); !ok {
		t.Error("the block policy outlived RemoveAll")
	}
}

// TestEncrypt sends a datagram from A to B through the SA of key 3, in
// both families, and checks what the wire and B saw.
func TestEncrypt(t *testing.T) {
	for _, six := range []bool{false, true} {
		t.Run(family(six), func(t *testing.T) {
			w := espWorld(t)
			k := randomKey(3)
			w.install(t, six, k)
			_, b := w.addrs(six)
			c := listen(t, w.b, b)

			wire := startCapture(t, w.a, w.ifA)
			payload, mark, ok := w.deliver(t, c, six, EncryptMark(3, 7))
			frames := wire.stop()
			if !ok {
				t.Fatalf("not delivered; xfrm_stat A %v, B %v", xfrmStat(t, w.a), xfrmStat(t, w.b))
			}
			checkWire(t, frames, 3, payload)

			// The output mark keeps the sender's node on the decrypted
			// packet, which comes back through B's tc ingress once.
			if mark != DecryptMark(9) {
				t.Errorf("the socket saw mark %#x, want %#x", mark, DecryptMark(9))
			}
			var seen [2]uint32 // last mark, count
			must(t, w.decrypts.Lookup(uint32(0), &seen))
			if seen != [2]uint32{DecryptMark(9), 1} {
				t.Errorf("tc ingress saw %d decrypted packets, the last with mark %#x; want 1 with %#x", seen[1], seen[0], DecryptMark(9))
			}
			for _, ns := range []*testutil.NetNS{w.a, w.b} {
				for name, n := range xfrmStat(t, ns) {
					t.Errorf("%s: %s = %d", ns.Name, name, n)
				}
			}

			// Marked for a key or a node nobody installed: dropped, never sent.
			for _, m := range []uint32{EncryptMark(5, 7), EncryptMark(3, 8)} {
				a, b := w.addrs(six)
				if err := send(w.a, a, b, m, []byte("x")); !errors.Is(err, unix.EPERM) {
					t.Errorf("mark %#x: %v, want EPERM", m, err)
				}
			}
		})
	}
}

// TestKeys installs two keys at once, reinstalls, replaces a key and
// removes one, checking delivery and Installed at each step.
func TestKeys(t *testing.T) {
	w := espWorld(t)
	pa, pb := w.peers(false)
	c := listen(t, w.b, w.b4)
	k3, k4 := randomKey(3), randomKey(4)
	w.install(t, false, k3)
	w.install(t, false, k4)
	delivers := func(spi uint8) bool {
		t.Helper()
		_, _, ok := w.deliver(t, c, false, EncryptMark(spi, 7))
		return ok
	}
	if !delivers(3) || !delivers(4) {
		t.Fatalf("two keys: SPI 3 and 4 must both deliver; xfrm_stat B %v", xfrmStat(t, w.b))
	}
	checkInstalled(t, w.a, SA{pa, 3}, SA{pa, 4})
	checkInstalled(t, w.b, SA{pb, 3}, SA{pb, 4})

	// Installing again leaves the states alone: their counters go on.
	w.install(t, false, k3)
	w.install(t, false, k4)
	h := xfrmHandle(t, w.a)
	if s := getState(t, h, outID(pa, 4)); s.Statistics.Packets != 1 {
		t.Errorf("after a repeated Install the OUT state has counted %d packets, want 1", s.Statistics.Packets)
	}
	if !delivers(3) || !delivers(4) {
		t.Fatal("a repeated Install broke delivery")
	}

	// New material for SPI 4 on A alone: A's state is replaced, B can no
	// longer decrypt, until B has the new key too.
	k4b := randomKey(4)
	must(t, Install(w.a.Handle, pa, k4b))
	if s := getState(t, h, outID(pa, 4)); !bytes.Equal(s.Aead.Key, DeriveKey(k4b, pa.Local, pa.Remote)) {
		t.Error("Install with a new key kept the old one")
	}
	if delivers(4) {
		t.Error("B decrypted with a key it does not have")
	}
	must(t, Install(w.b.Handle, pb, k4b))
	if !delivers(4) {
		t.Error("no delivery once both sides have the new key")
	}

	must(t, Remove(w.a.Handle, pa, 3))
	must(t, Remove(w.b.Handle, pb, 3))
	must(t, Remove(w.a.Handle, pa, 3)) // absent: fine
	checkInstalled(t, w.a, SA{pa, 4})
	checkInstalled(t, w.b, SA{pb, 4})
	if !delivers(4) {
		t.Error("removing SPI 3 broke SPI 4")
	}
	if err := send(w.a, w.a4, w.b4, EncryptMark(3, 7), []byte("x")); !errors.Is(err, unix.EPERM) {
		t.Errorf("SPI 3 after Remove: %v, want EPERM (the block policy)", err)
	}
}

// TestRemoveAll removes the package's objects in both families and keeps
// another owner's.
func TestRemoveAll(t *testing.T) {
	w := espWorld(t)
	w.install(t, false, randomKey(3))
	w.install(t, true, randomKey(3))
	h := xfrmHandle(t, w.a)
	foreignState := &netlink.XfrmState{
		Src: w.a4.AsSlice(), Dst: w.b4.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL,
		Spi: 0x2000, Reqid: 7, Aead: randomKey(1).aeadFor(),
	}
	must(t, h.XfrmStateAdd(foreignState))
	foreignPolicies := []*netlink.XfrmPolicy{{
		Src: prefix("198.18.0.1/32"), Dst: prefix("198.18.0.99/32"), Dir: netlink.XFRM_DIR_OUT,
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: w.a4.AsSlice(), Dst: w.b4.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x2000, Reqid: 7}},
	}, {
		// Looks like a peer's policy, but its template is another's.
		Src: prefix("0.0.0.0/0"), Dst: prefix("0.0.0.0/0"), Dir: netlink.XFRM_DIR_OUT,
		Mark:  &netlink.XfrmMark{Value: EncryptMark(3, 99), Mask: EncryptMask},
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: w.a4.AsSlice(), Dst: w.b4.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x2000, Reqid: 7}},
	}}
	for _, pol := range foreignPolicies {
		must(t, h.XfrmPolicyAdd(pol))
	}
	if got := len(list(t, h.XfrmStateList)); got != 5 {
		t.Fatalf("%d states before RemoveAll, want 5", got)
	}

	must(t, RemoveAll(w.a.Handle))
	must(t, RemoveAll(w.a.Handle))
	states := list(t, h.XfrmStateList)
	if len(states) != 1 || states[0].Spi != 0x2000 {
		t.Errorf("%d states left, want only the foreign one", len(states))
	}
	policies := list(t, h.XfrmPolicyList)
	if len(policies) != 2 {
		t.Errorf("%d policies left, want the 2 foreign ones", len(policies))
	}
	for _, pol := range policies {
		if pol.Tmpls[0].Reqid != 7 {
			t.Errorf("a %s policy of sluice's is left", pol.Dir)
		}
	}
	checkInstalled(t, w.a)
}

func (k Key) aeadFor() *netlink.XfrmStateAlgo {
	return aead(k, k.Key)
}

func checkInstalled(t *testing.T, ns *testutil.NetNS, want ...SA) {
	t.Helper()
	got, err := Installed(ns.Handle)
	must(t, err)
	if !slices.Equal(got, want) {
		t.Errorf("Installed = %v, want %v", got, want)
	}
}

func xfrmHandle(t *testing.T, ns *testutil.NetNS) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(ns.Handle, unix.NETLINK_XFRM)
	must(t, err)
	t.Cleanup(h.Close)
	return h
}

func getState(t *testing.T, h *netlink.Handle, id *netlink.XfrmState) *netlink.XfrmState {
	t.Helper()
	s, err := h.XfrmStateGet(id)
	must(t, err)
	return s
}

func list[T any](t *testing.T, dump func(int) ([]T, error)) []T {
	t.Helper()
	v, err := dump(netlink.FAMILY_ALL)
	must(t, err)
	return v
}

func prefix(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}

func sockaddr(a netip.Addr, port int) unix.Sockaddr {
	if a.Is4() {
		return &unix.SockaddrInet4{Addr: a.As4(), Port: port}
	}
	return &unix.SockaddrInet6{Addr: a.As16(), Port: port}
}

// send sends payload from src to dst in ns, from a socket with SO_MARK
// mark: how a packet the datapath marked meets xfrm.
func send(ns *testutil.NetNS, src, dst netip.Addr, mark uint32, payload []byte) error {
	return nsrun.Do(ns.Handle, func() error {
		domain := unix.AF_INET
		if dst.Is6() {
			domain = unix.AF_INET6
		}
		fd, err := unix.Socket(domain, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
			return err
		}
		if err := unix.Bind(fd, sockaddr(src, 0)); err != nil {
			return err
		}
		return unix.Sendto(fd, payload, 0, sockaddr(dst, port))
	})
}

// listen opens a UDP socket on addr in ns that reports each datagram's
// skb->mark (SO_RCVMARK, Linux 5.19).
func listen(t *testing.T, ns *testutil.NetNS, addr netip.Addr) *net.UDPConn {
	t.Helper()
	c := ns.ListenUDP(t, netip.AddrPortFrom(addr, port))
	raw, err := c.SyscallConn()
	must(t, err)
	var serr error
	must(t, raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVMARK, 1) }))
	must(t, serr)
	return c
}

// deliver sends a fresh random payload from A to B with mark, and reports
// whether it arrived on c and with which mark.
func (w *world) deliver(t *testing.T, c *net.UDPConn, six bool, mark uint32) (payload []byte, got uint32, ok bool) {
	t.Helper()
	payload = make([]byte, 24)
	rand.Read(payload)
	a, b := w.addrs(six)
	must(t, send(w.a, a, b, mark, payload))
	buf, oob := make([]byte, 2048), make([]byte, 256)
	c.SetReadDeadline(time.Now().Add(time.Second))
	for {
		n, oobn, _, _, err := c.ReadMsgUDP(buf, oob)
		if err != nil {
			return payload, 0, false
		}
		if !bytes.Equal(buf[:n], payload) {
			continue // a late one from an earlier step
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		must(t, err)
		for _, m := range msgs {
			if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SO_MARK && len(m.Data) >= 4 {
				got = binary.NativeEndian.Uint32(m.Data)
			}
		}
		return payload, got, true
	}
}

// xfrmStat returns the non-zero counters of ns's /proc/net/xfrm_stat. The
// thread's own view: /proc/net follows the thread-group leader's netns.
func xfrmStat(t *testing.T, ns *testutil.NetNS) map[string]int {
	t.Helper()
	stats := map[string]int{}
	ns.Do(t, func() error {
		b, err := os.ReadFile("/proc/thread-self/net/xfrm_stat")
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) == 2 && f[1] != "0" {
				stats[f[0]], _ = strconv.Atoi(f[1])
			}
		}
		return nil
	})
	return stats
}

// capture records every frame on one device.
type capture struct {
	fd     int
	mu     sync.Mutex
	frames [][]byte
	done   chan struct{}
	quit   chan struct{}
}

func startCapture(t *testing.T, ns *testutil.NetNS, ifindex int) *capture {
	t.Helper()
	c := &capture{done: make(chan struct{}), quit: make(chan struct{})}
	proto := int(htons(unix.ETH_P_ALL))
	ns.Do(t, func() (err error) {
		// The socket stays in the namespace it was made in.
		if c.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto); err != nil {
			return err
		}
		tv := unix.NsecToTimeval(int64(20 * time.Millisecond))
		if err := unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		return unix.Bind(c.fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifindex})
	})
	go func() {
		defer close(c.done)
		buf := make([]byte, 65536)
		for {
			if n, _, err := unix.Recvfrom(c.fd, buf, 0); err == nil {
				c.mu.Lock()
				c.frames = append(c.frames, bytes.Clone(buf[:n]))
				c.mu.Unlock()
				continue
			}
			// Only once the socket is empty: stop keeps what was queued.
			select {
			case <-c.quit:
				return
			default:
			}
		}
	}()
	t.Cleanup(func() { c.stop() })
	return c
}

// stop ends the capture and returns its frames.
func (c *capture) stop() [][]byte {
	select {
	case <-c.quit:
	default:
		close(c.quit)
		<-c.done
		unix.Close(c.fd)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.frames
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// checkWire fails unless frames hold ESP with spi and no other IP packet
// but the kernel's own link control, and none shows payload in clear.
func checkWire(t *testing.T, frames [][]byte, spi uint8, payload []byte) {
	t.Helper()
	esp := 0
	for _, f := range frames {
		if bytes.Contains(f, payload) {
			t.Errorf("the payload in clear on the wire: %x", f)
		}
		p, ok := testutil.ParseIPFrame(f)
		if !ok || p.LinkControl() {
			continue
		}
		switch {
		case p.Proto == unix.IPPROTO_ESP && len(p.Payload) >= 8:
			if got := binary.BigEndian.Uint32(p.Payload); got != uint32(spi) {
				t.Errorf("ESP with SPI %d on the wire, want %d", got, spi)
			}
			esp++
		default:
			t.Errorf("on the wire: %s", p)
		}
	}
	if esp == 0 {
		t.Errorf("no ESP on the wire among %d frames", len(frames))
	}
}

// markESP attaches a tc ingress program to dev in ns that does what the
// datapath does to arriving ESP: it marks it mark, so it finds its IN
// state. It returns a one-entry array whose value holds the mark of the
// last packet with a decrypt mark that was not ESP (a decrypted one, back
// at the device) and how many there were.
func markESP(t *testing.T, ns *testutil.NetNS, dev string, mark uint32) *ebpf.Map {
	t.Helper()
	const (
		skbMark     = 8  // offsetof(struct __sk_buff, mark)
		skbProtocol = 16 // offsetof(struct __sk_buff, protocol)
		ipProto     = 14 + 9
		ip6Next     = 14 + 6
	)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	must(t, err)
	t.Cleanup(func() { m.Close() })
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R2, asm.R6, skbProtocol, asm.Word),
		asm.Mov.Imm(asm.R7, ipProto),
		asm.JEq.Imm(asm.R2, int32(htons(unix.ETH_P_IP)), "load"),
		asm.Mov.Imm(asm.R7, ip6Next),
		asm.JEq.Imm(asm.R2, int32(htons(unix.ETH_P_IPV6)), "load"),
		asm.Ja.Label("other"),
		asm.Mov.Reg(asm.R1, asm.R6).WithSymbol("load"),
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -8),
		asm.Mov.Imm(asm.R4, 1),
		asm.FnSkbLoadBytes.Call(),
		asm.JNE.Imm(asm.R0, 0, "other"),
		asm.LoadMem(asm.R2, asm.RFP, -8, asm.Byte),
		asm.JNE.Imm(asm.R2, unix.IPPROTO_ESP, "other"),
		asm.Mov.Imm32(asm.R2, int32(mark)),
		asm.StoreMem(asm.R6, skbMark, asm.R2, asm.Word),
		asm.Ja.Label("out"),
		asm.LoadMem(asm.R2, asm.R6, skbMark, asm.Word).WithSymbol("other"),
		asm.And.Imm(asm.R2, MarkMagicMask),
		asm.JNE.Imm(asm.R2, MarkDecrypt, "out"),
		asm.StoreImm(asm.RFP, -4, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, m.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "out"),
		asm.LoadMem(asm.R2, asm.R6, skbMark, asm.Word),
		asm.StoreMem(asm.R0, 0, asm.R2, asm.Word),
		asm.Mov.Imm(asm.R2, 1),
		asm.AddAtomic.Mem(asm.R0, asm.R2, asm.Word, 4),
		asm.Mov.Imm(asm.R0, 0).WithSymbol("out"), // TC_ACT_OK
		asm.Return(),
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL", Instructions: insns})
	must(t, err)
	t.Cleanup(func() { prog.Close() })

	h, err := netlink.NewHandleAt(ns.Handle)
	must(t, err)
	defer h.Close()
	l, err := h.LinkByName(dev)
	must(t, err)
	index := l.Attrs().Index
	must(t, h.QdiscAdd(&netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}))
	must(t, h.FilterAdd(&netlink.BpfFilter{
		FilterAttrs:  netlink.FilterAttrs{LinkIndex: index, Parent: netlink.HANDLE_MIN_INGRESS, Handle: 1, Protocol: unix.ETH_P_ALL, Priority: 1},
		Fd:           prog.FD(),
		Name:         "mark_esp",
		DirectAction: true,
	}))
	return m
}
