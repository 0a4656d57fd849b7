// Package bpf holds sluice's BPF programs: the C sources next to this file and
// the objects bpf2go compiled from them, embedded so that users of the library
// never need a compiler. Only sluice's own packages load them.
//
// Regenerate with `make generate` from the repository root; it pins the
// compiler and flags.
package bpf

//go:generate go tool bpf2go -no-global-types -type layout_stamp -type event_settings -type metrics_value -type endpoint_info -type endpoint_counters -type endpoint_record -type ipcache_key -type ipcache_value Datapath datapath.c
//go:generate go tool bpf2go -no-global-types -type event -type drop_reason -type trace_point -type event_type -type event_flag -type event_lost_cause -type direction -type layout_version -type event_version -type endpoint_flag Types types.c
