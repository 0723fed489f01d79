#!/usr/bin/env bash
# Builds the Debian test image: `debootstrap --variant=minbase bookworm`
# (bash, apt, dpkg, perl-base, coreutils) from the Debian mirror this
# machine's apt uses, packed like the busybox image as
# docker.io/library/debian:bookworm. Needs root and debootstrap; takes a
# few minutes the first time, then comes from the cache.
#
# Usage: tests/images/make-debian-image.sh
# Prints the output directory as its last line (progress goes to stderr):
#   oci/, debian-oci.tar, debian-docker.tar, digests.env (as the busybox script).
# Environment:
#   DEBIAN_MIRROR   mirror URL (default: the first bookworm source in /etc/apt)
#   VMRUN_CACHE     cache directory (default: $XDG_CACHE_HOME/vmrun or ~/.cache/vmrun)
# Cached by these scripts, the suite and the mirror; delete the directory
# to get a fresh one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/images/lib.sh
. "$here/lib.sh"

suite=bookworm
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"

# The mirror apt is configured with: deb822 .sources first, then one-line lists.
find_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$suite" '
            /^[[:space:]]*$/ { if (uris != "" && suites ~ ("(^| )" suite "( |$)")) { print uris; exit } uris = ""; suites = ""; next }
            /^URIs:/   { uris = $2 }
            /^Suites:/ { $1 = ""; suites = $0 }
            END { if (uris != "" && suites ~ ("(^| )" suite "( |$)")) print uris }' "$f" | head -1
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk -v suite="$suite" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i+1) == suite) print $i; break } }' || true
}
mirror=${DEBIAN_MIRROR:-$(find_mirror | head -1 || true)}
[ -n "$mirror" ] || die "no $suite source in /etc/apt; set DEBIAN_MIRROR"

key=$( (cat "$here/lib.sh" "$0"; echo "$suite $mirror") | sha256sum | cut -c1-16)
use_cache "debian-$suite" "$key"

r=$tmp/rootfs
log "debootstrap --variant=minbase $suite from $mirror (a few minutes)"
debootstrap --variant=minbase "$suite" "$r" "$mirror" >&2 || {
    [ -f "$r/debootstrap/debootstrap.log" ] && tail -20 "$r/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
}

log "trimming the root file system"
# What a container runtime provides, and what only served the bootstrap.
rm -rf "${r:?}"/dev/* "$r"/proc/* "$r"/sys/* "$r"/run/* "$r"/tmp/* "$r"/var/tmp/*
rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/apt/*.bin "$r"/var/lib/apt/lists/* "$r"/var/log/* "$r"/debootstrap
rm -f "$r/etc/resolv.conf" "$r/etc/hostname"
: >"$r/etc/machine-id"
chmod 1777 "$r/tmp" "$r/var/tmp"

epoch=$(date +%s)
log "$(du -sh "$r" | cut -f1) root file system"
pack_image "$r" "$tmp/out" debian "$suite" "$epoch" \
    '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["bash"]}'
publish "$tmp/out" "$out"
