#!/usr/bin/env bash
# On a fresh machine: installs what is needed, builds the guest kernel and
# vmrun, and boots the demo guest (busybox) with its console on this
# terminal. The guest prints a greeting and reboots, which ends vmrun.
#
# The first run builds the guest kernel (about 7 minutes on 2 cores, cached
# afterwards); on hosts that emulate guest kernel mode the boot itself takes
# about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
kernel=$(kernel-config/build.sh | tail -n 1)
echo "demo: building vmrun" >&2
cargo build --release --quiet -p vmrun -p vmrun-initramfs
mkdir -p target/demo
initrd=$(target/release/vmrun-initramfs demo --out target/demo/initramfs.cpio | tail -n 1)
echo "demo: booting $kernel with $initrd" >&2
exec target/release/vmrun boot --kernel "$kernel" --initrd "$initrd" --cpus 2 --memory 128 \
    --report target/demo/boot-report.json "$@"
