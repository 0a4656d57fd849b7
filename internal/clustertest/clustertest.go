// Package clustertest builds, for tests, a cluster of sluice datapaths on
// one machine: testutil.NewCluster's namespaces, each node with its own
// datapath (on its own bpffs) told about the others (package node), and
// endpoints on every node. Everything goes when the test ends.
package clustertest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/endpoint"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/node"
)

// Options shape a cluster; the zero value is three nodes routing over
// VXLAN, two endpoints each, on a 1500-byte underlay.
type Options struct {
	Routing     datapath.Routing // RoutingVXLAN when RoutingLocal
	Nodes       int              // 3 when 0
	Endpoints   int              // per node; 2 when 0
	UnderlayMTU int              // 1500 when 0
	// NoPeers leaves each datapath without the other nodes: the test
	// applies them.
	NoPeers bool
	// Limits of every datapath; Conntrack 4096 (small, quick to make)
	// unless set.
	Limits datapath.Limits
	// Encryption between the nodes. With EncryptionIPsec every node has
	// IPsecKeys before it learns of the others, unless NoKeys.
	Encryption datapath.Encryption
	NoKeys     bool
}

// IPsecKey is a key for tests: AES-128-GCM, a fixed key of the SPI.
func IPsecKey(spi uint8) node.IPsecKey {
	key := make([]byte, 20)
	for i := range key {
		key[i] = spi*16 + byte(i)
	}
	return node.IPsecKey{SPI: spi, AEAD: "rfc4106(gcm(aes))", Key: key, ICVBits: 128}
}

// IPsecKeys is the key set a cluster starts with: IPsecKey(1).
func IPsecKeys() node.IPsecKeys {
	return node.IPsecKeys{Keys: []node.IPsecKey{IPsecKey(1)}, Current: 1}
}

// Cluster is the nodes, each with its datapath and endpoints.
type Cluster struct {
	*testutil.Cluster
	Nodes []*Node
}

// Node is one node of the cluster.
type Node struct {
	*testutil.ClusterNode
	DP        *datapath.Datapath
	Config    datapath.Node
	Endpoints []*endpoint.Endpoint
	// WireGuardKey is the node's public key, with EncryptionWireGuard.
	WireGuardKey [32]byte
}

// New builds a cluster.
func New(t testing.TB, opts Options) *Cluster {
	t.Helper()
	testutil.Privileged(t)
	if opts.Routing == datapath.RoutingLocal {
		opts.Routing = datapath.RoutingVXLAN
	}
	if opts.Endpoints == 0 {
		opts.Endpoints = 2
	}
	if opts.Limits.Conntrack == 0 {
		opts.Limits.Conntrack = 4096
	}
	c := &Cluster{Cluster: testutil.NewCluster(t, testutil.ClusterOptions{Nodes: opts.Nodes, UnderlayMTU: opts.UnderlayMTU})}
	for i, cn := range c.Cluster.Nodes {
		n := &Node{ClusterNode: cn, Config: datapath.Node{
			Name:         cn.Name,
			PodCIDRs:     cn.PodCIDRs,
			Routing:      opts.Routing,
			Addresses:    []netip.Addr{cn.IPv4, cn.IPv6},
			Devices:      []string{cn.Device},
			ClusterCIDRs: c.ClusterCIDRs,
			Encryption:   opts.Encryption,
		}}
		dp, err := datapath.Open(context.Background(), datapath.Config{
			Name:   "node",
			NetNS:  cn.NS.Path,
			BPFFS:  cn.BPFFS,
			Node:   n.Config,
			Limits: opts.Limits,
		})
		if err != nil {
			t.Fatalf("open the datapath of %s: %v", cn, err)
		}
		n.DP = dp
		t.Cleanup(func() {
			if err := dp.Unload(); err != nil && !errors.Is(err, os.ErrClosed) {
				t.Errorf("unload the datapath of %s: %v", cn, err)
			}
		})
		switch {
		case opts.Encryption == datapath.EncryptionIPsec && !opts.NoKeys:
			if _, err := node.SetIPsecKeys(context.Background(), dp, IPsecKeys()); err != nil {
				t.Fatalf("IPsec keys of %s: %v", cn, err)
			}
		case opts.Encryption == datapath.EncryptionWireGuard:
			if n.WireGuardKey, err = node.WireGuardPublicKey(dp); err != nil {
				t.Fatalf("WireGuard key of %s: %v", cn, err)
			}
		}
		for j := range opts.Endpoints {
			ep, err := endpoint.Create(context.Background(), dp, EndpointSpec(i, j))
			if err != nil {
				t.Fatalf("create endpoint %d on %s: %v", j+1, cn, err)
			}
			n.Endpoints = append(n.Endpoints, ep)
		}
		c.Nodes = append(c.Nodes, n)
	}
	if !opts.NoPeers {
		for _, n := range c.Nodes {
			if _, err := node.Sync(context.Background(), n.DP, c.Peers(n)); err != nil {
				t.Fatalf("tell %s about the other nodes: %v", n, err)
			}
		}
	}
	return c
}

// EndpointSpec is endpoint j of node i: ID j+1, 198.19.i.(10+j) and
// fd00:10:0:i::(10+j), identity 1000 + 100i + j, a namespace of its own.
func EndpointSpec(i, j int) endpoint.Spec {
	return endpoint.Spec{
		ID:       uint16(j + 1),
		IPv4:     netip.AddrFrom4([4]byte{198, 19, byte(i), byte(10 + j)}),
		IPv6:     netip.MustParseAddr(fmt.Sprintf("fd00:10:0:%x::%x", i, 0x10+j)),
		Identity: Identity(i, j),
		NetNS:    testutil.Name("sluice-t-"),
	}
}

// Identity is the identity of endpoint j of node i.
func Identity(i, j int) datapath.Identity { return datapath.Identity(1000 + 100*i + j) }

// Object is node n as the other nodes know it.
func (n *Node) Object() node.Node {
	return node.Node{Name: n.Name, Addresses: n.Config.Addresses, PodCIDRs: n.Config.PodCIDRs, WireGuardKey: n.WireGuardKey}
}

// Peers is every node but n, as n knows them.
func (c *Cluster) Peers(n *Node) []node.Node {
	var out []node.Node
	for _, m := range c.Nodes {
		if m != n {
			out = append(out, m.Object())
		}
	}
	return out
}

// Endpoint returns endpoint j of node i.
func (c *Cluster) Endpoint(i, j int) *endpoint.Endpoint { return c.Nodes[i].Endpoints[j] }

// NetNS returns an endpoint's namespace.
func NetNS(t testing.TB, ep *endpoint.Endpoint) *testutil.NetNS {
	t.Helper()
	return testutil.OpenNetNS(t, ep.NetNS)
}

// Serve accepts TCP connections on addr inside ns until the test ends,
// and hands each to handle, on a goroutine of its own, which closes it
// after.
func Serve(t testing.TB, ns *testutil.NetNS, addr netip.AddrPort, handle func(net.Conn)) {
	t.Helper()
	l := ns.ListenTCP(t, addr)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
}

// Echo serves TCP echo on addr inside ns until the test ends.
func Echo(t testing.TB, ns *testutil.NetNS, addr netip.AddrPort) {
	t.Helper()
	Serve(t, ns, addr, func(c net.Conn) { io.Copy(c, c) })
}

// TCPRoundTrip connects from ns to addr, writes msg and reads it back,
// within timeout; it returns the error of the first step that failed.
func TCPRoundTrip(t testing.TB, ns *testutil.NetNS, addr netip.AddrPort, msg []byte, timeout time.Duration) error {
	t.Helper()
	c, err := ns.DialTCP(t, addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != string(msg) {
		return fmt.Errorf("echo of %d bytes differs", len(msg))
	}
	return nil
}
