/* The ledger: user space's record of every object it made (an endpoint's
 * spec, and the devices, namespaces, links and map entries it created),
 * pinned with the rest so that any process can list, finish, undo or tear
 * down what another one started. Never read by BPF. */
#pragma once

#include "common.h"

#define LEDGER_ENTRIES 65536
#define LEDGER_RECORD_SIZE 2048

struct ledger_key {
	__u32 kind; /* which object package: enum in internal/ledger */
	__u32 id;
};

/* A versioned JSON document, zero-padded. */
struct ledger_record {
	__u8 data[LEDGER_RECORD_SIZE];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LEDGER_ENTRIES);
	__type(key, struct ledger_key);
	__type(value, struct ledger_record);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ledger SEC(".maps");

/* Documents too large for a record (a policy of many rules), in chunks. */
#define LEDGER_BLOB_ENTRIES 65536
#define LEDGER_BLOB_CHUNK 4096

struct ledger_blob_key {
	__u32 kind;
	__u32 id;
	__u32 chunk;
};

struct ledger_blob {
	__u32 len; /* bytes used in data */
	__u8 data[LEDGER_BLOB_CHUNK];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LEDGER_BLOB_ENTRIES);
	__type(key, struct ledger_blob_key);
	__type(value, struct ledger_blob);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ledger_blobs SEC(".maps");
