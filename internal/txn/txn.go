// Package txn is the one shape every change to a datapath takes: a list of
// phases, each with its undo, run in order. A phase that fails takes back
// itself and every phase before it, newest first, so a failed change
// leaves the datapath as it was. A process killed between (or inside)
// phases leaves a ledger record that says which version is live; each
// object package's repair (see core.RegisterRepair) reads it and finishes
// or takes back the change.
//
// Every phase boundary is a crash point: tests kill a child process at a
// named point (Crash) and check what Reconcile makes of what is left.
package txn

import (
	"errors"
	"fmt"
)

// Phase is one step of a change.
type Phase struct {
	Name string
	Do   func() error
	// Undo takes back what Do did, and what a Do that failed did in part;
	// nil when there is nothing to take back.
	Undo func() error
	// After marks a phase that runs once the change is made (the phases
	// before it committed it): it removes what the old version had. It
	// has no Undo, and when it fails nothing is taken back: the change
	// stays made, and Reconcile removes what is left over.
	After bool
}

// Run runs the phases of the change named what in order. When one fails,
// the Undo of it and of every phase before it runs, newest first; the
// error says what failed and, if taking back failed too, that as well.
// Before each phase and after the last, Run passes the crash point
// "what/phase" (and "what/done") to Crash.
func Run(what string, phases ...Phase) error {
	for i, p := range phases {
		Crash(what + "/" + p.Name)
		if err := p.Do(); err != nil {
			if p.After {
				return fmt.Errorf("%s is made, but not all the old version had is removed (Reconcile removes it): %w", what, err)
			}
			// ErrUnchanged: nothing to change. The phases before take back
			// what they did, as for a failure.
			var errs []error
			for j := i; j >= 0; j-- {
				if phases[j].Undo != nil {
					errs = append(errs, phases[j].Undo())
				}
			}
			if undoErr := errors.Join(errs...); undoErr != nil {
				return fmt.Errorf("%w (and taking it back: %w)", err, undoErr)
			}
			return err
		}
	}
	Crash(what + "/done")
	return nil
}

// ErrUnchanged, returned by a phase, ends a change that has nothing to change:
// the phases before it are taken back and Run returns ErrUnchanged.
var ErrUnchanged = errors.New("nothing to change")

// CrashHook, when set, is called at every crash point. Only tests set it:
// a child process kills itself at the point it was told to.
var CrashHook func(point string)

// Crash passes a crash point to CrashHook. Phases call it inside
// themselves too, where a kill leaves half a phase done (half the map
// entries written).
func Crash(point string) {
	if CrashHook != nil {
		CrashHook(point)
	}
}
