#!/usr/bin/env bash
# Builds the pause test image, laid out as Kubernetes' pause image: one
# static binary at /pause (tests/images/pause.c, `cc -static`) and nothing
# else, its entrypoint. containerd's CRI runs it as every pod's sandbox
# container (`sandbox_image`); tests/cri.rs imports it.
#
# Usage: tests/images/make-pause-image.sh
# Prints the output directory as its last line (progress goes to stderr):
#   oci/               OCI image layout
#   pause-oci.tar      OCI archive (docker.io/library/pause:vmrun-test)
#   pause-docker.tar   docker save archive
#   digests.env        IMAGE, MANIFEST_DIGEST, CONFIG_DIGEST, LAYER_DIGEST, ...
# Cached under $VMRUN_CACHE/test-images (default ~/.cache/vmrun), keyed by
# these scripts, the source and the compiler's version.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/images/lib.sh
. "$here/lib.sh"

src=$here/pause.c
command -v cc >/dev/null || die "no C compiler (apt-get install build-essential, or scripts/deps.sh)"

key=$( { cat "$here/lib.sh" "$0" "$src"; cc --version; } | sha256sum | cut -c1-16)
use_cache "pause" "$key"

# A fixed time: the image depends on the source and the compiler only.
epoch=1700000000

umask 022
r=$tmp/rootfs
mkdir -p "$r"
cc -static -Os -s -o "$r/pause" "$src" || die "cc -static failed (build-essential and its static libc are needed)"
if ldd "$r/pause" >/dev/null 2>&1; then die "$r/pause is dynamically linked"; fi

pack_image "$r" "$tmp/out" pause vmrun-test "$epoch" '{"Entrypoint":["/pause"]}' \
    --owner=0 --group=0 --mtime="@$epoch"
publish "$tmp/out" "$out"
