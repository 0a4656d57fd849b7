// Package icmpecho sends ICMP and ICMPv6 echo requests from inside a network
// namespace and counts the replies: what `ping` does, without the ping
// binary. It needs root (raw sockets).
package icmpecho

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
)

// Options tune Ping. The zero value sends one request and waits a second.
type Options struct {
	Src     netip.Addr    // source address, one the namespace has; the route's when invalid
	Count   int           // echo requests to send, one after the other; 1 when 0
	Timeout time.Duration // how long to wait for each reply; 1s when 0
}

// payloadLen makes requests as long as ping's default: 98-byte IPv4 frames.
const payloadLen = 56

// Echo identifiers of this process: every Ping has its own, because a raw
// socket sees every ICMP packet of its namespace, replies to other Pings
// included.
var (
	idBase = rand.Uint32()
	lastID atomic.Uint32
)

// Ping sends opts.Count echo requests to dst from inside the network
// namespace ns (the caller's when closed) and returns how many replies came
// back from dst, each within opts.Timeout. A request the kernel refuses to
// send counts as unanswered, as a lost one does: a cgroup program's drop,
// for one, shows as EPERM. The error reports what kept Ping from trying:
// no raw socket, or a source address the namespace does not have.
// Equivalent to: `ping -c COUNT -W TIMEOUT -I SRC DST` in the namespace.
func Ping(ns netns.NsHandle, dst netip.Addr, opts Options) (int, error) {
	dst = dst.Unmap()
	if !dst.IsValid() || dst.Zone() != "" {
		return 0, fmt.Errorf("echo to %v: want a valid address without a zone", dst)
	}
	network, reqType, replyType := "ip4:icmp", uint8(packet.ICMPEchoRequest), uint8(packet.ICMPEchoReply)
	if dst.Is6() {
		network, reqType, replyType = "ip6:ipv6-icmp", packet.ICMPv6EchoRequest, packet.ICMPv6EchoReply
	}
	var laddr *net.IPAddr
	if opts.Src.IsValid() {
		if opts.Src.Unmap().Is4() != dst.Is4() {
			return 0, fmt.Errorf("echo to %s from %s: the families differ", dst, opts.Src)
		}
		laddr = &net.IPAddr{IP: opts.Src.Unmap().AsSlice()}
	}
	count, timeout := max(opts.Count, 1), opts.Timeout
	if timeout <= 0 {
		timeout = time.Second
	}

	// The socket stays in the namespace it was made in; only making it
	// needs a thread there.
	var c *net.IPConn
	if err := nsrun.Do(ns, func() (err error) {
		c, err = net.ListenIP(network, laddr)
		return err
	}); err != nil {
		return 0, fmt.Errorf("echo to %s: %w", dst, err)
	}
	defer c.Close()

	id := uint16(idBase + lastID.Add(1))
	to := &net.IPAddr{IP: dst.AsSlice()}
	buf := make([]byte, 1500)
	replies := 0
	for seq := range uint16(count) {
		req := packet.Build(&packet.ICMP{Type: reqType, ID: id, Seq: seq}, packet.Payload(make([]byte, payloadLen)))
		if dst.Is6() {
			// The kernel computes ICMPv6 checksums, pseudo-header
			// included, on raw sockets.
			req[2], req[3] = 0, 0
		}
		if _, err := c.WriteTo(req, to); err != nil {
			continue // unanswered, see above
		}
		if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
			return replies, fmt.Errorf("echo to %s: %w", dst, err)
		}
		for {
			// IPv4 comes with its header, which ReadFrom strips.
			n, from, err := c.ReadFrom(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
			if err != nil {
				return replies, fmt.Errorf("echo to %s: %w", dst, err)
			}
			if isReply(buf[:n], from, dst, replyType, id, seq) {
				replies++
				break
			}
		}
	}
	return replies, nil
}

// isReply reports whether b, from from, is the echo reply of dst to the
// request with id and seq.
func isReply(b []byte, from net.Addr, dst netip.Addr, replyType uint8, id, seq uint16) bool {
	src, ok := from.(*net.IPAddr)
	if !ok || len(b) < 8 || b[0] != replyType || b[1] != 0 {
		return false
	}
	addr, _ := netip.AddrFromSlice(src.IP)
	return addr.Unmap() == dst && binary.BigEndian.Uint16(b[4:6]) == id && binary.BigEndian.Uint16(b[6:8]) == seq
}
