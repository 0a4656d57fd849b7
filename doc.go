// Package sluice is an embeddable eBPF datapath for Linux: the forwarding,
// policy, load balancing and observability of a Cilium-class CNI, as a Go
// library with no orchestration opinion. A controller, a CNI plugin, a VM
// manager or a 40-line main.go decides what exists; sluice makes the kernel
// do it and shows what the kernel did with every packet.
//
// # Object model
//
//   - [github.com/sluicedp/sluice/datapath]: one loaded datapath per network
//     namespace (node). It owns the pinned maps, the attached programs and
//     the event stream: Open, Close (keeps running), Unload (tears down),
//     Metrics, Events.
//   - [github.com/sluicedp/sluice/endpoint]: workloads on the node (a veth
//     pair into their own namespace, addresses, a security identity), with
//     anti-spoofing and local forwarding by bpf_redirect_peer.
//   - [github.com/sluicedp/sluice/policy]: ingress and egress rules of an
//     endpoint.
//   - [github.com/sluicedp/sluice/service]: virtual addresses balanced over
//     backends.
//   - [github.com/sluicedp/sluice/node]: the other nodes of a cluster, so
//     that pods reach pods across nodes, over VXLAN or natively routed,
//     under policy by the sender's identity.
//
// The BPF programs are compiled ahead of time and embedded: using the
// library needs no compiler.
//
// # Example
//
//	dp, err := datapath.Open(ctx, datapath.Config{
//		Name: "node-a",
//		Node: datapath.Node{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}},
//	})
//	if err != nil {
//		return err
//	}
//	defer dp.Close() // the datapath keeps running; dp.Unload() removes it
//
//	ep, err := endpoint.Create(ctx, dp, endpoint.Spec{
//		ID: 7, IPv4: netip.MustParseAddr("198.18.1.7"), Identity: 1001, NetNS: "web-1",
//	})
//
//	events, err := dp.Events(ctx)
//	if err != nil {
//		return err
//	}
//	for ev := range events {
//		fmt.Println(ev) // drop SPOOFED_SOURCE_IP egress ifindex=2 endpoint=7 len=98: 198.18.1.99 > ...
//	}
//
// # Requirements
//
// Linux 6.1 or later (tested on 6.1 and 6.18; tcx links from 6.6, clsact and
// cls_bpf before), BTF, a BPF filesystem (mounted when missing) and cgroup v2 for
// socket hooks; root, or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN.
package sluice
