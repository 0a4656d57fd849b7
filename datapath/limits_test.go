package datapath

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/testutil"
)

// Maps whose size is fixed by what they are, not by how much the datapath
// holds.
var fixedSize = []string{
	bpfobj.EndpointMapLayout,       // the stamp
	bpfobj.EndpointMapEventConfig,  // the settings
	bpfobj.EndpointMapEventLimiter, // one per CPU
	bpfobj.EndpointMapEventLost,    // one per cause
	bpfobj.EndpointMapMetrics,      // one per direction and reason
	bpfobj.EndpointMapNodeConfig,   // the local node's settings
	bpfobj.EndpointMapIpsecSpi,     // the IPsec key in use
}

// Every map that holds objects is sized from Limits, and Limits reads the
// limits back from the sizes.
func TestMapsSizedFromLimits(t *testing.T) {
	limits := Limits{
		Endpoints: 3, IPCache: 64, Conntrack: 2048, PolicyEntries: 100, CIDRIdentities: 5,
		Services: 4, Backends: 9, ServiceSlots: 2048, Nodes: 7,
	}
	dp := open(t, Config{Limits: limits})
	if got := dp.Limits(); got != limits {
		t.Errorf("Limits() = %+v, want %+v", got, limits)
	}
	want := map[string]uint32{
		"endpoints": 3, "ep_counters": 3, "ipcache": 64, "conntrack": 2048,
		"fragments": 1024, "lb_affinity": 1024, "lb_sock_revnat": 1024, "snat": 2048,
		"policy": 100, "policy_counters": 100, "policy_meta": 6,
		// endpoint and policy records, CIDR identities, services and
		// their shared record, nodes, the spare
		"ledger":       2*3 + 5 + 4 + 1 + 7 + ledgerSpare,
		"ledger_blobs": uint32(3 + 2 + 4 + 1 + blobSpare),
		"lb_frontends": 4, "lb_revnat": 4, "lb_backends": 9, "lb_counters": 9, "lb_slots": 128,
		"node_addrs": 2*7 + core.NodeAddrSpare, "node_cidrs": 4*7 + nodeCIDRSpare,
	}
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		t.Fatal(err)
	}
	for name := range spec.Maps {
		m := dp.st.Map(name)
		switch size, ok := want[name]; {
		case ok:
			if m.MaxEntries() != size {
				t.Errorf("%s has room for %d, want %d", name, m.MaxEntries(), size)
			}
		case name == bpfobj.EndpointMapEvents:
			if uint64(m.MaxEntries()) != ringBytes(DefaultEventConfig(), cpus()) {
				t.Errorf("events ring of %d bytes, want %d", m.MaxEntries(), ringBytes(DefaultEventConfig(), cpus()))
			}
		case !strings.Contains(strings.Join(fixedSize, " "), name):
			t.Errorf("map %s is not sized from Limits", name)
		}
	}
	if got := DefaultLimits(); got.ServiceSlots/16384 < 1000 || got.CIDRIdentities == 0 || got.PolicyEntries < 16*got.Endpoints {
		t.Errorf("default limits %+v: want room for 1,000 Maglev services and 16 policy entries per endpoint", got)
	}
	for _, bad := range []Limits{{PolicyEntries: -1}, {PolicyEntries: 1<<24 + 1}, {CIDRIdentities: -1}, {CIDRIdentities: 1<<20 + 1}, {Nodes: -1}, {Nodes: 65536}} {
		if err := (&Config{Name: "x", Limits: bad}).validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("limits %+v: %v, want ErrInvalid", bad, err)
		}
	}
}

// mapMemory returns what the kernel charges for a map (its memlock in
// fdinfo: what it allocated, not what it may grow to) and what it holds
// when full, estimated as its entries times their key and value (a
// per-CPU value once per CPU).
func mapMemory(t *testing.T, m *ebpf.Map) (charged, full uint64) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", m.FD()))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "memlock:"); ok {
			fmt.Sscan(strings.TrimSpace(v), &charged)
		}
	}
	value := uint64(m.ValueSize())
	if m.Type() == ebpf.PerCPUArray || m.Type() == ebpf.PerCPUHash {
		value = (value + 7) &^ 7 * uint64(cpus())
	}
	full = uint64(m.MaxEntries()) * (uint64(m.KeySize()) + value)
	if m.Type() == ebpf.RingBuf {
		full = uint64(m.MaxEntries())
	}
	return charged, full
}

// A datapath of the default limits takes memory within reason: what the
// kernel allocates up front, less what grows with the CPUs, stays under
// 80 MiB. The figures are logged (go test -v).
func TestDefaultMapMemory(t *testing.T) {
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	dp := open(t, Config{NetNS: ns.Path, Limits: DefaultLimits()})
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		t.Fatal(err)
	}
	var charged, perCPU, full uint64
	for _, name := range sortedNames(spec) {
		m := dp.st.Map(name)
		c, f := mapMemory(t, m)
		t.Logf("%-16s %8d entries  %7.2f MiB charged  %8.2f MiB full", name, m.MaxEntries(), float64(c)/(1<<20), float64(f)/(1<<20))
		charged += c
		full += f
		if m.Type() == ebpf.PerCPUArray || m.Type() == ebpf.PerCPUHash {
			perCPU += c
		}
	}
	t.Logf("%d CPUs: %.1f MiB charged (%.1f MiB of it per-CPU maps), %.1f MiB when every map is full",
		cpus(), float64(charged)/(1<<20), float64(perCPU)/(1<<20), float64(full)/(1<<20))
	// Before Linux 6.4 a map's memlock in fdinfo is what it takes full,
	// not what it was charged (map_mem_usage came with 6.4).
	if !testutil.KernelAtLeast(6, 4) {
		t.Skip("this kernel reports no map's charged memory")
	}
	if charged-perCPU > 80<<20 {
		t.Errorf("a datapath of the default limits is charged %.1f MiB besides per-CPU maps, want at most 80", float64(charged-perCPU)/(1<<20))
	}
}
