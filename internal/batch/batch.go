// Package batch reads whole BPF hash maps with batch lookups: a few system
// calls for thousands of entries, where iterating key by key takes two
// each.
package batch

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// Size is how many entries one lookup reads.
const Size = 4096

// Each calls fn with every entry of m, a hash map with keys K and values
// V. The entries are read in batches, not at one instant: one that
// changes while Each runs is seen as it was or as it is.
func Each[K, V any](m *ebpf.Map, fn func(k *K, v *V)) error {
	keys, values := make([]K, Size), make([]V, Size)
	return each(m, keys, values, func(i int) { fn(&keys[i], &values[i]) })
}

// EachPerCPU calls fn with every entry of m, a per-CPU hash map with keys
// K and values V: the entry's value on each possible CPU.
func EachPerCPU[K, V any](m *ebpf.Map, fn func(k *K, v []V)) error {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	keys, values := make([]K, Size), make([]V, Size*cpus)
	return each(m, keys, values, func(i int) { fn(&keys[i], values[i*cpus:(i+1)*cpus]) })
}

// Count returns how many entries m, a hash map with keys K and values V,
// holds.
func Count[K, V any](m *ebpf.Map) (int, error) {
	n := 0
	err := Each(m, func(*K, *V) { n++ })
	return n, err
}

// each reads m into keys and values a batch at a time, calling got with
// the index of each entry read.
func each(m *ebpf.Map, keys, values any, got func(i int)) error {
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, values, nil)
		for i := range n {
			got(i)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil // that was the last batch
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", m, err)
		}
	}
}
