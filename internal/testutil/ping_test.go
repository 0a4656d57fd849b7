package testutil

import (
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/sluicedp/sluice/internal/icmpecho"
)

func TestPing(t *testing.T) {
	Privileged(t)
	p := NewPair(t)
	absent4, absent6 := netip.MustParseAddr("198.18.0.9"), netip.MustParseAddr("fd00::9")
	quick := 200 * time.Millisecond

	// Concurrent Pings in one namespace each count their own replies: a
	// raw socket sees them all. A's own address loops back, so A's
	// sockets see the requests too.
	var wg sync.WaitGroup
	for _, tc := range []struct {
		dst  netip.Addr
		opts PingOptions
		want int
	}{
		{p.IPB, PingOptions{Count: 3}, 3},
		{p.IP6B, PingOptions{Count: 3}, 3},
		{p.IPA, PingOptions{Count: 2}, 2},
		{p.IP6A, PingOptions{Count: 2}, 2},
		{netip.MustParseAddr("::ffff:198.18.0.2"), PingOptions{}, 1},
		{absent4, PingOptions{Count: 2, Timeout: quick}, 0},
		{absent6, PingOptions{Count: 2, Timeout: quick}, 0},
		{netip.MustParseAddr("198.19.0.1"), PingOptions{Timeout: quick}, 0}, // no route
	} {
		wg.Go(func() {
			if got := Ping(t, p.A.Handle, tc.dst, tc.opts); got != tc.want {
				t.Errorf("ping %s %+v: %d replies, want %d", tc.dst, tc.opts, got, tc.want)
			}
		})
	}
	wg.Wait()

	// A second address on A's device, as a workload claiming one.
	p.A.AddAddr(t, "veth0", "198.18.0.99/32")
	if got := Ping(t, p.A.Handle, p.IPB, PingOptions{Src: netip.MustParseAddr("198.18.0.99")}); got != 1 {
		t.Errorf("ping from a second address: %d replies, want 1", got)
	}
	if !p.Ping(1) {
		t.Error("Pair.Ping got no reply")
	}

	// With A ignoring echo requests, pings of its own addresses meet only
	// the requests: no reply.
	p.A.Do(t, func() error {
		for _, f := range []string{"/proc/sys/net/ipv4/icmp_echo_ignore_all", "/proc/sys/net/ipv6/icmp/echo_ignore_all"} {
			if err := os.WriteFile(f, []byte("1"), 0); err != nil {
				return err
			}
		}
		return nil
	})
	for _, dst := range []netip.Addr{p.IPA, p.IP6A} {
		if got := Ping(t, p.A.Handle, dst, PingOptions{Timeout: quick}); got != 0 {
			t.Errorf("ping %s, which ignores echo requests: %d replies", dst, got)
		}
	}

	// Failures to send at all are errors, not unanswered requests.
	for _, opts := range []PingOptions{{Src: absent4}, {Src: p.IP6A}} {
		if n, err := icmpecho.Ping(p.A.Handle, p.IPB, opts); err == nil {
			t.Errorf("ping from %s: %d replies and no error", opts.Src, n)
		}
	}
}
