// Command endpoints is sluice's main demo. It builds a node in a network
// namespace of its own, opens a datapath there (pins on a private bpffs),
// connects two workloads as endpoints, and shows the datapath at work:
// traffic between them forwarded by BPF, a connection through a service
// frontend, a spoofed packet dropped with its reason, counters and events.
// Everything it makes, it removes.
//
//	go run ./examples/endpoints     # as root
package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/bpffs"
	"github.com/sluicedp/sluice/internal/icmpecho"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/service"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "endpoints demo:", err)
		os.Exit(1)
	}
}

func run() (err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	suffix := fmt.Sprint(os.Getpid())

	// The node: a namespace and a private bpffs.
	nodeName := "sluice-demo-node-" + suffix
	node, err := nsrun.New(nodeName)
	if err != nil {
		return err
	}
	defer func() {
		node.Close()
		err = errors.Join(err, netns.DeleteNamed(nodeName))
	}()
	pins, err := os.MkdirTemp("", "sluice-demo-bpffs-")
	if err != nil {
		return err
	}
	if err := bpffs.Ensure(pins); err != nil {
		return err
	}
	defer func() {
		err = errors.Join(err, unix.Unmount(pins, unix.MNT_DETACH), os.Remove(pins))
	}()

	dp, err := datapath.Open(ctx, datapath.Config{
		Name:  "demo",
		NetNS: nodeName,
		BPFFS: pins,
		Node: datapath.Node{PodCIDRs: []netip.Prefix{
			netip.MustParsePrefix("198.18.1.0/24"),
			netip.MustParsePrefix("fd00:1::/64"),
		}},
	})
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, dp.Unload()) }()
	fmt.Printf("datapath %q in namespace %s, pins in %s\n", dp.Name(), nodeName, pins)

	// Two workloads.
	var eps []*endpoint.Endpoint
	for i, name := range []string{"web", "db"} {
		ep, err := endpoint.Create(ctx, dp, endpoint.Spec{
			ID:       uint16(i + 1),
			IPv4:     netip.AddrFrom4([4]byte{198, 18, 1, byte(10 + i)}),
			IPv6:     netip.AddrFrom16([16]byte{0xfd, 0, 0, 1, 15: byte(0x10 + i)}),
			Identity: datapath.Identity(1000 + i),
			Labels:   map[string]string{"app": name},
			NetNS:    "sluice-demo-" + name + "-" + suffix,
		})
		if err != nil {
			return err
		}
		defer func() { err = errors.Join(err, endpoint.Delete(context.Background(), dp, ep.ID)) }()
		eps = append(eps, ep)
		fmt.Printf("endpoint %d %-3s %s %s on %s (host end %s), gateway %s\n",
			ep.ID, name, ep.IPv4, ep.IPv6, ep.IfName, ep.HostIfName, ep.Gateway4)
	}
	web, db := eps[0], eps[1]

	events, err := dp.Events(ctx)
	if err != nil {
		return err
	}

	webNS, err := netns.GetFromName(web.NetNS)
	if err != nil {
		return err
	}
	defer webNS.Close()

	fmt.Println("\n# web pings db, over IPv4 and IPv6: forwarded by bpf_redirect_peer")
	for _, to := range []netip.Addr{db.IPv4, db.IPv6} {
		if err := ping(webNS, to, icmpecho.Options{Count: 3}, 3); err != nil {
			return err
		}
	}

	fmt.Println("\n# web reaches db through a service: 198.18.200.1:80 balanced over db's port 8080")
	if err := viaService(ctx, dp, webNS, db); err != nil {
		return err
	}

	fmt.Println("\n# web claims an address that is not its own")
	spoofed := netip.MustParseAddr("198.18.1.99")
	if err := netdev.AddAddr(webNS, "eth0", netip.PrefixFrom(spoofed, 32)); err != nil {
		return err
	}
	if err := ping(webNS, db.IPv4, icmpecho.Options{Src: spoofed}, 0); err != nil {
		return err
	}
	if err := awaitDrop(events, datapath.ReasonSpoofedSourceIP, web.ID); err != nil {
		return err
	}

	fmt.Println("\n# counters")
	for _, ep := range eps {
		c, err := endpoint.ReadCounters(dp, ep.ID)
		if err != nil {
			return err
		}
		fmt.Printf("endpoint %d: out %d packets / %d bytes, in %d packets / %d bytes\n",
			ep.ID, c.PacketsOut, c.BytesOut, c.PacketsIn, c.BytesIn)
	}
	metrics, err := dp.Metrics()
	if err != nil {
		return err
	}
	keys := slices.SortedFunc(maps.Keys(metrics), func(a, b datapath.MetricKey) int {
		return cmp.Or(cmp.Compare(a.Direction, b.Direction), cmp.Compare(a.Reason, b.Reason))
	})
	for _, k := range keys {
		fmt.Printf("%-8s %-18s %d packets\n", k.Direction, k.Reason, metrics[k].Packets)
	}
	fmt.Println("\nremoving the endpoints, the datapath and the namespaces")
	return nil
}

// ping sends echo requests from the namespace ns, prints how many replies
// came back and fails unless that is want.
func ping(ns netns.NsHandle, dst netip.Addr, opts icmpecho.Options, want int) error {
	replies, err := icmpecho.Ping(ns, dst, opts)
	if err != nil {
		return err
	}
	from := ""
	if opts.Src.IsValid() {
		from = " from " + opts.Src.String()
	}
	fmt.Printf("ping %s%s: %d of %d replied\n", dst, from, replies, max(opts.Count, 1))
	if replies != want {
		return fmt.Errorf("ping %s%s: %d replies, want %d", dst, from, replies, want)
	}
	return nil
}

// awaitDrop prints events until a drop for reason from the endpoint id
// arrives, and fails when none does within two seconds.
func awaitDrop(events <-chan datapath.Event, reason datapath.Reason, id uint16) error {
	timeout := time.After(2 * time.Second)
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return fmt.Errorf("events ended before a %s drop from endpoint %d", reason, id)
			}
			fmt.Println("event:", ev)
			if d, ok := ev.(*datapath.DropEvent); ok && d.Reason == reason && d.Endpoint == uint32(id) {
				return nil
			}
		case <-timeout:
			return fmt.Errorf("no %s drop event from endpoint %d", reason, id)
		}
	}
}

// viaService puts a TCP server on db's port 8080, makes 198.18.200.1:80 a
// service with db as its backend, connects from web's namespace to the
// frontend and prints what it sees: the server's answer, from the frontend.
func viaService(ctx context.Context, dp *datapath.Datapath, webNS netns.NsHandle, db *endpoint.Endpoint) error {
	fe := service.Frontend{Addr: netip.MustParseAddr("198.18.200.1"), Port: 80, Protocol: service.TCP}
	if _, err := service.Upsert(ctx, dp, service.Service{
		Frontend: fe,
		Backends: []service.Backend{{Addr: db.IPv4, Port: 8080, Weight: 1}},
	}); err != nil {
		return err
	}
	dbNS, err := netns.GetFromName(db.NetNS)
	if err != nil {
		return err
	}
	defer dbNS.Close()
	var ln net.Listener
	if err := nsrun.Do(dbNS, func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(db.IPv4, 8080).String())
		return err
	}); err != nil {
		return err
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			fmt.Fprintf(c, "hello from %s", c.LocalAddr())
			c.Close()
		}
	}()
	return nsrun.Do(webNS, func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(fe.Addr, fe.Port).String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		answer, err := io.ReadAll(c)
		if err != nil {
			return err
		}
		fmt.Printf("connected to %s, answer %q\n", c.RemoteAddr(), answer)
		counters, err := service.ReadCounters(dp, fe)
		if err != nil {
			return err
		}
		fmt.Printf("backend %s: %d flow, %d packets translated\n", counters[0].Backend, counters[0].Flows, counters[0].Packets)
		return nil
	})
}
