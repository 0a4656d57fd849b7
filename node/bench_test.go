package node_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sort"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/clustertest"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/netdev"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
)

// What one op of BenchmarkCrossNode moves: 64 MiB of bulk transfer, or
// 1000 request/response round trips (so that -benchtime 3x still times
// thousands of them).
const (
	benchBulkBytes   = 64 << 20
	benchRoundTrips  = 1000
	benchBulkPort    = 5001
	benchRRPort      = 5002
	benchIOTimeout   = 5 * time.Second
	benchWriteBuffer = 1 << 20
)

// benchWirings are the four ways BenchmarkCrossNode joins a pod on node 0
// to a pod on node 1, in the order it measures them.
var benchWirings = []struct {
	name    string
	routing datapath.Routing // sluice's; RoutingLocal for the kernel's baselines
	vxlan   bool             // the baseline's
}{
	{"sluice-vxlan", datapath.RoutingVXLAN, false},
	{"sluice-native", datapath.RoutingNative, false},
	{"linux-routing", datapath.RoutingLocal, false},
	{"linux-vxlan", datapath.RoutingLocal, true},
}

// benchWiring is one of benchWirings, built.
type benchWiring struct {
	*clustertest.Pair
	sluice *clustertest.Cluster // nil for a baseline
}

// drops returns the drop counters of both nodes' datapaths that are not
// zero: none for a baseline.
func (w benchWiring) drops(t testing.TB) map[string]uint64 {
	out := map[string]uint64{}
	if w.sluice != nil {
		for _, n := range w.sluice.Nodes {
			for k, v := range benchDrops(t, n.DP) {
				out[n.Name+" "+k] = v
			}
		}
	}
	return out
}

// BenchmarkCrossNode measures TCP from a pod on node 0 to a pod on node 1,
// IPv4, through sluice (VXLAN and native routing, clustertest.New) and
// through the kernel alone (clustertest.Baseline: plain routing, and a
// kernel VXLAN device), all four built before the first measurement:
//
//   - throughput: each op sends 64 MiB through every wiring in turn, on a
//     connection of its own to a sink in the other pod (MB/s-WIRING);
//   - rr: each op makes 1000 round trips of 1-byte request and 1-byte
//     response through every wiring in turn, on one connection per wiring,
//     both ends on blocking sockets (req/s-WIRING);
//   - both report sluice over the kernel: sluice-vxlan/linux-vxlan
//     ("vxlan-" metrics) and sluice-native/linux-routing ("native-"), for
//     throughput ("-tput-x") and request rate ("-rr-x"), each the median
//     of the ops' ratios; above 1, sluice is the faster;
//   - programs/WIRING: the round trips again with the kernel's BPF run
//     time statistics on, each program's ns per run (never while the
//     ratios are measured: the statistics cost time of their own).
//
// The wirings take turns within every op, the first one changing from op
// to op, so that a machine whose speed drifts during the run (a shared or
// virtual one) moves all four alike and the ratios hold. Sender,
// receiver and both nodes share the machine's CPUs: compare figures of
// one run (3x is a quick look; 100x takes about a minute).
//
//	go test -run '^$' -bench CrossNode -benchtime 100x ./node
func BenchmarkCrossNode(b *testing.B) {
	pairs := make([]benchWiring, len(benchWirings))
	for i, w := range benchWirings {
		p := &pairs[i]
		if w.routing == datapath.RoutingLocal {
			p.Pair = clustertest.Baseline(b, w.vxlan)
		} else {
			p.sluice = clustertest.New(b, clustertest.Options{Routing: w.routing, Nodes: 2, Endpoints: 1})
			p.Pair = p.sluice.Pair(b)
		}
		benchSink(b, p.Dst, netip.AddrPortFrom(p.DstAddr, benchBulkPort))
		benchResponder(b, p.Dst, netip.AddrPortFrom(p.DstAddr, benchRRPort))
		// The path works (and the neighbours are resolved) before it is
		// timed.
		if err := clustertest.TCPRoundTrip(b, p.Src, netip.AddrPortFrom(p.DstAddr, benchRRPort), []byte{1}, 5*time.Second); err != nil {
			b.Fatalf("%s: %v", w.name, err)
		}
	}

	b.Run("throughput", func(b *testing.B) {
		b.SetBytes(benchBulkBytes * int64(len(pairs)))
		took := benchTakeTurns(b, pairs, func(i int) (time.Duration, error) { return benchBulk(b, pairs[i].Pair) })
		benchReport(b, took, "MB/s", "tput", func(d time.Duration) float64 {
			return float64(b.N) * benchBulkBytes / 1e6 / d.Seconds()
		})
	})
	rrs := make([]benchRoundTripper, len(pairs))
	for i, p := range pairs {
		r, err := benchDialRR(b, p.Pair)
		if err != nil {
			b.Fatalf("%s: %v", benchWirings[i].name, err)
		}
		rrs[i] = r
	}
	b.Run("rr", func(b *testing.B) {
		took := benchTakeTurns(b, pairs, func(i int) (time.Duration, error) { return rrs[i].roundTrips(benchRoundTrips) })
		benchReport(b, took, "req/s", "rr", func(d time.Duration) float64 {
			return float64(b.N*benchRoundTrips) / d.Seconds()
		})
	})
	// Where the time goes.
	for i, w := range benchWirings {
		p := pairs[i]
		if p.sluice == nil {
			continue
		}
		b.Run("programs/"+w.name, func(b *testing.B) {
			stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
			if err != nil {
				b.Skipf("no BPF run time statistics: %v", err)
			}
			defer stats.Close()
			before := benchProgramStats(b, p.sluice)
			for range b.N {
				if _, err := rrs[i].roundTrips(benchRoundTrips); err != nil {
					b.Fatal(err)
				}
			}
			for name, s := range benchProgramStats(b, p.sluice) {
				if runs := s.runs - before[name].runs; runs > 0 {
					b.ReportMetric(float64(s.ns-before[name].ns)/float64(runs), "ns/run-"+name)
				}
			}
		})
	}
}

// benchTakeTurns runs each op once through every wiring, starting with
// a different one each op, and returns the time each op took through
// each wiring (took[wiring][op]). A wiring that fails fails the
// benchmark, with its datapath's drops.
func benchTakeTurns(b *testing.B, pairs []benchWiring, op func(i int) (time.Duration, error)) [][]time.Duration {
	took := make([][]time.Duration, len(pairs))
	b.ResetTimer()
	for n := range b.N {
		for k := range pairs {
			i := (n + k) % len(pairs)
			d, err := op(i)
			if err != nil {
				b.Fatalf("%s: %v; drops in the datapath: %v", benchWirings[i].name, err, pairs[i].drops(b))
			}
			took[i] = append(took[i], d)
		}
	}
	return took
}

// benchReport reports each wiring's rate (rate of its total time, in
// unit) and the two ratios of sluice over the kernel ("vxlan-KIND-x",
// "native-KIND-x"). A ratio is the median, over the ops, of the kernel's
// time over sluice's in that op: the two ran one right after the other,
// so a moment the machine stalled (a neighbour on a shared host) spoils
// one op's ratio instead of moving the totals.
func benchReport(b *testing.B, took [][]time.Duration, unit, kind string, rate func(time.Duration) float64) {
	byName := map[string][]time.Duration{}
	for i, w := range benchWirings {
		var total time.Duration
		for _, d := range took[i] {
			total += d
		}
		byName[w.name] = took[i]
		b.ReportMetric(rate(total), unit+"-"+w.name)
	}
	ratio := func(sluice, kernel []time.Duration) float64 {
		r := make([]float64, len(sluice))
		for n := range sluice {
			r[n] = kernel[n].Seconds() / sluice[n].Seconds()
		}
		return median(r)
	}
	b.ReportMetric(ratio(byName["sluice-vxlan"], byName["linux-vxlan"]), "vxlan-"+kind+"-x")
	b.ReportMetric(ratio(byName["sluice-native"], byName["linux-routing"]), "native-"+kind+"-x")
}

// median returns the middle value of v (the mean of the two middle ones
// for an even count); it sorts v.
func median(v []float64) float64 {
	sort.Float64s(v)
	m := len(v) / 2
	if len(v)%2 == 1 {
		return v[m]
	}
	return (v[m-1] + v[m]) / 2
}

// programStats is what the kernel counted of a program: runs, and run
// time in nanoseconds.
type programStats struct{ runs, ns uint64 }

// benchProgramStats returns the counts of each BPF program of the
// cluster's datapaths, by program name, summed over the nodes.
func benchProgramStats(b *testing.B, c *clustertest.Cluster) map[string]programStats {
	b.Helper()
	out := map[string]programStats{}
	for _, n := range c.Nodes {
		st := core.Of(n.DP)
		eps, err := st.EndpointPrograms()
		if err != nil {
			b.Fatal(err)
		}
		progs := map[string]*ebpf.Program{"from_endpoint": eps.FromEndpoint, "from_host": eps.FromHost}
		for _, name := range []string{bpfobj.HostProgFromNetdev, bpfobj.HostProgToNetdev, bpfobj.OverlayProgFromOverlay, bpfobj.OverlayProgToOverlay} {
			if progs[name], err = st.NodeProgram(name); err != nil {
				b.Fatal(err)
			}
		}
		for name, prog := range progs {
			ps, err := prog.Stats()
			if err != nil {
				b.Fatal(err)
			}
			s := out[name]
			out[name] = programStats{s.runs + ps.RunCount, s.ns + uint64(ps.Runtime)}
		}
	}
	return out
}

// benchBulk sends 64 MiB from p.Src to the sink on a new connection and
// returns the time it took, up to the sink's answer that all of it
// arrived. A transfer that makes no progress for benchIOTimeout fails.
func benchBulk(b *testing.B, p *clustertest.Pair) (time.Duration, error) {
	c, err := p.Src.DialTCP(b, netip.AddrPortFrom(p.DstAddr, benchBulkPort), 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, benchWriteBuffer)
	start := time.Now()
	for sent := 0; sent < benchBulkBytes; sent += len(buf) {
		c.SetWriteDeadline(time.Now().Add(benchIOTimeout))
		if _, err := c.Write(buf); err != nil {
			return 0, fmt.Errorf("after %d bytes: %w", sent, err)
		}
	}
	if err := c.CloseWrite(); err != nil {
		return 0, err
	}
	var got uint64
	c.SetReadDeadline(time.Now().Add(benchIOTimeout))
	if err := binary.Read(c, binary.BigEndian, &got); err != nil {
		return 0, fmt.Errorf("the sink's count: %w", err)
	}
	took := time.Since(start)
	if got != benchBulkBytes {
		return 0, fmt.Errorf("the sink received %d bytes of %d", got, benchBulkBytes)
	}
	return took, nil
}

// benchSink counts what each TCP connection to addr inside ns sends, and
// answers the end of its stream with the count (8 bytes, big-endian).
func benchSink(t testing.TB, ns *testutil.NetNS, addr netip.AddrPort) {
	clustertest.Serve(t, ns, addr, func(c net.Conn) {
		buf := make([]byte, benchWriteBuffer)
		var n uint64
		for {
			c.SetReadDeadline(time.Now().Add(benchIOTimeout))
			k, err := c.Read(buf)
			n += uint64(k)
			if err == io.EOF {
				binary.Write(c, binary.BigEndian, n)
				return
			}
			if err != nil {
				return
			}
		}
	})
}

// benchRoundTripper is a connection from a pair's source pod to its
// responder.
type benchRoundTripper struct{ fd int }

// benchDialRR connects p.Src to the responder; the test closes the
// connection.
func benchDialRR(b *testing.B, p *clustertest.Pair) (benchRoundTripper, error) {
	fd, err := benchSocket(p.Src)
	if err != nil {
		return benchRoundTripper{}, err
	}
	b.Cleanup(func() { unix.Close(fd) })
	to := &unix.SockaddrInet4{Port: benchRRPort, Addr: p.DstAddr.As4()}
	if err := unix.Connect(fd, to); err != nil {
		return benchRoundTripper{}, fmt.Errorf("connect to %s: %w", p.DstAddr, err)
	}
	return benchRoundTripper{fd}, nil
}

// roundTrips makes n round trips of one byte each way and returns the
// time they took.
func (r benchRoundTripper) roundTrips(n int) (time.Duration, error) {
	req := []byte{'?'}
	resp := make([]byte, 1)
	start := time.Now()
	for i := range n {
		if err := benchExchange(r.fd, req, resp); err != nil {
			return 0, fmt.Errorf("round trip %d: %w", i, err)
		}
	}
	return time.Since(start), nil
}

// benchExchange writes req on the connected socket fd and reads the
// answer of the same length into resp. A system call the Go runtime's
// signals interrupt is made again: with a timeout on the socket, the
// kernel does not restart it.
func benchExchange(fd int, req, resp []byte) error {
	if err := benchWriteAll(fd, req); err != nil {
		return err
	}
	for got := 0; got < len(resp); {
		n, err := unix.Read(fd, resp[got:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if n == 0 {
			return io.ErrUnexpectedEOF
		}
		got += n
	}
	return nil
}

// benchWriteAll writes all of p on the socket fd, making the call again
// when a signal interrupts it.
func benchWriteAll(fd int, p []byte) error {
	for len(p) > 0 {
		n, err := unix.Write(fd, p)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		p = p[n:]
	}
	return nil
}

// benchSocket makes a blocking TCP socket inside ns, with Nagle off and
// a timeout on every send and receive: a broken path fails the benchmark
// instead of hanging it. Blocking sockets keep Go's network poller off
// the round trips, so that they are the kernel's and the datapath's.
func benchSocket(ns *testutil.NetNS) (fd int, err error) {
	err = nsrun.Do(ns.Handle, func() error { // a socket stays in the namespace it was made in
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return -1, fmt.Errorf("netns %s: socket: %w", ns.Name, err)
	}
	tv := unix.NsecToTimeval(int64(benchIOTimeout))
	err = errors.Join(
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv),
	)
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("netns %s: socket options: %w", ns.Name, err)
	}
	return fd, nil
}

// benchResponder answers every byte that comes on a TCP connection to
// addr inside ns with one byte, on blocking sockets, until the test ends.
func benchResponder(t testing.TB, ns *testutil.NetNS, addr netip.AddrPort) {
	t.Helper()
	l, err := benchSocket(ns)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptInt(l, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(l, &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()}); err != nil {
		t.Fatalf("bind %s: %v", addr, err)
	}
	if err := unix.Listen(l, 16); err != nil {
		t.Fatal(err)
	}
	// A listening socket's receive timeout bounds accept too: loop on it
	// until the test ends (shutdown wakes a blocked accept).
	done := make(chan struct{})
	t.Cleanup(func() {
		close(done)
		unix.Shutdown(l, unix.SHUT_RDWR)
	})
	go func() {
		defer unix.Close(l) // here, where no accept can follow
		for {
			c, _, err := unix.Accept4(l, unix.SOCK_CLOEXEC)
			select {
			case <-done:
				if err == nil {
					unix.Close(c)
				}
				return
			default:
			}
			if err != nil {
				if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
					continue
				}
				return
			}
			unix.SetsockoptInt(c, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
			go func() {
				defer unix.Close(c)
				buf := make([]byte, 64)
				for {
					n, err := unix.Read(c, buf)
					switch {
					case err == unix.EINTR || err == unix.EAGAIN: // a signal, or an idle connection
						select {
						case <-done:
							return
						default:
							continue
						}
					case err != nil || n == 0:
						return
					}
					if benchWriteAll(c, buf[:n]) != nil { // a byte back for each byte
						return
					}
				}
			}()
		}
	}()
}

// BenchmarkNodePath measures, with BPF_PROG_TEST_RUN on node 0 of a
// two-node VXLAN cluster, what a packet costs:
//
//   - path=encap: from_endpoint on a TCP packet from a local endpoint to
//     the pod on node 1 (conntrack, policy without rules, the tunnel key
//     set, redirected to the VXLAN device);
//   - path=masquerade: to_netdev on a TCP packet a local pod sends outside
//     the cluster, as it leaves the node device (SNAT to the node's
//     address and a port of its own).
//
// Each over 4096 distinct flows, one run per packet: new flows (SYNs, the
// conntrack or the masquerading map emptied before each pass) and
// established ones (ACKs of flows the first pass made). Beside each, in
// the same pass, an empty tc program on the same frames. Metrics, per
// packet and mean of the kernel-reported durations: ns/pkt, empty-ns/pkt,
// their difference (over-empty-ns/pkt) and ratio (x-empty).
//
//	go test -run '^$' -bench NodePath -benchtime 3x ./node
func BenchmarkNodePath(b *testing.B) {
	const flows = 4096
	c := clustertest.New(b, clustertest.Options{Routing: datapath.RoutingVXLAN, Nodes: 2, Endpoints: 1,
		Limits: datapath.Limits{Conntrack: 65536}}) // room for every flow, twice over in the masquerading map
	n0, ep, peer := c.Nodes[0], c.Endpoint(0, 0), c.Endpoint(1, 0)
	st := core.Of(n0.DP)
	fromEndpoint, toNetdev := egressPrograms(b, n0)
	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()

	// Flow i has source port 10000+i, to the pod on node 1 (encap) or to
	// one of 64 destinations outside the cluster (masquerade:
	// 198.18.64.1-64, port 443, so that the node's ports towards each are
	// far from all taken).
	encap := func(flags uint8) [][]byte {
		var out [][]byte
		for i := range flows {
			out = append(out, packet.Build(&packet.Ethernet{Src: ep.MAC, Dst: ep.HostMAC},
				&packet.IPv4{Src: ep.IPv4, Dst: peer.IPv4},
				&packet.TCP{SrcPort: uint16(10000 + i), DstPort: 80, Seq: 1, Ack: benchAck(flags), Flags: flags}))
		}
		return out
	}
	internet, err := netdev.Get(c.Internet.Handle, "eth0")
	if err != nil {
		b.Fatal(err)
	}
	outside := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 64, byte(1 + i%64)}) }
	masquerade := func(flags uint8) [][]byte {
		var out [][]byte
		for i := range flows {
			out = append(out, packet.Build(&packet.Ethernet{Src: n0.MAC, Dst: internet.MAC},
				&packet.IPv4{Src: ep.IPv4, Dst: outside(i), TTL: 63},
				&packet.TCP{SrcPort: uint16(10000 + i), DstPort: 443, Seq: 1, Ack: benchAck(flags), Flags: flags}))
		}
		return out
	}

	ports := make([]uint16, flows) // what masquerading picked for each flow in its last new pass
	for _, path := range []struct {
		name    string
		prog    *ebpf.Program
		ctx     *progtest.SKB
		frames  func(flags uint8) [][]byte
		state   *ebpf.Map // what a pass of new flows starts without
		verdict uint32
		check   func(i int, fresh bool, out []byte) error
	}{
		{"encap", fromEndpoint, &progtest.SKB{Ifindex: uint32(ep.HostIfindex)}, encap, st.Objs.Conntrack, progtest.TCActRedirect,
			func(i int, _ bool, out []byte) error {
				// Encapsulation is the VXLAN device's, from the tunnel key:
				// the frame itself only lost a hop.
				if ttl := out[14+8]; ttl != 63 {
					return fmt.Errorf("TTL %d, want 63", ttl)
				}
				return nil
			}},
		{"masquerade", toNetdev, &progtest.SKB{Ifindex: uint32(n0.Ifindex)}, masquerade, st.Objs.Snat, progtest.TCActOK,
			func(i int, fresh bool, out []byte) error {
				src, _ := netip.AddrFromSlice(out[14+12 : 14+16])
				port := binary.BigEndian.Uint16(out[14+20:])
				if src != n0.IPv4 || port < 61000 {
					return fmt.Errorf("left as %s:%d, want %s and a port from 61000", src, port, n0.IPv4)
				}
				if fresh {
					ports[i] = port
				} else if port != ports[i] {
					return fmt.Errorf("port %d, but the flow was given %d", port, ports[i])
				}
				return nil
			}},
	} {
		syn, ack := path.frames(packet.SYN), path.frames(packet.ACK)
		for _, fresh := range []bool{true, false} {
			flowsName, frames := "established", ack
			if fresh {
				flowsName, frames = "new", syn
			}
			b.Run(fmt.Sprintf("path=%s/flows=%s", path.name, flowsName), func(b *testing.B) {
				var cost, base time.Duration
				err := nsrun.Do(n0.NS.Handle, func() error {
					// Checked passes first: the flows made, then (for
					// established flows) each frame of the measured kind.
					if err := benchEmptyMap(path.state); err != nil {
						return err
					}
					checked := [][][]byte{syn}
					if !fresh {
						checked = append(checked, ack)
					}
					for pass, frames := range checked {
						for i, f := range frames {
							r, err := progtest.Run(path.prog, f, path.ctx)
							if err != nil {
								return err
							}
							if r.Verdict != path.verdict {
								return fmt.Errorf("flow %d: verdict %d, want %d", i, r.Verdict, path.verdict)
							}
							if err := path.check(i, pass == 0, r.Packet); err != nil {
								return fmt.Errorf("flow %d: %w", i, err)
							}
						}
					}
					for range b.N {
						if fresh {
							if err := benchEmptyMap(path.state); err != nil {
								return err
							}
						}
						c, err := progtest.MeanCost(path.prog, frames, path.ctx, 1)
						if err != nil {
							return err
						}
						e, err := progtest.MeanCost(empty, frames, path.ctx, 1)
						if err != nil {
							return err
						}
						cost, base = cost+c, base+e
					}
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
				ns := func(d time.Duration) float64 { return float64(d) / float64(b.N) }
				b.ReportMetric(ns(cost), "ns/pkt")
				b.ReportMetric(ns(base), "empty-ns/pkt")
				b.ReportMetric(ns(cost)-ns(base), "over-empty-ns/pkt")
				b.ReportMetric(ns(cost)/ns(base), "x-empty")
			})
		}
	}
	if drops := benchDrops(b, n0.DP); len(drops) > 0 {
		b.Errorf("node-0 dropped packets: %v", drops)
	}
}

// benchAck is the acknowledgement number of a frame with the flags.
func benchAck(flags uint8) uint32 {
	if flags&packet.ACK != 0 {
		return 1
	}
	return 0
}

// benchEmptyMap deletes every entry of m.
func benchEmptyMap(m *ebpf.Map) error {
	var (
		k, v []byte
		keys [][]byte
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, append([]byte(nil), k...))
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list %s: %w", m, err)
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete from %s: %w", m, err)
		}
	}
	return nil
}

// benchDrops are the datapath's drop counters that are not zero.
func benchDrops(t testing.TB, dp *datapath.Datapath) map[string]uint64 {
	t.Helper()
	m, err := dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint64{}
	for k, v := range m {
		if v.Packets > 0 && k.Reason != datapath.ReasonForwarded {
			out[k.Direction.String()+" "+k.Reason.String()] = v.Packets
		}
	}
	return out
}
