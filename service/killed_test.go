package service_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/service"
)

// syncSets are what the churning child hands over, in turn: sets of
// services that differ in size and backends.
func syncSet(round int) []service.Service {
	n := 200 + 100*(round%3)
	out := make([]service.Service, n)
	for i := range out {
		out[i] = service.Service{
			Frontend: service.Frontend{Addr: netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)}), Port: 80, Protocol: service.TCP},
			Backends: manyBackends(1 + (i+round)%5),
		}
	}
	return out
}

// churnSync, given "BPFFS|NETNS", syncs the sets in turn until it is
// killed. It says "ready" once the datapath is open and "synced" after each
// Sync.
func churnSync(arg string) int {
	bpffs, ns, _ := strings.Cut(arg, "|")
	dp, err := datapath.Open(context.Background(), datapath.Config{Name: "node", BPFFS: bpffs, NetNS: ns, MustExist: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	for round := 0; ; round++ {
		if _, err := service.Sync(context.Background(), dp, "", syncSet(round)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		fmt.Println("synced")
	}
}

// TestKilledMidSync: a process killed at any point of a Sync leaves the
// services so that Reconcile (or re-opening) makes them consistent: every
// listed service has its frontend, and every frontend, backend and table
// block in the maps belongs to a listed service. A Sync afterwards works.
func TestKilledMidSync(t *testing.T) {
	n := newNode(t)
	bpffs := n.dp.PinDir()[:strings.LastIndexByte(n.dp.PinDir(), '/')]
	undone := 0
	for i := range 16 {
		cmd, err := testutil.Child("churnsync", bpffs+"|"+n.ns.Path)
		if err != nil {
			t.Fatal(err)
		}
		out, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// The kill lands within the third Sync, timed by the second (the
		// first may find its set in place already; all are slow on an
		// emulated kernel).
		r := bufio.NewReader(out)
		var start, end time.Time
		for _, want := range []string{"ready\n", "synced\n", "synced\n"} {
			if line, err := r.ReadString('\n'); err != nil || line != want {
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatalf("child: %q, %v", line, err)
			}
			start, end = end, time.Now()
		}
		// Its writes come after it computes the change: its second half.
		took := end.Sub(start)
		time.Sleep(took/2 + time.Duration(rand.Int64N(int64(took/2))))
		cmd.Process.Kill()
		cmd.Wait()
		k, err := n.dp.Reconcile(context.Background())
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		undone += k
		checkConsistent(t, n.dp)
	}
	t.Logf("Reconcile undid %d half-made services", undone)
	if undone == 0 {
		t.Error("no kill left half-made work: the test proves nothing")
	}
	if _, err := service.Sync(context.Background(), n.dp, "", syncSet(0)); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, n.dp)
}

// checkConsistent checks the service maps against List.
func checkConsistent(t *testing.T, dp *datapath.Datapath) {
	t.Helper()
	list, err := service.List(dp)
	if err != nil {
		t.Fatal(err)
	}
	st := core.Of(dp)
	ids := map[uint32]bool{}
	var k bpfobj.TypesLbFrontendKey
	var v bpfobj.TypesLbFrontend
	frontends := 0
	it := st.Objs.LbFrontends.Iterate()
	for it.Next(&k, &v) {
		ids[v.Service] = true
		frontends++
	}
	if frontends != len(list) {
		t.Fatalf("%d frontends in the map, %d services listed", frontends, len(list))
	}
	var id uint32
	var b bpfobj.TypesLbBackend
	backends := 0
	it = st.Objs.LbBackends.Iterate()
	for it.Next(&id, &b) {
		backends++
		if !ids[b.Service] || id>>16 != b.Service {
			t.Fatalf("backend %#x of service %d, which has no frontend", id, b.Service)
		}
	}
	want := 0
	for _, s := range list {
		want += len(s.Backends)
	}
	if backends != want {
		t.Fatalf("%d backends in the map, the services have %d", backends, want)
	}
	var sk bpfobj.TypesLbSlotKey
	var sb bpfobj.TypesLbSlotBlock
	it = st.Objs.LbSlots.Iterate()
	for it.Next(&sk, &sb) {
		if !ids[sk.Table/2] {
			t.Fatalf("a table block of service %d, which has no frontend", sk.Table/2)
		}
	}
}
