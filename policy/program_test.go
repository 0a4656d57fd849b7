package policy

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/bpftest"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
)

// The program decides as the semantics say: random policies from the fuzz
// generator, their entries written to a real datapath's maps, and packets
// from every kind of remote end decided by the datapath's own
// policy_decide under BPF_PROG_TEST_RUN, each against the reference.
func TestProgramAgreesWithSemantics(t *testing.T) {
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name: "node", NetNS: ns.Path, BPFFS: testutil.BPFFS(t), Limits: datapath.Limits{Conntrack: 4096},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Unload()
	st := core.Of(dp)
	spec, err := bpftest.LoadProbe()
	if err != nil {
		t.Fatal(err)
	}
	maps := map[string]*ebpf.Map{}
	for name := range spec.Maps {
		maps[name] = st.Map(name)
	}
	var objs bpftest.ProbeObjects
	if err := bpftest.LoadProbeObjects(&objs, &ebpf.CollectionOptions{MapReplacements: maps}); err != nil {
		t.Fatal(err)
	}
	defer objs.Close()

	decide := func(ep uint16, dir datapath.Direction, remote datapath.Identity, proto Protocol, port uint16) policyResult {
		frame := make([]byte, 14+16)
		binary.NativeEndian.PutUint32(frame[14:], uint32(remote))
		binary.NativeEndian.PutUint16(frame[18:], ep)
		frame[20], frame[21] = uint8(dir), uint8(proto)
		binary.NativeEndian.PutUint16(frame[22:], port)
		frame[12], frame[13] = 0x88, 0xb5 // local experimental: no IP header to check
		var r progtest.Result
		if err := nsrun.Do(st.NS, func() (err error) {
			r, err = progtest.Run(objs.ProbePolicy, frame, nil)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return policyResult{verdict: uint8(r.Verdict >> 16), rule: uint16(r.Verdict)}
	}

	rng := rand.New(rand.NewPCG(7, 11))
	cases := 40
	if testing.Short() {
		cases = 20
	}
	checked := 0
	for range cases {
		data := make([]byte, 96)
		for i := range data {
			data[i] = byte(rng.UintN(256))
		}
		in := fuzzInput(data)
		fc, c := genCase(t, &in)
		m, err := c.Resolve(fc.endpoint, fc.ids)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range m.Entries {
			if err := st.Objs.Policy.Put(&k, &v); err != nil {
				t.Fatal(err)
			}
		}
		for k, v := range m.Meta {
			if err := st.Objs.PolicyMeta.Put(&k, &v); err != nil {
				t.Fatal(err)
			}
		}
		for _, pkt := range genPackets(fc.policy, fc.known, &in) {
			for _, dir := range []datapath.Direction{datapath.Ingress, datapath.Egress} {
				want := refVerdict(fc.policy, dir, pkt.remote, fc.cidrOf, pkt.proto, pkt.port)
				if got := decide(fc.endpoint, dir, pkt.remote, pkt.proto, pkt.port); got != want {
					t.Fatalf("%s %s: the program says %+v, the semantics %+v\npolicy %s", dir, pkt, got, want, describe(fc.policy))
				}
				checked++
			}
		}
		for k := range m.Entries {
			st.Objs.Policy.Delete(&k)
		}
		for k := range m.Meta {
			st.Objs.PolicyMeta.Delete(&k)
		}
	}
	t.Logf("%d decisions of the program matched the semantics", checked)
}
