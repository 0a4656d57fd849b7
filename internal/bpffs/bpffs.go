// Package bpffs makes sure a BPF filesystem is mounted where pins go.
package bpffs

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ErrOccupied reports a path that is neither a BPF filesystem nor an empty
// directory to mount one on.
var ErrOccupied = errors.New("not a BPF filesystem, and not an empty directory to mount one on")

// IsMounted reports whether path is the root of a mounted BPF filesystem.
func IsMounted(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("statfs %s: %w", path, err)
	}
	return st.Type == unix.BPF_FS_MAGIC, nil
}

// Ensure mounts a BPF filesystem at path unless one is there already,
// creating the directory if needed. It refuses to mount over a directory
// that has anything in it. Equivalent to: `mount -t bpf bpf PATH`.
func Ensure(path string) error {
	ok, err := IsMounted(path)
	if err != nil || ok {
		return err
	}
	if err := os.MkdirAll(path, 0o755); err != nil {
		return fmt.Errorf("create bpffs mount point: %w", err)
	}
	if entries, err := os.ReadDir(path); err != nil || len(entries) > 0 {
		return fmt.Errorf("%s: %w (%v)", path, ErrOccupied, err)
	}
	if err := unix.Mount("bpf", path, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", path, err)
	}
	return nil
}
