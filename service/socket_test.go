package service_test

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/service"
)

func TestMain(m *testing.M) {
	testutil.Main(m, map[string]func(string) int{"ask": askMain, "churnsync": churnSync, "synccrash": syncCrash, "udpsockets": udpSocketsMain})
}

// question is what a child asks: from the namespace NetNS, a TCP or UDP
// message to To.
type question struct {
	NetNS string
	TCP   bool
	To    netip.AddrPort
}

// answer is what it got: the reply, and the peer (TCP) or source (UDP) it
// came from.
type answer struct {
	Reply string
	From  netip.AddrPort
	Err   string
}

func askMain(arg string) int {
	var q question
	var a answer
	if err := json.Unmarshal([]byte(arg), &q); err != nil {
		return 2
	}
	ns, err := netns.GetFromName(q.NetNS)
	if err == nil {
		err = nsrun.Do(ns, func() (err error) {
			if q.TCP {
				a.Reply, a.From, err = dialTCP(q.To, wait)
			} else {
				a.Reply, a.From, err = sendUDP(0, q.To, wait)
			}
			return err
		})
	}
	if err != nil {
		a.Err = err.Error()
	}
	json.NewEncoder(os.Stdout).Encode(a)
	return 0
}

// askFrom asks q from a child process in the cgroup.
func askFrom(t *testing.T, cgroup string, q question) answer {
	t.Helper()
	arg, _ := json.Marshal(q)
	cmd, err := testutil.Child("ask", string(arg))
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	var a answer
	if err := json.Unmarshal(out, &a); err != nil {
		t.Fatalf("child said %q: %v", out, err)
	}
	return a
}

// TestTranslateSocket: processes in the datapath's cgroup have frontends
// translated when they connect and send (no per-packet translation: the
// backend's packet counter stays 0) and see the frontend as their peer;
// with Both, processes outside the cgroup are translated per packet.
func TestTranslateSocket(t *testing.T) {
	cgroup := testutil.Cgroup(t)
	n := newNodeWith(t, datapath.Config{Cgroup: cgroup})
	for _, v6 := range []bool{false, true} {
		serve(t, n.a, v6, 8080)
		want := netip.AddrPortFrom(addrOf(n.a, v6), 8080).String()
		for _, tcp := range []bool{true, false} {
			for _, reach := range []service.Reach{service.SocketOnly, service.Both} {
				fe := service.Frontend{Addr: frontendAddr(v6), Port: 80, Protocol: service.UDP}
				if tcp {
					fe.Protocol = service.TCP
				}
				t.Run(fmt.Sprintf("ipv6=%v/%v/%v", v6, fe.Protocol, reach), func(t *testing.T) {
					dst := netip.AddrPortFrom(fe.Addr, fe.Port)
					if err := service.Delete(t.Context(), n.dp, fe); err != nil && !isNotFound(err) {
						t.Fatal(err)
					}
					upsert(t, n.dp, service.Service{Frontend: fe, Backends: backends(n.a, v6, 8080), Reach: reach})
					a := askFrom(t, cgroup, question{NetNS: n.client.NetNS, TCP: tcp, To: dst})
					if a.Err != "" || a.Reply != want || a.From != dst {
						t.Fatalf("in the cgroup: %+v; want %q from %v", a, want, dst)
					}
					c := counters(t, n.dp, fe)
					if c.Flows != 1 || c.Packets != 0 {
						t.Errorf("after one socket-level flow: %+v", c)
					}
					// Outside the cgroup: per packet with Both, not at all
					// with SocketOnly.
					var err error
					var reply string
					var from netip.AddrPort
					timeout := wait
					if reach == service.SocketOnly {
						timeout = 300 * time.Millisecond
					}
					if tcp {
						reply, from, err = askTCP(n.client, dst, timeout)
					} else {
						reply, from, err = askUDP(n.client, 0, dst, timeout)
					}
					if reach == service.SocketOnly {
						if err == nil {
							t.Errorf("outside the cgroup a socket-only frontend answered %q", reply)
						}
						return
					}
					if err != nil || reply != want || from != dst {
						t.Fatalf("outside the cgroup: %q from %v, %v", reply, from, err)
					}
					if c := counters(t, n.dp, fe); c.Flows != 2 || c.Packets == 0 {
						t.Errorf("after a tc-level flow: %+v", c)
					}
				})
			}
		}
	}
}

// TestHairpin: an endpoint that reaches a frontend whose backend is itself
// gets its answer, from the frontend, at the socket level and per packet.
func TestHairpin(t *testing.T) {
	cgroup := testutil.Cgroup(t)
	n := newNodeWith(t, datapath.Config{Cgroup: cgroup})
	for _, v6 := range []bool{false, true} {
		serve(t, n.client, v6, 8080)
		want := netip.AddrPortFrom(addrOf(n.client, v6), 8080).String()
		for _, tcp := range []bool{true, false} {
			fe := service.Frontend{Addr: frontendAddr(v6), Port: 80, Protocol: service.UDP}
			if tcp {
				fe.Protocol = service.TCP
			}
			dst := netip.AddrPortFrom(fe.Addr, fe.Port)
			t.Run(fmt.Sprintf("ipv6=%v/%v", v6, fe.Protocol), func(t *testing.T) {
				upsert(t, n.dp, service.Service{Frontend: fe, Backends: backends(n.client, v6, 8080)})
				a := askFrom(t, cgroup, question{NetNS: n.client.NetNS, TCP: tcp, To: dst})
				if a.Err != "" || a.Reply != want || a.From != dst {
					t.Errorf("socket level: %+v; want %q from %v", a, want, dst)
				}
				// Per packet: twice, the second time on the tracked flow.
				for range 2 {
					var reply string
					var from netip.AddrPort
					var err error
					if tcp {
						reply, from, err = askTCP(n.client, dst, wait)
					} else {
						reply, from, err = askUDP(n.client, 33000, dst, wait)
					}
					if err != nil || reply != want || from != dst {
						t.Fatalf("per packet: %q from %v, %v; want %q from %v", reply, from, err, want, dst)
					}
				}
			})
		}
	}
}

func counters(t *testing.T, dp *datapath.Datapath, fe service.Frontend) service.BackendCounters {
	t.Helper()
	c, err := service.ReadCounters(dp, fe)
	if err != nil || len(c) != 1 {
		t.Fatalf("counters: %v, %v", c, err)
	}
	return c[0]
}
