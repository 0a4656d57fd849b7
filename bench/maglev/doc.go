// Package maglevbench compares sluice's Maglev table builder with
// Cilium's pkg/maglev: build time and the share of slots that move when a
// backend goes. It is a module of its own so that the sluice library never
// depends on Cilium; everything is in its tests.
package maglevbench
