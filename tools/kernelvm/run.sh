#!/usr/bin/env bash
# Run the privileged Go tests on Debian 12's Linux 6.1 kernel under qemu.
#
#   tools/kernelvm/run.sh [-run RE] [-skip RE] [-v] [-timeout D] [-failfast] [PACKAGES...]
#
# PACKAGES are go list patterns (default ./...). The flags mean what they mean
# to `go test`; -test.* flags are passed to the test binaries as they are.
#
# Host side: install what is missing, fetch and unpack the newest
# linux-image-6.1.0-N-amd64-unsigned (cached in .vm/), build static test
# binaries, build a small busybox initramfs, boot, stream the serial console
# and exit 0 only when the guest reports that every test binary passed.
# The guest (tools/kernelvm/guest.sh) runs on the host's own root filesystem,
# shared read-only over 9p. See tools/kernelvm/README.md.
#
# Environment:
#   KERNELVM_ABI           ABI number N of linux-image-6.1.0-N-amd64-unsigned
#                          (default: the newest apt knows)
#   KERNELVM_DEB           a linux-image .deb to use instead of downloading one
#   KERNELVM_TIMEOUT       seconds before the VM is killed (default 1800)
#   KERNELVM_TEST_TIMEOUT  -test.timeout of each test binary (default 20m)
#   KERNELVM_JOBS          test binaries the guest runs at once (default: its
#                          CPUs; 1 with -v, so that the output stays readable)
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
cache="$repo/.vm"
vm_timeout=${KERNELVM_TIMEOUT:-1800}
test_timeout=${KERNELVM_TEST_TIMEOUT:-20m}
guest_jobs=${KERNELVM_JOBS:-0} # 0: the guest's CPUs

export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/local/go/bin:/usr/sbin:/sbin"

log() { printf 'kernelvm: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------- arguments

usage() { sed -n '2,7s/^# \{0,1\}//p' "$0" >&2; exit 2; }

test_flags=()  # -test.* flags for every binary
patterns=()    # go list patterns
verbose=false
while (($#)); do
	arg=$1; shift
	case $arg in
	-h | -help | --help) usage ;;
	-v | -failfast | -short)
		test_flags+=("-test.${arg#-}")
		[[ $arg == -v ]] && verbose=true ;;
	-run | -skip | -timeout | -count | -parallel | -cpu | -bench | -benchtime)
		(($#)) || die "$arg needs a value"
		test_flags+=("-test.${arg#-}=$1"); shift ;;
	-run=* | -skip=* | -timeout=* | -count=* | -parallel=* | -cpu=* | -bench=* | -benchtime=*)
		test_flags+=("-test.${arg#-}") ;;
	-test.*) test_flags+=("$arg") ;;
	--) patterns+=("$@"); break ;;
	-*) die "unknown flag $arg (see $0 -h)" ;;
	*) patterns+=("$arg") ;;
	esac
done
((${#patterns[@]})) || patterns=(./...)

# ---------------------------------------------------------------- packages

[[ $(id -u) == 0 ]] || die "run me as root (apt-get, and qemu reads the whole filesystem)"

# command -> Debian package. ip, tc, nsenter and sysctl are what the tests
# run inside the guest: it uses the host's tools, so they must be here.
declare -A want=(
	[qemu-system-x86_64]=qemu-system-x86
	[cpio]=cpio
	[gzip]=gzip
	[modprobe]=kmod
	[depmod]=kmod
	[ip]=iproute2
	[tc]=iproute2
	[nsenter]=util-linux
	[sysctl]=procps
)
missing=()
for cmd in "${!want[@]}"; do
	command -v "$cmd" >/dev/null || missing+=("${want[$cmd]}")
done
# The initramfs has no libraries: its busybox must be the static one.
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
	missing+=(busybox-static)
if ((${#missing[@]})); then
	mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
	log "installing ${missing[*]}"
	apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || {
		apt-get update -q >&2
		apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
	}
fi
busybox=$(command -v busybox) # busybox-static conflicts with busybox: this one
command -v go >/dev/null || die "go not found (PATH=$PATH)"

# ---------------------------------------------------------------- kernel

# Prints the newest linux-image-6.1.0-N-amd64-unsigned that apt knows. The
# non-cloud flavour: the cloud one has no 9p.
newest_kernel_package() {
	apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$' |
		awk '{print $1}' | sort -V | tail -n 1
}

# Temporary files and directories, removed on exit.
cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT

# Unpacks the linux-image .deb $1 into $cache/kernel/$release and runs depmod
# there. An unpacked kernel is complete once it has a .complete file.
unpack_kernel() {
	local deb=$1 tmp
	tmp=$(mktemp -d "$cache/kernel/.unpack.XXXXXX")
	cleanup+=("$tmp")
	dpkg-deb -x "$deb" "$tmp"
	[[ -f $tmp/boot/vmlinuz-$release && -d $tmp/lib/modules/$release ]] ||
		die "$deb holds no kernel $release"
	depmod -b "$tmp" "$release"
	touch "$tmp/.complete"
	rm -rf "${cache:?}/kernel/$release"
	mv "$tmp" "$cache/kernel/$release"
}

mkdir -p "$cache/kernel"
if [[ -n ${KERNELVM_DEB:-} ]]; then
	pkg=$(dpkg-deb -f "$KERNELVM_DEB" Package)
elif [[ -n ${KERNELVM_ABI:-} ]]; then
	pkg=linux-image-6.1.0-$KERNELVM_ABI-amd64-unsigned
else
	pkg=$(newest_kernel_package)
	if [[ -z $pkg ]]; then
		apt-get update -q >&2
		pkg=$(newest_kernel_package)
	fi
	[[ -n $pkg ]] || die "apt knows no linux-image-6.1.0-*-amd64-unsigned (is this Debian 12?)"
fi
release=${pkg#linux-image-}; release=${release%-unsigned} # 6.1.0-N-amd64
if [[ ! -f $cache/kernel/$release/.complete ]]; then
	if [[ -n ${KERNELVM_DEB:-} ]]; then
		unpack_kernel "$KERNELVM_DEB"
	else
		log "downloading $pkg"
		dl=$(mktemp -d "$cache/kernel/.download.XXXXXX")
		cleanup+=("$dl")
		# apt downloads as the _apt user; let it write there.
		chown _apt "$dl" 2>/dev/null || true
		(cd "$dl" && apt-get download -q "$pkg" >&2)
		unpack_kernel "$dl"/*.deb
	fi
fi
kdir="$cache/kernel/$release"
log "kernel $release ($kdir)"

# ---------------------------------------------------------------- test binaries

run_dir=$(mktemp -d "$cache/run.XXXXXX")
cleanup+=("$run_dir")

# Every package with tests, as static binaries (CGO_ENABLED=0): they need
# nothing from the guest. Without cgo there is no -race.
packages=()  # "import path<TAB>directory<TAB>binary", for guest.sh
while IFS=$'\t' read -r pkg dir has_tests; do
	if [[ -z $has_tests ]]; then
		printf '?   \t%s\t[no test files]\n' "$pkg"
		continue
	fi
	bin="$run_dir/bin/${pkg//\//_}.test"
	packages+=("$pkg"$'\t'"$dir"$'\t'"$bin")
done < <(cd "$repo" && go list -f '{{.ImportPath}}{{"\t"}}{{.Dir}}{{"\t"}}{{if or .TestGoFiles .XTestGoFiles}}y{{end}}' "${patterns[@]}")
((${#packages[@]})) || die "no packages with tests in: ${patterns[*]}"

# A package that does not build fails, as with go test, and the rest run.
# Two builds at a time: the linker is single-threaded.
log "building ${#packages[@]} test binaries"
build() {
	local pkg=$1 bin=$2
	(cd "$repo" && CGO_ENABLED=0 go test -c -o "$bin" "$pkg") || printf 'FAIL\t%s [build failed]\n' "$pkg"
}
for entry in "${packages[@]}"; do
	IFS=$'\t' read -r pkg _ bin <<<"$entry"
	(($(jobs -rp | wc -l) < 2)) || wait -n || true
	build "$pkg" "$bin" &
done
wait
built=()
for entry in "${packages[@]}"; do
	IFS=$'\t' read -r _ _ bin <<<"$entry"
	if [[ -x $bin ]]; then
		built+=("$entry")
	fi
done
((${#built[@]})) || die "FAIL: nothing built"
build_failed=$((${#packages[@]} - ${#built[@]}))

# The guest runs the binaries side by side (KERNELVM_JOBS): the slowest
# packages start first, so that the last to finish does not start last.
slow=(node policy service endpoint datapath)
packages=()
declare -A placed=()
for name in "${slow[@]}"; do
	for entry in "${built[@]}"; do
		pkg=${entry%%$'\t'*}
		[[ ${pkg##*/} == "$name" ]] || continue
		packages+=("$entry")
		placed[$pkg]=1
	done
done
for entry in "${built[@]}"; do
	[[ -n ${placed[${entry%%$'\t'*}]:-} ]] || packages+=("$entry")
done

# Programs tests run as separate processes (testutil.Program): the guest
# cannot run the Go toolchain on the read-only root.
progs="$run_dir/progs"
mkdir -p "$progs"
for dir in "$repo"/internal/testprog/*/; do
	[[ -d $dir ]] || continue
	(cd "$repo" && CGO_ENABLED=0 go build -o "$progs/$(basename "$dir")" "./internal/testprog/$(basename "$dir")")
done

# The guest sources this file.
{
	declare -p packages test_flags verbose test_timeout guest_jobs
	printf 'modules=%q\n' "$kdir/lib/modules"
	printf 'repo=%q\n' "$repo"
	printf 'progs=%q\n' "$progs"
} >"$run_dir/config"

# ---------------------------------------------------------------- initramfs

# The initramfs only gets the host's root filesystem mounted: the 9p and
# virtio modules (none are built into Debian's kernel) and a busybox /init.
initrd="$run_dir/initrd"
mkdir -p "$initrd"/{bin,dev,proc,sys,newroot,modules}
cp "$busybox" "$initrd/bin/busybox"
# modprobe --show-depends prints the insmod commands that loading the modules
# would run, dependencies first; the order of the file names keeps that order.
declare -A copied=()
n=0
while read -r kind path _; do
	[[ $kind == insmod && -z ${copied[$path]:-} ]] || continue # or "builtin"
	copied[$path]=1
	dst=$(printf '%s/modules/%02d-%s' "$initrd" "$n" "$(basename "$path")")
	n=$((n + 1))
	case $path in # busybox insmod wants plain .ko files
	*.ko.xz) xz -dc "$path" >"${dst%.xz}" ;;
	*.ko.zst) zstd -qdc "$path" >"${dst%.zst}" ;;
	*.ko.gz) gzip -dc "$path" >"${dst%.gz}" ;;
	*) cp "$path" "$dst" ;;
	esac
done < <(modprobe -d "$kdir" -S "$release" --show-depends -a virtio_pci 9pnet_virtio 9p)

cat >"$initrd/init" <<EOF
#!/bin/busybox sh
# Generated by tools/kernelvm/run.sh.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
fail() { echo "kernelvm: init: \$*"; echo o >/proc/sysrq-trigger; sleep 60; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in /modules/*.ko; do insmod "\$m" || fail "insmod \$m failed"; done
# The host's root, read-only. cache=loose: nothing changes it during a run.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro hostroot /newroot ||
	fail "cannot mount the host's root filesystem over 9p"
for d in dev proc sys; do mount --move /\$d /newroot/\$d; done
exec switch_root /newroot /bin/bash $(printf %q "$repo/tools/kernelvm/guest.sh") $(printf %q "$run_dir/config")
EOF
chmod +x "$initrd/init"
(cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -1) >"$run_dir/initrd.gz"

# guest.sh bind-mounts the 6.1 modules over /lib/modules, which must exist
# on the (read-only) shared root as a mount point.
mkdir -p /lib/modules

# ---------------------------------------------------------------- boot

# The guest prints "kernelvm-result TOKEN status=N ..." as its last word; the
# token keeps anything else on the console from passing for it.
token=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
printf 'token=%q\n' "$token" >>"$run_dir/config"
console="$run_dir/console.log"

log "booting (timeout ${vm_timeout}s)"
start=$SECONDS
set +e
# TCG, not KVM: /dev/kvm cannot be relied on (where it exists it may still be
# unable to boot a stock kernel). -no-reboot turns the guest's power-off,
# reboot or panic (panic=-1) into qemu exiting. multidevs=remap keeps inode
# numbers unique where the shared tree spans several host filesystems.
timeout -k 10 "$vm_timeout" qemu-system-x86_64 \
	-nodefaults -no-user-config -display none -no-reboot \
	-accel tcg,thread=multi -cpu max -smp 2 -m 4G -nic none \
	-kernel "$kdir/boot/vmlinuz-$release" -initrd "$run_dir/initrd.gz" \
	-append "console=ttyS0 panic=-1 quiet" \
	-serial stdio \
	-fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
	-device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
	</dev/null 2>&1 | sed -u 's/\r$//' | tee "$console"
qemu_status=${PIPESTATUS[0]}
set -e
log "VM ran for $((SECONDS - start))s"

if ((qemu_status == 124 || qemu_status == 137)); then
	die "FAIL: the VM did not finish within ${vm_timeout}s"
fi
result=$(grep -a "^kernelvm-result $token " "$console" || true)
[[ -n $result ]] || die "FAIL: the guest ended without reporting a result (qemu exit status $qemu_status)"
[[ $result == *" status=0 "* ]] || exit 1
((build_failed == 0)) || die "FAIL: $build_failed package(s) did not build"
