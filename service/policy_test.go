package service_test

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/policy"
	"github.com/sluicedp/sluice/service"
)

// TestPolicyAfterTranslation: egress policy decides on the backend a flow
// is translated to, its identity and port, not on the frontend.
func TestPolicyAfterTranslation(t *testing.T) {
	n := newNode(t)
	serve(t, n.a, false, 8080)
	serve(t, n.b, false, 8080)
	// The client may reach a (identity 1002) on TCP 8080, and nothing else.
	_, err := policy.Apply(context.Background(), n.dp, n.client.ID, policy.Policy{Egress: []policy.Rule{{
		Peers: []policy.Peer{{Identity: n.a.Identity}},
		Ports: []policy.Port{{Protocol: policy.TCP, Port: 8080}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP}
	dst := netip.AddrPortFrom(fe.Addr, fe.Port)

	upsert(t, n.dp, service.Service{Frontend: fe, Backends: backends(n.a, false, 8080), Reach: service.TCOnly})
	if answer, from, err := askTCP(n.client, dst, wait); err != nil || from != dst || portOf(t, answer) != 8080 {
		t.Fatalf("to the allowed backend: %q from %v, %v", answer, from, err)
	}

	upsert(t, n.dp, service.Service{Frontend: fe, Backends: backends(n.b, false, 8080), Reach: service.TCOnly})
	before := dropped(t, n.dp, datapath.ReasonPolicyDenied)
	if answer, _, err := askTCP(n.client, dst, 300*time.Millisecond); err == nil {
		t.Fatalf("to a backend policy denies: answered %q", answer)
	}
	if after := dropped(t, n.dp, datapath.ReasonPolicyDenied); after <= before {
		t.Errorf("POLICY_DENIED drops %d, then %d", before, after)
	}
}

// A connection through a frontend survives policy changes that still
// allow its backend: its service entry says where it goes, not whether it
// may, and lives as long as the connection does.
func TestServiceConnectionSurvivesPolicyChanges(t *testing.T) {
	n := newNode(t)
	serve(t, n.a, false, 9001, 9002)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP}
	upsert(t, n.dp, service.Service{Frontend: fe, Backends: backends(n.a, false, 9001, 9002), Reach: service.TCOnly})
	toA := policy.Rule{Peers: []policy.Peer{{Identity: n.a.Identity}}, Ports: []policy.Port{{Protocol: policy.TCP, Port: 9001, EndPort: 9002}}}
	other := policy.Rule{Peers: []policy.Peer{{Identity: n.b.Identity}}, Ports: []policy.Port{{Protocol: policy.TCP, Port: 7000}}}
	applyTo := func(rules ...policy.Rule) {
		t.Helper()
		if _, err := policy.Apply(context.Background(), n.dp, n.client.ID, policy.Policy{Egress: rules}); err != nil {
			t.Fatal(err)
		}
	}
	applyTo(toA, other)
	var c net.Conn
	if err := inNS(n.client, func() (err error) {
		c, err = net.DialTimeout("tcp", netip.AddrPortFrom(fe.Addr, fe.Port).String(), wait)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	port := askOn(t, c)
	// Each change removes or adds an entry the connection does not use.
	for i := range 8 {
		if i%2 == 0 {
			applyTo(toA)
		} else {
			applyTo(toA, other)
		}
		if p := askOn(t, c); p != port {
			t.Fatalf("change %d: the connection went from backend port %d to %d", i, port, p)
		}
	}
	flows, err := n.dp.Flows()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		if f.ToFrontend && time.Until(f.Expires) < time.Hour {
			t.Errorf("the connection's service entry expires in %v: %v", time.Until(f.Expires), f)
		}
	}
}

// Translation is decided before it is recorded: a flow policy denies
// leaves no service entry, no affinity and no flow in its backend's
// counters, so the client's retries are free to go to a backend it may
// reach.
func TestDeniedFlowLeavesNoTrace(t *testing.T) {
	n := newNode(t)
	serve(t, n.a, false, 8080)
	serve(t, n.b, false, 8080)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.TCP}
	dst := netip.AddrPortFrom(fe.Addr, fe.Port)
	svc := service.Service{Frontend: fe, Backends: append(backends(n.a, false, 8080), backends(n.b, false, 8080)...),
		Affinity: time.Hour, Reach: service.TCOnly}
	upsert(t, n.dp, svc)
	// The client may reach b only.
	if _, err := policy.Apply(context.Background(), n.dp, n.client.ID, policy.Policy{Egress: []policy.Rule{{
		Peers: []policy.Peer{{Identity: n.b.Identity}},
	}}}); err != nil {
		t.Fatal(err)
	}
	answered := 0
	for range 20 {
		if _, _, err := askTCP(n.client, dst, 300*time.Millisecond); err == nil {
			answered++
		}
	}
	if answered == 0 {
		t.Error("20 connections, none answered: the denied backend stuck")
	}
	counters, err := service.ReadCounters(n.dp, fe)
	if err != nil {
		t.Fatal(err)
	}
	if counters[0].Flows != 0 || counters[0].Packets != 0 {
		t.Errorf("the denied backend counts %+v", counters[0])
	}
	if counters[1].Flows != uint64(answered) {
		t.Errorf("the allowed backend counts %d flows, %d connections were answered", counters[1].Flows, answered)
	}
}

// Affinity never picks a backend of weight 0: it is in no slot.
func TestAffinitySkipsWeightZero(t *testing.T) {
	n := newNode(t)
	serve(t, n.a, false, 9001, 9002)
	fe := service.Frontend{Addr: fe4, Port: 80, Protocol: service.UDP}
	dst := netip.AddrPortFrom(fe.Addr, fe.Port)
	svc := service.Service{Frontend: fe, Backends: backends(n.a, false, 9001, 9002), Affinity: time.Hour, Reach: service.TCOnly}
	upsert(t, n.dp, svc)
	answer, _, err := askUDP(n.client, 0, dst, wait)
	if err != nil {
		t.Fatal(err)
	}
	pinned := portOf(t, answer)
	for i := range svc.Backends {
		if svc.Backends[i].Port == pinned {
			svc.Backends[i].Weight = 0
		}
	}
	upsert(t, n.dp, svc)
	for range 5 {
		answer, _, err := askUDP(n.client, 0, dst, wait)
		if err != nil {
			t.Fatal(err)
		}
		if p := portOf(t, answer); p == pinned {
			t.Fatalf("a new flow went to backend port %d, whose weight is 0", p)
		}
	}
}

// A datagram larger than the MTU goes through a frontend whole, both
// ways, under a port policy: its later fragments follow the first one's
// translation and decision (large DNS answers).
func TestFragmentsThroughFrontend(t *testing.T) {
	n := newNode(t)
	if _, err := policy.Apply(context.Background(), n.dp, n.client.ID, policy.Policy{Egress: []policy.Rule{{
		Peers: []policy.Peer{{Identity: n.a.Identity}},
		Ports: []policy.Port{{Protocol: policy.UDP, Port: 5353}},
	}}}); err != nil {
		t.Fatal(err)
	}
	for _, v6 := range []bool{false, true} {
		backend := netip.AddrPortFrom(addrOf(n.a, v6), 5353)
		testutil.OpenNetNS(t, n.a.NetNS).EchoUDP(t, backend)
		fe := service.Frontend{Addr: frontendAddr(v6), Port: 53, Protocol: service.UDP}
		upsert(t, n.dp, service.Service{Frontend: fe, Backends: []service.Backend{{Addr: backend.Addr(), Port: 5353, Weight: 1}}, Reach: service.TCOnly})
		got, from := 0, netip.AddrPort{}
		if err := inNS(n.client, func() error {
			c, err := net.ListenPacket("udp", ":0")
			if err != nil {
				return err
			}
			defer c.Close()
			buf := make([]byte, 65536)
			for range 3 { // a lost fragment loses the datagram: try again
				c.SetDeadline(time.Now().Add(wait / 3))
				if _, err := c.WriteTo(make([]byte, 4000), net.UDPAddrFromAddrPort(netip.AddrPortFrom(fe.Addr, fe.Port))); err != nil {
					return err
				}
				k, peer, err := c.ReadFrom(buf)
				if err == nil {
					got, from = k, peer.(*net.UDPAddr).AddrPort()
					return nil
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if want := netip.AddrPortFrom(fe.Addr, fe.Port); got != 4000 || from.Addr().Unmap() != want.Addr() || from.Port() != want.Port() {
			t.Errorf("ipv6=%v: a 4000-byte datagram through %v: %d bytes came back from %v", v6, fe, got, from)
		}
	}
}
