// Package bpftest holds BPF programs that exist only for sluice's tests:
// they call the shared C helpers in ways a test can steer.
package bpftest

//go:generate go tool bpf2go -no-global-types Probe ../../bpf/test/probe.c
