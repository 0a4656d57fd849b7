// Command arp-blacklist drops ARP packets that ask about blacklisted IPv4
// addresses, with an XDP program on one interface, and prints how many it
// dropped every second until interrupted.
//
//	arp-blacklist -iface eth1 -block 198.18.0.9,198.18.0.10
//	arp-blacklist -iface veth1 -netns blue -block 198.18.0.9
//	arp-blacklist -demo    # a self-contained run in two namespaces it makes
//
// It is a one-off XDP program written with the same tools as sluice (bpf2go,
// cilium/ebpf). The blacklist holds up to 100,000 addresses.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/internal/nsrun"
)

// maxBlacklist is MAX_BLACKLIST in arp.c.
const maxBlacklist = 100000

func main() {
	iface := flag.String("iface", "", "interface to attach to")
	nsName := flag.String("netns", "", "network namespace of the interface (name under /run/netns or path); default: this process's")
	block := flag.String("block", "", "comma-separated IPv4 addresses to blacklist")
	demo := flag.Bool("demo", false, "run a self-contained demo in two network namespaces it creates and removes")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	var err error
	if *demo {
		err = runDemo(ctx)
	} else {
		err = run(ctx, *iface, *nsName, *block)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "arp-blacklist:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, iface, nsName, block string) error {
	addrs, err := parseAddrs(block)
	if err != nil {
		return err
	}
	if iface == "" {
		return errors.New("-iface is required (or -demo)")
	}
	ns := netns.None()
	if nsName != "" {
		path := nsName
		if !strings.Contains(nsName, "/") {
			path = "/run/netns/" + nsName
		}
		if ns, err = netns.GetFromPath(path); err != nil {
			return fmt.Errorf("network namespace %s: %w", nsName, err)
		}
		defer ns.Close()
	}
	bl, err := attachBlacklist(ns, iface, addrs)
	if err != nil {
		return err
	}
	defer bl.Close()
	fmt.Printf("dropping ARP for %d addresses on %s; Ctrl-C to stop\n", len(addrs), iface)

	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if err := bl.print(os.Stdout); err != nil {
				return err
			}
		}
	}
}

// parseAddrs parses a comma-separated list of IPv4 addresses.
func parseAddrs(list string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, s := range strings.Split(list, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil || !a.Is4() {
			return nil, fmt.Errorf("-block: %q is not an IPv4 address", s)
		}
		out = append(out, a)
	}
	if len(out) > maxBlacklist {
		return nil, fmt.Errorf("-block: %d addresses, at most %d", len(out), maxBlacklist)
	}
	return out, nil
}

// blacklist is the loaded program, its maps and its XDP link.
type blacklist struct {
	objs BlacklistObjects
	link link.Link
}

// attachBlacklist loads the blacklist and attaches it to iface in ns.
func attachBlacklist(ns netns.NsHandle, iface string, addrs []netip.Addr) (*blacklist, error) {
	bl, err := loadBlacklist(addrs)
	if err != nil {
		return nil, err
	}
	if err := bl.attach(ns, iface); err != nil {
		bl.Close()
		return nil, err
	}
	return bl, nil
}

// loadBlacklist loads the program and fills the blacklist with addrs.
func loadBlacklist(addrs []netip.Addr) (*blacklist, error) {
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, err
	}
	bl := &blacklist{}
	if err := LoadBlacklistObjects(&bl.objs, nil); err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	for _, a := range addrs {
		if err := bl.objs.Blacklist.Put(a.As4(), uint64(0)); err != nil {
			bl.Close()
			return nil, fmt.Errorf("blacklist %s: %w", a, err)
		}
	}
	return bl, nil
}

// attach attaches the program to iface in ns: native XDP where the driver
// has it, generic XDP otherwise.
func (bl *blacklist) attach(ns netns.NsHandle, iface string) error {
	err := nsrun.Do(ns, func() error {
		ifi, err := net.InterfaceByName(iface)
		if err != nil {
			return err
		}
		opts := link.XDPOptions{Program: bl.objs.ArpBlacklist, Interface: ifi.Index}
		if bl.link, err = link.AttachXDP(opts); err != nil {
			opts.Flags = link.XDPGenericMode
			bl.link, err = link.AttachXDP(opts)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("attach to %s: %w", iface, err)
	}
	return nil
}

// Close detaches the program and releases the maps.
func (bl *blacklist) Close() error {
	var err error
	if bl.link != nil {
		err = bl.link.Close()
	}
	return errors.Join(err, bl.objs.Close())
}

// drops returns the drop count of every blacklisted address.
func (bl *blacklist) drops() (map[netip.Addr]uint64, error) {
	out := make(map[netip.Addr]uint64)
	var (
		key [4]byte
		n   uint64
	)
	it := bl.objs.Blacklist.Iterate()
	for it.Next(&key, &n) {
		out[netip.AddrFrom4(key)] = n
	}
	return out, it.Err()
}

// totals returns the ARP and other packets passed and dropped, over all CPUs.
func (bl *blacklist) totals() (passed, dropped uint64, err error) {
	for key, dst := range map[uint32]*uint64{0: &passed, 1: &dropped} { // enum verdict in arp.c
		var percpu []uint64
		if err := bl.objs.Totals.Lookup(key, &percpu); err != nil {
			return 0, 0, err
		}
		for _, v := range percpu {
			*dst += v
		}
	}
	return passed, dropped, nil
}

func (bl *blacklist) print(w *os.File) error {
	passed, dropped, err := bl.totals()
	if err != nil {
		return err
	}
	drops, err := bl.drops()
	if err != nil {
		return err
	}
	var parts []string
	for a, n := range drops {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%s=%d", a, n))
		}
	}
	slices.Sort(parts)
	fmt.Fprintf(w, "passed %d, dropped %d %s\n", passed, dropped, strings.Join(parts, " "))
	return nil
}
