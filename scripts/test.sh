#!/usr/bin/env bash
# Runs every test: lints, unit tests, and the tests that boot real guests
# with the guest kernel from kernel-config/build.sh and the agent from
# rootfs/build.sh (both built once and cached). Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
VMRUN_TEST_KERNEL=$(kernel-config/build.sh | tail -n 1)
VMRUN_AGENT_INITRD=$(rootfs/build.sh | tail -n 1)
export VMRUN_TEST_KERNEL VMRUN_AGENT_INITRD
echo "test: guest kernel $VMRUN_TEST_KERNEL, agent $VMRUN_AGENT_INITRD" >&2

cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace "$@"
