// Package bpfobj holds the BPF objects compiled from the C sources in bpf/,
// embedded so that users of the library never need a compiler, and their Go
// twins of the C types. One object per hook family; the maps they share are
// pinned by name. Only sluice's own packages use it.
//
// Regenerate with `make generate` from the repository root; it pins the
// compiler and flags.
package bpfobj

//go:generate go tool bpf2go -no-global-types Endpoint ../../bpf/endpoint.c
//go:generate go tool bpf2go -no-global-types Host ../../bpf/host.c
//go:generate go tool bpf2go -no-global-types Overlay ../../bpf/overlay.c
//go:generate go tool bpf2go -no-global-types Sock ../../bpf/sock.c
//go:generate go tool bpf2go -no-global-types SockDestroy ../../bpf/sock_destroy.c
//go:generate go tool bpf2go -no-global-types -type layout_stamp -type event_settings -type metrics_value -type endpoint_info -type endpoint_counters -type ledger_key -type ledger_record -type ledger_blob_key -type ledger_blob -type ipcache_key -type ipcache_value -type event -type drop_reason -type trace_point -type event_type -type event_flag -type event_lost_cause -type direction -type layout_version -type event_version -type endpoint_flag -type ipcache_source -type policy_key -type policy_entry -type policy_entry_flag -type policy_meta_key -type policy_meta_value -type policy_meta_flag -type policy_shape -type policy_counter_key -type policy_counter -type policy_verdict -type ct_key -type ct_entry -type ct_dir -type ct_flag -type lb_frontend_key -type lb_frontend -type lb_backend -type lb_slot_key -type lb_slot_block -type lb_backend_counters -type lb_affinity_key -type lb_affinity_entry -type lb_sock_key -type sock_destroy_key -type lb_flag -type lb_backend_state -type node_settings -type node_route -type node_addr_key -type routing_mode -type node_id -type node_flag -type node_config_flag -type snat_key -type snat_entry -type snat_dir Types ../../bpf/types.c
