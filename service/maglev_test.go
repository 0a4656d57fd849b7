package service

import (
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/sluicedp/sluice/datapath"
)

func backends(n int) []MaglevBackend {
	out := make([]MaglevBackend, n)
	for i := range out {
		out[i] = MaglevBackend{Key: fmt.Sprintf("198.18.%d.%d:80", i/250, i%250+1), Weight: 1}
	}
	return out
}

// Every backend gets close to its share of the slots, weights honoured.
func TestMaglevShares(t *testing.T) {
	bs := backends(10)
	bs[0].Weight, bs[1].Weight = 3, 0
	table, err := MaglevTable(bs, DefaultMaglevSize)
	if err != nil {
		t.Fatal(err)
	}
	count := make([]int, len(bs))
	for _, b := range table {
		count[b]++
	}
	total := 3 + 8 // weights
	for i, b := range bs {
		want := float64(DefaultMaglevSize) * float64(b.Weight) / float64(total)
		if math.Abs(float64(count[i])-want) > want*0.02+1 {
			t.Errorf("backend %d (weight %d) has %d slots, want about %.0f", i, b.Weight, count[i], want)
		}
	}
}

// The same backends give the same table; removing one of N moves few slots
// of the others.
func TestMaglevDisruption(t *testing.T) {
	for _, tc := range []struct {
		n       int
		maxMove float64 // share of all slots that may move besides the removed backend's
	}{{10, 0.20}, {100, 0.023}, {1000, 0.03}} {
		bs := backends(tc.n)
		a, err := MaglevTable(bs, DefaultMaglevSize)
		if err != nil {
			t.Fatal(err)
		}
		again, _ := MaglevTable(bs, DefaultMaglevSize)
		for i := range a {
			if a[i] != again[i] {
				t.Fatalf("n=%d: two builds of the same backends differ at slot %d", tc.n, i)
			}
		}
		// Remove backend 3: the indexes above it shift by one.
		fewer := append(append([]MaglevBackend(nil), bs[:3]...), bs[4:]...)
		b, err := MaglevTable(fewer, DefaultMaglevSize)
		if err != nil {
			t.Fatal(err)
		}
		moved := 0
		for i := range a {
			was := bs[a[i]].Key
			if was == bs[3].Key {
				continue // its slots must move
			}
			if fewer[b[i]].Key != was {
				moved++
			}
		}
		share := float64(moved) / float64(len(a))
		t.Logf("n=%d: removing one backend moved %.2f%% of the slots of the others", tc.n, 100*share)
		if share > tc.maxMove {
			t.Errorf("n=%d: %.2f%% of the others' slots moved, want at most %.1f%%", tc.n, 100*share, 100*tc.maxMove)
		}
	}
}

func TestMaglevErrors(t *testing.T) {
	for name, tc := range map[string]struct {
		bs []MaglevBackend
		m  int
	}{
		"size not prime":         {backends(3), 16380},
		"size below backends":    {backends(20), 17},
		"no backend with weight": {[]MaglevBackend{{Key: "a"}}, 13},
		"no backend":             {nil, 13},
	} {
		if _, err := MaglevTable(tc.bs, tc.m); !errors.Is(err, datapath.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}

// BenchmarkMaglev builds tables of the sizes and backend counts Cilium's
// benchmarks use.
func BenchmarkMaglev(b *testing.B) {
	for _, m := range []int{16381, 65537} {
		for _, n := range []int{100, 1000} {
			bs := backends(n)
			b.Run(fmt.Sprintf("m=%d/backends=%d", m, n), func(b *testing.B) {
				for b.Loop() {
					if _, err := MaglevTable(bs, m); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
