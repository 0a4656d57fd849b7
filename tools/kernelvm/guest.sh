#!/usr/bin/env bash
# The guest side of tools/kernelvm/run.sh: PID 1 of the VM, started by the
# initramfs on the host's root filesystem (read-only over 9p).
#
#   guest.sh CONFIG
#
# CONFIG, written by run.sh, sets: packages (import path, directory, test
# binary; tab-separated), test_flags, verbose, test_timeout, guest_jobs
# (binaries run at once; 0: one per CPU), modules (the unpacked kernel's
# lib/modules), repo (the repository's root), progs (the programs of
# internal/testprog) and token.
#
# Makes what the tests write to writable, loads the modules the tests need,
# runs the test binaries side by side, each in its package directory as
# `go test` would, prints `go test`'s summary lines, then "kernelvm-result
# TOKEN status=N passed=P failed=F" and powers off.

# shellcheck disable=SC2154 # the variables CONFIG sets
set -euo pipefail

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp LANG=C.UTF-8
export CI=true # the tests fail instead of skipping when they lack something

# PID 1 must not exit: that panics the kernel. Power off instead, which
# makes qemu (-no-reboot) exit. sysrq-trigger works whatever kernel.sysrq says.
power_off() {
	sync
	echo o >/proc/sysrq-trigger
	sleep 60
}
trap 'echo "kernelvm: guest.sh failed at line $LINENO"; power_off' ERR

# shellcheck source=/dev/null
source "$1" # CONFIG
export SLUICE_TESTPROGS=$progs # testutil.Program

# ---------------------------------------------------------------- mounts

# /proc, /sys and /dev come from the initramfs. Everything else the tests or
# their tools write goes to tmpfs: t.TempDir, /run/netns (named namespaces).
# A tmpfs hides what was below it, and the repository (with the test
# binaries and the kernel) may be there: CI clones it anywhere, /tmp
# included. A second view of the root on /mnt lets it be bound back.
mkdir -p /dev/shm /dev/pts # the rest exist on the host
mount --bind / /mnt
for dir in /tmp /var/tmp /run /dev/shm; do
	mount -t tmpfs -o mode=1777 tmpfs "$dir"
	if [[ $repo/ == "$dir"/* ]]; then
		mkdir -p "$repo"
		mount --bind "/mnt$repo" "$repo"
	fi
done
mount -t devpts devpts /dev/pts
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
# The 6.1 modules where modprobe (and the kernel's own module autoloading,
# which runs /sbin/modprobe) look for them.
mount --bind -o ro "$modules" /lib/modules

# veth, vxlan: devices the tests make; sch_ingress: clsact; cls_bpf: the
# legacy attach path (6.1 has no tcx); xfrm_user: netlink.NewHandleAt with no
# families asks for XFRM and fails without it.
modprobe -a veth vxlan bridge sch_ingress cls_bpf xfrm_user

read -r uptime _ </proc/uptime
echo "kernelvm: kernel $(uname -r), up ${uptime}s, uid $(id -u), CI=$CI, $(nproc) CPUs"
echo "kernelvm: modules: $(lsmod | awk 'NR > 1 {print $1}' | sort | tr '\n' ' ')"

# ---------------------------------------------------------------- tests

# Microseconds since the epoch.
now_us() { local t=${EPOCHREALTIME/./}; echo $((10#$t)); }
# Seconds with three decimals, as go test prints them.
seconds() { local ms=$(($1 / 1000)); printf '%d.%03ds' $((ms / 1000)) $((ms % 1000)); }

# run_package N ENTRY runs test binary number N ("import path<TAB>dir<TAB>
# binary") in its package directory, prints its output if it failed (all of
# it as it comes with -v) and go test's summary line, and leaves its exit
# status in $results/N. Jobs print under a lock, one whole report at a time.
results=/tmp/test-results
mkdir -p "$results"
run_package() {
	local n=$1 pkg dir bin out="$results/$1.out" rc=0 start took note=""
	IFS=$'\t' read -r pkg dir bin <<<"$2"
	local flags=(-test.count=1 "-test.timeout=$test_timeout" "${test_flags[@]}")
	start=$(now_us)
	# "|| rc=" keeps a failing test from tripping set -e.
	if [[ $verbose == true ]]; then
		(cd "$dir" && exec "$bin" "${flags[@]}") 2>&1 | tee "$out" || rc=${PIPESTATUS[0]}
	else
		(cd "$dir" && exec "$bin" "${flags[@]}") >"$out" 2>&1 || rc=$?
	fi
	took=$(seconds $(($(now_us) - start)))
	{
		flock 9
		if ((rc == 0)); then
			grep -q '^testing: warning: no tests to run' "$out" && note=" [no tests to run]"
			printf 'ok  \t%s\t%s%s\n' "$pkg" "$took" "$note"
		else
			[[ $verbose == true ]] || cat "$out"
			printf 'FAIL\t%s\t%s\n' "$pkg" "$took"
		fi
	} 9>"$results/lock"
	echo "$rc" >"$results/$n"
}

# Side by side, as go test runs packages: one binary at a time leaves a
# CPU idle, as most tests wait on one thing at a time. With -v, one at a
# time, so that the output stays readable.
at_once=$guest_jobs
((at_once > 0)) || at_once=$(nproc)
[[ $verbose == true ]] && at_once=1
echo "kernelvm: ${#packages[@]} test binaries, $at_once at a time"
for n in "${!packages[@]}"; do
	while (($(jobs -rp | wc -l) >= at_once)); do
		wait -n || true
	done
	run_package "$n" "${packages[$n]}" &
done
wait

passed=0 failed=0
for n in "${!packages[@]}"; do
	if [[ $(cat "$results/$n" 2>/dev/null) == 0 ]]; then
		passed=$((passed + 1))
	else
		failed=$((failed + 1))
	fi
done

status=0
if ((failed)); then
	echo FAIL
	status=1
fi
read -r uptime _ </proc/uptime
echo "kernelvm: guest up ${uptime}s"
echo "kernelvm-result $token status=$status passed=$passed failed=$failed"
power_off
