package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/packet"
)

var errNoReply = errors.New("no ARP reply")

// arping sends one ARP request for target out of the interface ifname and
// waits up to timeout for the reply, like `arping -c 1 -I IFNAME TARGET`.
// It returns the MAC address that answered. Run it inside the namespace of
// ifname.
func arping(ifname string, sender, target netip.Addr, timeout time.Duration) (net.HardwareAddr, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, err
	}
	proto := htons(unix.ETH_P_ARP)
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(proto))
	if err != nil {
		return nil, fmt.Errorf("packet socket: %w", err)
	}
	defer unix.Close(fd)
	addr := &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index}
	if err := unix.Bind(fd, addr); err != nil {
		return nil, fmt.Errorf("bind to %s: %w", ifname, err)
	}
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, err
	}

	broadcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	req := packet.Build(
		&packet.Ethernet{Src: ifi.HardwareAddr, Dst: broadcast},
		&packet.ARP{Op: 1, SenderMAC: ifi.HardwareAddr, SenderIP: sender, TargetIP: target},
	)
	if err := unix.Sendto(fd, req, 0, addr); err != nil {
		return nil, fmt.Errorf("send ARP request: %w", err)
	}

	deadline := time.Now().Add(timeout)
	buf := make([]byte, 128)
	for time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("receive: %w", err)
		}
		// An ARP reply (op 2) from target: sender protocol address at 28.
		if n >= 42 && buf[21] == 2 && netip.AddrFrom4([4]byte(buf[28:32])) == target {
			return net.HardwareAddr(append([]byte(nil), buf[22:28]...)), nil
		}
	}
	return nil, fmt.Errorf("%s: %w", target, errNoReply)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
