package service_test

import (
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/policy"
	"github.com/sluicedp/sluice/service"
)

// An Open by another build takes over a running datapath: its programs
// replace the old ones on every hook, in place, while TCP and UDP flows
// through a service and a policy go on without a loss; no hook keeps the
// old program; and an Open by the same build changes no program.
func TestUpgradeInPlace(t *testing.T) {
	for _, mode := range []datapath.AttachMode{datapath.AttachAuto, datapath.AttachLegacy} {
		t.Run(mode.String(), func(t *testing.T) {
			n := newNodeWith(t, datapath.Config{TCAttach: mode, Cgroup: testutil.Cgroup(t)})
			ctx := context.Background()
			serve(t, n.a, false, 9001)
			for _, proto := range []service.Protocol{service.TCP, service.UDP} {
				upsert(t, n.dp, service.Service{Frontend: service.Frontend{Addr: fe4, Port: 80, Protocol: proto}, Backends: backends(n.a, false, 9001), Reach: service.TCOnly})
			}
			if _, err := policy.Apply(ctx, n.dp, n.client.ID, policy.Policy{Egress: []policy.Rule{{
				Peers: []policy.Peer{{Identity: n.a.Identity}},
				Ports: []policy.Port{{Protocol: policy.TCP, Port: 9001}, {Protocol: policy.UDP, Port: 9001}},
			}}}); err != nil {
				t.Fatal(err)
			}
			var conns []net.Conn
			for _, network := range []string{"tcp", "udp"} {
				var c net.Conn
				if err := inNS(n.client, func() (err error) {
					c, err = net.DialTimeout(network, netip.AddrPortFrom(fe4, 80).String(), wait)
					return err
				}); err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if port := askOn(t, c); port != 9001 {
					t.Fatalf("%s: backend port %d", network, port)
				}
				conns = append(conns, c)
			}
			// The flows keep going while the new build takes over.
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var mu sync.Mutex
			var failures []error
			asked := 0
			for _, c := range conns {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, 64)
					for {
						select {
						case <-stop:
							return
						default:
						}
						c.SetDeadline(time.Now().Add(wait))
						_, err := c.Write([]byte("hi"))
						if err == nil {
							_, err = c.Read(buf)
						}
						mu.Lock()
						asked++
						if err != nil {
							failures = append(failures, err)
						}
						mu.Unlock()
						if err != nil {
							return
						}
					}
				}()
			}
			before := attachedPrograms(t, n)
			// The datapath as an older build left it.
			markBuild(t, n.dp, "an older build")
			bpffs := filepath.Dir(n.dp.PinDir())
			cfg := datapath.Config{Name: "node", BPFFS: bpffs, NetNS: n.ns.Path, MustExist: true, TCAttach: mode}
			dp2, err := datapath.Open(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer dp2.Close()
			time.Sleep(200 * time.Millisecond) // flows after the swap too
			close(stop)
			wg.Wait()
			if len(failures) > 0 || asked < 4 {
				t.Errorf("the flows during the upgrade: %d exchanges, failures %v", asked, failures)
			}
			after := attachedPrograms(t, n)
			mine := loadedPrograms(t, dp2)
			for hook, id := range after {
				if slices.Contains(before, id) {
					t.Errorf("hook %d keeps the old program %d", hook, id)
				}
				if !mine[id] {
					t.Errorf("hook %d runs program %d, not one the new build loaded", hook, id)
				}
			}
			if len(after) != len(before) || len(after) < 2*3+8 {
				t.Errorf("%d hooks before, %d after; want the 3 endpoints' 2 and the 8 socket hooks", len(before), len(after))
			}
			for _, c := range conns {
				if port := askOn(t, c); port != 9001 {
					t.Errorf("after the upgrade the flow went to backend port %d", port)
				}
			}
			// The same build again: nothing to swap.
			dp3, err := datapath.Open(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			dp3.Close()
			if again := attachedPrograms(t, n); !slices.Equal(again, after) {
				t.Errorf("an Open by the same build changed programs: %v, then %v", after, again)
			}
		})
	}
}

// markBuild writes, into the datapath's record, the build whose programs
// it says are attached.
func markBuild(t *testing.T, dp *datapath.Datapath, build string) {
	t.Helper()
	st := core.Of(dp)
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindDatapath, 0)
	if err != nil {
		t.Fatal(err)
	}
	var node map[string]any
	if err := json.Unmarshal(r.Object, &node); err != nil {
		t.Fatal(err)
	}
	node["programs"] = build
	if r.Object, err = json.Marshal(node); err != nil {
		t.Fatal(err)
	}
	if err := ledger.Put(st.Objs.Ledger, r); err != nil {
		t.Fatal(err)
	}
}

// attachedPrograms returns the ID of the program on each hook: each
// endpoint's ingress and egress (by interface index), then each socket
// link pinned.
func attachedPrograms(t *testing.T, n *node) []ebpf.ProgramID {
	t.Helper()
	var out []ebpf.ProgramID
	n.ns.Do(t, func() error {
		for _, ifindex := range []int{n.client.HostIfindex, n.a.HostIfindex, n.b.HostIfindex} {
			for _, attach := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
				out = append(out, hookProgram(t, ifindex, attach))
			}
		}
		return nil
	})
	dir := filepath.Join(n.dp.PinDir(), "links")
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if filepath.Ext(e.Name()) != "" || len(e.Name()) < 7 || e.Name()[:7] != "cgroup-" {
			continue
		}
		l, err := link.LoadPinnedLink(filepath.Join(dir, e.Name()), nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, info.Program)
	}
	return out
}

// hookProgram returns the first program on a tc hook: a tcx link's, or a
// legacy filter's.
func hookProgram(t *testing.T, ifindex int, attach ebpf.AttachType) ebpf.ProgramID {
	t.Helper()
	if res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: attach}); err == nil && len(res.Programs) > 0 {
		return res.Programs[0].ID
	}
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		t.Fatal(err)
	}
	parent := uint32(netlink.HANDLE_MIN_INGRESS)
	if attach == ebpf.AttachTCXEgress {
		parent = netlink.HANDLE_MIN_EGRESS
	}
	filters, err := netlink.FilterList(l, parent)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Id != 0 {
			return ebpf.ProgramID(bf.Id)
		}
	}
	t.Fatalf("no program on %v of interface %d", attach, ifindex)
	return 0
}

// loadedPrograms returns the IDs of the programs a handle loaded.
func loadedPrograms(t *testing.T, dp *datapath.Datapath) map[ebpf.ProgramID]bool {
	t.Helper()
	out := map[ebpf.ProgramID]bool{}
	st := core.Of(dp)
	progs := []*ebpf.Program{st.Objs.FromEndpoint, st.Objs.FromHost}
	if sp, err := st.SockPrograms(); err == nil {
		progs = append(progs, sp.Connect4, sp.Connect6, sp.Sendmsg4, sp.Sendmsg6, sp.Recvmsg4, sp.Recvmsg6, sp.Getpeername4, sp.Getpeername6)
	}
	for _, p := range progs {
		if p == nil {
			continue
		}
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		if id, ok := info.ID(); ok {
			out[id] = true
		}
	}
	return out
}
