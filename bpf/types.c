//go:build ignore

/* Never loaded. Holds every type Go has a twin of, so that bpf2go generates
 * them once for all objects: map keys and values (through the maps the
 * headers declare) and, declared below, the types no map names (ring buffer
 * records, enums). */
#include "lib/common.h"
#include "lib/reasons.h"
#include "lib/events.h"
#include "lib/ipcache.h"
#include "lib/endpoint.h"
#include "lib/ledger.h"
#include "lib/policy.h"
#include "lib/ct.h"
#include "lib/service.h"
#include "lib/sock_destroy.h"
#include "lib/node.h"
#include "lib/snat.h"
#include "lib/encrypt.h"

struct event *_event __attribute__((unused));
enum drop_reason *_drop_reason __attribute__((unused));
enum trace_point *_trace_point __attribute__((unused));
enum event_type *_event_type __attribute__((unused));
enum event_flag *_event_flag __attribute__((unused));
enum event_lost_cause *_event_lost_cause __attribute__((unused));
enum direction *_direction __attribute__((unused));
enum layout_version *_layout_version __attribute__((unused));
enum event_version *_event_version __attribute__((unused));
enum endpoint_flag *_endpoint_flag __attribute__((unused));
enum ipcache_source *_ipcache_source __attribute__((unused));
enum policy_entry_flag *_policy_entry_flag __attribute__((unused));
enum policy_meta_flag *_policy_meta_flag __attribute__((unused));
enum policy_shape *_policy_shape __attribute__((unused));
enum policy_verdict *_policy_verdict __attribute__((unused));
enum ct_dir *_ct_dir __attribute__((unused));
enum ct_flag *_ct_flag __attribute__((unused));
enum lb_flag *_lb_flag __attribute__((unused));
enum lb_backend_state *_lb_backend_state __attribute__((unused));
enum routing_mode *_routing_mode __attribute__((unused));
enum node_id *_node_id __attribute__((unused));
enum node_flag *_node_flag __attribute__((unused));
enum node_config_flag *_node_config_flag __attribute__((unused));
enum snat_dir *_snat_dir __attribute__((unused));
enum encryption *_encryption __attribute__((unused));

char __license[] SEC("license") = "GPL";
