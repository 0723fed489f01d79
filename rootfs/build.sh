#!/usr/bin/env bash
# Builds the guest agent (statically linked, profile `agent`: small, no
# unwinding) and the initramfs that holds just the agent as /init plus
# /dev/console. Progress goes to stderr; the last line of stdout is the
# initramfs path.
#
# The machine has no musl target, so glibc is linked statically
# (crt-static), as a non-PIE executable (relocation-model=static: no
# self-relocation at startup, 80 KiB smaller). The agent gets its own
# target directory so that its RUSTFLAGS do not invalidate the normal
# build.
set -euo pipefail
cd "$(dirname "$0")/.."

triple=x86_64-unknown-linux-gnu
target_dir=$(realpath -m "${VMRUN_AGENT_TARGET_DIR:-target/agent}")
agent=$target_dir/$triple/agent/vmrun-agent
out=$target_dir/agent-initramfs.cpio

echo "rootfs/build.sh: building vmrun-agent (static glibc, profile agent) in $target_dir" >&2
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
    cargo build --profile agent --target "$triple" --target-dir "$target_dir" -p vmrun-agent >&2

if ! file_out=$(LC_ALL=C readelf -d "$agent" 2>/dev/null) || grep -q NEEDED <<<"$file_out"; then
    echo "rootfs/build.sh: $agent is not statically linked" >&2
    exit 1
fi

echo "rootfs/build.sh: writing the initramfs" >&2
# Same target directory: never waits on (or disturbs) the normal build's lock.
cargo run --quiet --target-dir "$target_dir" -p vmrun-initramfs -- agent --agent "$agent" --out "$out" >/dev/null
echo "rootfs/build.sh: agent $(stat -c %s "$agent") bytes, initramfs $(stat -c %s "$out") bytes" >&2
echo "$out"
