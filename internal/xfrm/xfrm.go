// Package xfrm installs the kernel's IPsec objects (ESP in tunnel mode) that
// encrypt the traffic between this node and each remote node, in a given
// network namespace, through netlink handles bound to it, so the calling
// thread's namespace never changes.
//
// The BPF datapath chooses what is encrypted, with skb->mark: it marks a
// packet EncryptMark(spi, node) to have it encrypted towards node, and marks
// ESP arriving from node DecryptMark(node) before the stack decrypts it. The
// kernel looks an inbound SA up by (destination, SPI, protocol, mark), never
// by its source, so the mark is what tells two senders apart.
//
// Every object the package makes carries reqid Reqid, the mark magic bits
// or its own priorities; RemoveAll and Installed find them by those and
// leave every other object in the namespace alone. Calls for one namespace
// must not run concurrently.
package xfrm

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Reqid is the reqid of every state and template the package makes: what
// marks them as sluice's.
const Reqid = 0x51c

// The skb->mark layout, Cilium's: bits 8-11 are the magic, bits 12-15 the
// key's SPI, bits 16-31 the remote node's number; bits 0-7 are left to
// others.
const (
	MarkEncrypt   = 0x0E00
	MarkDecrypt   = 0x0D00
	MarkMagicMask = 0x0F00
	EncryptMask   = 0xFFFFFF00 // node, SPI and magic
	DecryptMask   = 0xFFFF0F00 // node and magic
)

const (
	replayWindow = 1024 // packets; with ESN
	// priorityBlock loses to the peers' OUT policies (priority 0): the
	// kernel prefers the lower value.
	priorityBlock = 100
	priorityBase  = 2975 // Cilium's
	// The throwaway state of Supported: an SPI and a mark magic no other
	// object of the package uses.
	probeSPI  = 0xff
	probeMark = 0x0B00
)

// Errors for input the package refuses before it touches the kernel.
var (
	ErrInvalidKey     = errors.New("invalid IPsec key")
	ErrInvalidPeer    = errors.New("invalid IPsec peer")
	ErrInvalidAddress = errors.New("invalid local address for IPsec")
)

// EncryptMark is the mark that has a packet encrypted towards node with
// the key numbered spi.
func EncryptMark(spi uint8, node uint16) uint32 {
	return MarkEncrypt | uint32(spi&0xF)<<12 | uint32(node)<<16
}

// DecryptMark is the mark ESP from node must carry to find its IN state;
// the decrypted packet carries it too.
func DecryptMark(node uint16) uint32 {
	return MarkDecrypt | uint32(node)<<16
}

// Peer is a remote node as the xfrm objects see it: its number (the
// datapath's node ID, 1..65535, in the marks) and a pair of underlay
// addresses of one family, this node's and the remote node's.
type Peer struct {
	Node          uint16
	Local, Remote netip.Addr
}

// normal returns p with IPv4-mapped addresses made IPv4, or an error
// wrapping ErrInvalidPeer.
func (p Peer) normal() (Peer, error) {
	p.Local, p.Remote = p.Local.Unmap(), p.Remote.Unmap()
	switch {
	case p.Node == 0:
		return p, fmt.Errorf("%w: node 0 is no node number", ErrInvalidPeer)
	case !unicast(p.Local) || !unicast(p.Remote):
		return p, fmt.Errorf("%w: node %d: %v and %v must both be unicast addresses without a zone", ErrInvalidPeer, p.Node, p.Local, p.Remote)
	case p.Local.Is4() != p.Remote.Is4():
		return p, fmt.Errorf("%w: node %d: %v and %v are of two families", ErrInvalidPeer, p.Node, p.Local, p.Remote)
	case p.Local == p.Remote:
		return p, fmt.Errorf("%w: node %d: local and remote are both %v", ErrInvalidPeer, p.Node, p.Local)
	}
	return p, nil
}

func unicast(a netip.Addr) bool {
	broadcast := netip.AddrFrom4([4]byte{255, 255, 255, 255})
	return a.IsValid() && a.Zone() == "" && !a.IsUnspecified() && !a.IsMulticast() && a != broadcast
}

// SA is an OUT state the package made: which peer and which key.
type SA struct {
	Peer Peer
	SPI  uint8
}

// handle returns an xfrm netlink handle bound to ns (the caller's when ns
// is closed).
func handle(ns netns.NsHandle) (*netlink.Handle, error) {
	if !ns.IsOpen() {
		return netlink.NewHandle(unix.NETLINK_XFRM)
	}
	return netlink.NewHandleAt(ns, unix.NETLINK_XFRM)
}

// Install makes the objects that encrypt traffic to p and decrypt traffic
// from p with key k: the OUT state Local→Remote and the IN state
// Remote→Local, each with its own key (DeriveKey), and the OUT policy that
// sends packets marked EncryptMark(k.SPI, p.Node) through the first. The
// IN state's output mark leaves DecryptMark(p.Node) on the decrypted
// packet, so the datapath still knows which node sent it.
//
// It is idempotent: a state that is there already as wanted is left alone,
// keeping its sequence numbers (the peer's replay window expects them); one
// that differs, in its key say, is replaced, as the kernel's update would
// keep the old key. InstallBase must have run for p.Local's family, or
// decrypted packets are dropped (XfrmInNoPols). Returns an error wrapping
// ErrInvalidKey or ErrInvalidPeer for bad input, before touching ns.
// Equivalent to:
//
//	ip xfrm state add src LOCAL dst REMOTE proto esp spi SPI reqid 0x51c mode tunnel \
//		flag esn replay-window 1024 aead AEAD KEY ICV mark ENC mask 0xffffff00
//	ip xfrm state add src REMOTE dst LOCAL ... mark DEC mask 0xffff0f00 output-mark DEC
//	ip xfrm policy update src 0/0 dst 0/0 dir out mark ENC mask 0xffffff00 \
//		tmpl src LOCAL dst REMOTE proto esp spi SPI reqid 0x51c mode tunnel
func Install(ns netns.NsHandle, p Peer, k Key) error {
	if err := k.Validate(); err != nil {
		return err
	}
	p, err := p.normal()
	if err != nil {
		return err
	}
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	// States first: the policy never points at a state that is missing.
	for _, s := range []*netlink.XfrmState{outState(p, k), inState(p, k)} {
		if err := ensureState(h, s); err != nil {
			return fmt.Errorf("node %d, SPI %d: %w", p.Node, k.SPI, err)
		}
	}
	if err := h.XfrmPolicyUpdate(outPolicy(p, k.SPI)); err != nil {
		return fmt.Errorf("node %d, SPI %d: OUT policy: %w", p.Node, k.SPI, err)
	}
	return nil
}

// Remove deletes what Install made for p and the key numbered spi; what is
// absent already is not an error. The OUT policy goes first, so packets
// still marked for spi meet the block policy, not the clear.
func Remove(ns netns.NsHandle, p Peer, spi uint8) error {
	if spi < 1 || spi > 15 {
		return fmt.Errorf("%w: SPI %d is not in 1..15", ErrInvalidKey, spi)
	}
	p, err := p.normal()
	if err != nil {
		return err
	}
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	errPolicy := deletePolicy(h, outPolicy(p, spi))
	errOut := deleteState(h, outID(p, spi))
	errIn := deleteState(h, inID(p, spi))
	if err := errors.Join(errPolicy, errOut, errIn); err != nil {
		return fmt.Errorf("node %d, SPI %d: %w", p.Node, spi, err)
	}
	return nil
}

// InstallBase makes, for the family of each local address, the policies
// every peer shares: an OUT block policy that drops whatever is marked for
// encryption but matches no peer's policy, so it is never sent in clear,
// and IN and FWD policies with an optional template for ESP to the local
// address, without which the kernel drops every packet a tunnel-mode SA
// decrypted (XfrmInNoPols). Plaintext still passes them. Idempotent.
// Takes at most one address per family; returns an error wrapping
// ErrInvalidAddress otherwise. Equivalent to:
//
//	ip xfrm policy update src 0/0 dst 0/0 dir out mark 0xe00 mask 0xf00 action block priority 100
//	ip xfrm policy update src 0/0 dst 0/0 dir in priority 2975 \
//		tmpl src 0.0.0.0 dst LOCAL proto esp reqid 0x51c mode tunnel level use
//	ip xfrm policy update src 0/0 dst 0/0 dir fwd priority 2975 tmpl ...
func InstallBase(ns netns.NsHandle, locals []netip.Addr) error {
	byFamily, err := oneByFamily(locals)
	if err != nil {
		return err
	}
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	for _, local := range byFamily {
		// The block policy first: marked packets are never sent in clear.
		policies := []*netlink.XfrmPolicy{
			blockPolicy(local),
			basePolicy(netlink.XFRM_DIR_IN, local),
			basePolicy(netlink.XFRM_DIR_FWD, local),
		}
		for _, pol := range policies {
			if err := h.XfrmPolicyUpdate(pol); err != nil {
				return fmt.Errorf("%s policy for %v: %w", pol.Dir, local, err)
			}
		}
	}
	return nil
}

// oneByFamily returns the valid addresses of locals, at most one of each
// family.
func oneByFamily(locals []netip.Addr) ([]netip.Addr, error) {
	var v4, v6 netip.Addr
	for _, a := range locals {
		a = a.Unmap()
		if !unicast(a) {
			return nil, fmt.Errorf("%w: %v is not a unicast address without a zone", ErrInvalidAddress, a)
		}
		seen := &v6
		if a.Is4() {
			seen = &v4
		}
		if seen.IsValid() && *seen != a {
			return nil, fmt.Errorf("%w: two addresses of one family, %v and %v", ErrInvalidAddress, *seen, a)
		}
		*seen = a
	}
	var out []netip.Addr
	for _, a := range []netip.Addr{v4, v6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out, nil
}

// RemoveAll deletes every state and policy the package made in ns, and
// nothing else: what unloading the datapath calls. Peers' OUT policies go
// first and the block policies last, so nothing marked for encryption
// leaves in clear meanwhile. It goes on past errors and returns them all.
func RemoveAll(ns netns.NsHandle) error {
	h, err := handle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	policies, err := listPolicies(h)
	if err != nil {
		return err
	}
	states, err := listStates(h)
	if err != nil {
		return err
	}
	var errs []error
	deletePolicies := func(kind policyKind) {
		for _, pol := range policies {
			if kindOf(&pol.XfrmPolicy) == kind {
				errs = append(errs, deletePolicy(h, &pol.XfrmPolicy))
			}
		}
	}
	deletePolicies(peerPolicy)
	for _, s := range states {
		if ours(&s.XfrmState) {
			id := s.XfrmState
			id.Src, id.Dst = addrOf(s.Src, s.family).AsSlice(), addrOf(s.Dst, s.family).AsSlice()
			errs = append(errs, deleteState(h, &id))
		}
	}
	deletePolicies(basePolicyKind)
	deletePolicies(blockPolicyKind)
	return errors.Join(errs...)
}

// Installed lists the OUT states the package made in ns, one per peer and
// key, with the peer's node read from the mark: what a verification
// compares with what should be there.
func Installed(ns netns.NsHandle) ([]SA, error) {
	h, err := handle(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	states, err := listStates(h)
	if err != nil {
		return nil, err
	}
	var sas []SA
	for _, s := range states {
		if !ours(&s.XfrmState) || s.Mark.Mask != EncryptMask || s.Mark.Value&MarkMagicMask != MarkEncrypt {
			continue
		}
		sas = append(sas, SA{
			Peer: Peer{Node: uint16(s.Mark.Value >> 16), Local: addrOf(s.Src, s.family), Remote: addrOf(s.Dst, s.family)},
			SPI:  uint8(s.Spi),
		})
	}
	slices.SortFunc(sas, func(a, b SA) int {
		if a.Peer.Node != b.Peer.Node {
			return int(a.Peer.Node) - int(b.Peer.Node)
		}
		if c := a.Peer.Remote.Compare(b.Peer.Remote); c != 0 {
			return c
		}
		return int(a.SPI) - int(b.SPI)
	})
	return sas, nil
}

// Supported returns nil when ns's kernel can make ESP states with
// AES-GCM, and an error wrapping errors.ErrUnsupported when it cannot
// (no xfrm netlink, no ESP or no GCM). It adds a throwaway state and
// removes it; the first ESP state loads modules and runs crypto
// self-tests, which can take seconds.
func Supported(ns netns.NsHandle) error {
	h, err := handle(ns)
	if errors.Is(err, unix.EPROTONOSUPPORT) {
		return fmt.Errorf("xfrm netlink: %w: %w", errors.ErrUnsupported, err)
	}
	if err != nil {
		return err
	}
	defer h.Close()
	lo := netip.MustParseAddr("127.0.0.1")
	probe := esp(lo, lo, probeSPI, &netlink.XfrmMark{Value: probeMark, Mask: ^uint32(0)})
	probe.Aead = &netlink.XfrmStateAlgo{Name: AESGCM, Key: make([]byte, 16+saltLen), ICVLen: 128}
	err = h.XfrmStateAdd(probe)
	switch {
	case errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EPROTONOSUPPORT), errors.Is(err, unix.ENOENT):
		return fmt.Errorf("add an ESP state: %w: %w", errors.ErrUnsupported, err)
	case err != nil && !errors.Is(err, unix.EEXIST):
		return fmt.Errorf("add an ESP state: %w", err)
	}
	if err := h.XfrmStateDel(probe); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("remove the ESP probe state: %w", err)
	}
	return nil
}

// esp is the identity and mode of a state of the package, without its key.
func esp(src, dst netip.Addr, spi uint8, mark *netlink.XfrmMark) *netlink.XfrmState {
	return &netlink.XfrmState{
		Src: src.AsSlice(), Dst: dst.AsSlice(),
		Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Spi: int(spi),
		Reqid: Reqid, ESN: true, ReplayWindow: replayWindow,
		// Always a mask: the netlink package turns 0 into 0xffffffff.
		Mark: mark,
	}
}

func outID(p Peer, spi uint8) *netlink.XfrmState {
	return esp(p.Local, p.Remote, spi, &netlink.XfrmMark{Value: EncryptMark(spi, p.Node), Mask: EncryptMask})
}

func inID(p Peer, spi uint8) *netlink.XfrmState {
	return esp(p.Remote, p.Local, spi, &netlink.XfrmMark{Value: DecryptMark(p.Node), Mask: DecryptMask})
}

func outState(p Peer, k Key) *netlink.XfrmState {
	s := outID(p, k.SPI)
	s.Aead = aead(k, DeriveKey(k, p.Local, p.Remote))
	return s
}

func inState(p Peer, k Key) *netlink.XfrmState {
	s := inID(p, k.SPI)
	s.Aead = aead(k, DeriveKey(k, p.Remote, p.Local))
	s.OutputMark = &netlink.XfrmMark{Value: DecryptMark(p.Node), Mask: ^uint32(0)}
	return s
}

func aead(k Key, key []byte) *netlink.XfrmStateAlgo {
	return &netlink.XfrmStateAlgo{Name: k.AEAD, Key: key, ICVLen: k.ICVBits}
}

// describe names a state for errors. Never format an XfrmState itself:
// its String method panics on a nil Pcpunum, and it would print the key.
func describe(s *netlink.XfrmState) string {
	dir := "IN"
	if s.Mark != nil && s.Mark.Value&MarkMagicMask == MarkEncrypt {
		dir = "OUT"
	}
	return fmt.Sprintf("%s state %v→%v SPI %d", dir, s.Src, s.Dst, s.Spi)
}

// ensureState makes h hold want; see Install.
func ensureState(h *netlink.Handle, want *netlink.XfrmState) error {
	have, err := h.XfrmStateGet(want)
	switch {
	case errors.Is(err, unix.ESRCH):
		if err := h.XfrmStateAdd(want); err != nil {
			return fmt.Errorf("add %s: %w", describe(want), err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("get %s: %w", describe(want), err)
	case !ours(have) || !sameMark(have.Mark, want.Mark):
		// A state without a mark matches a lookup with any mark.
		return fmt.Errorf("%s: a state not made by sluice has its SPI and destination: %w", describe(want), unix.EEXIST)
	case same(have, want):
		return nil
	}
	if err := h.XfrmStateDel(want); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("replace %s: %w", describe(want), err)
	}
	if err := h.XfrmStateAdd(want); err != nil {
		return fmt.Errorf("replace %s: %w", describe(want), err)
	}
	return nil
}

// same reports whether the state the kernel has is the one Install wants.
// The kernel's dump does not show ESN or its replay window; the package
// always sets both.
func same(have, want *netlink.XfrmState) bool {
	return have.Mode == want.Mode && have.Reqid == want.Reqid && have.Src.Equal(want.Src) &&
		have.Encap == nil && have.Aead != nil && have.Auth == nil && have.Crypt == nil &&
		have.Aead.Name == want.Aead.Name && have.Aead.ICVLen == want.Aead.ICVLen &&
		(string(have.Aead.Key) == string(want.Aead.Key) || redacted(have.Aead.Key)) &&
		sameMark(have.Mark, want.Mark) && sameOutputMark(have.OutputMark, want.OutputMark)
}

// redacted reports whether a dumped key is all zeros, as a kernel locked
// down for confidentiality shows every key: then it cannot be compared,
// and is taken to be right rather than replaced on every call.
func redacted(key []byte) bool {
	for _, b := range key {
		if b != 0 {
			return false
		}
	}
	return len(key) > 0
}

func sameMark(a, b *netlink.XfrmMark) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// sameOutputMark compares output marks as the kernel holds them: the
// netlink package reads a mask of 0xffffffff as 0.
func sameOutputMark(a, b *netlink.XfrmMark) bool {
	norm := func(m *netlink.XfrmMark) netlink.XfrmMark {
		if m == nil {
			return netlink.XfrmMark{}
		}
		n := *m
		if n.Mask == 0 {
			n.Mask = ^uint32(0)
		}
		return n
	}
	return norm(a) == norm(b)
}

// ours reports whether s is a state the package made: its reqid and a
// mark of the package's layout.
func ours(s *netlink.XfrmState) bool {
	if s.Reqid != Reqid || s.Proto != netlink.XFRM_PROTO_ESP || s.Mark == nil {
		return false
	}
	switch s.Mark.Mask {
	case EncryptMask:
		return s.Mark.Value&MarkMagicMask == MarkEncrypt
	case DecryptMask:
		return s.Mark.Value&MarkMagicMask == MarkDecrypt
	}
	return false
}

// deleteState deletes the package's state with id's identity, if there is
// one. The kernel finds a state by destination, SPI and mark, and a state
// without a mark matches any mark, so the state found is checked first.
func deleteState(h *netlink.Handle, id *netlink.XfrmState) error {
	have, err := h.XfrmStateGet(id)
	switch {
	case errors.Is(err, unix.ESRCH):
		return nil
	case err != nil:
		return fmt.Errorf("get %s: %w", describe(id), err)
	case !ours(have) || !sameMark(have.Mark, id.Mark):
		return fmt.Errorf("delete %s: a state not made by sluice shadows it", describe(id))
	}
	if err := h.XfrmStateDel(id); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("delete %s: %w", describe(id), err)
	}
	return nil
}

// anyNet is the selector address that matches every address of a's family.
func anyNet(a netip.Addr) *net.IPNet {
	if a.Is4() {
		return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	}
	return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
}

// anyAddr is the template address that stands for any address of a's family.
func anyAddr(a netip.Addr) net.IP {
	return anyNet(a).IP
}

func outPolicy(p Peer, spi uint8) *netlink.XfrmPolicy {
	return &netlink.XfrmPolicy{
		Src: anyNet(p.Local), Dst: anyNet(p.Local), Dir: netlink.XFRM_DIR_OUT,
		Mark: &netlink.XfrmMark{Value: EncryptMark(spi, p.Node), Mask: EncryptMask},
		Tmpls: []netlink.XfrmPolicyTmpl{{
			Src: p.Local.AsSlice(), Dst: p.Remote.AsSlice(),
			Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Spi: int(spi), Reqid: Reqid,
		}},
	}
}

func blockPolicy(local netip.Addr) *netlink.XfrmPolicy {
	return &netlink.XfrmPolicy{
		Src: anyNet(local), Dst: anyNet(local), Dir: netlink.XFRM_DIR_OUT,
		Mark:   &netlink.XfrmMark{Value: MarkEncrypt, Mask: MarkMagicMask},
		Action: netlink.XFRM_POLICY_BLOCK, Priority: priorityBlock,
	}
}

func basePolicy(dir netlink.Dir, local netip.Addr) *netlink.XfrmPolicy {
	return &netlink.XfrmPolicy{
		Src: anyNet(local), Dst: anyNet(local), Dir: dir, Priority: priorityBase,
		Tmpls: []netlink.XfrmPolicyTmpl{{
			Src: anyAddr(local), Dst: local.AsSlice(),
			Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: Reqid, Optional: 1,
		}},
	}
}

// policyKind tells the package's policies apart from each other and from
// everyone else's.
type policyKind int

const (
	foreignPolicy policyKind = iota
	peerPolicy
	basePolicyKind
	blockPolicyKind
)

func kindOf(pol *netlink.XfrmPolicy) policyKind {
	oneTmpl := len(pol.Tmpls) == 1 && pol.Tmpls[0].Reqid == Reqid && pol.Tmpls[0].Proto == netlink.XFRM_PROTO_ESP
	m := pol.Mark
	switch {
	case pol.Dir == netlink.XFRM_DIR_OUT && m != nil && m.Mask == EncryptMask && m.Value&MarkMagicMask == MarkEncrypt && oneTmpl:
		return peerPolicy
	case pol.Dir == netlink.XFRM_DIR_OUT && m != nil && *m == netlink.XfrmMark{Value: MarkEncrypt, Mask: MarkMagicMask} &&
		pol.Action == netlink.XFRM_POLICY_BLOCK && pol.Priority == priorityBlock && len(pol.Tmpls) == 0:
		return blockPolicyKind
	case (pol.Dir == netlink.XFRM_DIR_IN || pol.Dir == netlink.XFRM_DIR_FWD) && m == nil &&
		pol.Priority == priorityBase && oneTmpl && pol.Tmpls[0].Optional == 1:
		return basePolicyKind
	}
	return foreignPolicy
}

// deletePolicy deletes the policy with pol's selector, direction and mark
// (or, when pol has one, its index); a missing one is not an error.
func deletePolicy(h *netlink.Handle, pol *netlink.XfrmPolicy) error {
	if err := h.XfrmPolicyDel(pol); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete %s policy %v→%v: %w", pol.Dir, pol.Src, pol.Dst, err)
	}
	return nil
}

// A listed object and the address family it was listed for: the netlink
// package cannot always tell from the addresses.
type (
	listedState struct {
		netlink.XfrmState
		family int
	}
	listedPolicy struct {
		netlink.XfrmPolicy
		family int
	}
)

var families = []int{netlink.FAMILY_V4, netlink.FAMILY_V6}

// dumpTries bounds the dumps a concurrent change interrupts.
const dumpTries = 5

func listStates(h *netlink.Handle) ([]listedState, error) {
	var out []listedState
	for _, family := range families {
		states, err := retryDump(func() ([]netlink.XfrmState, error) { return h.XfrmStateList(family) })
		if err != nil {
			return nil, fmt.Errorf("list states: %w", err)
		}
		for _, s := range states {
			out = append(out, listedState{s, family})
		}
	}
	return out, nil
}

func listPolicies(h *netlink.Handle) ([]listedPolicy, error) {
	var out []listedPolicy
	for _, family := range families {
		policies, err := retryDump(func() ([]netlink.XfrmPolicy, error) { return h.XfrmPolicyList(family) })
		if err != nil {
			return nil, fmt.Errorf("list policies: %w", err)
		}
		for _, p := range policies {
			out = append(out, listedPolicy{p, family})
		}
	}
	return out, nil
}

func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	var err error
	for range dumpTries {
		var v []T
		if v, err = dump(); err == nil {
			return v, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return nil, err
}

// addrOf converts an address the netlink package parsed, which reads an
// IPv6 address whose last 12 bytes are zero as the IPv4 address of its
// first 4.
func addrOf(ip net.IP, family int) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	a = a.Unmap()
	if family == netlink.FAMILY_V6 && a.Is4() {
		var b [16]byte
		v4 := a.As4()
		copy(b[:4], v4[:])
		return netip.AddrFrom16(b)
	}
	return a
}
