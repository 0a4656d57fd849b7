package datapath

import (
	"errors"

	"github.com/cilium/ebpf"
)

// Errors returned by sluice. Every error from the library wraps one of these,
// or one of the standard library's os.ErrClosed (a call on a closed
// handle), os.ErrNotExist (a handle on a datapath unloaded since) and
// os.ErrPermission (missing privileges), with the kernel's errno or
// cilium/ebpf's error beside it, so that errors.Is works through every
// layer. The object packages (endpoint, policy, service) return these too.
var (
	// ErrInvalid means the input was rejected before anything changed.
	ErrInvalid = errors.New("invalid argument")
	// ErrExists means the object is already there.
	ErrExists = errors.New("already exists")
	// ErrNotFound means the object, namespace or device is not there.
	ErrNotFound = errors.New("not found")
	// ErrMapFull means a datapath map has no room for another entry.
	ErrMapFull = errors.New("datapath map is full")
	// ErrIncompatible means pinned state was written by a sluice with
	// another layout version; it is left untouched.
	ErrIncompatible = errors.New("incompatible pinned datapath")
	// ErrNotSupported means the kernel lacks a feature. It is cilium/ebpf's
	// own sentinel, so errors from either library match it.
	ErrNotSupported = ebpf.ErrNotSupported
)
