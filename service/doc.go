// Package service will hold virtual addresses (ClusterIP, NodePort,
// ExternalIP, LoadBalancer) balanced over backends, with random and Maglev
// selection, session affinity and source ranges. It is not built yet; see
// docs/architecture.md for the plan.
package service
