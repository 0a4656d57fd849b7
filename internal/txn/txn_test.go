package txn

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// A failed phase takes back itself and every phase before it, newest
// first; an after phase's failure takes nothing back; ErrUnchanged takes
// back what came before and is returned; every boundary is a crash point.
func TestRun(t *testing.T) {
	var log []string
	phase := func(name string, fail error, after bool) Phase {
		return Phase{
			Name:  name,
			After: after,
			Do: func() error {
				log = append(log, "do "+name)
				return fail
			},
			Undo: func() error {
				log = append(log, "undo "+name)
				return nil
			},
		}
	}
	var points []string
	CrashHook = func(p string) { points = append(points, p) }
	defer func() { CrashHook = nil }()
	boom := errors.New("boom")

	for _, c := range []struct {
		phases []Phase
		err    error
		log    []string
		points []string
	}{
		{
			phases: []Phase{phase("a", nil, false), phase("b", nil, false)},
			log:    []string{"do a", "do b"},
			points: []string{"x/a", "x/b", "x/done"},
		},
		{
			phases: []Phase{phase("a", nil, false), phase("b", boom, false), phase("c", nil, false)},
			err:    boom,
			log:    []string{"do a", "do b", "undo b", "undo a"},
			points: []string{"x/a", "x/b"},
		},
		{
			phases: []Phase{phase("a", nil, false), phase("b", nil, false), phase("c", boom, true)},
			err:    boom,
			log:    []string{"do a", "do b", "do c"},
			points: []string{"x/a", "x/b", "x/c"},
		},
		{
			phases: []Phase{phase("a", nil, false), phase("b", ErrUnchanged, false)},
			err:    ErrUnchanged,
			log:    []string{"do a", "do b", "undo b", "undo a"},
			points: []string{"x/a", "x/b"},
		},
	} {
		log, points = nil, nil
		err := Run("x", c.phases...)
		if !errors.Is(err, c.err) || (c.err == nil) != (err == nil) {
			t.Errorf("Run: %v, want %v", err, c.err)
		}
		if !slices.Equal(log, c.log) || !slices.Equal(points, c.points) {
			t.Errorf("ran %v at %v, want %v at %v", log, points, c.log, c.points)
		}
	}
	// An undo that fails is reported beside the failure.
	err := Run("x", Phase{Name: "a", Do: func() error { return nil }, Undo: func() error { return errors.New("stuck") }},
		Phase{Name: "b", Do: func() error { return boom }})
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "stuck") {
		t.Errorf("a failed undo: %v", err)
	}
}
