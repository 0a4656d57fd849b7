// Package endpoint will hold workloads on the node: a veth pair into the
// workload's own network namespace, its addresses and security identity,
// local forwarding and anti-spoofing. It is not built yet; see
// docs/architecture.md for the plan.
package endpoint
