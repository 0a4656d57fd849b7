package main

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
)

const (
	xdpDrop = 1
	xdpPass = 2
)

var (
	macA    = net.HardwareAddr{2, 0, 0, 0, 0, 1}
	blocked = netip.MustParseAddr("198.18.0.9")
	allowed = netip.MustParseAddr("198.18.0.2")
)

func arpFrame(op uint16, target netip.Addr) []byte {
	return packet.Build(
		&packet.Ethernet{Src: macA, Dst: net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
		&packet.ARP{Op: op, SenderMAC: macA, SenderIP: netip.MustParseAddr("198.18.0.1"), TargetIP: target},
	)
}

func TestProgram(t *testing.T) {
	testutil.Privileged(t)
	bl, err := loadBlacklist([]netip.Addr{blocked})
	if err != nil {
		t.Fatal(err)
	}
	defer bl.Close()

	ipv4 := packet.Build(&packet.Ethernet{Src: macA}, &packet.IPv4{Src: allowed, Dst: blocked}, &packet.UDP{SrcPort: 1, DstPort: 2})
	for _, tc := range []struct {
		name  string
		frame []byte
		want  uint32
	}{
		{"request for blocked", arpFrame(1, blocked), xdpDrop},
		{"reply about blocked", arpFrame(2, blocked), xdpDrop},
		{"request for allowed", arpFrame(1, allowed), xdpPass},
		{"IPv4 to blocked", ipv4, xdpPass},
		{"truncated ARP", arpFrame(1, blocked)[:14+20], xdpPass},
		{"bare Ethernet header", arpFrame(1, blocked)[:14], xdpPass},
	} {
		r, err := progtest.Run(bl.objs.ArpBlacklist, tc.frame, nil)
		if err != nil {
			t.Fatal(err)
		}
		if r.Verdict != tc.want {
			t.Errorf("%s: verdict %d, want %d", tc.name, r.Verdict, tc.want)
		}
	}
	drops, err := bl.drops()
	if err != nil {
		t.Fatal(err)
	}
	if drops[blocked] != 2 {
		t.Errorf("drop counter for %s = %d, want 2", blocked, drops[blocked])
	}
	passed, dropped, err := bl.totals()
	if err != nil || passed != 4 || dropped != 2 {
		t.Errorf("totals: passed %d dropped %d (%v), want 4 and 2", passed, dropped, err)
	}
}

// ARP across two namespaces: the blacklisted address gets no answer, the
// other does, and the counter matches the requests sent.
func TestRealARP(t *testing.T) {
	testutil.Privileged(t)
	p := testutil.NewPair(t)
	p.B.AddAddr(t, "veth1", blocked.String()+"/24")
	bl, err := attachBlacklist(p.B.Handle, "veth1", []netip.Addr{blocked})
	if err != nil {
		t.Fatal(err)
	}
	defer bl.Close()

	ask := func(target netip.Addr) error {
		return nsrun.Do(p.A.Handle, func() error {
			_, err := arping("veth0", p.IPA, target, 300*time.Millisecond)
			return err
		})
	}
	const n = 3
	for range n {
		if err := ask(allowed); err != nil {
			t.Errorf("ARP for %s: %v", allowed, err)
		}
		if err := ask(blocked); !errors.Is(err, errNoReply) {
			t.Errorf("ARP for blacklisted %s: %v, want no reply", blocked, err)
		}
	}
	drops, err := bl.drops()
	if err != nil {
		t.Fatal(err)
	}
	if drops[blocked] != n {
		t.Errorf("drop counter %d, want %d", drops[blocked], n)
	}
}

func TestParseAddrs(t *testing.T) {
	got, err := parseAddrs(" 198.18.0.9, 198.18.0.10 ,")
	if err != nil || len(got) != 2 {
		t.Errorf("parseAddrs = %v, %v", got, err)
	}
	for _, bad := range []string{"fd00::1", "198.18.0", "x"} {
		if _, err := parseAddrs(bad); err == nil {
			t.Errorf("parseAddrs(%q) accepted", bad)
		}
	}
}
