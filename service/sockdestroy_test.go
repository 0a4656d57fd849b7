package service_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/service"
)

// udpSocketsArg is what a "udpsockets" child is asked: from the namespace
// NetNS, a connected UDP socket to each of To (an IPv4-mapped address
// makes an IPv6 socket).
type udpSocketsArg struct {
	NetNS string
	To    []netip.AddrPort
}

// udpSocketsMain connects the sockets and hands them to its parent over
// the Unix socket at fd 3, then exits: a socket belongs to the cgroup of
// the process that made it, whoever holds it after.
func udpSocketsMain(arg string) int {
	var q udpSocketsArg
	if err := json.Unmarshal([]byte(arg), &q); err != nil {
		return 2
	}
	var fds []int
	ns, err := netns.GetFromName(q.NetNS)
	if err == nil {
		err = nsrun.Do(ns, func() error {
			for _, to := range q.To {
				fd, err := connectUDP(to)
				if err != nil {
					return fmt.Errorf("connect to %v: %w", to, err)
				}
				fds = append(fds, fd)
			}
			return nil
		})
	}
	if err == nil {
		err = unix.Sendmsg(3, []byte{1}, unix.UnixRights(fds...), nil, 0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func connectUDP(to netip.AddrPort) (int, error) {
	family := unix.AF_INET6
	var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: to.Addr().As16(), Port: int(to.Port())}
	if to.Addr().Is4() {
		family = unix.AF_INET
		sa = &unix.SockaddrInet4{Addr: to.Addr().As4(), Port: int(to.Port())}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.Connect(fd, sa); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// udpSocketsFrom has a child process in the cgroup connect UDP sockets
// from ep's namespace to each of to, and returns them, closed when the
// test ends.
func udpSocketsFrom(t *testing.T, cgroup, ns string, to ...netip.AddrPort) []*net.UDPConn {
	t.Helper()
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pair[0])
	theirs := os.NewFile(uintptr(pair[1]), "child end")
	defer theirs.Close()

	arg, _ := json.Marshal(udpSocketsArg{NetNS: ns, To: to})
	cmd, err := testutil.Child("udpsockets", string(arg))
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	cmd.ExtraFiles = []*os.File{theirs} // fd 3
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("child: %v: %s", err, out)
	}

	oob := make([]byte, unix.CmsgSpace(4*len(to)))
	_, oobn, _, _, err := unix.Recvmsg(pair[0], make([]byte, 1), oob, unix.MSG_DONTWAIT)
	if err != nil {
		t.Fatalf("receive the sockets: %v", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("receive the sockets: %d messages, %v", len(msgs), err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != len(to) {
		t.Fatalf("received %d sockets, want %d: %v", len(fds), len(to), err)
	}
	conns := make([]*net.UDPConn, len(fds))
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), fmt.Sprint("udp to ", to[i]))
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c.(*net.UDPConn)
		t.Cleanup(func() { c.Close() })
	}
	return conns
}

// askConnected sends a datagram on a connected socket and returns the answer.
func askConnected(c *net.UDPConn) (string, error) {
	c.SetDeadline(time.Now().Add(wait))
	if _, err := c.Write([]byte("hi")); err != nil {
		return "", fmt.Errorf("send: %w", err)
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil {
		return "", fmt.Errorf("receive: %w", err)
	}
	return string(buf[:n]), nil
}

// destroySockets calls DestroySockets as the service package does: with
// the datapath's lock held.
func destroySockets(t *testing.T, dp *datapath.Datapath, targets ...core.SocketTarget) (int, error) {
	t.Helper()
	st := core.Of(dp)
	unlock, err := st.Lock(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	return st.DestroySockets(targets)
}

// TestDestroySockets: a connected UDP socket that the socket programs sent
// to backend A of a frontend is closed when A leaves the service, or the
// service goes, in an endpoint's namespace and in the datapath's: it is
// disconnected, so a send without an address fails with EDESTADDRREQ, and
// its next receive fails with ECONNABORTED. Sockets sent to another
// backend, sent to A for another frontend, or connected to A by address
// are left alone; in IPv4, IPv6 and IPv4-mapped IPv6.
func TestDestroySockets(t *testing.T) {
	cgroup := testutil.Cgroup(t)
	n := newNodeWith(t, datapath.Config{Cgroup: cgroup})
	probe := core.SocketTarget{Frontend: netip.MustParseAddrPort("198.18.200.9:9"), Backend: netip.MustParseAddrPort("198.18.1.12:9")}
	if _, err := destroySockets(t, n.dp, probe); errors.Is(err, ebpf.ErrNotSupported) {
		testutil.RequireSince(t, "bpf_sock_destroy (closing the UDP sockets of removed backends)", 6, 5, err)
	} else if err != nil {
		t.Fatal(err)
	}

	for _, v6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("ipv6=%v", v6), func(t *testing.T) {
			serve(t, n.a, v6, 8080, 8081)
			serve(t, n.b, v6, 8080)
			a := netip.AddrPortFrom(addrOf(n.a, v6), 8080)
			a2 := netip.AddrPortFrom(addrOf(n.a, v6), 8081)
			b := netip.AddrPortFrom(addrOf(n.b, v6), 8080)
			// Frontend one has backends A and B, two has A alone: a
			// socket sent to A for two stays when A leaves one.
			one := netip.AddrPortFrom(frontendAddr(v6), 80)
			two := netip.AddrPortFrom(frontendAddr(v6), 81)
			upsert(t, n.dp, service.Service{
				Frontend: service.Frontend{Addr: one.Addr(), Port: one.Port(), Protocol: service.UDP},
				Backends: []service.Backend{{Addr: a.Addr(), Port: a.Port(), Weight: 1}, {Addr: b.Addr(), Port: b.Port(), Weight: 1}},
				Reach:    service.SocketOnly,
			})
			upsert(t, n.dp, service.Service{
				Frontend: service.Frontend{Addr: two.Addr(), Port: two.Port(), Protocol: service.UDP},
				Backends: []service.Backend{{Addr: a.Addr(), Port: a.Port(), Weight: 1}},
				Reach:    service.SocketOnly,
			})

			// From the client endpoint: to two, to A and another port
			// of A by address, and enough to one (one IPv4-mapped) that
			// both of its backends have some.
			to := []netip.AddrPort{two, a, a2}
			if !v6 {
				to = append(to, netip.AddrPortFrom(netip.AddrFrom16(one.Addr().As16()), one.Port()))
			}
			for range 16 {
				to = append(to, one)
			}
			conns := udpSocketsFrom(t, cgroup, n.client.NetNS, to...)
			// From the datapath's namespace, the node's, to two:
			// translated at connect, though they send nothing (the node
			// has no address the backend could answer).
			node := udpSocketsFrom(t, cgroup, n.ns.Name, two, two)

			answers := make([]string, len(conns))
			oneToA := map[int]bool{} // sent to A for one
			for i, c := range conns {
				got, err := askConnected(c)
				if err != nil {
					t.Fatalf("socket to %v: %v", to[i], err)
				}
				answers[i] = got
				if netip.AddrPortFrom(to[i].Addr().Unmap(), to[i].Port()) == one && got == a.String() {
					oneToA[i] = true
				}
			}
			if answers[0] != a.String() || answers[1] != a.String() || answers[2] != a2.String() {
				t.Fatalf("sockets to %v answered by %q", to[:3], answers[:3])
			}
			if len(oneToA) == 0 || len(oneToA) == len(to)-3 {
				t.Fatalf("%d of the %d sockets to %v went to %v: the test needs some to each backend", len(oneToA), len(to)-3, one, a)
			}

			// Targets that match none of the sockets: A for a frontend it
			// is no backend of, B for two, and a port of A no frontend
			// sent anything to.
			if got, err := destroySockets(t, n.dp,
				core.SocketTarget{Frontend: netip.AddrPortFrom(frontendAddr(v6), 82), Backend: a},
				core.SocketTarget{Frontend: two, Backend: b},
				core.SocketTarget{Frontend: one, Backend: a2},
			); err != nil || got != 0 {
				t.Fatalf("destroyed %d sockets matching no target (%v)", got, err)
			}

			// A leaves one: the Upsert closes the sockets it had there.
			upsert(t, n.dp, service.Service{
				Frontend: service.Frontend{Addr: one.Addr(), Port: one.Port(), Protocol: service.UDP},
				Backends: []service.Backend{{Addr: b.Addr(), Port: b.Port(), Weight: 1}},
				Reach:    service.SocketOnly,
			})
			for i, c := range conns {
				if !oneToA[i] {
					if got, err := askConnected(c); err != nil || got != answers[i] {
						t.Errorf("socket to %v, answered by %s before: now %q, %v", to[i], answers[i], got, err)
					}
					continue
				}
				checkDestroyed(t, c, to[i])
			}
			for _, c := range node {
				if _, err := c.Write([]byte("hi")); err != nil {
					t.Errorf("the node's socket to %v: %v before its backend left", two, err)
				}
			}

			// Two goes, and with it the endpoint's socket and the node's.
			if err := service.Delete(t.Context(), n.dp, service.Frontend{Addr: two.Addr(), Port: two.Port(), Protocol: service.UDP}); err != nil {
				t.Fatal(err)
			}
			checkDestroyed(t, conns[0], two)
			for _, c := range node {
				checkDestroyed(t, c, two)
			}

			// Nothing is closed twice.
			if got, err := destroySockets(t, n.dp, core.SocketTarget{Frontend: one, Backend: a}, core.SocketTarget{Frontend: two, Backend: a}); err != nil || got != 0 {
				t.Errorf("again: destroyed %d, %v; want 0", got, err)
			}
		})
	}
}

// checkDestroyed checks that the connected socket c was destroyed: a send
// finds it disconnected, and the receive after gets the error.
func checkDestroyed(t *testing.T, c *net.UDPConn, to netip.AddrPort) {
	t.Helper()
	c.SetDeadline(time.Now().Add(wait))
	if _, err := c.Write([]byte("hi")); !errors.Is(err, unix.EDESTADDRREQ) {
		t.Errorf("socket to %v: send after destroy: %v, want EDESTADDRREQ", to, err)
	}
	if _, err := c.Read(make([]byte, 64)); !errors.Is(err, unix.ECONNABORTED) {
		t.Errorf("socket to %v: receive after destroy: %v, want ECONNABORTED", to, err)
	}
}
