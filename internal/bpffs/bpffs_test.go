package bpffs_test

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluicedp/sluice/internal/bpffs"
	"github.com/sluicedp/sluice/internal/testutil"
)

func TestEnsure(t *testing.T) {
	testutil.Privileged(t)
	dir := filepath.Join(t.TempDir(), "fs")
	if err := bpffs.Ensure(dir); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(dir, unix.MNT_DETACH)
	if ok, err := bpffs.IsMounted(dir); !ok || err != nil {
		t.Fatalf("not mounted after Ensure: %v", err)
	}
	if err := bpffs.Ensure(dir); err != nil {
		t.Errorf("a second Ensure: %v", err)
	}

	// Never mount over a directory with something in it.
	full := t.TempDir()
	if err := os.WriteFile(filepath.Join(full, "keep"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := bpffs.Ensure(full); err == nil {
		unix.Unmount(full, unix.MNT_DETACH)
		t.Fatal("Ensure mounted over a non-empty directory")
	}
	if _, err := os.Stat(filepath.Join(full, "keep")); err != nil {
		t.Errorf("the directory's file is hidden: %v", err)
	}
}
