// Package wireguard configures the kernel's WireGuard device of a network
// namespace: the device itself through rtnetlink, its key, port and peers
// through the "wireguard" generic netlink family, with a small client on
// vishvananda/netlink's nl package. Every call acts in the namespace it is
// given; the calling thread's namespace never changes.
//
// Requires a kernel with WireGuard (Linux 5.6, or a module: Debian 12's
// 6.1 has one).
package wireguard

import (
	"crypto/ecdh"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// DefaultPort is WireGuard's UDP port between nodes (Cilium's, not
// WireGuard's own 51820, so both can run on one node).
const DefaultPort = 51871

// What WireGuard adds to a packet over an IPv4 and an IPv6 underlay: the
// outer IP header, UDP (8), the data message header (16) and the
// Poly1305 tag (16). The kernel pads a packet only up to the device MTU,
// so a device MTU of the underlay's minus this never fragments.
const (
	Overhead4 = 20 + 8 + 16 + 16
	Overhead6 = 40 + 8 + 16 + 16
)

// Key is a Curve25519 key, private or public.
type Key [32]byte

// String returns the key in base64, as `wg` prints it.
func (k Key) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// ParseKey parses a key in base64, as `wg` prints it.
func ParseKey(s string) (Key, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return Key{}, fmt.Errorf("parse key: %w", err)
	}
	if len(b) != len(Key{}) {
		return Key{}, fmt.Errorf("parse key: %d bytes, want %d", len(b), len(Key{}))
	}
	return Key(b), nil
}

// Public returns the public key of the private key k.
func (k Key) Public() Key {
	priv, err := ecdh.X25519().NewPrivateKey(k[:])
	if err != nil {
		panic(err) // only for a length other than 32
	}
	return Key(priv.PublicKey().Bytes())
}

// NewPrivateKey returns a random private key, clamped as `wg genkey`
// clamps it (the kernel would clamp it anyway).
func NewPrivateKey() (Key, error) {
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return Key{}, fmt.Errorf("generate private key: %w", err)
	}
	k := Key(priv.Bytes())
	k[0] &= 248
	k[31] = k[31]&127 | 64
	return k, nil
}

// Peer is another node as the device sees it.
type Peer struct {
	PublicKey Key
	// Endpoint is where the peer's encrypted packets go. When it is the
	// zero value SetPeer leaves the peer's endpoint as it is: none for a
	// new peer, which then only answers.
	Endpoint netip.AddrPort
	// AllowedIPs are the destinations routed to the peer, and the only
	// sources accepted from it.
	AllowedIPs []netip.Prefix
}

// PeerStatus is a peer with what the kernel knows about it.
type PeerStatus struct {
	Peer
	LastHandshake    time.Time // zero before the first handshake
	RxBytes, TxBytes uint64
}

// Device is a WireGuard device as the kernel reports it. It has no private
// key: that never leaves the kernel through this package.
type Device struct {
	Ifindex   int
	PublicKey Key // zero when the device has no private key
	Port      uint16
	Peers     []PeerStatus
}

// handle returns a netlink handle bound to ns (the caller's when ns is closed).
func handle(ns netns.NsHandle) (*netlink.Handle, error) {
	if !ns.IsOpen() {
		return netlink.NewHandle()
	}
	return netlink.NewHandleAt(ns)
}

// unsupported marks the error of adding a device of a kind the kernel does
// not know (EOPNOTSUPP) as errors.ErrUnsupported.
func unsupported(err error) error {
	if errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("%w: %w", errors.ErrUnsupported, err)
	}
	return err
}

// Supported returns nil when a WireGuard device can be made in ns, by
// making one and deleting it, and an error matching errors.ErrUnsupported
// when the kernel has no WireGuard. Making the first one loads the module.
func Supported(ns netns.NsHandle) error {
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	name, err := probeName()
	if err != nil {
		return err
	}
	probe := &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name}}
	if err := h.LinkAdd(probe); err != nil {
		return fmt.Errorf("add wireguard device: %w", unsupported(err))
	}
	if err := h.LinkDel(probe); err != nil {
		return fmt.Errorf("delete wireguard device %s: %w", name, err)
	}
	return nil
}

// probeName returns a device name that no other probe uses at once.
func probeName() (string, error) {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return "wgprobe" + hex.EncodeToString(b), nil
}

// Ensure makes the WireGuard device name in ns when it is missing, and
// gives it the MTU (the kernel's default, 1420, when 0), a private key
// when it has none, listens on port and sets it up. A device that exists
// keeps its key, so a restart does not change the node's public key.
// rp_filter is turned off on it: the effective value is the larger of
// "all" and the device's, so "all" must be 0 too for it to count.
// Returns the device's ifindex and public key. A device of that name that
// is not WireGuard is an error matching unix.EEXIST, and a kernel without
// WireGuard gives one matching errors.ErrUnsupported. Equivalent to:
//
//	ip -n NS link add NAME mtu MTU type wireguard
//	ip netns exec NS wg set NAME listen-port PORT private-key <(wg genkey)
//	ip netns exec NS sysctl net.ipv4.conf.NAME.rp_filter=0
//	ip -n NS link set NAME up
func Ensure(ns netns.NsHandle, name string, port uint16, mtu int) (ifindex int, public Key, err error) {
	h, err := handle(ns)
	if err != nil {
		return 0, Key{}, err
	}
	defer h.Close()
	link, err := ensureLink(h, name, mtu)
	if err != nil {
		return 0, Key{}, err
	}
	err = withFamily(ns, func(family uint16) error {
		var err error
		if public, err = configure(family, name, port); err != nil {
			return err
		}
		return rpFilterOff(name)
	})
	if err != nil {
		return 0, Key{}, err
	}
	if err := h.LinkSetUp(link); err != nil {
		return 0, Key{}, fmt.Errorf("set %s up: %w", name, err)
	}
	return link.Attrs().Index, public, nil
}

// ensureLink returns the WireGuard device name, made when missing, with
// the MTU.
func ensureLink(h *netlink.Handle, name string, mtu int) (netlink.Link, error) {
	l, err := h.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		if err := h.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}}); err != nil {
			return nil, fmt.Errorf("add wireguard device %s: %w", name, unsupported(err))
		}
		if l, err = h.LinkByName(name); err != nil {
			return nil, fmt.Errorf("device %s: %w", name, err)
		}
		return l, nil
	case err != nil:
		return nil, fmt.Errorf("device %s: %w", name, err)
	case l.Type() != "wireguard":
		return nil, fmt.Errorf("device %s is %s, not wireguard: %w", name, l.Type(), unix.EEXIST)
	}
	if mtu != 0 && l.Attrs().MTU != mtu {
		if err := h.LinkSetMTU(l, mtu); err != nil {
			return nil, fmt.Errorf("set MTU of %s to %d: %w", name, mtu, err)
		}
	}
	return l, nil
}

// configure sets the listen port of device name, and a new private key
// when it has none, and returns its public key.
func configure(family uint16, name string, port uint16) (Key, error) {
	d, err := getDevice(family, name)
	if err != nil {
		return Key{}, err
	}
	attrs := []*nl.RtAttr{nl.NewRtAttr(unix.WGDEVICE_A_LISTEN_PORT, nl.Uint16Attr(port))}
	public := d.PublicKey
	if public == (Key{}) {
		private, err := NewPrivateKey()
		if err != nil {
			return Key{}, err
		}
		attrs = append(attrs, nl.NewRtAttr(unix.WGDEVICE_A_PRIVATE_KEY, private[:]))
		public = private.Public()
	}
	return public, setDevice(family, name, attrs...)
}

// rpFilterOff writes 0 to the rp_filter of device name in the calling
// thread's namespace: a file below /proc/sys/net belongs to the namespace
// of the thread that opens it.
func rpFilterOff(name string) error {
	path := "/proc/sys/net/ipv4/conf/" + name + "/rp_filter"
	if err := os.WriteFile(path, []byte("0"), 0); err != nil {
		return fmt.Errorf("rp_filter of %s: %w", name, err)
	}
	return nil
}

// SetPeer adds peer p to device name in ns, or replaces the endpoint and
// the allowed IPs of the peer with its key; other peers stay as they are.
// More than 1024 allowed IPs take several messages: when one after the
// first fails, the peer keeps only some of them.
// Equivalent to:
//
//	ip netns exec NS wg set NAME peer KEY endpoint ENDPOINT replace-allowed-ips allowed-ips IPS
func SetPeer(ns netns.NsHandle, name string, p Peer) error {
	if p.PublicKey == (Key{}) {
		return fmt.Errorf("set peer on %s: zero public key: %w", name, unix.EINVAL)
	}
	attrs, err := peerAttrs(p)
	if err != nil {
		return fmt.Errorf("set peer %s on %s: %w", p.PublicKey, name, err)
	}
	return withFamily(ns, func(family uint16) error {
		for _, a := range attrs {
			if err := setDevice(family, name, peersAttr(a)); err != nil {
				return err
			}
		}
		return nil
	})
}

// RemovePeer removes the peer with key from device name in ns; a peer that
// is not there is not an error. Equivalent to:
//
//	ip netns exec NS wg set NAME peer KEY remove
func RemovePeer(ns netns.NsHandle, name string, key Key) error {
	a, err := peerAttr(Peer{PublicKey: key}, unix.WGPEER_F_REMOVE_ME)
	if err != nil {
		return fmt.Errorf("remove peer %s from %s: %w", key, name, err)
	}
	return withFamily(ns, func(family uint16) error {
		return setDevice(family, name, peersAttr(a))
	})
}

// Get returns device name in ns with its peers. A missing device is an
// error matching unix.ENODEV, one that is not WireGuard one matching
// unix.EOPNOTSUPP. Equivalent to: `ip netns exec NS wg show NAME dump`.
func Get(ns netns.NsHandle, name string) (Device, error) {
	var d Device
	err := withFamily(ns, func(family uint16) error {
		var err error
		d, err = getDevice(family, name)
		return err
	})
	if err != nil {
		return Device{}, err
	}
	return d, nil
}
