package datapath

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf/link"

	"github.com/sluicedp/sluice/internal/attach"
	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/core"
	"github.com/sluicedp/sluice/internal/ledger"
)

// upgrade makes this build's programs the ones that run, when the datapath
// records another build's: every endpoint's and node device's tc
// attachments and every socket program's link get the new program in
// place (link.Update for a link, a filter replaced at its own handle for
// a legacy one: atomic, no packet goes unhandled), and the record then
// names this build. The pinned
// maps are shared, so flows, policies and services carry over; a layout
// that changed is refused before this (checkLayout). A re-open by the same
// build loads no program. Open calls it holding the directory lock, after
// Reconcile.
func upgrade(st *core.State) error {
	r, err := ledger.Get(st.Objs.Ledger, ledger.KindDatapath, 0)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	var node nodeRecord
	if err := json.Unmarshal(r.Object, &node); err != nil {
		return fmt.Errorf("%w: node record: %w", ErrIncompatible, err)
	}
	if node.Programs == bpfobj.Build() {
		return nil
	}
	recs, err := ledger.List(st.Objs.Ledger, ledger.KindEndpoint)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	for _, rec := range recs {
		if rec.State != ledger.Ready || rec.Made.Device == nil {
			continue
		}
		progs, err := st.EndpointPrograms()
		if err != nil {
			return err
		}
		for _, l := range rec.Made.Links {
			prog, hook := progs.FromEndpoint, attach.Ingress
			if l.Egress {
				prog, hook = progs.FromHost, attach.Egress
			}
			if l.Program != "" && l.Program != bpfobj.EndpointProgFromEndpoint && l.Program != bpfobj.EndpointProgFromHost {
				return fmt.Errorf("%w: endpoint %d: no program %q in this build", ErrIncompatible, rec.ID, l.Program)
			}
			if err := st.AttachTC(rec.Made.Device.Ifindex, hook, prog, l.Key); err != nil {
				return fmt.Errorf("upgrade endpoint %d: %w", rec.ID, err)
			}
		}
	}
	devices, err := ledger.List(st.Objs.Ledger, ledger.KindDevice)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	for _, rec := range devices {
		if rec.State != ledger.Ready || rec.Made.Device == nil {
			continue
		}
		for _, l := range rec.Made.Links {
			if err := attachNodeLink(st, rec.Made.Device, l); err != nil {
				return fmt.Errorf("upgrade node device %s: %w", rec.Made.Device.Name, err)
			}
		}
	}
	if err := upgradeSocketPrograms(st); err != nil {
		return err
	}
	node.Programs = bpfobj.Build()
	obj, err := json.Marshal(node)
	if err != nil {
		return err
	}
	r.Object = obj
	return ledger.Put(st.Objs.Ledger, r)
}

// upgradeSocketPrograms gives each pinned socket program link this
// build's program.
func upgradeSocketPrograms(st *core.State) error {
	for _, h := range socketHooks {
		pin := filepath.Join(st.LinksDir(), cgroupLinkPrefix+h.name)
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("upgrade %s: %w", pin, err)
		}
		progs, err := st.SockPrograms()
		if err == nil {
			err = l.Update(h.prog(progs))
		}
		l.Close()
		if err != nil {
			return fmt.Errorf("upgrade %s: %w", pin, err)
		}
	}
	return nil
}
