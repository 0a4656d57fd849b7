// Package service will hold virtual addresses (ClusterIP, NodePort,
// ExternalIP, LoadBalancer) balanced over backends, with random and Maglev
// selection, session affinity and source ranges. So far it holds the pure
// part of Maglev selection: Maglev builds the lookup table of a backend
// set. The datapath side is not built yet; see docs/architecture.md for
// the plan.
package service
