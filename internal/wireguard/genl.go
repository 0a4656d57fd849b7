package wireguard

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/nsrun"
)

// This file speaks the kernel's "wireguard" generic netlink family
// (include/uapi/linux/wireguard.h): messages, and the attributes in them.

// dumpRetries bounds how often Get repeats a dump that a concurrent change
// of the device interrupted.
const dumpRetries = 5

// withFamily runs fn on a thread in ns with the id of the wireguard family
// there. The package-level netlink calls open their sockets in the calling
// thread's namespace, so everything fn sends reaches ns.
func withFamily(ns netns.NsHandle, fn func(family uint16) error) error {
	return nsrun.Do(ns, func() error {
		fam, err := netlink.GenlFamilyGet(unix.WG_GENL_NAME)
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("generic netlink family %s: %w: %w", unix.WG_GENL_NAME, errors.ErrUnsupported, err)
		}
		if err != nil {
			return fmt.Errorf("generic netlink family %s: %w", unix.WG_GENL_NAME, err)
		}
		return fn(fam.ID)
	})
}

// setDevice sends WG_CMD_SET_DEVICE for device name with attrs.
func setDevice(family uint16, name string, attrs ...*nl.RtAttr) error {
	req := nl.NewNetlinkRequest(int(family), unix.NLM_F_ACK)
	req.AddData(&nl.Genlmsg{Command: unix.WG_CMD_SET_DEVICE, Version: unix.WG_GENL_VERSION})
	req.AddData(nl.NewRtAttr(unix.WGDEVICE_A_IFNAME, nl.ZeroTerminated(name)))
	for _, a := range attrs {
		req.AddData(a)
	}
	if _, err := req.Execute(unix.NETLINK_GENERIC, 0); err != nil {
		return fmt.Errorf("configure wireguard device %s: %w", name, err)
	}
	return nil
}

// getDevice dumps device name with WG_CMD_GET_DEVICE. The kernel marks a
// dump that a change of the device interrupted; such a dump is repeated.
func getDevice(family uint16, name string) (Device, error) {
	for range dumpRetries {
		req := nl.NewNetlinkRequest(int(family), unix.NLM_F_DUMP)
		req.AddData(&nl.Genlmsg{Command: unix.WG_CMD_GET_DEVICE, Version: unix.WG_GENL_VERSION})
		req.AddData(nl.NewRtAttr(unix.WGDEVICE_A_IFNAME, nl.ZeroTerminated(name)))
		msgs, err := req.Execute(unix.NETLINK_GENERIC, family)
		if errors.Is(err, nl.ErrDumpInterrupted) {
			continue
		}
		if err != nil {
			return Device{}, fmt.Errorf("dump wireguard device %s: %w", name, err)
		}
		d, err := parseDevice(msgs)
		if err != nil {
			return Device{}, fmt.Errorf("dump wireguard device %s: %w", name, err)
		}
		return d, nil
	}
	return Device{}, fmt.Errorf("dump wireguard device %s: interrupted %d times: %w", name, dumpRetries, nl.ErrDumpInterrupted)
}

// allowedIPsPerMessage bounds the allowed IPs of a peer sent in one
// message: an attribute's length is 16 bits, and one allowed IP takes up
// to 40 bytes, so a longer list has to be spread over several messages.
const allowedIPsPerMessage = 1024

// peerAttrs is peer p as the WGDEVICE_A_PEERS of one message or more. The
// first replaces the peer's endpoint and allowed IPs; the others add
// allowed IPs (no WGPEER_F_REPLACE_ALLOWEDIPS), as `wg` does.
func peerAttrs(p Peer) ([]*nl.RtAttr, error) {
	var attrs []*nl.RtAttr
	ips, flags := p.AllowedIPs, uint32(unix.WGPEER_F_REPLACE_ALLOWEDIPS)
	for {
		n := min(len(ips), allowedIPsPerMessage)
		a, err := peerAttr(Peer{PublicKey: p.PublicKey, Endpoint: p.Endpoint, AllowedIPs: ips[:n]}, flags)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, a)
		ips, flags, p.Endpoint = ips[n:], 0, netip.AddrPort{}
		if len(ips) == 0 {
			return attrs, nil
		}
	}
}

// peerAttr is one peer of a WGDEVICE_A_PEERS list, with flags
// (WGPEER_F_*). A peer with WGPEER_F_REMOVE_ME needs only its key.
func peerAttr(p Peer, flags uint32) (*nl.RtAttr, error) {
	a := nl.NewRtAttr(unix.NLA_F_NESTED, nil)
	a.AddRtAttr(unix.WGPEER_A_PUBLIC_KEY, p.PublicKey[:])
	a.AddRtAttr(unix.WGPEER_A_FLAGS, nl.Uint32Attr(flags))
	if flags&unix.WGPEER_F_REMOVE_ME != 0 {
		return a, nil
	}
	if p.Endpoint.IsValid() {
		sa, err := sockaddr(p.Endpoint)
		if err != nil {
			return nil, err
		}
		a.AddRtAttr(unix.WGPEER_A_ENDPOINT, sa)
	}
	ips := a.AddRtAttr(unix.NLA_F_NESTED|unix.WGPEER_A_ALLOWEDIPS, nil)
	for _, prefix := range p.AllowedIPs {
		if !prefix.IsValid() {
			return nil, fmt.Errorf("allowed IP %v: invalid prefix", prefix)
		}
		prefix = prefix.Masked()
		family := uint16(unix.AF_INET6)
		if prefix.Addr().Is4() {
			family = unix.AF_INET
		}
		ip := ips.AddRtAttr(unix.NLA_F_NESTED, nil)
		ip.AddRtAttr(unix.WGALLOWEDIP_A_FAMILY, nl.Uint16Attr(family))
		ip.AddRtAttr(unix.WGALLOWEDIP_A_IPADDR, prefix.Addr().AsSlice())
		ip.AddRtAttr(unix.WGALLOWEDIP_A_CIDR_MASK, nl.Uint8Attr(uint8(prefix.Bits())))
	}
	return a, nil
}

// peersAttr is the WGDEVICE_A_PEERS list holding peers.
func peersAttr(peers ...*nl.RtAttr) *nl.RtAttr {
	a := nl.NewRtAttr(unix.NLA_F_NESTED|unix.WGDEVICE_A_PEERS, nil)
	for _, p := range peers {
		a.AddChild(p)
	}
	return a
}

// Sizes of struct sockaddr_in and struct sockaddr_in6.
const (
	sizeofSockaddrIn  = 16
	sizeofSockaddrIn6 = 28
)

// sockaddr encodes ap as the struct sockaddr_in or sockaddr_in6 that
// WGPEER_A_ENDPOINT holds: the family in host order, the port in network
// order. An IPv4-mapped IPv6 address becomes IPv4, as the kernel would
// send to it anyway. A zone (scope id) is not supported.
func sockaddr(ap netip.AddrPort) ([]byte, error) {
	addr := ap.Addr().Unmap()
	switch {
	case !addr.IsValid():
		return nil, fmt.Errorf("endpoint %v: invalid address", ap)
	case addr.Zone() != "":
		return nil, fmt.Errorf("endpoint %v: zones are not supported", ap)
	case addr.Is4():
		b := make([]byte, sizeofSockaddrIn)
		binary.NativeEndian.PutUint16(b[0:], unix.AF_INET)
		binary.BigEndian.PutUint16(b[2:], ap.Port())
		a := addr.As4()
		copy(b[4:], a[:])
		return b, nil
	default:
		b := make([]byte, sizeofSockaddrIn6)
		binary.NativeEndian.PutUint16(b[0:], unix.AF_INET6)
		binary.BigEndian.PutUint16(b[2:], ap.Port())
		a := addr.As16()
		copy(b[8:], a[:]) // after the flow info; the scope id stays 0
		return b, nil
	}
}

// parseSockaddr decodes a WGPEER_A_ENDPOINT; its scope id is dropped.
func parseSockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) < 2 {
		return netip.AddrPort{}, fmt.Errorf("endpoint of %d bytes", len(b))
	}
	switch family := binary.NativeEndian.Uint16(b); {
	case family == unix.AF_INET && len(b) >= sizeofSockaddrIn:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:])), nil
	case family == unix.AF_INET6 && len(b) >= sizeofSockaddrIn6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])), binary.BigEndian.Uint16(b[2:])), nil
	default:
		return netip.AddrPort{}, fmt.Errorf("endpoint of family %d and %d bytes", family, len(b))
	}
}

// parseDevice reads the messages of a WG_CMD_GET_DEVICE dump. The device's
// own attributes come in the first; the peers are spread over all of them,
// and a peer with many allowed IPs over several: its key is repeated, its
// other attributes come only in its first part. The private key is skipped.
func parseDevice(msgs [][]byte) (Device, error) {
	var d Device
	index := map[Key]int{} // position in d.Peers
	for _, m := range msgs {
		if len(m) < nl.SizeofGenlmsg {
			return Device{}, fmt.Errorf("message of %d bytes", len(m))
		}
		attrs, err := nl.ParseRouteAttr(m[nl.SizeofGenlmsg:])
		if err != nil {
			return Device{}, err
		}
		for _, a := range attrs {
			switch a.Attr.Type &^ unix.NLA_F_NESTED {
			case unix.WGDEVICE_A_IFINDEX:
				d.Ifindex = int(native32(a.Value))
			case unix.WGDEVICE_A_PUBLIC_KEY:
				d.PublicKey, err = keyAttr(a.Value)
			case unix.WGDEVICE_A_LISTEN_PORT:
				d.Port = native16(a.Value)
			case unix.WGDEVICE_A_PEERS:
				err = parsePeers(a.Value, &d, index)
			}
			if err != nil {
				return Device{}, err
			}
		}
	}
	return d, nil
}

// parsePeers adds the peers of a WGDEVICE_A_PEERS list to d, merging a
// peer's later parts into its first.
func parsePeers(b []byte, d *Device, index map[Key]int) error {
	peers, err := nl.ParseRouteAttr(b)
	if err != nil {
		return err
	}
	for _, pa := range peers {
		p, err := parsePeer(pa.Value)
		if err != nil {
			return err
		}
		i, ok := index[p.PublicKey]
		if !ok {
			index[p.PublicKey] = len(d.Peers)
			d.Peers = append(d.Peers, p)
			continue
		}
		d.Peers[i].AllowedIPs = append(d.Peers[i].AllowedIPs, p.AllowedIPs...)
	}
	return nil
}

// parsePeer reads one peer (or one part of it).
func parsePeer(b []byte) (PeerStatus, error) {
	attrs, err := nl.ParseRouteAttr(b)
	if err != nil {
		return PeerStatus{}, err
	}
	var p PeerStatus
	for _, a := range attrs {
		switch a.Attr.Type &^ unix.NLA_F_NESTED {
		case unix.WGPEER_A_PUBLIC_KEY:
			p.PublicKey, err = keyAttr(a.Value)
		case unix.WGPEER_A_ENDPOINT:
			p.Endpoint, err = parseSockaddr(a.Value)
		case unix.WGPEER_A_LAST_HANDSHAKE_TIME:
			p.LastHandshake, err = parseTimespec(a.Value)
		case unix.WGPEER_A_RX_BYTES:
			p.RxBytes = native64(a.Value)
		case unix.WGPEER_A_TX_BYTES:
			p.TxBytes = native64(a.Value)
		case unix.WGPEER_A_ALLOWEDIPS:
			p.AllowedIPs, err = parseAllowedIPs(a.Value)
		}
		if err != nil {
			return PeerStatus{}, err
		}
	}
	return p, nil
}

// parseAllowedIPs reads a WGPEER_A_ALLOWEDIPS list.
func parseAllowedIPs(b []byte) ([]netip.Prefix, error) {
	list, err := nl.ParseRouteAttr(b)
	if err != nil {
		return nil, err
	}
	prefixes := make([]netip.Prefix, 0, len(list))
	for _, l := range list {
		attrs, err := nl.ParseRouteAttr(l.Value)
		if err != nil {
			return nil, err
		}
		var addr netip.Addr
		var bits int
		for _, a := range attrs {
			switch a.Attr.Type &^ unix.NLA_F_NESTED {
			case unix.WGALLOWEDIP_A_IPADDR:
				addr, _ = netip.AddrFromSlice(a.Value)
			case unix.WGALLOWEDIP_A_CIDR_MASK:
				if len(a.Value) > 0 {
					bits = int(a.Value[0])
				}
			}
		}
		prefix := netip.PrefixFrom(addr, bits)
		if !prefix.IsValid() {
			return nil, fmt.Errorf("allowed IP %v/%d: invalid", addr, bits)
		}
		prefixes = append(prefixes, prefix)
	}
	return prefixes, nil
}

// parseTimespec reads a struct __kernel_timespec; zero, no handshake yet,
// is the zero time.Time.
func parseTimespec(b []byte) (time.Time, error) {
	if len(b) < 16 {
		return time.Time{}, fmt.Errorf("timespec of %d bytes", len(b))
	}
	sec, nsec := int64(native64(b[0:])), int64(native64(b[8:]))
	if sec == 0 && nsec == 0 {
		return time.Time{}, nil
	}
	return time.Unix(sec, nsec), nil
}

// keyAttr reads a key attribute.
func keyAttr(b []byte) (Key, error) {
	if len(b) != len(Key{}) {
		return Key{}, fmt.Errorf("key of %d bytes: %w", len(b), unix.EINVAL)
	}
	return Key(b), nil
}

// native16, native32 and native64 read an integer attribute in host
// order; a short one reads as 0.
func native16(b []byte) uint16 {
	if len(b) < 2 {
		return 0
	}
	return binary.NativeEndian.Uint16(b)
}

func native32(b []byte) uint32 {
	if len(b) < 4 {
		return 0
	}
	return binary.NativeEndian.Uint32(b)
}

func native64(b []byte) uint64 {
	if len(b) < 8 {
		return 0
	}
	return binary.NativeEndian.Uint64(b)
}
