#!/usr/bin/env bash
# Builds the busybox test image from Debian's busybox-static: /bin/busybox
# and a symlink for each applet, /etc/passwd and /etc/group, packed as an
# OCI image layout, an OCI archive and a `docker save` archive
# (docker.io/library/busybox:latest). Deterministic: the same busybox-static
# package gives the same digests.
#
# Usage: tests/images/make-busybox-image.sh
# Prints the output directory as its last line (progress goes to stderr):
#   oci/                 OCI image layout
#   busybox-oci.tar      OCI archive
#   busybox-docker.tar   docker save archive
#   digests.env          IMAGE, MANIFEST_DIGEST, CONFIG_DIGEST, LAYER_DIGEST, ...
# Cached under $VMRUN_CACHE/test-images (default ~/.cache/vmrun), keyed by
# these scripts and the busybox binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/images/lib.sh
. "$here/lib.sh"

bin=/bin/busybox
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
    die "busybox-static is not installed (apt-get install busybox-static, or scripts/deps.sh)"
[ -x "$bin" ] || die "$bin not found"
if ldd "$bin" >/dev/null 2>&1; then die "$bin is dynamically linked; install busybox-static"; fi

key=$(cat "$here/lib.sh" "$0" "$bin" | sha256sum | cut -c1-16)
use_cache "busybox" "$key"

# The package's file time: fixed for a given busybox-static version.
epoch=$(stat -c %Y "$bin")
log "busybox-static $(dpkg-query -W -f='${Version}' busybox-static), $("$bin" --list | wc -l) applets"

umask 022
r=$tmp/rootfs
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,tmp,root,home,var,run}
chmod 1777 "$r/tmp"
chmod 0700 "$r/root"
install -m 0755 "$bin" "$r/bin/busybox"
for applet in $("$bin" --list-full); do
    [ -e "$r/$applet" ] || [ -L "$r/$applet" ] || ln -s /bin/busybox "$r/$applet"
done
cat >"$r/etc/passwd" <<'EOT'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
EOT
cat >"$r/etc/group" <<'EOT'
root:x:0:
daemon:x:1:
nogroup:x:65534:
EOT
chmod 0644 "$r/etc/passwd" "$r/etc/group"

pack_image "$r" "$tmp/out" busybox latest "$epoch" \
    '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]}' \
    --owner=0 --group=0 --mtime="@$epoch"
publish "$tmp/out" "$out"
