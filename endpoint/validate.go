package endpoint

import (
	"cmp"
	"crypto/sha256"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/sluicedp/sluice/datapath"
)

const (
	defaultIfName = "eth0"
	defaultMTU    = 1500
	maxIfName     = 15 // IFNAMSIZ - 1
)

// normalize fills in defaults and checks everything that can be checked
// without the kernel. It returns the endpoint to create: gateways are
// derived from podCIDRs, the MTU is the node's (Node.MTU) unless given.
func normalize(spec Spec, dpName string, podCIDRs []netip.Prefix, nodeMTU int) (*Endpoint, error) {
	invalid := func(format string, args ...any) error {
		return fmt.Errorf("endpoint %d: %s: %w", spec.ID, fmt.Sprintf(format, args...), datapath.ErrInvalid)
	}
	if spec.ID == 0 {
		return nil, invalid("ID 0: want 1 to %d", MaxID)
	}
	if spec.Identity < datapath.MinIdentity {
		return nil, invalid("identity %s: identities below %d are reserved", spec.Identity, datapath.MinIdentity)
	}
	if (spec.NetNS == "") == (spec.Interface == "") {
		return nil, invalid("set exactly one of NetNS and Interface")
	}
	if ns := spec.NetNS; ns != "" && !strings.ContainsRune(ns, '/') && (len(ns) > 255 || ns == "." || ns == "..") {
		return nil, invalid("network namespace name %q: want a file name under /run/netns", ns)
	}
	ep := &Endpoint{Spec: spec}
	if ep.IfName == "" {
		ep.IfName = defaultIfName
	}
	if ep.HostIfName == "" {
		ep.HostIfName = fmt.Sprintf("sl-ep%d", spec.ID)
	}
	if spec.Interface != "" {
		ep.HostIfName = spec.Interface
		if len(spec.MAC) == 0 {
			return nil, invalid("adopting %s needs the workload's MAC", spec.Interface)
		}
	}
	for _, name := range []string{ep.IfName, ep.HostIfName} {
		if err := checkIfName(name); err != nil {
			return nil, invalid("%v", err)
		}
	}
	if ep.MTU == 0 {
		ep.MTU = cmp.Or(nodeMTU, defaultMTU)
	}
	if ep.MTU < 68 || ep.MTU > 65535 {
		return nil, invalid("MTU %d: want 68 to 65535", ep.MTU)
	}
	if len(ep.MAC) == 0 {
		ep.MAC = defaultMAC(dpName, spec.ID)
	} else if len(ep.MAC) != 6 || ep.MAC[0]&1 != 0 || [6]byte(ep.MAC) == [6]byte{} {
		return nil, invalid("MAC %s: want a unicast Ethernet address", ep.MAC)
	}
	ep.MAC = append(net.HardwareAddr(nil), ep.MAC...)

	if !ep.IPv4.IsValid() && !ep.IPv6.IsValid() {
		return nil, invalid("no address: set IPv4, IPv6 or both")
	}
	if ep.IPv4.IsValid() {
		if !ep.IPv4.Is4() {
			return nil, invalid("IPv4 %s is not an IPv4 address", ep.IPv4)
		}
		gw, err := gateway(ep.IPv4, podCIDRs)
		if err != nil {
			return nil, invalid("%v", err)
		}
		ep.Gateway4 = gw
	}
	if ep.IPv6.IsValid() {
		if !ep.IPv6.Is6() || ep.IPv6.Is4In6() || ep.IPv6.Zone() != "" {
			return nil, invalid("IPv6 %s is not an IPv6 address", ep.IPv6)
		}
		gw, err := gateway(ep.IPv6, podCIDRs)
		if err != nil {
			return nil, invalid("%v", err)
		}
		ep.Gateway6 = gw
		if ep.MTU < 1280 {
			return nil, invalid("MTU %d: IPv6 needs at least 1280", ep.MTU)
		}
	}
	return ep, nil
}

// gateway returns the gateway of the pod CIDR addr is in: its first address.
func gateway(addr netip.Addr, podCIDRs []netip.Prefix) (netip.Addr, error) {
	for _, p := range podCIDRs {
		if !p.Contains(addr) {
			continue
		}
		gw := p.Addr().Next()
		switch {
		case addr == p.Addr():
			return netip.Addr{}, fmt.Errorf("%s is the network address of pod CIDR %s", addr, p)
		case addr == gw:
			return netip.Addr{}, fmt.Errorf("%s is the gateway of pod CIDR %s", addr, p)
		case addr.Is4() && addr == lastAddr(p):
			return netip.Addr{}, fmt.Errorf("%s is the broadcast address of pod CIDR %s", addr, p)
		}
		return gw, nil
	}
	return netip.Addr{}, fmt.Errorf("%s is outside every pod CIDR of the datapath %v", addr, podCIDRs)
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func checkIfName(name string) error {
	if len(name) == 0 || len(name) > maxIfName {
		return fmt.Errorf("interface name %q: want 1 to %d bytes", name, maxIfName)
	}
	if name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n") {
		return fmt.Errorf("interface name %q: no '/', ':' or white space, not '.' or '..'", name)
	}
	return nil
}

// defaultMAC is the workload MAC of an endpoint that names none: a locally
// administered unicast address derived from the datapath and the ID, so
// that the same spec always means the same endpoint (Apply compares them).
// It only has to be unique on the endpoint's own veth link.
func defaultMAC(dpName string, id uint16) net.HardwareAddr {
	sum := sha256.Sum256(fmt.Appendf(nil, "sluice/%s/endpoint/%d", dpName, id))
	mac := net.HardwareAddr(sum[:6])
	mac[0] = mac[0]&^0x01 | 0x02
	return mac
}
