package node_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/clustertest"
	"github.com/sluicedp/sluice/internal/nsrun"
	"github.com/sluicedp/sluice/internal/testutil"
	"github.com/sluicedp/sluice/internal/wireguard"
	"github.com/sluicedp/sluice/internal/xfrm"
	"github.com/sluicedp/sluice/node"
)

var encryptions = []datapath.Encryption{datapath.EncryptionIPsec, datapath.EncryptionWireGuard}

// requireEncryption skips the test on a kernel built without what e
// needs (the host's: the VM's Debian kernels have both as modules).
func requireEncryption(t *testing.T, e datapath.Encryption) {
	t.Helper()
	switch e {
	case datapath.EncryptionIPsec:
		testutil.RequireConfig(t, "CONFIG_INET_ESP")
	case datapath.EncryptionWireGuard:
		testutil.RequireConfig(t, "CONFIG_WIREGUARD")
	}
}

// marker is a random payload that must never be seen on the underlay.
func marker(t *testing.T) []byte {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return []byte("secret-" + hex.EncodeToString(b))
}

// captureUnderlay records what the nodes' ports of the underlay bridge
// carry: every packet between nodes, as anyone on the wire sees it
// (inside a node, a decrypted packet is seen again).
func captureUnderlay(t *testing.T, c *clustertest.Cluster) func() [][]byte {
	var caps []*testutil.Capture
	for _, n := range c.Nodes {
		caps = append(caps, c.Underlay.StartCapture(t, n.Name))
	}
	return func() [][]byte {
		var all [][]byte
		for _, cp := range caps {
			all = append(all, cp.Stop()...)
		}
		return all
	}
}

// checkEncrypted fails unless every IP packet between the nodes' underlay
// addresses is ESP (IPsec) or WireGuard's UDP, at least one was seen, no
// packet has a pod's address outside, and secret is nowhere. It returns
// the SPIs of the ESP packets seen.
func checkEncrypted(t *testing.T, c *clustertest.Cluster, e datapath.Encryption, frames [][]byte, secret []byte) map[uint32]int {
	t.Helper()
	isNode := func(a netip.Addr) bool {
		return slices.ContainsFunc(c.Nodes, func(n *clustertest.Node) bool { return slices.Contains(n.Config.Addresses, a) })
	}
	inCluster := func(a netip.Addr) bool {
		return slices.ContainsFunc(c.ClusterCIDRs, func(p netip.Prefix) bool { return p.Contains(a) })
	}
	spis := map[uint32]int{}
	encrypted, bad := 0, 0
	for _, f := range frames {
		if bytes.Contains(f, secret) {
			t.Errorf("the underlay carried the secret in clear: %x", f)
			return spis
		}
		p, ok := testutil.ParseIPFrame(f)
		if !ok {
			continue // ARP
		}
		if inCluster(p.Src) || inCluster(p.Dst) {
			bad++
			t.Errorf("a pod's packet in clear on the underlay: %s", p)
			continue
		}
		if !isNode(p.Src) || !isNode(p.Dst) {
			continue
		}
		if p.LinkControl() {
			continue
		}
		switch {
		case e == datapath.EncryptionIPsec && p.Proto == unix.IPPROTO_ESP && len(p.Payload) >= 8:
			spis[binary.BigEndian.Uint32(p.Payload)]++
			encrypted++
		case e == datapath.EncryptionWireGuard && p.Proto == unix.IPPROTO_UDP && len(p.Payload) >= 9 &&
			binary.BigEndian.Uint16(p.Payload) == datapath.WireGuardPort && binary.BigEndian.Uint16(p.Payload[2:]) == datapath.WireGuardPort:
			encrypted++
		default:
			if bad++; bad <= 5 {
				t.Errorf("between nodes, not %s: %s", e, p)
			}
		}
	}
	if encrypted == 0 {
		t.Errorf("no %s packet between the nodes among %d frames", e, len(frames))
	}
	return spis
}

// With IPsec and with WireGuard, in each routing mode, pods on two nodes
// talk TCP, IPv4 and IPv6, a bulk transfer among it; on the underlay
// between the nodes there is nothing but ESP or WireGuard, and the
// payload is nowhere to be seen.
func TestEncryptedPodToPod(t *testing.T) {
	for _, e := range encryptions {
		for _, mode := range modes {
			t.Run(e.String()+"/"+mode.String(), func(t *testing.T) {
				requireEncryption(t, e)
				c := clustertest.New(t, clustertest.Options{Routing: mode, Nodes: 2, Endpoints: 1, Encryption: e})
				stop := captureUnderlay(t, c)
				secret := marker(t)
				src := clustertest.NetNS(t, c.Endpoint(0, 0))
				dst := c.Endpoint(1, 0)
				dstNS := clustertest.NetNS(t, dst)
				for _, addr := range []netip.Addr{dst.IPv4, dst.IPv6} {
					ap := netip.AddrPortFrom(addr, 7)
					clustertest.Echo(t, dstNS, ap)
					if err := clustertest.TCPRoundTrip(t, src, ap, secret, 10*time.Second); err != nil {
						t.Errorf("TCP to %s: %v", ap, err)
					}
					bulk := netip.AddrPortFrom(addr, 8)
					countBytes(t, dstNS, bulk)
					if n, err := sendBulk(t, src, bulk, 1<<20); err != nil || n != 1<<20 {
						t.Errorf("1 MiB to %s: %d bytes arrived (%v)", bulk, n, err)
					}
				}
				spis := checkEncrypted(t, c, e, stop(), secret)
				if e == datapath.EncryptionIPsec && (len(spis) != 1 || spis[1] == 0) {
					t.Errorf("ESP with SPIs %v, want only 1", spis)
				}
				for _, n := range c.Nodes {
					checkXfrmStats(t, n)
				}
				checkRepair(t, c, e)
				// An IPsec state made anew sends from sequence number 1,
				// which the peer refuses as replayed until the next key
				// rotation (docs/architecture.md). A WireGuard peer
				// handshakes anew.
				if e == datapath.EncryptionWireGuard {
					ap := netip.AddrPortFrom(dst.IPv4, 7)
					if err := clustertest.TCPRoundTrip(t, src, ap, secret, 10*time.Second); err != nil {
						t.Errorf("TCP to %s after repair: %v", ap, err)
					}
				}
			})
		}
	}
}

// checkRepair takes away from node-0 what encrypts its traffic to
// node-1 (an IPsec state, the WireGuard peer): Verify finds it, and puts
// it back.
func checkRepair(t *testing.T, c *clustertest.Cluster, e datapath.Encryption) {
	t.Helper()
	n0 := c.Nodes[0]
	if drift, err := n0.DP.Verify(t.Context(), false); err != nil || len(drift) != 0 {
		t.Fatalf("Verify: %v, %v", drift, err)
	}
	switch e {
	case datapath.EncryptionIPsec:
		sas, err := xfrm.Installed(n0.NS.Handle)
		if err != nil || len(sas) == 0 {
			t.Fatalf("SAs: %v, %v", sas, err)
		}
		if err := xfrm.Remove(n0.NS.Handle, sas[0].Peer, sas[0].SPI); err != nil {
			t.Fatal(err)
		}
	case datapath.EncryptionWireGuard:
		if err := wireguard.RemovePeer(n0.NS.Handle, datapath.WireGuardDevice, c.Nodes[1].WireGuardKey); err != nil {
			t.Fatal(err)
		}
	}
	drift, err := n0.DP.Verify(t.Context(), true)
	if err != nil || len(drift) != 1 || !drift[0].Repaired {
		t.Errorf("Verify with repair, after the encryption of node-1 was taken away: %v, %v", drift, err)
	}
	if drift, err := n0.DP.Verify(t.Context(), false); err != nil || len(drift) != 0 {
		t.Errorf("Verify after repair: %v, %v", drift, err)
	}
}

// xfrmStats reads the xfrm error counters of a node's namespace.
func xfrmStats(t *testing.T, n *clustertest.Node) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	err := nsrun.Do(n.NS.Handle, func() error {
		// /proc/net follows the thread group's leader, which may be in
		// another namespace: thread-self follows this thread.
		f, err := os.Open("/proc/thread-self/net/xfrm_stat")
		if err != nil {
			return err
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) == 2 {
				out[fields[0]], _ = strconv.ParseUint(fields[1], 10, 64)
			}
		}
		return sc.Err()
	})
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return out
}

// checkXfrmStats fails when xfrm counted a packet it could not decrypt,
// had no policy or state for, or blocked.
func checkXfrmStats(t *testing.T, n *clustertest.Node) {
	t.Helper()
	stats := xfrmStats(t, n)
	for _, k := range []string{"XfrmInNoStates", "XfrmInNoPols", "XfrmInStateProtoError", "XfrmInStateSeqError", "XfrmOutNoStates", "XfrmOutPolBlock"} {
		if stats[k] != 0 {
			t.Errorf("%s: %s %d", n, k, stats[k])
		}
	}
}

// A key rotation under a running TCP stream loses no byte and no
// connection: the new key is added on every node, then made current on
// every node, then the old one removed; the stream goes on throughout,
// and afterwards only the new SPI is on the wire.
func TestIPsecKeyRotation(t *testing.T) {
	requireEncryption(t, datapath.EncryptionIPsec)
	c := clustertest.New(t, clustertest.Options{Nodes: 2, Endpoints: 1, Encryption: datapath.EncryptionIPsec})
	src := clustertest.NetNS(t, c.Endpoint(0, 0))
	dst := netip.AddrPortFrom(c.Endpoint(1, 0).IPv4, 8)
	countBytes(t, clustertest.NetNS(t, c.Endpoint(1, 0)), dst)
	conn, err := src.DialTCP(t, dst, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var sent atomic.Int64
	done := make(chan error, 1)
	var stopping atomic.Bool
	go func() {
		chunk := make([]byte, 16<<10)
		for !stopping.Load() {
			conn.SetWriteDeadline(time.Now().Add(20 * time.Second))
			n, err := conn.Write(chunk)
			sent.Add(int64(n))
			if err != nil {
				done <- err
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
		done <- conn.CloseWrite()
	}()
	// progress waits until the stream has moved on by some bytes.
	progress := func(what string) {
		t.Helper()
		from := sent.Load()
		deadline := time.Now().Add(20 * time.Second)
		for sent.Load() < from+256<<10 {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the stream stalled at %d bytes", what, sent.Load())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	setAll := func(keys node.IPsecKeys) {
		t.Helper()
		for _, n := range c.Nodes {
			if changed, err := node.SetIPsecKeys(context.Background(), n.DP, keys); err != nil || !changed {
				t.Fatalf("%s: set keys %+v: changed %t, %v", n, keys.Current, changed, err)
			}
		}
	}
	k1, k2 := clustertest.IPsecKey(1), clustertest.IPsecKey(2)
	progress("before")
	setAll(node.IPsecKeys{Keys: []node.IPsecKey{k1, k2}, Current: 1})
	progress("both keys, encrypting with 1")
	setAll(node.IPsecKeys{Keys: []node.IPsecKey{k1, k2}, Current: 2})
	progress("both keys, encrypting with 2")
	setAll(node.IPsecKeys{Keys: []node.IPsecKey{k2}, Current: 2})
	stop := captureUnderlay(t, c)
	progress("key 2 alone")
	stopping.Store(true)
	if err := <-done; err != nil {
		t.Fatalf("the stream broke after %d bytes: %v", sent.Load(), err)
	}
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := strconv.ParseInt(string(got), 10, 64); n != sent.Load() {
		t.Errorf("%d bytes sent, %s arrived", sent.Load(), got)
	}
	if spis := checkEncrypted(t, c, datapath.EncryptionIPsec, stop(), []byte{0xde, 0xad, 0xbe, 0xef, 0xde, 0xad}); len(spis) != 1 || spis[2] == 0 {
		t.Errorf("after the rotation, ESP with SPIs %v, want only 2", spis)
	}
	for _, n := range c.Nodes {
		checkXfrmStats(t, n)
		current, installed, err := node.IPsecSPIs(n.DP)
		if err != nil || current != 2 || !slices.Equal(installed, []uint8{2}) {
			t.Errorf("%s: IPsecSPIs = %d %v, %v; want 2 [2]", n, current, installed, err)
		}
		sas, err := xfrm.Installed(n.NS.Handle)
		if err != nil {
			t.Fatal(err)
		}
		for _, sa := range sas {
			if sa.SPI != 2 {
				t.Errorf("%s: an SA of key %d is left: %+v", n, sa.SPI, sa.Peer)
			}
		}
	}
}

// Until a node has keys, what its pods send to other nodes is dropped
// (ReasonNoKey), never sent in clear; once every node has them, it flows.
func TestIPsecNoKey(t *testing.T) {
	requireEncryption(t, datapath.EncryptionIPsec)
	c := clustertest.New(t, clustertest.Options{Nodes: 2, Endpoints: 1, Encryption: datapath.EncryptionIPsec, NoKeys: true})
	stop := captureUnderlay(t, c)
	src := clustertest.NetNS(t, c.Endpoint(0, 0))
	ap := netip.AddrPortFrom(c.Endpoint(1, 0).IPv4, 7)
	clustertest.Echo(t, clustertest.NetNS(t, c.Endpoint(1, 0)), ap)
	secret := marker(t)
	if err := clustertest.TCPRoundTrip(t, src, ap, secret, time.Second); err == nil {
		t.Fatal("TCP across nodes without keys: connected")
	}
	if n := metric(t, c.Nodes[0].DP, datapath.ReasonNoKey, datapath.Egress); n == 0 {
		t.Error("no drop counted as NO_KEY")
	}
	for _, f := range stop() {
		if p, ok := testutil.ParseIPFrame(f); ok && !p.LinkControl() {
			t.Errorf("without keys, the underlay carried %s", p)
		}
	}
	for _, n := range c.Nodes {
		if _, err := node.SetIPsecKeys(context.Background(), n.DP, clustertest.IPsecKeys()); err != nil {
			t.Fatal(err)
		}
	}
	if err := clustertest.TCPRoundTrip(t, src, ap, secret, 10*time.Second); err != nil {
		t.Errorf("TCP across nodes with keys: %v", err)
	}
}

// Bad keys and bad nodes are refused with a typed error, and nothing
// changes: the key set, the xfrm states, the WireGuard peers.
func TestEncryptionBadInput(t *testing.T) {
	t.Run("ipsec", func(t *testing.T) {
		requireEncryption(t, datapath.EncryptionIPsec)
		c := clustertest.New(t, clustertest.Options{Nodes: 2, Endpoints: 1, Encryption: datapath.EncryptionIPsec})
		dp := c.Nodes[0].DP
		before, err := xfrm.Installed(c.Nodes[0].NS.Handle)
		if err != nil || len(before) == 0 {
			t.Fatalf("SAs %v, %v", before, err)
		}
		k := clustertest.IPsecKey
		with := func(f func(*node.IPsecKey)) node.IPsecKey { key := k(2); f(&key); return key }
		for name, keys := range map[string]node.IPsecKeys{
			"key too short":     {Keys: []node.IPsecKey{k(1), with(func(k *node.IPsecKey) { k.Key = k.Key[:16] })}, Current: 1},
			"key too long":      {Keys: []node.IPsecKey{k(1), with(func(k *node.IPsecKey) { k.Key = append(k.Key, 1) })}, Current: 1},
			"SPI 0":             {Keys: []node.IPsecKey{k(1), with(func(k *node.IPsecKey) { k.SPI = 0 })}, Current: 1},
			"SPI 16":            {Keys: []node.IPsecKey{k(1), with(func(k *node.IPsecKey) { k.SPI = 16 })}, Current: 1},
			"unknown algorithm": {Keys: []node.IPsecKey{k(1), with(func(k *node.IPsecKey) { k.AEAD = "cbc(des)" })}, Current: 1},
			"bad ICV":           {Keys: []node.IPsecKey{k(1), with(func(k *node.IPsecKey) { k.ICVBits = 100 })}, Current: 1},
			"current absent":    {Keys: []node.IPsecKey{k(1)}, Current: 2},
			"SPI twice":         {Keys: []node.IPsecKey{k(1), k(1)}, Current: 1},
			"too many":          {Keys: []node.IPsecKey{k(1), k(2), k(3), k(4), k(5)}, Current: 1},
			"SPI 1 rekeyed":     {Keys: []node.IPsecKey{with(func(k *node.IPsecKey) { k.SPI = 1 })}, Current: 1},
		} {
			if _, err := node.SetIPsecKeys(context.Background(), dp, keys); !errors.Is(err, datapath.ErrInvalid) {
				t.Errorf("%s: %v, want ErrInvalid", name, err)
			}
		}
		current, installed, err := node.IPsecSPIs(dp)
		if err != nil || current != 1 || !slices.Equal(installed, []uint8{1}) {
			t.Errorf("after bad keys: %d %v, %v", current, installed, err)
		}
		after, err := xfrm.Installed(c.Nodes[0].NS.Handle)
		if err != nil || !slices.Equal(before, after) {
			t.Errorf("SAs changed by bad keys: %v, then %v (%v)", before, after, err)
		}
		if _, err := node.WireGuardPublicKey(dp); !errors.Is(err, datapath.ErrInvalid) {
			t.Errorf("WireGuardPublicKey of an IPsec datapath: %v", err)
		}
	})
	t.Run("wireguard", func(t *testing.T) {
		requireEncryption(t, datapath.EncryptionWireGuard)
		c := clustertest.New(t, clustertest.Options{Nodes: 3, Endpoints: 1, Encryption: datapath.EncryptionWireGuard, NoPeers: true})
		dp := c.Nodes[0].DP
		noKey := c.Nodes[1].Object()
		noKey.WireGuardKey = [32]byte{}
		if _, err := node.Apply(context.Background(), dp, noKey); !errors.Is(err, datapath.ErrInvalid) {
			t.Errorf("a node without a key: %v, want ErrInvalid", err)
		}
		if _, err := node.Apply(context.Background(), dp, c.Nodes[1].Object()); err != nil {
			t.Fatal(err)
		}
		same := c.Nodes[2].Object()
		same.WireGuardKey = c.Nodes[1].WireGuardKey
		if _, err := node.Apply(context.Background(), dp, same); !errors.Is(err, datapath.ErrExists) {
			t.Errorf("a node with another's key: %v, want ErrExists", err)
		}
		if _, err := node.SetIPsecKeys(context.Background(), dp, clustertest.IPsecKeys()); !errors.Is(err, datapath.ErrInvalid) {
			t.Errorf("IPsec keys for a WireGuard datapath: %v, want ErrInvalid", err)
		}
		if list, err := node.List(dp); err != nil || len(list) != 1 {
			t.Errorf("nodes after bad input: %v, %v", list, err)
		}
	})
}
