# The one place that pins how BPF objects are built.
BPF_CLANG ?= clang-19
BPF_STRIP ?= llvm-strip-19
# -nostdinc: the programs use only bpf/include, never the build host's headers.
# -mcpu=v3: the instruction set every supported kernel (Linux 6.1 on) accepts.
BPF_CFLAGS := -O2 -g -Wall -Werror -nostdinc -mcpu=v3

.PHONY: generate test demo

generate:
	BPF2GO_CC=$(BPF_CLANG) BPF2GO_STRIP=$(BPF_STRIP) BPF2GO_CFLAGS="$(BPF_CFLAGS)" \
		go generate ./internal/... ./examples/...

# The tests need root and a BPF-capable kernel (see README.md).
test:
	go test -race -count=1 ./...

demo:
	go run ./examples/endpoints
