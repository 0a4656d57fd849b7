package service

import (
	"net/netip"

	"github.com/sluicedp/sluice/internal/core"
)

// socketTargets names the backends whose connected UDP sockets are closed
// when a service changes from old to new (nil: deleted): those new no
// longer has. A connected UDP socket chose its backend once, at connect,
// and would keep sending to a backend that left
// (core.State.DestroySockets); a backend that stays, in any state, keeps
// its flows (see State), sockets included. Only a UDP frontend translated
// at the socket level has such sockets.
func socketTargets(old, new *Service) []core.SocketTarget {
	if old == nil || old.Frontend.Protocol != UDP || old.Reach == TCOnly {
		return nil
	}
	has := map[netip.AddrPort]bool{}
	if new != nil {
		for _, b := range new.Backends {
			has[b.AddrPort()] = true
		}
	}
	fe := netip.AddrPortFrom(old.Frontend.Addr, old.Frontend.Port)
	var out []core.SocketTarget
	for _, b := range old.Backends {
		if !has[b.AddrPort()] {
			out = append(out, core.SocketTarget{Frontend: fe, Backend: b.AddrPort()})
		}
	}
	return out
}
