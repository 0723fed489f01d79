#!/usr/bin/env bash
# On a fresh machine: installs what is needed, builds the guest kernel, the
# guest agent and vmrun, installs them into the data directory
# ($VMRUN_HOME, default /var/lib/vmrun for root), loads a busybox image made
# from Debian's busybox-static, and runs a container in a microVM:
#
#   vmrun run busybox echo Hello from a vmrun microVM
#
# The first run builds the guest kernels (about 8 minutes on 2 cores, cached
# afterwards) and, on its first `vmrun run`, a warm-start template (a boot:
# about a minute on hosts that emulate guest kernel mode).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
kernel=$(kernel-config/build.sh | tail -n 1)
initrd=$(rootfs/build.sh | tail -n 1)
echo "demo: building vmrun and vmrun-vmm" >&2
cargo build --release --quiet -p vmrun -p vmrun-vmm
vmrun=$PWD/target/release/vmrun

home=${VMRUN_HOME:-}
if [ -z "$home" ]; then
    if [ "$(id -u)" -eq 0 ]; then home=/var/lib/vmrun; else home=${XDG_DATA_HOME:-$HOME/.local/share}/vmrun; fi
fi
mkdir -p "$home/boot"
install -m 0644 "$kernel" "$home/boot/vmlinux"
install -m 0644 "$kernel-up" "$home/boot/vmlinux-up"
install -m 0644 "$initrd" "$home/boot/agent.cpio"
echo "demo: installed the guest kernel and agent into $home/boot" >&2

images=$(tests/images/make-busybox-image.sh | tail -n 1)
"$vmrun" load -i "$images/busybox-oci.tar" >&2
echo "demo: vmrun run busybox echo Hello from a vmrun microVM" >&2
exec "$vmrun" run --rm busybox echo "Hello from a vmrun microVM"
