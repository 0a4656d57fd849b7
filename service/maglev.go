package service

import (
	"fmt"
	"math/big"

	"github.com/sluicedp/sluice/datapath"
)

// DefaultMaglevSize is the Maglev table size when none is given: a prime,
// as every size must be, large enough for a few hundred backends.
const DefaultMaglevSize = 16381

// MaglevBackend is one backend as the Maglev builder sees it: a key that
// names it the same way every time (its address and port) and a weight.
type MaglevBackend struct {
	Key    string
	Weight uint16 // 0: gets no slot
}

// MaglevTable builds a Maglev lookup table (Eisenbud et al., NSDI 2016) of size
// m, a prime: each slot holds the index of a backend in backends. Each
// backend walks the table in its own order (an offset and a step derived
// from its key) and the backends take turns claiming the next free slot of
// their order, a backend of weight w taking w turns for every turn of a
// backend of weight 1. A backend's slots are close to m * weight / total,
// the same backends always give the same table, and adding or removing one
// backend moves few slots of the others. m not prime, m smaller than the
// number of backends with a weight, or no backend with a weight is
// ErrInvalid.
func MaglevTable(backends []MaglevBackend, m int) ([]uint32, error) {
	if !isPrime(m) {
		return nil, fmt.Errorf("maglev table size %d: want a prime: %w", m, datapath.ErrInvalid)
	}
	var active []int
	maxWeight := uint16(0)
	for i, b := range backends {
		if b.Weight > 0 {
			active = append(active, i)
			maxWeight = max(maxWeight, b.Weight)
		}
	}
	if len(active) == 0 {
		return nil, fmt.Errorf("maglev: no backend with a weight: %w", datapath.ErrInvalid)
	}
	if len(active) > m {
		return nil, fmt.Errorf("maglev table size %d: too small for %d backends: %w", m, len(active), datapath.ErrInvalid)
	}

	// Each backend's order: slot(j) = (offset + j*skip) mod m, walked
	// lazily and without a division: the permutation table of the paper
	// is never built.
	ws := make([]walker, len(active))
	for k, i := range active {
		h := fnv64(backends[i].Key)
		ws[k] = walker{
			index:  uint32(i),
			slot:   (h >> 32) % uint64(m),
			skip:   (h&0xffffffff)%uint64(m-1) + 1,
			weight: uint64(backends[i].Weight),
		}
	}
	const empty = ^uint32(0)
	table := make([]uint32, m)
	for i := range table {
		table[i] = empty
	}
	filled := 0
	for filled < m {
		for k := range ws {
			w := &ws[k]
			// Weighted turns: every backend earns its weight each round
			// and takes a turn per maxWeight earned.
			w.credit += w.weight
			for w.credit >= uint64(maxWeight) && filled < m {
				w.credit -= uint64(maxWeight)
				for table[w.slot] != empty {
					w.advance(uint64(m))
				}
				table[w.slot] = w.index
				w.advance(uint64(m))
				filled++
			}
		}
	}
	return table, nil
}

func isPrime(m int) bool { return m >= 2 && big.NewInt(int64(m)).ProbablyPrime(0) }

// walker is a backend walking its order of the table.
type walker struct {
	index  uint32
	slot   uint64 // the next slot of its order: offset, then + skip mod m
	skip   uint64
	weight uint64
	credit uint64 // turns earned, in units of 1/maxWeight
}

// advance moves a walker to the next slot of its order.
func (w *walker) advance(m uint64) {
	w.slot += w.skip
	if w.slot >= m {
		w.slot -= m
	}
}

// fnv64 is FNV-1a: a hash that is the same in every process, as the table
// must be.
func fnv64(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	// FNV's low bits mix poorly for short keys: finish with a
	// multiply-xorshift (splitmix64's).
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	return h ^ h>>31
}
