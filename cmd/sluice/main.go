// Command sluice inspects a running sluice datapath: why packets were
// dropped, how many, and what the datapath holds.
//
//	sluice [-bpffs DIR] [-name NAME] COMMAND
//
//	reasons      the drop reasons: number, name, meaning
//	metrics      packets and bytes by direction and reason
//	events       drop events as they happen (-traces: trace points too)
//	endpoints    endpoints with their addresses and counters
//	flows        tracked connections, with the policy rule that allowed each
//	services     services: frontends, backends with their states and counters
//	nodes        the remote nodes: addresses and pod CIDRs
//	lost         event records the datapath could not send
//	verify       the maps compared with the ledger, object by object: every
//	             difference (-repair mends each; it opens the datapath
//	             read-write, in the namespace -netns names)
//	unload       remove the datapath, in the namespace -netns names: what
//	             its objects made, its programs and its pins; also one
//	             that Open refuses
//
// It opens the datapath read-only (maps only, no program, no lock), so it
// works beside the program that owns it and where a program would not
// load; `events -traces` opens it read-write to switch traces on, and
// restores the event settings when it stops.
// A datapath has one events reader at a time: `sluice events` fails while the
// program that owns the datapath reads them, and while it runs, that
// program's Events fails.
package main

import (
	"cmp"
	"context"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/node"
	// Its checks and repairs: verify covers policies too.
	_ "github.com/sluicedp/sluice/policy"
	"github.com/sluicedp/sluice/service"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "sluice:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, out, errOut io.Writer) error {
	fs := flag.NewFlagSet("sluice", flag.ContinueOnError)
	fs.SetOutput(out)
	bpffs := fs.String("bpffs", datapath.DefaultBPFFS, "BPF filesystem the datapath is pinned in")
	name := fs.String("name", "", "datapath name (required unless there is exactly one)")
	traces := fs.Bool("traces", false, "events: report trace points too")
	repair := fs.Bool("repair", false, "verify: mend every difference")
	netns := fs.String("netns", "/proc/thread-self/ns/net", "verify -repair, unload: the network namespace the datapath serves (a name under /run/netns, or a path)")
	fs.Usage = func() {
		fmt.Fprintln(out, "usage: sluice [-bpffs DIR] [-name NAME] reasons|metrics|events|endpoints|flows|services|nodes|lost|verify|unload")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() < 1 {
		fs.Usage()
		return errors.New("want exactly one command")
	}
	// Flags may follow the command too: sluice verify -repair.
	cmd := fs.Arg(0)
	if err := fs.Parse(fs.Args()[1:]); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return errors.New("want exactly one command")
	}
	if cmd == "reasons" {
		return reasons(out)
	}
	switch cmd {
	case "metrics", "events", "endpoints", "flows", "services", "nodes", "lost", "verify", "unload":
	default:
		fs.Usage()
		return fmt.Errorf("unknown command %q", cmd)
	}

	if *name == "" {
		n, err := onlyDatapath(*bpffs)
		if err != nil {
			return err
		}
		*name = n
	}
	// Read-only, but for events -traces, which switches traces on.
	open := datapath.OpenReadOnly
	if cmd == "events" && *traces {
		open = datapath.Open
	}
	if cmd == "unload" {
		return datapath.UnloadPinned(ctx, datapath.Config{Name: *name, BPFFS: *bpffs, NetNS: *netns})
	}
	cfg := datapath.Config{Name: *name, BPFFS: *bpffs, MustExist: true}
	if cmd == "verify" && *repair {
		// A repair undoes what killed writers left: devices and
		// attachments, in the datapath's own namespace, which Open
		// checks.
		open, cfg.NetNS = datapath.Open, *netns
	}
	dp, err := open(ctx, cfg)
	if err != nil {
		return err
	}
	defer dp.Close()

	switch cmd {
	case "metrics":
		return metrics(dp, out)
	case "events":
		return events(ctx, dp, *traces, out, errOut)
	case "endpoints":
		return endpoints(dp, out)
	case "flows":
		return flows(dp, out)
	case "services":
		return services(dp, out)
	case "nodes":
		return nodes(dp, out)
	case "verify":
		return verify(ctx, dp, *repair, out)
	default:
		lost, err := dp.Lost()
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "ring full: %d\nrate limited: %d\n", lost.RingFull, lost.RateLimited)
		return nil
	}
}

// onlyDatapath returns the name of the one datapath pinned in bpffs.
func onlyDatapath(bpffs string) (string, error) {
	entries, err := os.ReadDir(bpffs)
	if err != nil {
		return "", err
	}
	var names []string
	for _, e := range entries {
		if _, err := os.Stat(bpffs + "/" + e.Name() + "/layout"); err == nil {
			names = append(names, e.Name())
		}
	}
	switch len(names) {
	case 0:
		return "", fmt.Errorf("no datapath pinned in %s", bpffs)
	case 1:
		return names[0], nil
	}
	return "", fmt.Errorf("several datapaths in %s (%s): choose one with -name", bpffs, strings.Join(names, ", "))
}

func reasons(out io.Writer) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "CODE\tREASON\tMEANING")
	for _, r := range datapath.Reasons() {
		fmt.Fprintf(w, "%d\t%s\t%s\n", r, r, r.Doc())
	}
	return w.Flush()
}

func metrics(dp *datapath.Datapath, out io.Writer) error {
	m, err := dp.Metrics()
	if err != nil {
		return err
	}
	keys := slices.SortedFunc(maps.Keys(m), func(a, b datapath.MetricKey) int {
		return cmp.Or(cmp.Compare(a.Direction, b.Direction), cmp.Compare(a.Reason, b.Reason))
	})
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "DIRECTION\tREASON\tPACKETS\tBYTES\t")
	for _, k := range keys {
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\t\n", k.Direction, k.Reason, m[k].Packets, m[k].Bytes)
	}
	return w.Flush()
}

func events(ctx context.Context, dp *datapath.Datapath, traces bool, out, errOut io.Writer) error {
	// The reader first: while another holds the events, their settings are
	// that one's.
	evs, err := dp.Events(ctx)
	if errors.Is(err, datapath.ErrExists) {
		return fmt.Errorf("another process is reading this datapath's events, and there is one reader at a time (%w)", err)
	}
	if err != nil {
		return err
	}
	if traces {
		was, err := dp.EventConfig()
		if err != nil {
			return err
		}
		now := was
		now.Traces = true
		if err := dp.SetEventConfig(context.Background(), now); err != nil {
			return err
		}
		defer dp.SetEventConfig(context.Background(), was)
	}
	return printEvents(evs, out, errOut)
}

// printEvents prints events to out and the reader's errors to errOut as they
// come. It returns the error that ended the stream, or one that counts the
// errors the stream went on after.
func printEvents(evs <-chan datapath.Event, out, errOut io.Writer) error {
	failed := 0
	for ev := range evs {
		e, ok := ev.(*datapath.ErrorEvent)
		switch {
		case !ok:
			fmt.Fprintln(out, ev)
		case e.Ended:
			return e.Err
		default:
			fmt.Fprintln(errOut, "sluice:", e.Err)
			failed++
		}
	}
	if failed > 0 {
		return fmt.Errorf("the events reader reported %d errors", failed)
	}
	return nil
}

func endpoints(dp *datapath.Datapath, out io.Writer) error {
	list, err := endpoint.List(dp)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tIDENTITY\tIPV4\tIPV6\tHOST IF\tNETNS\tPKTS OUT\tPKTS IN\tLABELS")
	for _, ep := range list {
		c, err := endpoint.ReadCounters(dp, ep.ID)
		if err != nil {
			return err
		}
		var labels []string
		for _, k := range slices.Sorted(maps.Keys(ep.Labels)) {
			labels = append(labels, k+"="+ep.Labels[k])
		}
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", ep.ID, ep.Identity, addr(ep.IPv4.String(), ep.IPv4.IsValid()),
			addr(ep.IPv6.String(), ep.IPv6.IsValid()), ep.HostIfName, cmp.Or(ep.NetNS, "-"), c.PacketsOut, c.PacketsIn, strings.Join(labels, ","))
	}
	return w.Flush()
}

func flows(dp *datapath.Datapath, out io.Writer) error {
	list, err := dp.Flows()
	if err != nil {
		return err
	}
	slices.SortFunc(list, func(a, b datapath.Flow) int {
		return cmp.Or(cmp.Compare(a.Endpoint, b.Endpoint), cmp.Compare(a.Src.String(), b.Src.String()), cmp.Compare(a.Dst.String(), b.Dst.String()))
	})
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "ENDPOINT	DIR	PROTO	SOURCE	DESTINATION	REMOTE	RULE	PKTS	STATE")
	for _, f := range list {
		state := "new"
		switch {
		case f.Closing:
			state = "closing"
		case f.Replied:
			state = "established"
		}
		if f.Audited {
			state += ",audited"
		}
		rule := "-"
		if f.Rule >= 0 {
			rule = fmt.Sprint(f.Rule)
		}
		fmt.Fprintf(w, "%d	%s	%d	%s	%s	%s	%s	%d	%s\n", f.Endpoint, f.Direction, f.Protocol, f.Src, f.Dst, f.Remote, rule, f.Packets, state)
	}
	return w.Flush()
}

func addr(s string, ok bool) string {
	if ok {
		return s
	}
	return "-"
}

func services(dp *datapath.Datapath, out io.Writer) error {
	list, err := service.List(dp)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "FRONTEND\tALGORITHM\tREACH\tAFFINITY\tBACKEND\tWEIGHT\tSTATE\tFLOWS\tPKTS\tBYTES")
	for _, s := range list {
		c, err := service.ReadCounters(dp, s.Frontend)
		if err != nil {
			return err
		}
		head := fmt.Sprintf("%s\t%s\t%s\t%s", s.Frontend, s.Algorithm, s.Reach, s.Affinity)
		if len(s.Backends) == 0 {
			fmt.Fprintf(w, "%s\t-\t\t\t\t\t\n", head)
		}
		for i, b := range s.Backends {
			fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%d\t%d\t%d\n", head, b.AddrPort(), b.Weight, b.State, c[i].Flows, c[i].Packets, c[i].Bytes)
			head = "\t\t\t"
		}
	}
	return w.Flush()
}

// nodes lists the remote nodes.
func nodes(dp *datapath.Datapath, out io.Writer) error {
	list, err := node.List(dp)
	if err != nil {
		return err
	}
	local := dp.Node()
	switch local.Encryption {
	case datapath.EncryptionIPsec:
		current, installed, err := node.IPsecSPIs(dp)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "encryption: IPsec, encrypting with key %d, keys %v\n", current, installed)
	case datapath.EncryptionWireGuard:
		// The device is in the datapath's namespace, which the CLI may
		// not be in.
		if key, err := node.WireGuardPublicKey(dp); err != nil {
			fmt.Fprintf(out, "encryption: WireGuard (public key: %v)\n", err)
		} else {
			fmt.Fprintf(out, "encryption: WireGuard, public key %s\n", base64.StdEncoding.EncodeToString(key[:]))
		}
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tADDRESSES\tPOD CIDRS\tWIREGUARD KEY")
	for _, n := range list {
		key := "-"
		if n.WireGuardKey != ([32]byte{}) {
			key = base64.StdEncoding.EncodeToString(n.WireGuardKey[:])
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", n.Name, joinStrings(n.Addresses), joinStrings(n.PodCIDRs), key)
	}
	return w.Flush()
}

func joinStrings[T fmt.Stringer](list []T) string {
	s := make([]string, len(list))
	for i, x := range list {
		s[i] = x.String()
	}
	return strings.Join(s, ",")
}

// verify prints every difference between the maps and the ledger, and
// fails when one is left unrepaired.
func verify(ctx context.Context, dp *datapath.Datapath, repair bool, out io.Writer) error {
	drift, err := dp.Verify(ctx, repair)
	left := 0
	for _, d := range drift {
		fmt.Fprintln(out, d)
		if !d.Repaired {
			left++
		}
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "%d differences, %d repaired\n", len(drift), len(drift)-left)
	if left > 0 {
		return fmt.Errorf("%d differences between the maps and the ledger", left)
	}
	return nil
}
