package testutil

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/sluicedp/sluice/internal/txn"
)

// A test binary can start itself again as a child process that runs one
// function, its role, instead of the tests: a process to kill half-way,
// another process on the same datapath, one that starts inside a cgroup.
const childEnv = "SLUICE_TEST_CHILD" // "ROLE=ARG"

// Main, called from TestMain, runs the tests, or, in a child that Child
// started, the function of its role with its argument, and exits with what
// that returns.
func Main(m *testing.M, roles map[string]func(arg string) int) {
	if role, arg, ok := strings.Cut(os.Getenv(childEnv), "="); ok && roles[role] != nil {
		os.Exit(roles[role](arg))
	}
	os.Exit(m.Run())
}

// Child returns a command that runs this test binary as a child in the
// given role, with arg.
func Child(role, arg string) (*exec.Cmd, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+role+"="+arg)
	return cmd, nil
}

// CrashAt makes this process kill itself (SIGKILL, as a kill from outside
// would) when a change reaches the named crash point (internal/txn).
func CrashAt(point string) {
	txn.CrashHook = func(p string) {
		if p == point {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
		}
	}
}

// RunKilled runs a child in the given role and fails the test unless it
// was killed by SIGKILL (CrashAt): one that exits never reached its crash
// point.
func RunKilled(t testing.TB, role, arg string) {
	t.Helper()
	cmd, err := Child(role, arg)
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child %s %s was not killed at its crash point: %v: %s", role, arg, err, out)
	}
}
