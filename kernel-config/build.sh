#!/usr/bin/env bash
# Builds vmrun's guest kernels: uncompressed ELF images from Debian's
# linux-source-6.1 package, configured as `make tinyconfig` plus the fragment
# kernel-config/vmrun.config: `vmlinux`, for VMs of several vCPUs, and
# `vmlinux-up` beside it, the same without SMP (plus vmrun-up.config), which
# vmrun boots for VMs of one vCPU.
#
# The result is cached under $VMRUN_CACHE (default ~/.cache/vmrun), keyed by a
# hash of the fragments, the patches, this script and the kernel source
# version, so a second call returns at once. Progress goes to standard error;
# the last line of standard output is the path of the vmlinux (vmlinux-up,
# config-up and System.map-up are beside it).
#
# Environment:
#   VMRUN_CACHE       cache directory (default: $XDG_CACHE_HOME/vmrun or ~/.cache/vmrun)
#   VMRUN_KERNEL_JOBS parallel make jobs (default: number of CPUs)
#   VMRUN_NO_APT=1    do not install missing build dependencies with apt-get
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/vmrun.config"
up_fragment="$here/vmrun-up.config"
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
key=$( { cat "$fragment" "$up_fragment" "$here/build.sh" "${patches[@]}"; echo "$src_version"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/vmlinux-up" ]; then
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

# configure_and_build DIR FRAGMENT...: an out-of-tree build in DIR of
# tinyconfig with the fragments merged in order, checked, then vmlinux.
configure_and_build() {
    local dir=$1; shift
    local names; names=$(for f in "$@"; do basename "$f"; done | paste -sd+)
    mkdir -p "$dir"
    log "      configuring $(basename "$dir"): tinyconfig + $names"
    make -s O="$dir" ARCH=x86_64 tinyconfig >"$dir/merge.log" 2>&1 \
        || { cat "$dir/merge.log" >&2; die "make tinyconfig failed"; }
    ./scripts/kconfig/merge_config.sh -m -O "$dir" "$dir/.config" "$@" >>"$dir/merge.log" 2>&1 \
        || { cat "$dir/merge.log" >&2; die "merging the config fragments failed"; }
    make -s O="$dir" ARCH=x86_64 olddefconfig >>"$dir/merge.log" 2>&1

    # Kconfig drops options whose dependencies are not met, without failing.
    # Insist that every line of the fragments made it into the final config
    # (a later fragment's line wins over an earlier one's).
    local bad=0 line sym
    while IFS= read -r line; do
        if [[ $line =~ ^#\ (CONFIG_[A-Z0-9_]+)\ is\ not\ set$ ]]; then
            sym=${BASH_REMATCH[1]}
            if grep -q "^$sym=" "$dir/.config"; then log "config: $sym should be off but is $(grep "^$sym=" "$dir/.config")"; bad=1; fi
        elif [[ $line =~ ^CONFIG_[A-Z0-9_]+= ]]; then
            if ! grep -qxF "$line" "$dir/.config"; then log "config: wanted $line, got: $(grep "^${line%%=*}[= ]" "$dir/.config" || echo unset)"; bad=1; fi
        fi
    done < <(cat "$@" | awk '/^(# )?CONFIG_/ { match($0, /CONFIG_[A-Z0-9_]+/); last[substr($0, RSTART, RLENGTH)] = $0 } END { for (s in last) print last[s] }')
    [ $bad -eq 0 ] || die "the kernel configuration of $(basename "$dir") does not match $names"

    local start n=0 l
    start=$(date +%s)
    make O="$dir" ARCH=x86_64 -j"$jobs" vmlinux 2>&1 | while IFS= read -r l; do
        case $l in
            *": error: "*|*"Error "*|*"*** "*) printf '%s\n' "$l" >&2 ;;
            "  CC "*|"  AR "*|"  LD "*) n=$((n + 1)); [ $((n % 200)) -eq 0 ] && log "  ... $(basename "$dir"): $n objects, $(( $(date +%s) - start )) s" ;;
        esac
    done
    [ "${PIPESTATUS[0]}" -eq 0 ] || die "make vmlinux failed for $(basename "$dir") (see the errors above)"
    [ -f "$dir/vmlinux" ] || die "make finished but produced no vmlinux in $(basename "$dir")"
}

start=$(date +%s)
log "[2/4] building vmlinux (SMP) with $jobs jobs (about 5 minutes on 2 cores)"
configure_and_build "$work/smp" "$fragment"
log "[3/4] building vmlinux-up (one CPU) with $jobs jobs (about 5 minutes on 2 cores)"
configure_and_build "$work/up" "$fragment" "$up_fragment"

log "[4/4] installing into $out"
mkdir -p "$out.tmp"
for v in smp up; do
    suffix=; [ $v = up ] && suffix=-up
    cp "$work/$v/vmlinux" "$out.tmp/vmlinux$suffix"
    cp "$work/$v/.config" "$out.tmp/config$suffix"
    nm "$work/$v/vmlinux" >"$out.tmp/System.map$suffix" 2>/dev/null || true
done
rm -rf "$out"
mv "$out.tmp" "$out"
log "done in $(( $(date +%s) - start )) s: $out/vmlinux"
echo "$out/vmlinux"
