//go:build ignore

/* The sluice datapath object: its maps are pinned and shared by every
 * program; the programs themselves are added concern by concern. */
#include "lib/common.h"
#include "lib/reasons.h"
#include "lib/metrics.h"
#include "lib/events.h"

char __license[] SEC("license") = "GPL";
