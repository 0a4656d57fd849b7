// Package policy will hold the ingress and egress rules of an endpoint: peers
// by identity, CIDR or reserved entity, L4 ports and ranges, allow and deny,
// looked up in constant time whatever the number of rules. It is not built
// yet; see docs/architecture.md for the plan.
package policy
