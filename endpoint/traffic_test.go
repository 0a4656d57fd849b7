package endpoint_test

import (
	"context"
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/testutil"
)

// udpFrame is a UDP datagram from a to to:9 as a frame of exactly size bytes.
func udpFrame(a *endpoint.Endpoint, to netip.Addr, size int) []byte {
	eth := &packet.Ethernet{Src: a.MAC, Dst: a.HostMAC}
	if to.Is4() {
		return packet.Build(eth, &packet.IPv4{Src: a.IPv4, Dst: to}, &packet.UDP{SrcPort: 1000, DstPort: 9},
			packet.Payload(make([]byte, size-14-20-8)))
	}
	return packet.Build(eth, &packet.IPv6{Src: a.IPv6, Dst: to}, &packet.UDP{SrcPort: 1000, DstPort: 9},
		packet.Payload(make([]byte, size-14-40-8)))
}

// Frames whose headers are not in the linear area of the packet (a raw
// socket keeps only the Ethernet header there for frames above a page) are
// pulled, checked and delivered like any other.
func TestLargeFrames(t *testing.T) {
	n := newNode(t)
	sa, sb := spec(1), spec(2)
	sa.MTU, sb.MTU = 9000, 9000
	a, b := n.create(t, sa), n.create(t, sb)
	wa, wb := testutil.OpenNetNS(t, a.NetNS), testutil.OpenNetNS(t, b.NetNS)
	for _, to := range []netip.Addr{b.IPv4, b.IPv6} {
		sizes := []int{1500, 4100, 6000, 9014}
		rx := wb.ListenUDP(t, netip.AddrPortFrom(to, 9))
		for _, size := range sizes {
			wa.SendFrames(t, "eth0", udpFrame(a, to, size))
		}
		got := testutil.Receive(rx, len(sizes), 2*time.Second)
		var want []int
		for _, size := range sizes {
			want = append(want, size-14-8-map[bool]int{true: 20, false: 40}[to.Is4()])
		}
		if !slices.Equal(got, want) {
			t.Errorf("to %s: received datagrams of %v bytes, want %v", to, got, want)
		}
	}
}

// metric returns the packets counted for a reason and direction.
func metric(t testing.TB, dp *datapath.Datapath, r datapath.Reason, d datapath.Direction) uint64 {
	t.Helper()
	m, err := dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return m[datapath.MetricKey{Reason: r, Direction: d}].Packets
}

// A VLAN-tagged frame from a workload is dropped. The kernel takes the tag
// off into the packet's metadata before tc runs, and bpf_redirect_peer
// would carry it into the destination's namespace.
func TestVLANFromEndpoint(t *testing.T) {
	n := newNode(t)
	a, b := n.create(t, spec(1)), n.create(t, spec(2))
	wa := testutil.OpenNetNS(t, a.NetNS)
	rx := testutil.OpenNetNS(t, b.NetNS).ListenUDP(t, netip.AddrPortFrom(b.IPv4, 9))
	before := metric(t, n.dp, datapath.ReasonVLANTagged, datapath.Egress)

	untagged := udpFrame(a, b.IPv4, 100)
	tagged := slices.Concat(untagged[:12], []byte{0x81, 0x00, 0, 100}, untagged[12:])
	wa.SendFrames(t, "eth0", tagged, untagged)
	if got := testutil.Receive(rx, 2, 500*time.Millisecond); len(got) != 1 {
		t.Errorf("received %d datagrams, want the untagged one", len(got))
	}
	if got := metric(t, n.dp, datapath.ReasonVLANTagged, datapath.Egress); got != before+1 {
		t.Errorf("VLAN_TAGGED counted %d, want %d", got, before+1)
	}
}

// When a workload's namespace is deleted behind sluice's back, its veth pair
// goes with it; packets to it are dropped as REDIRECT_FAILED instead of
// being counted as delivered.
func TestDestinationGone(t *testing.T) {
	n := newNode(t)
	a, b := n.create(t, spec(1)), n.create(t, spec(2))
	if err := netns.DeleteNamed(b.NetNS); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := netdev.Get(n.ns.Handle, b.HostIfName)
		if errors.Is(err, unix.ENODEV) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still exists 10s after its peer's namespace was deleted", b.HostIfName)
		}
		time.Sleep(20 * time.Millisecond)
	}
	before, err := endpoint.ReadCounters(n.dp, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	failed := metric(t, n.dp, datapath.ReasonRedirectFailed, datapath.Ingress)
	testutil.OpenNetNS(t, a.NetNS).SendFrames(t, "eth0", udpFrame(a, b.IPv4, 100), udpFrame(a, b.IPv6, 100))
	if got := metric(t, n.dp, datapath.ReasonRedirectFailed, datapath.Ingress); got != failed+2 {
		t.Errorf("REDIRECT_FAILED counted %d, want %d", got, failed+2)
	}
	if after, _ := endpoint.ReadCounters(n.dp, b.ID); after.PacketsIn != before.PacketsIn {
		t.Errorf("packets in went from %d to %d with the destination gone", before.PacketsIn, after.PacketsIn)
	}
}

// Create attaches the program before the host end comes up, so nothing the
// workload sends reaches the host unchecked. Legacy tc mode announces the
// filter on netlink, so the order of the two can be watched.
func TestCreateAttachesBeforeUp(t *testing.T) {
	dp, ns := openLegacy(t)
	t.Cleanup(func() { dp.Unload() })

	var sock int
	ns.Do(t, func() (err error) {
		sock, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		return unix.Bind(sock, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: unix.RTMGRP_LINK | unix.RTMGRP_TC})
	})
	defer unix.Close(sock)

	ep, err := endpoint.Create(context.Background(), dp, spec(1))
	if err != nil {
		t.Fatal(err)
	}
	defer endpoint.Delete(context.Background(), dp, ep.ID)

	var seen []string // in order: "up", "filter"
	tv := unix.NsecToTimeval(int64(200 * time.Millisecond))
	unix.SetsockoptTimeval(sock, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	buf := make([]byte, 1<<16)
	for {
		nr, _, err := unix.Recvfrom(sock, buf, 0)
		if err != nil {
			break // nothing more within the timeout
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:nr])
		if err != nil {
			t.Fatal(err)
		}
		// ifinfomsg and tcmsg both have the interface index at bytes
		// 4-7; ifinfomsg has its flags at 8-11.
		for _, m := range msgs {
			if len(m.Data) < 12 || int(int32(binary.NativeEndian.Uint32(m.Data[4:8]))) != ep.HostIfindex {
				continue
			}
			switch m.Header.Type {
			case unix.RTM_NEWLINK:
				if binary.NativeEndian.Uint32(m.Data[8:12])&unix.IFF_UP != 0 {
					seen = append(seen, "up")
				}
			case unix.RTM_NEWTFILTER:
				seen = append(seen, "filter")
			}
		}
	}
	up, filter := slices.Index(seen, "up"), slices.Index(seen, "filter")
	if up < 0 || filter < 0 || filter > up {
		t.Errorf("netlink announced %v for %s: want the filter before the interface comes up", seen, ep.HostIfName)
	}
}
