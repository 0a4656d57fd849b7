package policy

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/packet"
	"github.com/sluicedp/sluice/internal/progtest"
	"github.com/sluicedp/sluice/internal/testutil"
)

// This file holds the stateful half of the reference semantics: what
// conntrack lets through (established flows, replies, TCP state, later
// fragments) and what a new policy revokes, written from the rules in the
// package doc and docs/architecture.md, not from the program. Random
// sequences of policy changes and packets between two local endpoints run
// through the real from-endpoint program and through this model; every
// verdict and drop reason must agree.

// refTuple is a flow as one packet has it.
type refTuple struct {
	src, dst     int // endpoint index
	proto        Protocol
	sport, dport uint16
}

func (t refTuple) reverse() refTuple {
	return refTuple{t.dst, t.src, t.proto, t.dport, t.sport}
}

// refEntry is a tracked flow of endpoint owner, as it began (its tuple)
// and in its owner's direction.
type refEntry struct {
	owner int
	dir   datapath.Direction
	tuple refTuple
}

type refState struct {
	fin, finReply, rst bool
	identity           datapath.Identity
}

func (s refState) over(syn bool) bool { return s.rst || (s.fin && s.finReply && syn) }

// refModel is two endpoints' policies and conntrack.
type refModel struct {
	ids      [2]datapath.Identity
	policies [2]Policy
	ct       map[refEntry]*refState
	frags    map[refDatagram]refTuple // the first fragment's tuple
}

// refDatagram names the fragments of one datagram.
type refDatagram struct {
	src, dst int
	proto    Protocol
	id       uint16
}

type refPacket struct {
	tuple    refTuple
	flags    uint8 // TCP
	fragment int   // 0: none, 1: first, 2: later
	id       uint16
}

func (p refPacket) String() string {
	return fmt.Sprintf("%d:%d > %d:%d %v flags %#x fragment %d id %d", p.tuple.src, p.tuple.sport, p.tuple.dst, p.tuple.dport, p.tuple.proto, p.flags, p.fragment, p.id)
}

// refOutcome is a verdict: delivered, or dropped for reason in dir.
type refOutcome struct {
	delivered bool
	reason    datapath.Reason
	dir       datapath.Direction
}

func (m *refModel) syn(p refPacket) bool {
	return p.tuple.proto == TCP && p.fragment != 2 && p.flags&(packet.SYN|packet.ACK) == packet.SYN
}

// side is one endpoint's check of the packet: its own flow, a reply, or a
// new flow its policy decides. It returns false and the reason to drop.
func (m *refModel) side(p refPacket, owner int, dir datapath.Direction) (bool, datapath.Reason) {
	t := p.tuple
	syn := m.syn(p)
	if e := m.ct[refEntry{owner, dir, t}]; e != nil && !e.over(syn) {
		m.touch(e, p, false)
		return true, 0
	}
	other := datapath.Ingress
	if dir == datapath.Ingress {
		other = datapath.Egress
	}
	if e := m.ct[refEntry{owner, other, t.reverse()}]; e != nil && !syn && !e.over(syn) {
		m.touch(e, p, true)
		return true, 0
	}
	if t.proto == TCP && p.fragment != 2 && !syn {
		return false, datapath.ReasonNoConnection
	}
	remote := m.ids[1-owner]
	if res := refVerdict(m.policies[owner], dir, remote, noCIDR, t.proto, t.dport); res.verdict == policyDenied {
		return false, datapath.ReasonPolicyDenied
	}
	e := &refState{identity: remote}
	m.touch(e, p, false)
	m.ct[refEntry{owner, dir, t}] = e
	return true, 0
}

func (m *refModel) touch(e *refState, p refPacket, reply bool) {
	if p.tuple.proto != TCP || p.fragment == 2 {
		return
	}
	if p.flags&packet.FIN != 0 {
		if reply {
			e.finReply = true
		} else {
			e.fin = true
		}
	}
	if p.flags&packet.RST != 0 {
		e.rst = true
	}
}

func noCIDR(datapath.Identity) (netip.Prefix, bool) { return netip.Prefix{}, false }

// send is what the datapath owes packet p: the sender's egress check, then
// the receiver's ingress check.
func (m *refModel) send(p refPacket) refOutcome {
	d := refDatagram{p.tuple.src, p.tuple.dst, p.tuple.proto, p.id}
	switch p.fragment {
	case 1:
		m.frags[d] = p.tuple
	case 2:
		first, ok := m.frags[d]
		if !ok {
			return refOutcome{reason: datapath.ReasonFragNoFirst, dir: datapath.Egress}
		}
		p.tuple = first
	}
	if ok, why := m.side(p, p.tuple.src, datapath.Egress); !ok {
		return refOutcome{reason: why, dir: datapath.Egress}
	}
	if ok, why := m.side(p, p.tuple.dst, datapath.Ingress); !ok {
		return refOutcome{reason: why, dir: datapath.Ingress}
	}
	return refOutcome{delivered: true}
}

// apply replaces endpoint i's policy and forgets every flow of its that
// the new one does not allow, and the other side's entry of it.
func (m *refModel) apply(i int, p Policy) {
	m.policies[i] = p
	for k, e := range m.ct {
		if k.owner != i {
			continue
		}
		if refVerdict(p, k.dir, e.identity, noCIDR, k.tuple.proto, k.tuple.dport).verdict == policyDenied {
			delete(m.ct, k)
			peer := k
			peer.owner = 1 - i
			peer.dir = datapath.Ingress
			if k.dir == datapath.Ingress {
				peer.dir = datapath.Egress
			}
			delete(m.ct, peer)
		}
	}
}

// genStatefulPolicy is a small random policy in one direction or both,
// over the other endpoint's identity and a few ports.
func genStatefulPolicy(rng *rand.Rand, other datapath.Identity) Policy {
	rules := func() []Rule {
		switch rng.IntN(4) {
		case 0:
			return nil // no policy in this direction
		case 1:
			return []Rule{} // nothing allowed
		}
		var out []Rule
		for range 1 + rng.IntN(3) {
			r := Rule{}
			if rng.IntN(4) == 0 {
				r.Action = Deny
			}
			switch rng.IntN(3) {
			case 0:
				r.Peers = []Peer{{Identity: other}}
			case 1:
				r.Peers = []Peer{{Identity: 9999}}
			}
			switch rng.IntN(4) {
			case 0:
				r.Ports = []Port{{Protocol: TCP, Port: 80}}
			case 1:
				r.Ports = []Port{{Protocol: UDP, Port: 53}}
			case 2:
				r.Ports = []Port{{Protocol: TCP, Port: 80, EndPort: 81}}
			}
			out = append(out, r)
		}
		return out
	}
	return Policy{Ingress: rules(), Egress: rules()}
}

func genPacket(rng *rand.Rand) refPacket {
	p := refPacket{tuple: refTuple{src: rng.IntN(2), sport: uint16(40000 + rng.IntN(2)), dport: uint16(80 + rng.IntN(2))}}
	p.tuple.dst = 1 - p.tuple.src
	if rng.IntN(2) == 0 { // the other way round: a reply's ports
		p.tuple.sport, p.tuple.dport = p.tuple.dport, p.tuple.sport
	}
	p.tuple.proto = TCP
	if rng.IntN(3) == 0 {
		p.tuple.proto = UDP
		if rng.IntN(2) == 0 {
			p.tuple.dport = 53
		}
		if rng.IntN(4) == 0 {
			p.fragment, p.id = 1+rng.IntN(2), uint16(1+rng.IntN(3))
		}
	}
	p.flags = []uint8{packet.SYN, packet.SYN | packet.ACK, packet.ACK, packet.ACK | packet.PSH, packet.FIN | packet.ACK, packet.RST}[rng.IntN(6)]
	return p
}

func TestStatefulSemantics(t *testing.T) {
	testutil.Privileged(t)
	ns := testutil.NewNetNS(t)
	dp, err := datapath.Open(context.Background(), datapath.Config{
		Name: "node", NetNS: ns.Path, BPFFS: testutil.BPFFS(t), Limits: datapath.Limits{Conntrack: 4096},
		Node: datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Unload()
	var eps [2]*endpoint.Endpoint
	for i := range eps {
		if eps[i], err = endpoint.Create(context.Background(), dp, endpoint.Spec{
			ID: uint16(i + 1), IPv4: netip.AddrFrom4([4]byte{198, 18, 1, byte(11 + i)}),
			Identity: datapath.Identity(1001 + i), NetNS: testutil.Name("sluice-t-"),
		}); err != nil {
			t.Fatal(err)
		}
	}
	progs, err := core.Of(dp).EndpointPrograms()
	if err != nil {
		t.Fatal(err)
	}
	st := core.Of(dp)
	frame := func(p refPacket) []byte {
		from, to := eps[p.tuple.src], eps[p.tuple.dst]
		eth := &packet.Ethernet{Src: from.MAC, Dst: from.HostMAC}
		ip := &packet.IPv4{Src: from.IPv4, Dst: to.IPv4, ID: p.id, MoreFragments: p.fragment == 1}
		body := packet.Payload(make([]byte, 16))
		if p.fragment == 2 {
			ip.FragOffset, ip.Protocol = 4, packet.ProtoUDP
			return packet.Build(eth, ip, body)
		}
		if p.tuple.proto == UDP {
			return packet.Build(eth, ip, &packet.UDP{SrcPort: p.tuple.sport, DstPort: p.tuple.dport}, body)
		}
		return packet.Build(eth, ip, &packet.TCP{SrcPort: p.tuple.sport, DstPort: p.tuple.dport, Flags: p.flags})
	}

	rng := rand.New(rand.NewPCG(3, 5))
	sequences, length := 30, 60
	if testing.Short() {
		sequences = 10
	}
	for seq := range sequences {
		m := &refModel{ids: [2]datapath.Identity{1001, 1002}, ct: map[refEntry]*refState{}, frags: map[refDatagram]refTuple{}}
		for i := range eps { // a clean start: no policy, no flows
			if _, err := Apply(context.Background(), dp, eps[i].ID, Policy{}); err != nil {
				t.Fatal(err)
			}
			if _, err := Delete(context.Background(), dp, eps[i].ID); err != nil {
				t.Fatal(err)
			}
		}
		for _, name := range []string{"conntrack", "fragments"} {
			emptyMap(t, st.Map(name))
		}
		var trail []string
		for range length {
			if rng.IntN(8) == 0 {
				i := rng.IntN(2)
				p := genStatefulPolicy(rng, m.ids[1-i])
				if _, err := Apply(context.Background(), dp, eps[i].ID, p); err != nil {
					t.Fatal(err)
				}
				m.apply(i, p)
				trail = append(trail, fmt.Sprintf("apply to %d: %s", i, describe(p)))
				continue
			}
			p := genPacket(rng)
			want := m.send(p)
			before, err := dp.Metrics()
			if err != nil {
				t.Fatal(err)
			}
			var r progtest.Result
			if err := nsrun.Do(st.NS, func() (err error) {
				r, err = progtest.Run(progs.FromEndpoint, frame(p), &progtest.SKB{Ifindex: uint32(eps[p.tuple.src].HostIfindex)})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			after, err := dp.Metrics()
			if err != nil {
				t.Fatal(err)
			}
			got := refOutcome{delivered: r.Verdict == progtest.TCActRedirect}
			for k, v := range after {
				if k.Reason != datapath.ReasonForwarded && v.Packets > before[k].Packets {
					got.reason, got.dir = k.Reason, k.Direction
				}
			}
			trail = append(trail, fmt.Sprintf("%v: %+v", p, want))
			if got != want {
				t.Fatalf("sequence %d: program %+v, reference %+v after:\n%s", seq, got, want, joinLines(trail))
			}
		}
	}
}

// emptyMap deletes every entry of m.
func emptyMap(t *testing.T, m *ebpf.Map) {
	t.Helper()
	var (
		k, v []byte
		keys [][]byte
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, slices.Clone(k))
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatal(err)
		}
	}
}

func joinLines(lines []string) string {
	out := ""
	for _, l := range lines {
		out += "  " + l + "\n"
	}
	return out
}
