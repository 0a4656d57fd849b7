package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
)

// Demo addresses, from the benchmarking range that never leaves the machine.
var (
	demoClient  = netip.MustParsePrefix("198.18.0.1/24")
	demoServer  = netip.MustParsePrefix("198.18.0.2/24")
	demoBlocked = netip.MustParsePrefix("198.18.0.9/24") // also the server's
)

// runDemo makes two namespaces joined by a veth pair, blacklists one of the
// server's two addresses on its side, asks for both with ARP from the client
// side, prints what happened, and removes everything it made.
func runDemo(ctx context.Context) (err error) {
	suffix := fmt.Sprintf("%d", os.Getpid())
	client, server := "sluice-demo-client-"+suffix, "sluice-demo-server-"+suffix
	var nsC, nsS netns.NsHandle
	if nsC, err = nsrun.New(client); err != nil {
		return err
	}
	defer removeNS(client, nsC, &err)
	if nsS, err = nsrun.New(server); err != nil {
		return err
	}
	defer removeNS(server, nsS, &err)

	if _, _, err := netdev.Veth(netdev.VethPair{NS: nsC, Name: "veth0", PeerNS: nsS, PeerName: "veth1"}); err != nil {
		return err
	}
	for _, a := range []struct {
		ns  netns.NsHandle
		dev string
		p   netip.Prefix
	}{{nsC, "veth0", demoClient}, {nsS, "veth1", demoServer}, {nsS, "veth1", demoBlocked}} {
		if err := netdev.AddAddr(a.ns, a.dev, a.p); err != nil {
			return err
		}
	}
	fmt.Printf("namespaces %s (%s) and %s (%s, %s), joined by a veth pair\n",
		client, demoClient.Addr(), server, demoServer.Addr(), demoBlocked.Addr())

	bl, err := attachBlacklist(nsS, "veth1", []netip.Addr{demoBlocked.Addr()})
	if err != nil {
		return err
	}
	defer bl.Close()
	fmt.Printf("XDP blacklist on %s/veth1 blocks ARP for %s\n\n", server, demoBlocked.Addr())

	for round := 1; round <= 3 && ctx.Err() == nil; round++ {
		for _, target := range []netip.Addr{demoServer.Addr(), demoBlocked.Addr()} {
			err := nsrun.Do(nsC, func() error {
				mac, err := arping("veth0", demoClient.Addr(), target, 300*time.Millisecond)
				switch {
				case err == nil:
					fmt.Printf("arping %s: reply from %s\n", target, mac)
				case errors.Is(err, errNoReply):
					fmt.Printf("arping %s: no reply (blacklisted)\n", target)
				default:
					return err
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		if err := bl.print(os.Stdout); err != nil {
			return err
		}
	}
	fmt.Println("\nremoving the namespaces")
	return nil
}

func removeNS(name string, h netns.NsHandle, err *error) {
	h.Close()
	*err = errors.Join(*err, netns.DeleteNamed(name))
}
