package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/bpfobj"
	"github.com/sluicedp/sluice/internal/ledger"
)

// found is what Open found in a pin directory, before it loaded anything.
type found struct {
	// spec is the objects to load, every map sized: a pinned one keeps
	// its size (a re-open cannot resize it), a new one takes its size from
	// the limits.
	spec *ebpf.CollectionSpec
	// fresh says the directory holds no datapath with state: none at
	// all, or one whose first Open never finished (it has no stamp and
	// its ledger no object).
	fresh bool
	// events is the event configuration Open sets; nil keeps the pinned
	// one.
	events *EventConfig
}

// inspect checks the pins of dir (the names in before) against this
// build, changing nothing, and says how Open goes on. It fails with
// ErrIncompatible for a stamp of another layout, a pin of a map's name
// that is not that map (a directory, a program, a map of another shape),
// a map missing from a datapath with state, and a ledger record that
// cannot be read; with ErrInvalid for an event rate the pinned ring
// cannot hold.
func inspect(dir string, before map[string]bool, cfg Config) (*found, error) {
	version, err := checkLayout(dir)
	if err != nil {
		return nil, err
	}
	spec, err := bpfobj.LoadEndpoint()
	if err != nil {
		return nil, err
	}
	if err := checkPins(spec, dir, before); err != nil {
		return nil, err
	}
	f := &found{spec: spec, fresh: version == 0}
	if before[bpfobj.EndpointMapLedger] {
		ledgerMap, err := ebpf.LoadPinnedMap(filepath.Join(dir, bpfobj.EndpointMapLedger), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, fmt.Errorf("%w: load pinned %s: %w", ErrIncompatible, bpfobj.EndpointMapLedger, err)
		}
		objects := false
		err = scanLedger(ledgerMap, nil, func(r *ledger.Record) { objects = objects || r.Kind != ledger.KindDatapath })
		ledgerMap.Close()
		if errors.Is(err, ErrIncompatible) {
			return nil, fmt.Errorf("%w; UnloadPinned removes the datapath", err)
		}
		if err != nil {
			return nil, err
		}
		// No stamp, but objects: a datapath that ran, whose stamp is
		// gone. It is not made afresh.
		if objects {
			f.fresh = false
		}
	}
	if !f.fresh {
		// A map of a datapath with state is never made anew, empty: the
		// state the missing one held would silently be gone.
		for _, name := range sortedNames(spec) {
			if !before[name] {
				return nil, fmt.Errorf("%w: the datapath in %s has no %s map", ErrIncompatible, dir, name)
			}
		}
	}

	f.events = cfg.Events
	if f.events == nil && f.fresh {
		// A datapath whose first Open did not finish has the settings
		// nobody set (all zero) or, if a stamp was lost, someone's:
		// those stay.
		set, err := eventsSet(dir, before)
		if err != nil {
			return nil, err
		}
		if !set {
			def := DefaultEventConfig()
			f.events = &def
		}
	}
	limits := cfg.Limits.withDefaults()
	ev := DefaultEventConfig()
	if f.events != nil {
		ev = *f.events
	}
	sizes := limits.mapSizes()
	sizes[bpfobj.EndpointMapEvents] = uint32(ringBytes(ev, cpus()))
	for name, size := range sizes {
		if !before[name] {
			spec.Maps[name].MaxEntries = size
		}
	}
	if f.events != nil {
		ring := uint64(spec.Maps[bpfobj.EndpointMapEvents].MaxEntries)
		if need := ringBytes(*f.events, cpus()); f.events.RatePerCPU != 0 && need > ring {
			return nil, fmt.Errorf("events at %d/s and bursts of %d per CPU on %d CPUs need a ring of %d bytes, this datapath's has %d: %w",
				f.events.RatePerCPU, f.events.Burst, cpus(), need, ring, ErrInvalid)
		}
	}
	return f, nil
}

// checkPins fails with ErrIncompatible when a pin in dir (of the names in
// have) with the name of one of spec's maps is not that map: a directory,
// a program or link, a map of another type, key, value or flags. Each
// pinned map's spec takes the pinned size. It loads nothing else and
// changes nothing.
func checkPins(spec *ebpf.CollectionSpec, dir string, have map[string]bool) error {
	for _, name := range sortedNames(spec) {
		if !have[name] {
			continue
		}
		m, err := loadPinnedMap(spec, dir, name, true)
		if err != nil {
			return err
		}
		spec.Maps[name].MaxEntries = m.MaxEntries()
		m.Close()
	}
	return nil
}

// loadPinnedMap loads the map of spec's named name pinned in dir, failing
// with ErrIncompatible when the pin is not that map (of any size).
func loadPinnedMap(spec *ebpf.CollectionSpec, dir, name string, readOnly bool) (*ebpf.Map, error) {
	path := filepath.Join(dir, name)
	if fi, err := os.Lstat(path); err == nil && fi.IsDir() {
		return nil, fmt.Errorf("%w: %s is a directory, not the %s map", ErrIncompatible, path, name)
	}
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: readOnly})
	if errors.Is(err, unix.EPERM) {
		return nil, fmt.Errorf("load pinned %s: %w", name, err) // privileges: os.ErrPermission
	}
	if err != nil {
		// EINVAL: a program or a link.
		return nil, fmt.Errorf("%w: %s is not the %s map: %w", ErrIncompatible, path, name, err)
	}
	want := spec.Maps[name].Copy()
	want.MaxEntries = m.MaxEntries()
	if err := want.Compatible(m); err != nil {
		m.Close()
		return nil, fmt.Errorf("%w: pinned %s: %w", ErrIncompatible, name, err)
	}
	return m, nil
}

// readStamp returns the layout version dir's pins are stamped with, 0 when
// there is no layout pin or it holds no version, or an error matching
// ErrIncompatible when it cannot be read.
func readStamp(dir string) (uint32, error) {
	path := filepath.Join(dir, bpfobj.EndpointMapLayout)
	if fi, err := os.Lstat(path); err == nil && fi.IsDir() {
		return 0, fmt.Errorf("%w: %s is a directory, not the layout stamp", ErrIncompatible, path)
	}
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("%w: read layout stamp: %w", ErrIncompatible, err)
	}
	defer m.Close()
	// The version is the stamp's first field in every layout, so a stamp of
	// any layout can be read this way.
	raw := make([]byte, m.ValueSize())
	if err := m.Lookup(uint32(0), raw); err != nil {
		return 0, fmt.Errorf("%w: read layout stamp: %w", ErrIncompatible, err)
	}
	if len(raw) < 4 {
		return 0, fmt.Errorf("%w: a layout stamp of %d bytes", ErrIncompatible, len(raw))
	}
	return binary.NativeEndian.Uint32(raw), nil
}

func sortedNames(spec *ebpf.CollectionSpec) []string {
	names := make([]string, 0, len(spec.Maps))
	for name := range spec.Maps {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// eventsSet reports whether the pinned event configuration in dir, if
// any, holds settings: anything but the zeros a new map has.
func eventsSet(dir string, have map[string]bool) (bool, error) {
	if !have[bpfobj.EndpointMapEventConfig] {
		return false, nil
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, bpfobj.EndpointMapEventConfig), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return false, fmt.Errorf("%w: load pinned %s: %w", ErrIncompatible, bpfobj.EndpointMapEventConfig, err)
	}
	defer m.Close()
	var v bpfobj.TypesEventSettings
	if err := m.Lookup(uint32(0), &v); err != nil {
		return false, fmt.Errorf("%w: read event config: %w", ErrIncompatible, err)
	}
	return v != bpfobj.TypesEventSettings{}, nil
}

// readLedger returns the records of the ledger of the kinds want accepts
// (every kind when want is nil) that can be read, and an error matching
// ErrIncompatible that names each that cannot be, if any. Call it with the
// lock held.
func readLedger(m *ebpf.Map, want func(ledger.Kind) bool) ([]*ledger.Record, error) {
	var out []*ledger.Record
	err := scanLedger(m, want, func(r *ledger.Record) { out = append(out, r) })
	if err != nil && !errors.Is(err, ErrIncompatible) {
		return nil, err
	}
	return out, err
}

// scanLedger is ledger.Scan, with records that cannot be read reported as
// ErrIncompatible.
func scanLedger(m *ebpf.Map, want func(ledger.Kind) bool, visit func(*ledger.Record)) error {
	err := ledger.Scan(m, want, visit)
	if errors.Is(err, ledger.ErrCorrupt) {
		return fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	return err
}
