package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
	"github.com/sluicedp/sluice/internal/txn"
	"github.com/sluicedp/sluice/internal/wireguard"
	"github.com/sluicedp/sluice/internal/xfrm"
)

// IPsecKey is one key of the cluster's IPsec key set
// (datapath.EncryptionIPsec). Every node is given the same set; from it,
// each node derives a key for each direction between it and each other
// node (HKDF over the key, the SPI and both underlay addresses), so that
// no two security associations share a key.
type IPsecKey struct {
	// SPI names the key, on the wire and in packet marks: 1 to 15.
	SPI uint8
	// AEAD is the algorithm: "rfc4106(gcm(aes))" or
	// "rfc7539esp(chacha20,poly1305)".
	AEAD string
	// Key is the key and a 4-byte salt: 20, 28 or 36 bytes for AES-GCM
	// (AES-128, -192, -256), 36 for ChaCha20-Poly1305.
	Key []byte
	// ICVBits is the length of the integrity check: 64, 96 or 128 for
	// AES-GCM, 128 for ChaCha20-Poly1305.
	ICVBits int
}

// IPsecKeys is the key set a node has: the keys it encrypts and decrypts
// with, and the one it encrypts with (Current, one of them).
//
// A key is rotated without dropping a flow in three steps, each taken on
// every node before the next begins: add the new key to Keys (Current
// stays); make it Current; remove the old one. Between the first and the
// last, a node decrypts with both, so it does not matter which nodes
// encrypt with the new one yet.
type IPsecKeys struct {
	Keys    []IPsecKey
	Current uint8
}

// MaxIPsecKeys is how many keys a set may hold.
const MaxIPsecKeys = 4

// keysID is the record (KindNode 0: no node has it) of the IPsec key set.
const keysID = 0

// keysRecord is the key set's ledger record: while it changes (Creating),
// Old is the set it replaces.
type keysRecord struct {
	Version int        `json:"version"`
	Keys    IPsecKeys  `json:"keys"`
	Old     *IPsecKeys `json:"old,omitempty"`
}

// SetIPsecKeys gives the datapath the cluster's IPsec key set and
// reports whether it changed anything. Keys it did not have are
// installed for every node before Current switches (one map update: a
// packet uses one key or the other); keys it no longer has are removed
// last. Its errors wrap datapath.ErrInvalid for a bad set (a key of the
// wrong length, an unknown algorithm, an SPI out of range or named twice,
// a Current that is not in Keys, more than MaxIPsecKeys keys, a new key
// under an SPI the datapath has with another key: rotate to a new SPI
// instead), or a datapath without datapath.EncryptionIPsec. On error
// nothing is changed.
func SetIPsecKeys(ctx context.Context, dp *datapath.Datapath, keys IPsecKeys) (bool, error) {
	keys = cloneKeys(keys)
	st, unlock, err := core.Change(ctx, dp)
	if err != nil {
		return false, err
	}
	defer unlock()
	if st.Node.Encryption != core.EncryptionIPsec {
		return false, fmt.Errorf("IPsec keys: datapath %s does not encrypt with IPsec (datapath.Node.Encryption): %w", st.Name, datapath.ErrInvalid)
	}
	if err := validateKeys(keys); err != nil {
		return false, err
	}
	old, err := finishKeys(st)
	if err != nil {
		return false, err
	}
	for _, k := range keys.Keys {
		if i := slices.IndexFunc(old.Keys, func(o IPsecKey) bool { return o.SPI == k.SPI }); i >= 0 && !sameKey(old.Keys[i], k) {
			return false, fmt.Errorf("IPsec key %d: the datapath has another key with that SPI (give a new key a new SPI): %w", k.SPI, datapath.ErrInvalid)
		}
	}
	if sameKeys(old, keys) {
		return false, nil
	}
	all, err := load(st)
	if err != nil {
		return false, err
	}
	for _, in := range all.nodes {
		if in.rec.State != ledger.Ready {
			if err := finish(st, in.rec); err != nil {
				return false, err
			}
		}
	}
	all, err = load(st)
	if err != nil {
		return false, err
	}
	added := keysMinus(keys.Keys, old.Keys)
	intent, err := keysObject(keysRecord{Version: recordVersion, Keys: keys, Old: &old})
	if err != nil {
		return false, err
	}
	err = txn.Run("ipsec keys",
		txn.Phase{Name: "intent",
			Do:   func() error { return putKeysRecord(st, ledger.Creating, intent) },
			Undo: func() error { return restoreKeysRecord(st, old) }},
		txn.Phase{Name: "install",
			Do: func() error { return installKeys(st, all, added) },
			Undo: func() error {
				return removeKeys(st, all, spis(added))
			}},
		txn.Phase{Name: "switch",
			Do:   func() error { return setCurrent(st, keys.Current) },
			Undo: func() error { return setCurrent(st, old.Current) }},
		txn.Phase{Name: "cleanup", After: true, Do: func() error {
			return removeKeys(st, all, spis(keysMinus(old.Keys, keys.Keys)))
		}},
		txn.Phase{Name: "ready", After: true, Do: func() error { return commitKeys(st, keys) }},
	)
	if err != nil {
		return false, fmt.Errorf("set IPsec keys: %w", err)
	}
	return true, nil
}

// IPsecSPIs returns the SPIs of the IPsec keys the datapath has, and the
// one it encrypts with (0: none).
func IPsecSPIs(dp *datapath.Datapath) (current uint8, installed []uint8, err error) {
	st := core.Of(dp)
	release, err := st.ReadLock(context.Background())
	if err != nil {
		return 0, nil, err
	}
	defer release()
	r, err := loadKeys(st)
	if err != nil {
		return 0, nil, err
	}
	return r.Keys.Current, spis(r.Keys.Keys), nil
}

// WireGuardPublicKey returns the public key of the datapath's WireGuard
// device (datapath.EncryptionWireGuard): what the other nodes give as
// this node's Node.WireGuardKey. The device keeps its private key for as
// long as it lives (until Unload).
func WireGuardPublicKey(dp *datapath.Datapath) ([32]byte, error) {
	st := core.Of(dp)
	release, err := st.Use()
	if err != nil {
		return [32]byte{}, err
	}
	defer release()
	if st.Node.Encryption != core.EncryptionWireGuard {
		return [32]byte{}, fmt.Errorf("datapath %s does not encrypt with WireGuard: %w", st.Name, datapath.ErrInvalid)
	}
	d, err := wireguard.Get(st.NS, datapath.WireGuardDevice)
	if err != nil {
		return [32]byte{}, err
	}
	return d.PublicKey, nil
}

func validateKeys(keys IPsecKeys) error {
	invalid := func(format string, args ...any) error {
		return fmt.Errorf("IPsec keys: %s: %w", fmt.Sprintf(format, args...), datapath.ErrInvalid)
	}
	if len(keys.Keys) > MaxIPsecKeys {
		return invalid("%d keys: at most %d", len(keys.Keys), MaxIPsecKeys)
	}
	for i, k := range keys.Keys {
		if err := xfrmKey(k).Validate(); err != nil {
			return fmt.Errorf("IPsec keys: %w: %w", err, datapath.ErrInvalid)
		}
		if slices.ContainsFunc(keys.Keys[:i], func(o IPsecKey) bool { return o.SPI == k.SPI }) {
			return invalid("SPI %d named twice", k.SPI)
		}
	}
	if len(keys.Keys) == 0 && keys.Current != 0 {
		return invalid("current SPI %d, but no keys", keys.Current)
	}
	if len(keys.Keys) > 0 && !slices.Contains(spis(keys.Keys), keys.Current) {
		return invalid("current SPI %d is none of the keys' %v", keys.Current, spis(keys.Keys))
	}
	return nil
}

func xfrmKey(k IPsecKey) xfrm.Key {
	return xfrm.Key{SPI: k.SPI, AEAD: k.AEAD, Key: k.Key, ICVBits: k.ICVBits}
}

func sameKey(a, b IPsecKey) bool {
	return a.SPI == b.SPI && a.AEAD == b.AEAD && string(a.Key) == string(b.Key) && a.ICVBits == b.ICVBits
}

func sameKeys(a, b IPsecKeys) bool {
	return a.Current == b.Current && slices.EqualFunc(a.Keys, b.Keys, sameKey)
}

func cloneKeys(k IPsecKeys) IPsecKeys {
	k.Keys = slices.Clone(k.Keys)
	for i := range k.Keys {
		k.Keys[i].Key = slices.Clone(k.Keys[i].Key)
	}
	slices.SortFunc(k.Keys, func(a, b IPsecKey) int { return int(a.SPI) - int(b.SPI) })
	return k
}

// keysMinus is the keys of a whose SPI b has not.
func keysMinus(a, b []IPsecKey) []IPsecKey {
	var out []IPsecKey
	for _, k := range a {
		if !slices.Contains(spis(b), k.SPI) {
			out = append(out, k)
		}
	}
	return out
}

func spis(keys []IPsecKey) []uint8 {
	out := make([]uint8, 0, len(keys))
	for _, k := range keys {
		out = append(out, k.SPI)
	}
	return out
}

// loadKeys reads the key set's record; none is an empty set.
func loadKeys(st *core.State) (*keysRecord, error) {
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindNode, keysID)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return &keysRecord{Version: recordVersion}, nil
	}
	if err != nil {
		return nil, err
	}
	var obj keysRecord
	if err := json.Unmarshal(r.Object, &obj); err != nil || obj.Version != recordVersion {
		return nil, fmt.Errorf("%w: IPsec keys: record version %d (%v)", ledger.ErrCorrupt, obj.Version, err)
	}
	if r.State != ledger.Ready && obj.Old == nil {
		return nil, fmt.Errorf("%w: IPsec keys: a change without the set it replaces", ledger.ErrCorrupt)
	}
	return &obj, nil
}

// finishKeys finishes a change of the key set a killed process left (it
// is rolled forward: the new keys installed for every node, the current
// one switched, the old ones removed) and returns the set.
func finishKeys(st *core.State) (IPsecKeys, error) {
	r, err := loadKeys(st)
	if err != nil || r.Old == nil {
		return r.Keys, err
	}
	all, err := load(st)
	if err != nil {
		return IPsecKeys{}, err
	}
	err = errors.Join(
		installKeys(st, all, r.Keys.Keys),
		setCurrent(st, r.Keys.Current),
		removeKeys(st, all, spis(keysMinus(r.Old.Keys, r.Keys.Keys))),
	)
	if err != nil {
		return IPsecKeys{}, fmt.Errorf("finish IPsec keys: %w", err)
	}
	return r.Keys, commitKeys(st, r.Keys)
}

func keysObject(r keysRecord) ([]byte, error) { return json.Marshal(r) }

func putKeysRecord(st *core.State, state ledger.State, obj []byte) error {
	return ledger.Put(st.Objs.Ledger, &ledger.Record{Kind: ledger.KindNode, ID: keysID, State: state, Object: obj})
}

func commitKeys(st *core.State, keys IPsecKeys) error {
	obj, err := keysObject(keysRecord{Version: recordVersion, Keys: keys})
	if err != nil {
		return err
	}
	return putKeysRecord(st, ledger.Ready, obj)
}

// restoreKeysRecord puts back the record of the set old (none when it is
// empty: the datapath never had keys).
func restoreKeysRecord(st *core.State, old IPsecKeys) error {
	if len(old.Keys) == 0 && old.Current == 0 {
		err := ledger.Delete(st.Objs.Ledger, ledger.KindNode, keysID)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		return err
	}
	return commitKeys(st, old)
}

func setCurrent(st *core.State, spi uint8) error {
	if err := st.Objs.IpsecSpi.Put(uint32(0), uint32(spi)); err != nil {
		return fmt.Errorf("switch to IPsec key %d: %w", spi, err)
	}
	return nil
}

// installKeys installs the keys for every node.
func installKeys(st *core.State, all *nodes, keys []IPsecKey) error {
	for _, in := range all.nodes {
		for _, p := range ipsecPeers(st, in.id, in.spec) {
			for _, k := range keys {
				if err := xfrm.Install(st.NS, p, xfrmKey(k)); err != nil {
					return fmt.Errorf("node %s: IPsec key %d: %w", in.spec.Name, k.SPI, err)
				}
			}
		}
	}
	return nil
}

// removeKeys removes the keys of these SPIs for every node.
func removeKeys(st *core.State, all *nodes, spis []uint8) error {
	var errs []error
	for _, in := range all.nodes {
		for _, p := range ipsecPeers(st, in.id, in.spec) {
			for _, spi := range spis {
				errs = append(errs, xfrm.Remove(st.NS, p, spi))
			}
		}
	}
	return errors.Join(errs...)
}

// ipsecPeers is what IPsec sees of node id's version n: a pair of
// addresses for each family both nodes have. None without IPsec.
func ipsecPeers(st *core.State, id uint32, n Node) []xfrm.Peer {
	if st.Node.Encryption != core.EncryptionIPsec {
		return nil
	}
	var out []xfrm.Peer
	for _, local := range st.Node.Addresses {
		if remote, ok := addressOf(n, local.Is4()); ok {
			out = append(out, xfrm.Peer{Node: uint16(id), Local: local, Remote: remote})
		}
	}
	return out
}

// wireGuardPeer is what WireGuard sees of n: its key, where it listens
// (its address of the tunnel's family: IPv4 when both nodes have one),
// and the addresses it may send from inside the tunnel: its own (VXLAN
// inside WireGuard) and its pods'. Nil without WireGuard.
func wireGuardPeer(st *core.State, n Node) *wireguard.Peer {
	if st.Node.Encryption != core.EncryptionWireGuard {
		return nil
	}
	remote, ok := addressOf(n, true)
	if !ok || !slices.ContainsFunc(st.Node.Addresses, netip.Addr.Is4) {
		remote, _ = addressOf(n, false)
	}
	p := &wireguard.Peer{PublicKey: n.WireGuardKey, Endpoint: netip.AddrPortFrom(remote, datapath.WireGuardPort)}
	for _, a := range n.Addresses {
		p.AllowedIPs = append(p.AllowedIPs, netip.PrefixFrom(a, a.BitLen()))
	}
	p.AllowedIPs = append(p.AllowedIPs, n.PodCIDRs...)
	return p
}

// encrypt makes node id's version n reachable through the encryption:
// its IPsec states and policies for every key, or its WireGuard peer.
func encrypt(st *core.State, id uint32, n Node) error {
	if p := wireGuardPeer(st, n); p != nil {
		if err := wireguard.SetPeer(st.NS, datapath.WireGuardDevice, *p); err != nil {
			return fmt.Errorf("WireGuard peer %s: %w", n.Name, err)
		}
		return nil
	}
	peers := ipsecPeers(st, id, n)
	if len(peers) == 0 {
		return nil
	}
	keys, err := loadKeys(st)
	if err != nil {
		return err
	}
	for _, p := range peers {
		for _, k := range keys.Keys.Keys {
			if err := xfrm.Install(st.NS, p, xfrmKey(k)); err != nil {
				return fmt.Errorf("node %s: IPsec key %d: %w", n.Name, k.SPI, err)
			}
		}
	}
	return nil
}

// unencrypt removes what encrypt made for node id's version n and
// version keep (nil: none) does not need.
func unencrypt(st *core.State, id uint32, n Node, keep *Node) error {
	if p := wireGuardPeer(st, n); p != nil {
		if keep != nil && keep.WireGuardKey == n.WireGuardKey {
			return nil
		}
		return wireguard.RemovePeer(st.NS, datapath.WireGuardDevice, p.PublicKey)
	}
	var kept []xfrm.Peer
	if keep != nil {
		kept = ipsecPeers(st, id, *keep)
	}
	var errs []error
	for _, p := range ipsecPeers(st, id, n) {
		if slices.Contains(kept, p) {
			continue
		}
		for spi := uint8(1); spi <= 15; spi++ {
			errs = append(errs, xfrm.Remove(st.NS, p, spi))
		}
	}
	return errors.Join(errs...)
}

// checkEncryption compares the IPsec states (and the key in use) or the
// WireGuard peers with the records.
func checkEncryption(st *core.State, all *nodes, add func(object, what string, mend func() error) error) error {
	switch st.Node.Encryption {
	case core.EncryptionIPsec:
		return checkIPsec(st, all, add)
	case core.EncryptionWireGuard:
		return checkWireGuard(st, all, add)
	}
	return nil
}

func checkIPsec(st *core.State, all *nodes, add func(object, what string, mend func() error) error) error {
	keys, err := loadKeys(st)
	if err != nil {
		return err
	}
	var current uint32
	if err := st.Objs.IpsecSpi.Lookup(uint32(0), &current); err != nil {
		return fmt.Errorf("read ipsec_spi: %w", err)
	}
	if current != uint32(keys.Keys.Current) {
		if err := add("IPsec keys", fmt.Sprintf("encrypting with key %d, not %d", current, keys.Keys.Current), func() error {
			return setCurrent(st, keys.Keys.Current)
		}); err != nil {
			return err
		}
	}
	have, err := xfrm.Installed(st.NS)
	if err != nil {
		return err
	}
	want := map[xfrm.SA]bool{}
	for _, in := range all.nodes {
		for _, p := range ipsecPeers(st, in.id, in.spec) {
			for _, k := range keys.Keys.Keys {
				sa := xfrm.SA{Peer: p, SPI: k.SPI}
				want[sa] = true
				if slices.Contains(have, sa) {
					continue
				}
				err := add("node "+in.spec.Name, fmt.Sprintf("no IPsec state of key %d between %s and %s", k.SPI, p.Local, p.Remote), func() error {
					return xfrm.Install(st.NS, p, xfrmKey(k))
				})
				if err != nil {
					return err
				}
			}
		}
	}
	for _, sa := range have {
		if want[sa] {
			continue
		}
		err := add("IPsec", fmt.Sprintf("a state of key %d between %s and %s (node %d), which no node has", sa.SPI, sa.Peer.Local, sa.Peer.Remote, sa.Peer.Node), func() error {
			return xfrm.Remove(st.NS, sa.Peer, sa.SPI)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func checkWireGuard(st *core.State, all *nodes, add func(object, what string, mend func() error) error) error {
	dev, err := wireguard.Get(st.NS, datapath.WireGuardDevice)
	if err != nil {
		return err
	}
	have := map[wireguard.Key]wireguard.Peer{}
	for _, p := range dev.Peers {
		have[p.PublicKey] = p.Peer
	}
	for _, in := range all.nodes {
		want := wireGuardPeer(st, in.spec)
		if got, ok := have[want.PublicKey]; ok && got.Endpoint == want.Endpoint && samePrefixSet(got.AllowedIPs, want.AllowedIPs) {
			delete(have, want.PublicKey)
			continue
		}
		delete(have, want.PublicKey)
		if err := add("node "+in.spec.Name, "its WireGuard peer is missing or differs", func() error {
			return wireguard.SetPeer(st.NS, datapath.WireGuardDevice, *want)
		}); err != nil {
			return err
		}
	}
	for key := range have {
		if err := add("WireGuard", fmt.Sprintf("peer %s, which no node has", key), func() error {
			return wireguard.RemovePeer(st.NS, datapath.WireGuardDevice, key)
		}); err != nil {
			return err
		}
	}
	return nil
}

func samePrefixSet(a, b []netip.Prefix) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.SortFunc(a, comparePrefixes)
	slices.SortFunc(b, comparePrefixes)
	return slices.Equal(a, b)
}
