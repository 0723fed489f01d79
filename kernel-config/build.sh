#!/usr/bin/env bash
# Builds vmrun's guest kernel: an uncompressed ELF vmlinux from Debian's
# linux-source-6.1 package, configured as `make tinyconfig` plus the fragment
# kernel-config/vmrun.config.
#
# The result is cached under $VMRUN_CACHE (default ~/.cache/vmrun), keyed by a
# hash of the fragment, this script and the kernel source version, so a second
# call returns at once. Progress goes to standard error; the last line of
# standard output is the path of the vmlinux.
#
# Environment:
#   VMRUN_CACHE       cache directory (default: $XDG_CACHE_HOME/vmrun or ~/.cache/vmrun)
#   VMRUN_KERNEL_JOBS parallel make jobs (default: number of CPUs)
#   VMRUN_NO_APT=1    do not install missing build dependencies with apt-get
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/vmrun.config"
cache=${VMRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmrun}
jobs=${VMRUN_KERNEL_JOBS:-$(nproc)}
tarball=/usr/src/linux-source-6.1.tar.xz

log() { printf 'kernel-config/build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

install_deps() {
    local pkgs=(linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "${VMRUN_NO_APT:-}" = 1 ] && die "missing packages: ${missing[*]} (install them, or unset VMRUN_NO_APT)"
    command -v apt-get >/dev/null || die "missing packages: ${missing[*]}, and no apt-get to install them"
    log "installing build dependencies: ${missing[*]}"
    local sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}" >&2
}

install_deps
[ -f "$tarball" ] || die "$tarball not found after installing linux-source-6.1"

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
patches=("$here"/patches/*.patch)
key=$( { cat "$fragment" "$here/build.sh" "${patches[@]}"; echo "$src_version"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [ -f "$out/vmlinux" ]; then
    log "cached: $out/vmlinux (config $key)"
    echo "$out/vmlinux"
    exit 0
fi

mkdir -p "$cache/kernel"
work=$(mktemp -d "$cache/kernel/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "[1/4] unpacking linux-source-6.1 ($src_version)"
tar -C "$work" -xf "$tarball"
cd "$work/linux-source-6.1"
for p in "${patches[@]}"; do
    log "      patch: $(basename "$p")"
    patch -p1 --quiet --forward <"$p" >&2 || die "$(basename "$p") does not apply to linux-source-6.1 ($src_version)"
done

log "[2/4] configuring: tinyconfig + $(basename "$fragment")"
make -s ARCH=x86_64 tinyconfig >"$work/merge.log" 2>&1 \
    || { cat "$work/merge.log" >&2; die "make tinyconfig failed"; }
./scripts/kconfig/merge_config.sh -m .config "$fragment" >>"$work/merge.log" 2>&1 \
    || { cat "$work/merge.log" >&2; die "merging the config fragment failed"; }
make -s ARCH=x86_64 olddefconfig >>"$work/merge.log" 2>&1

# Kconfig drops options whose dependencies are not met, without failing.
# Insist that every line of the fragment made it into the final config.
bad=0
while IFS= read -r line; do
    if [[ $line =~ ^#\ (CONFIG_[A-Z0-9_]+)\ is\ not\ set$ ]]; then
        sym=${BASH_REMATCH[1]}
        if grep -q "^$sym=" .config; then log "config: $sym should be off but is $(grep "^$sym=" .config)"; bad=1; fi
    elif [[ $line =~ ^CONFIG_[A-Z0-9_]+= ]]; then
        if ! grep -qxF "$line" .config; then log "config: wanted $line, got: $(grep "^${line%%=*}[= ]" .config || echo unset)"; bad=1; fi
    fi
done <"$fragment"
[ $bad -eq 0 ] || die "the kernel configuration does not match kernel-config/vmrun.config"

log "[3/4] building vmlinux with $jobs jobs (about 10 minutes on 2 cores)"
start=$(date +%s)
make ARCH=x86_64 -j"$jobs" vmlinux 2>&1 | while IFS= read -r l; do
    case $l in
        *": error: "*|*"Error "*|*"*** "*) printf '%s\n' "$l" >&2 ;;
        "  CC "*|"  AR "*|"  LD "*) n=$((${n:-0} + 1)); [ $((n % 200)) -eq 0 ] && log "  ... $n objects, $(( $(date +%s) - start )) s" ;;
    esac
done
[ "${PIPESTATUS[0]}" -eq 0 ] || die "make vmlinux failed (see the errors above)"
[ -f vmlinux ] || die "make finished but produced no vmlinux"

log "[4/4] installing into $out"
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
nm vmlinux >"$out.tmp/System.map" 2>/dev/null || true
rm -rf "$out"
mv "$out.tmp" "$out"
log "done in $(( $(date +%s) - start )) s: $out/vmlinux"
echo "$out/vmlinux"
