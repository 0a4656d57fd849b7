package testutil

import (
	"net/netip"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/internal/icmpecho"
)

// PingOptions set the source address, the number of echo requests and how
// long Ping waits for each reply; the zero value sends one and waits a
// second.
type PingOptions = icmpecho.Options

// Ping sends ICMP or ICMPv6 echo requests (by dst's family) from inside the
// network namespace ns to dst and returns how many replies came back, as
// `ping -c COUNT -W TIMEOUT -I SRC DST` would in the namespace, but without
// the ping binary. A request the kernel refuses to send counts as
// unanswered. When Ping cannot try at all (no raw socket, a source address
// the namespace lacks), it fails the test and returns 0; with t.Errorf, so
// any goroutine may call it.
func Ping(t testing.TB, ns netns.NsHandle, dst netip.Addr, opts PingOptions) int {
	t.Helper()
	n, err := icmpecho.Ping(ns, dst, opts)
	if err != nil {
		t.Errorf("ping: %v", err)
	}
	return n
}
