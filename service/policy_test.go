package service_test

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
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
