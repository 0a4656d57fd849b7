package testutil

import (
	"bufio"
	"compress/gzip"
	"fmt"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// KernelAtLeast reports whether the running kernel's version is at least
// major.minor.
func KernelAtLeast(major, minor int) bool {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return false
	}
	var maj, min int
	fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &maj, &min)
	return maj > major || (maj == major && min >= minor)
}

// RequireSince skips the test when err says the kernel lacks a feature that
// came with Linux major.minor and the kernel is older than that, saying so.
// On a kernel that should have the feature it fails when the CI environment
// variable is set, and skips otherwise (see Require).
func RequireSince(t testing.TB, feature string, major, minor int, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if !KernelAtLeast(major, minor) {
		t.Skipf("skipping: %s needs Linux %d.%d: %v", feature, major, minor, err)
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("CI is set, and Linux %d.%d or later should have %s, but: %v", major, minor, feature, err)
	}
	t.Skipf("skipping: the kernel lacks %s: %v", feature, err)
}

// RequireConfig skips the test when the running kernel was built without
// option (e.g. "CONFIG_INET_ESP"), as /proc/config.gz says: an absence the
// kernel declares, not a broken setup, so it skips under CI too. A kernel
// that does not publish its configuration (Debian's, the VM's) is assumed
// to have the option, as a module if need be: the test runs and fails
// when it is missing after all.
func RequireConfig(t testing.TB, option string) {
	t.Helper()
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		return
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return
	}
	sc := bufio.NewScanner(zr)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, option+"=") {
			return
		}
		if line == "# "+option+" is not set" {
			t.Skipf("skipping: the kernel was built without %s", option)
		}
	}
	t.Skipf("skipping: the kernel's configuration has no %s", option)
}
