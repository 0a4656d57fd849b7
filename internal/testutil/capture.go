package testutil

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/netdev"
)

// Capture records every frame a device sends and receives, as tcpdump
// would, until Stop.
type Capture struct {
	fd     int
	mu     sync.Mutex
	frames [][]byte
	stop   chan struct{}
	done   chan struct{}
}

// StartCapture starts recording the frames of device dev of ns (an
// AF_PACKET socket, made inside ns, bound to the device). The test's end
// stops it, if Stop has not.
func (n *NetNS) StartCapture(t testing.TB, dev string) *Capture {
	t.Helper()
	l, err := netdev.Get(n.Handle, dev)
	if err != nil {
		t.Fatal(err)
	}
	c := &Capture{fd: -1, stop: make(chan struct{}), done: make(chan struct{})}
	all := int(htons(unix.ETH_P_ALL))
	n.Do(t, func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, all)
		if err != nil {
			return fmt.Errorf("capture socket: %w", err)
		}
		c.fd = fd
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(all), Ifindex: l.Index}); err != nil {
			return fmt.Errorf("bind the capture to %s: %w", dev, err)
		}
		tv := unix.NsecToTimeval(int64(20 * time.Millisecond))
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	})
	go c.run()
	t.Cleanup(func() { c.Stop() })
	return c
}

func (c *Capture) run() {
	defer close(c.done)
	defer unix.Close(c.fd)
	buf := make([]byte, 65536)
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		n, _, err := unix.Recvfrom(c.fd, buf, unix.MSG_TRUNC)
		if err != nil || n > len(buf) {
			continue
		}
		c.mu.Lock()
		c.frames = append(c.frames, append([]byte(nil), buf[:n]...))
		c.mu.Unlock()
	}
}

// Stop ends the capture and returns the frames, oldest first.
func (c *Capture) Stop() [][]byte {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.frames
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// IPFrame is what an Ethernet frame holds when it is IPv4 or IPv6: its
// addresses, its protocol (after IPv6 extension headers it does not
// parse: the first next header) and the payload past the IP header.
type IPFrame struct {
	Src, Dst netip.Addr
	Proto    uint8
	Payload  []byte
}

// ParseIPFrame parses an Ethernet frame's IP header; false for a frame
// of another EtherType or too short.
func ParseIPFrame(f []byte) (IPFrame, bool) {
	if len(f) < 14 {
		return IPFrame{}, false
	}
	ip := f[14:]
	switch binary.BigEndian.Uint16(f[12:14]) {
	case unix.ETH_P_IP:
		if len(ip) < 20 || int(ip[0]&0xf)*4 > len(ip) {
			return IPFrame{}, false
		}
		return IPFrame{
			Src: netip.AddrFrom4([4]byte(ip[12:16])), Dst: netip.AddrFrom4([4]byte(ip[16:20])),
			Proto: ip[9], Payload: ip[int(ip[0]&0xf)*4:],
		}, true
	case unix.ETH_P_IPV6:
		if len(ip) < 40 {
			return IPFrame{}, false
		}
		return IPFrame{
			Src: netip.AddrFrom16([16]byte(ip[8:24])), Dst: netip.AddrFrom16([16]byte(ip[24:40])),
			Proto: ip[6], Payload: ip[40:],
		}, true
	}
	return IPFrame{}, false
}

// LinkControl reports a frame the kernel sends on its own whenever an
// interface comes up: IPv6 neighbour discovery and multicast listener
// reports (to a multicast group, or ICMPv6 types 133 to 137). Captures
// that check what a test put on the wire skip them.
func (p IPFrame) LinkControl() bool {
	if p.Dst.IsMulticast() {
		return true
	}
	return p.Proto == unix.IPPROTO_ICMPV6 && len(p.Payload) > 0 && p.Payload[0] >= 133 && p.Payload[0] <= 137
}

func (p IPFrame) String() string {
	switch {
	case p.Proto == unix.IPPROTO_ESP && len(p.Payload) >= 8:
		return fmt.Sprintf("%s > %s ESP spi %d seq %d", p.Src, p.Dst, binary.BigEndian.Uint32(p.Payload), binary.BigEndian.Uint32(p.Payload[4:]))
	case (p.Proto == unix.IPPROTO_UDP || p.Proto == unix.IPPROTO_TCP) && len(p.Payload) >= 4:
		return fmt.Sprintf("%s > %s proto %d ports %d > %d", p.Src, p.Dst, p.Proto,
			binary.BigEndian.Uint16(p.Payload), binary.BigEndian.Uint16(p.Payload[2:]))
	}
	return fmt.Sprintf("%s > %s proto %d", p.Src, p.Dst, p.Proto)
}
