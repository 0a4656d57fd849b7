package testutil

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// SendFrames sends whole Ethernet frames out of device ifname of the
// namespace, as they are (a packet socket: no routing, no checks), and fails
// the test on error.
func (n *NetNS) SendFrames(t testing.TB, ifname string, frames ...[]byte) {
	t.Helper()
	n.Do(t, func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		defer unix.Close(fd)
		to := &unix.SockaddrLinklayer{Ifindex: ifi.Index}
		for _, f := range frames {
			if err := unix.Sendto(fd, f, 0, to); err != nil {
				return fmt.Errorf("send a %d-byte frame on %s: %w", len(f), ifname, err)
			}
		}
		return nil
	})
}

// ListenUDP opens a UDP socket on addr (address and port) inside the
// namespace; it is closed when the test ends.
func (n *NetNS) ListenUDP(t testing.TB, addr netip.AddrPort) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	n.Do(t, func() (err error) {
		// The socket stays in the namespace it was made in.
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		return err
	})
	t.Cleanup(func() { c.Close() })
	return c
}

// Receive reads datagrams from c until it has want of them or none comes
// for wait, and returns their lengths.
func Receive(c *net.UDPConn, want int, wait time.Duration) []int {
	var lens []int
	buf := make([]byte, 65536)
	for len(lens) < want {
		c.SetReadDeadline(time.Now().Add(wait))
		n, err := c.Read(buf)
		if err != nil {
			break
		}
		lens = append(lens, n)
	}
	return lens
}

// EchoUDP sends every datagram that reaches addr inside the namespace back
// to where it came from, whole, until the test ends.
func (n *NetNS) EchoUDP(t testing.TB, addr netip.AddrPort) {
	t.Helper()
	c := n.ListenUDP(t, addr)
	go func() {
		buf := make([]byte, 65536)
		for {
			k, peer, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort(buf[:k], peer)
		}
	}()
}
