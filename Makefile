# The one place that pins how BPF objects are built.
BPF_CLANG ?= clang-19
BPF_STRIP ?= llvm-strip-19
# -nostdinc: the programs use only bpf/include, never the build host's headers.
# -mcpu=v3: the instruction set every supported kernel (Linux 6.1 on) accepts.
BPF_CFLAGS := -O2 -g -Wall -Werror -nostdinc -mcpu=v3

.PHONY: generate test test-host test-6.1 demo

generate:
	BPF2GO_CC=$(BPF_CLANG) BPF2GO_STRIP=$(BPF_STRIP) BPF2GO_CFLAGS="$(BPF_CFLAGS)" \
		go generate ./internal/... ./examples/...

# The tests need root and a BPF-capable kernel (see README.md): first on this
# machine's kernel, then on Debian 12's Linux 6.1 under qemu.
test:
	$(MAKE) test-host
	$(MAKE) test-6.1

# Each kernel's run starts with a table of every BPF program: instructions,
# instructions the verifier processed, load time.
STATS := -v -run '^TestProgramStats$$' ./internal/bpfobj

# A bounded fuzz pass: random policies and packets, compiled entries against
# the semantics. Bounded by executions, not time: a time limit that ends
# while a worker runs a slow input fails the run ("context deadline
# exceeded") though nothing was found.
FUZZ := -run '^$$' -fuzz '^FuzzCompile$$' -fuzztime 30000x ./policy
# Service translation of random services and flows against the Go reference.
FUZZ_SERVICE := -run '^$$' -fuzz '^FuzzTranslate$$' -fuzztime 2000x ./service

test-host:
	go test -count=1 $(STATS)
	go test -race -count=1 ./...
	cd sluiceprom && go test -race -count=1 ./...
	go test $(FUZZ)
	go test $(FUZZ_SERVICE)

# KERNELVM_ARGS: go test style flags and packages, e.g. -run TestFoo ./datapath
# (tools/kernelvm/README.md).
test-6.1:
	bash tools/kernelvm/run.sh $(STATS)
	bash tools/kernelvm/run.sh $(KERNELVM_ARGS)

demo:
	go run ./examples/endpoints
