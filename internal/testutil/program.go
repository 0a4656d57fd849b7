package testutil

import (
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"testing"
)

// ProgramsEnv names a directory of programs built in advance from
// internal/testprog (tools/kernelvm builds them for the VM, which cannot
// run the Go toolchain).
const ProgramsEnv = "SLUICE_TESTPROGS"

// Program returns the path of the program built from internal/testprog/NAME:
// from ProgramsEnv when set, else built with `go build` into a temporary
// directory.
func Program(t testing.TB, name string) string {
	t.Helper()
	if dir := os.Getenv(ProgramsEnv); dir != "" {
		return filepath.Join(dir, name)
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	out := filepath.Join(t.TempDir(), name)
	cmd := exec.Command("go", "build", "-o", out, "./"+path.Join("internal/testprog", name))
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build internal/testprog/%s (the test needs the go command): %v\n%s", name, err, b)
	}
	return out
}
