package endpoint

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/sluicedp/sluice/datapath"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
)

// record is an endpoint as the ledger keeps it. It is its own versioned
// type, apart from the public Endpoint, so that renaming a field of the
// API never makes pinned endpoints unreadable.
type record struct {
	Version     int               `json:"version"`
	ID          uint16            `json:"id"`
	IPv4        netip.Addr        `json:"ipv4,omitzero"`
	IPv6        netip.Addr        `json:"ipv6,omitzero"`
	MAC         string            `json:"mac"`
	Identity    uint32            `json:"identity"`
	Labels      map[string]string `json:"labels,omitempty"`
	NetNS       string            `json:"netns,omitempty"`
	IfName      string            `json:"ifname"`
	HostIfName  string            `json:"host_ifname"`
	MTU         int               `json:"mtu"`
	Interface   string            `json:"interface,omitempty"`
	HostIfindex int               `json:"host_ifindex"`
	HostMAC     string            `json:"host_mac"`
	Gateway4    netip.Addr        `json:"gateway4,omitzero"`
	Gateway6    netip.Addr        `json:"gateway6,omitzero"`
	OwnsNetNS   bool              `json:"owns_netns,omitempty"`
}

const recordVersion = 1

func toRecord(ep *Endpoint) record {
	return record{
		Version: recordVersion, ID: ep.ID, IPv4: ep.IPv4, IPv6: ep.IPv6, MAC: ep.MAC.String(),
		Identity: uint32(ep.Identity), Labels: ep.Labels, NetNS: ep.NetNS, IfName: ep.IfName,
		HostIfName: ep.HostIfName, MTU: ep.MTU, Interface: ep.Interface, HostIfindex: ep.HostIfindex,
		HostMAC: ep.HostMAC.String(), Gateway4: ep.Gateway4, Gateway6: ep.Gateway6, OwnsNetNS: ep.OwnsNetNS,
	}
}

func (r *record) endpoint() (*Endpoint, error) {
	mac, err := net.ParseMAC(r.MAC)
	if err != nil {
		return nil, err
	}
	var hostMAC net.HardwareAddr
	if r.HostMAC != "" {
		if hostMAC, err = net.ParseMAC(r.HostMAC); err != nil {
			return nil, err
		}
	}
	return &Endpoint{
		Spec: Spec{
			ID: r.ID, IPv4: r.IPv4, IPv6: r.IPv6, MAC: mac, Identity: datapath.Identity(r.Identity),
			Labels: r.Labels, NetNS: r.NetNS, IfName: r.IfName, HostIfName: r.HostIfName, MTU: r.MTU,
			Interface: r.Interface,
		},
		HostIfindex: r.HostIfindex, HostMAC: hostMAC, Gateway4: r.Gateway4, Gateway6: r.Gateway6,
		OwnsNetNS: r.OwnsNetNS,
	}, nil
}

// setObject puts the endpoint into its ledger record.
func setObject(rec *ledger.Record, ep *Endpoint) error {
	b, err := json.Marshal(toRecord(ep))
	if err != nil {
		return err
	}
	rec.Object = b
	return nil
}

// decode returns the endpoint a ledger record describes.
func decode(rec *ledger.Record) (*Endpoint, error) {
	var r record
	if err := json.Unmarshal(rec.Object, &r); err != nil {
		return nil, fmt.Errorf("endpoint %d: %w: %w", rec.ID, datapath.ErrIncompatible, err)
	}
	if r.Version != recordVersion {
		return nil, fmt.Errorf("endpoint %d: record version %d, this build reads %d: %w", rec.ID, r.Version, recordVersion, datapath.ErrIncompatible)
	}
	ep, err := r.endpoint()
	if err != nil {
		return nil, fmt.Errorf("endpoint %d: %w: %w", rec.ID, datapath.ErrIncompatible, err)
	}
	return ep, nil
}

// putRecord writes a ledger record, turning a record that is too large into
// ErrInvalid (labels are what grows).
func putRecord(st *core.State, rec *ledger.Record) error {
	err := ledger.Put(st.Objs.Ledger, rec)
	if errors.Is(err, ledger.ErrTooLarge) {
		return fmt.Errorf("endpoint %d: %w: shorten the labels: %w", rec.ID, err, datapath.ErrInvalid)
	}
	return err
}

// lookup returns the ledger record of an endpoint in any state, or an error
// matching ErrNotFound.
func lookupRecord(st *core.State, id uint16) (*ledger.Record, error) {
	rec, err := ledger.Get(st.Objs.Ledger, ledger.KindEndpoint, uint32(id))
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("endpoint %d: %w", id, datapath.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("endpoint %d: %w: %w", id, datapath.ErrIncompatible, err)
	}
	return rec, nil
}

// lookup returns a ready endpoint, or an error matching ErrNotFound: one
// that is being created or deleted does not exist yet, or any more.
func lookup(st *core.State, id uint16) (*Endpoint, error) {
	rec, err := lookupRecord(st, id)
	if err != nil {
		return nil, err
	}
	if rec.State != ledger.Ready {
		return nil, fmt.Errorf("endpoint %d is %s: %w", id, rec.State, datapath.ErrNotFound)
	}
	return decode(rec)
}
