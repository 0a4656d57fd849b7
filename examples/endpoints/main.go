// Command endpoints is sluice's main demo. It builds a node in a network
// namespace of its own, opens a datapath there (pins on a private bpffs),
// connects two workloads as endpoints, and shows the datapath at work:
// traffic between them forwarded by BPF, a spoofed packet dropped with its
// reason, counters and events. Everything it makes, it removes.
//
//	go run ./examples/endpoints     # as root
package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/bpffs"
	"github.com/sluicedp/sluice/internal/nsrun"
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
		defer func() { err = errors.Join(err, endpoint.Delete(dp, ep.ID)) }()
		eps = append(eps, ep)
		fmt.Printf("endpoint %d %-3s %s %s on %s (host end %s), gateway %s\n",
			ep.ID, name, ep.IPv4, ep.IPv6, ep.IfName, ep.HostIfName, ep.Gateway4)
	}
	web, db := eps[0], eps[1]

	events, err := dp.Events(ctx)
	if err != nil {
		return err
	}

	fmt.Println("\n# web pings db, over IPv4 and IPv6: forwarded by bpf_redirect_peer")
	for _, to := range []netip.Addr{db.IPv4, db.IPv6} {
		fmt.Printf("$ ping %s: %s\n", to, outcome(inNS(web, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-q", to.String())))
	}

	fmt.Println("\n# web claims an address that is not its own")
	if err := inNS(web, "ip", "addr", "add", "198.18.1.99/32", "dev", "eth0"); err != nil {
		return err
	}
	fmt.Printf("$ ping -I 198.18.1.99 %s: %s\n", db.IPv4, outcome(inNS(web, "ping", "-c", "1", "-W", "1", "-q", "-I", "198.18.1.99", db.IPv4.String())))
	select {
	case ev := <-events:
		fmt.Println("event:", ev)
	case <-time.After(2 * time.Second):
		fmt.Println("event: none arrived")
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

// inNS runs a command inside the endpoint's namespace.
func inNS(ep *endpoint.Endpoint, args ...string) error {
	cmd := exec.Command("nsenter", append([]string{"--net=" + filepath.Join("/run/netns", ep.NetNS), "--"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

func outcome(err error) string {
	if err != nil {
		return "no reply"
	}
	return "replies"
}
