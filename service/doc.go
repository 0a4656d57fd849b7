// Package service balances virtual addresses over backends: a frontend
// (an address, port and protocol, as a Kubernetes ClusterIP and port)
// is translated to one of its backends, chosen at random or by Maglev,
// with client affinity and backend states (active, terminating,
// terminating but still serving, quarantined, maintenance) as kube-proxy
// and Cilium know them: a service with no active backend falls back to
// its terminating backends that still serve (see State).
//
// Translation happens at two levels, chosen per service. At the socket
// level the programs attached to the datapath's cgroup (datapath.Config
// Cgroup) rewrite the address a process connects or sends to, so a
// connected flow needs no per-packet work and the process sees the
// frontend as its peer. At the tc level the endpoint program rewrites every
// packet an endpoint sends to the frontend, keeps each flow on its backend
// through connection tracking, and makes replies come from the frontend
// again. Policy decides on the backend the packet goes to, after
// translation.
//
// Upsert and Delete change one service; Sync hands over the whole set and
// writes only the difference. Every change is made before it breaks: the
// new backends and selection table are written whole before the frontend
// points at them, and a flow keeps its backend unless that backend is
// removed. The state lives in the datapath's pinned maps and ledger, so a
// restarted controller finds it, and Sync rewrites nothing that is right.
package service
