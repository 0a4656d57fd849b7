package service_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/service"
)

// node is a datapath with a client endpoint and two server endpoints, dual
// stack, in namespaces of their own.
type node struct {
	dp     *datapath.Datapath
	ns     *testutil.NetNS
	client *endpoint.Endpoint
	a, b   *endpoint.Endpoint
}

func newNode(t testing.TB) *node {
	t.Helper()
	return newNodeWith(t, datapath.Config{})
}

// newNodeWith makes a node with cfg's limits and cgroup.
func newNodeWith(t testing.TB, cfg datapath.Config) *node {
	t.Helper()
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	cfg.Name, cfg.NetNS, cfg.BPFFS = "node", ns.Path, testutil.BPFFS(t)
	cfg.Node = datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24"), netip.MustParsePrefix("fd00:1::/64")}}
	if cfg.Limits.Conntrack == 0 {
		cfg.Limits.Conntrack = 4096 // small, quick to make
	}
	dp, err := datapath.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := dp.Unload(); err != nil {
			t.Error(err)
		}
	})
	n := &node{dp: dp, ns: ns}
	for i, ep := range []**endpoint.Endpoint{&n.client, &n.a, &n.b} {
		*ep, err = endpoint.Create(context.Background(), dp, endpoint.Spec{
			ID:       uint16(i + 1),
			IPv4:     netip.AddrFrom4([4]byte{198, 18, 1, byte(11 + i)}),
			IPv6:     netip.MustParseAddr(fmt.Sprintf("fd00:1::%x", 0x11+i)),
			Identity: datapath.Identity(1001 + i),
			NetNS:    testutil.Name("sluice-t-"),
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// inNS runs fn in the endpoint's namespace.
func inNS(ep *endpoint.Endpoint, fn func() error) error {
	h, err := netns.GetFromName(ep.NetNS)
	if err != nil {
		return err
	}
	defer h.Close()
	return nsrun.Do(h, fn)
}

func addrOf(ep *endpoint.Endpoint, v6 bool) netip.Addr {
	if v6 {
		return ep.IPv6
	}
	return ep.IPv4
}

// Frontends in the tests.
var (
	fe4 = netip.MustParseAddr("198.18.200.1")
	fe6 = netip.MustParseAddr("fd00:200::1")
)

func frontendAddr(v6 bool) netip.Addr {
	if v6 {
		return fe6
	}
	return fe4
}

// servers is a set of echo servers: each answers with "<its address:port>".
type servers struct {
	closers []func()
}

func (s *servers) close() {
	for _, c := range s.closers {
		c()
	}
}

// serve starts TCP and UDP echo servers on the endpoint's address at the
// given ports; each answers a message with the address and port it was
// reached at.
func serve(t testing.TB, ep *endpoint.Endpoint, v6 bool, ports ...uint16) *servers {
	t.Helper()
	s := &servers{}
	t.Cleanup(s.close)
	for _, port := range ports {
		ap := netip.AddrPortFrom(addrOf(ep, v6), port)
		var (
			ln net.Listener
			pc net.PacketConn
		)
		if err := inNS(ep, func() (err error) {
			if ln, err = net.Listen("tcp", ap.String()); err != nil {
				return err
			}
			pc, err = net.ListenPacket("udp", ap.String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		s.closers = append(s.closers, func() { ln.Close(); pc.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					buf := make([]byte, 64)
					for {
						if _, err := c.Read(buf); err != nil {
							return
						}
						if _, err := c.Write([]byte(ap.String())); err != nil {
							return
						}
					}
				}()
			}
		}()
		go func() {
			buf := make([]byte, 64)
			for {
				_, peer, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo([]byte(ap.String()), peer)
			}
		}()
	}
	return s
}

const wait = 5 * time.Second

// askUDP sends a datagram from the endpoint (from local port sport, any
// when 0) to dst and returns the answer and the address it came from.
func askUDP(ep *endpoint.Endpoint, sport uint16, dst netip.AddrPort, timeout time.Duration) (answer string, from netip.AddrPort, err error) {
	err = inNS(ep, func() (err error) {
		answer, from, err = sendUDP(sport, dst, timeout)
		return err
	})
	return answer, from, err
}

// sendUDP is askUDP in the calling thread's namespace.
func sendUDP(sport uint16, dst netip.AddrPort, timeout time.Duration) (answer string, from netip.AddrPort, err error) {
	err = func() error {
		laddr := &net.UDPAddr{Port: int(sport)}
		c, err := net.ListenUDP("udp", laddr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		if _, err := c.WriteToUDPAddrPort([]byte("hi"), dst); err != nil {
			return err
		}
		buf := make([]byte, 64)
		n, src, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return err
		}
		answer, from = string(buf[:n]), netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		return nil
	}()
	return answer, from, err
}

// askTCP connects from the endpoint to dst and returns the answer and the
// peer the connection has.
func askTCP(ep *endpoint.Endpoint, dst netip.AddrPort, timeout time.Duration) (answer string, peer netip.AddrPort, err error) {
	err = inNS(ep, func() (err error) {
		answer, peer, err = dialTCP(dst, timeout)
		return err
	})
	return answer, peer, err
}

// dialTCP is askTCP in the calling thread's namespace.
func dialTCP(dst netip.AddrPort, timeout time.Duration) (answer string, peer netip.AddrPort, err error) {
	err = func() error {
		c, err := net.DialTimeout("tcp", dst.String(), timeout)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		if _, err := c.Write([]byte("hi")); err != nil {
			return err
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		answer = string(buf[:n])
		peer = c.RemoteAddr().(*net.TCPAddr).AddrPort()
		peer = netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port())
		return nil
	}()
	return answer, peer, err
}

func isNotFound(err error) bool { return errors.Is(err, datapath.ErrNotFound) }

func backends(ep *endpoint.Endpoint, v6 bool, ports ...uint16) []service.Backend {
	var out []service.Backend
	for _, p := range ports {
		out = append(out, service.Backend{Addr: addrOf(ep, v6), Port: p, Weight: 1})
	}
	return out
}

func upsert(t testing.TB, dp *datapath.Datapath, svc service.Service) {
	t.Helper()
	if _, err := service.Upsert(context.Background(), dp, svc); err != nil {
		t.Fatal(err)
	}
}

// TestTranslateTC sends TCP and UDP, IPv4 and IPv6, from an endpoint to a
// frontend translated per packet: the backend answers, and the answer comes
// from the frontend.
func TestTranslateTC(t *testing.T) {
	n := newNode(t)
	for _, v6 := range []bool{false, true} {
		fe := netip.AddrPortFrom(frontendAddr(v6), 80)
		serve(t, n.a, v6, 8080)
		want := netip.AddrPortFrom(addrOf(n.a, v6), 8080).String()
		for _, proto := range []service.Protocol{service.TCP, service.UDP} {
			t.Run(fmt.Sprintf("ipv6=%v/%v", v6, proto), func(t *testing.T) {
				upsert(t, n.dp, service.Service{
					Frontend: service.Frontend{Addr: fe.Addr(), Port: fe.Port(), Protocol: proto},
					Backends: backends(n.a, v6, 8080),
					Reach:    service.TCOnly,
				})
				var (
					answer string
					from   netip.AddrPort
					err    error
				)
				if proto == service.TCP {
					answer, from, err = askTCP(n.client, fe, wait)
				} else {
					answer, from, err = askUDP(n.client, 0, fe, wait)
				}
				if err != nil {
					t.Fatal(err)
				}
				if answer != want || from != fe {
					t.Errorf("answer %q from %v; want %q from %v", answer, from, want, fe)
				}
			})
		}
	}
}

// TestNoBackend: a frontend whose backends take no new flows drops them
// with NO_BACKEND.
func TestNoBackend(t *testing.T) {
	n := newNode(t)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.UDP}
	b := backends(n.a, false, 8080)
	b[0].State = service.Terminating
	upsert(t, n.dp, service.Service{Frontend: fe, Backends: b, Reach: service.TCOnly})
	before := dropped(t, n.dp, datapath.ReasonNoBackend)
	if _, _, err := askUDP(n.client, 0, netip.AddrPortFrom(fe.Addr, fe.Port), 300*time.Millisecond); err == nil {
		t.Fatal("a frontend with no active backend answered")
	}
	if after := dropped(t, n.dp, datapath.ReasonNoBackend); after <= before {
		t.Errorf("NO_BACKEND drops %d, then %d", before, after)
	}
}

// TestNoBackendReject: a frontend that rejects answers a new flow no
// backend takes with a port unreachable, so TCP connect and a connected
// UDP socket's read fail at once, and counts it as a NO_BACKEND drop.
func TestNoBackendReject(t *testing.T) {
	n := newNode(t)
	for _, v6 := range []bool{false, true} {
		for _, proto := range []service.Protocol{service.TCP, service.UDP} {
			t.Run(fmt.Sprintf("ipv6=%v/%v", v6, proto), func(t *testing.T) {
				fe := service.Frontend{Addr: frontendAddr(v6), Port: 80, Protocol: proto}
				upsert(t, n.dp, service.Service{Frontend: fe, Backends: []service.Backend{}, Reach: service.TCOnly, NoBackend: service.Reject})
				before := dropped(t, n.dp, datapath.ReasonNoBackend)
				start := time.Now()
				err := inNS(n.client, func() error {
					c, err := net.DialTimeout(strings.ToLower(proto.String()), netip.AddrPortFrom(fe.Addr, fe.Port).String(), wait)
					if err != nil {
						return err
					}
					defer c.Close()
					return exchange(c)
				})
				if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) > wait/2 {
					t.Errorf("after %v: %v, want ECONNREFUSED at once", time.Since(start), err)
				}
				if after := dropped(t, n.dp, datapath.ReasonNoBackend); after <= before {
					t.Errorf("NO_BACKEND drops %d, then %d", before, after)
				}
			})
		}
	}
}

func dropped(t testing.TB, dp *datapath.Datapath, reason datapath.Reason) uint64 {
	t.Helper()
	m, err := dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	var sum uint64
	for k, v := range m {
		if k.Reason == reason {
			sum += v.Packets
		}
	}
	return sum
}

// portOf is the port in an echo server's answer.
func portOf(t testing.TB, answer string) uint16 {
	t.Helper()
	i := strings.LastIndexByte(answer, ':')
	p, err := strconv.Atoi(answer[i+1:])
	if err != nil {
		t.Fatalf("answer %q", answer)
	}
	return uint16(p)
}

// parallel runs fn for 0..n-1 on a few goroutines.
func parallel(n int, fn func(i int)) {
	var wg sync.WaitGroup
	next := make(chan int)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				fn(i)
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}

// TestICMPErrorTranslated: an ICMP port unreachable from a backend about a
// translated flow reaches the client's connected socket as about the
// frontend: the socket reports the connection refused.
func TestICMPErrorTranslated(t *testing.T) {
	n := newNode(t)
	for _, v6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipv6=%v", v6), func(t *testing.T) {
			fe := service.Frontend{Addr: frontendAddr(v6), Port: 80, Protocol: service.UDP}
			upsert(t, n.dp, service.Service{Frontend: fe, Backends: backends(n.a, v6, 8099), Reach: service.TCOnly}) // nothing listens
			err := inNS(n.client, func() error {
				c, err := net.Dial("udp", netip.AddrPortFrom(fe.Addr, fe.Port).String())
				if err != nil {
					return err
				}
				defer c.Close()
				return exchange(c)
			})
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("read from a frontend whose backend has no listener: %v, want ECONNREFUSED", err)
			}
		})
	}
}

// exchange writes a message on c and reads an answer: the error says why
// none came (ECONNREFUSED for a refusal).
func exchange(c net.Conn) error {
	c.SetDeadline(time.Now().Add(wait))
	if _, err := c.Write([]byte("hi")); err != nil {
		return err
	}
	_, err := c.Read(make([]byte, 8))
	return err
}

// A UDP socket whose datagrams carry an IPv6 extension header sees the
// refusal too: the port unreachable quotes the datagram past the header,
// to its ports.
func TestNoBackendRejectBehindExtensionHeader(t *testing.T) {
	n := newNode(t)
	fe := service.Frontend{Addr: fe6, Port: 80, Protocol: service.UDP}
	upsert(t, n.dp, service.Service{Frontend: fe, Backends: []service.Backend{}, Reach: service.TCOnly, NoBackend: service.Reject})
	err := inNS(n.client, func() error {
		c, err := net.Dial("udp", netip.AddrPortFrom(fe.Addr, fe.Port).String())
		if err != nil {
			return err
		}
		defer c.Close()
		raw, err := c.(*net.UDPConn).SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		// A destination options header of 8 bytes: PadN of 4.
		raw.Control(func(fd uintptr) {
			serr = unix.SetsockoptString(int(fd), unix.IPPROTO_IPV6, unix.IPV6_DSTOPTS, string([]byte{0, 0, 1, 4, 0, 0, 0, 0}))
		})
		if serr != nil {
			return serr
		}
		return exchange(c)
	})
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("%v, want ECONNREFUSED", err)
	}
}
