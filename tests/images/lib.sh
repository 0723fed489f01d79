# Shared by the make-*-image.sh scripts: the cache of built images, and
# packing a root file system as a one-layer OCI image, three ways.
# Sourced, not run.
#
# The packing is plain GNU tar + gzip -n + sha256sum + hand-written JSON (no
# umoci or skopeo needed), with sorted names, fixed owners and times where
# asked, so the same input gives the same bytes and digests.

log() { echo "$(basename "$0"): $*" >&2; }
die() { log "error: $*"; exit 1; }

cache_root() { echo "${VMRUN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmrun}/test-images"; }

# use_cache NAME KEY: sets $out to the cache's NAME-KEY; when that image is
# there, prints its path and ends the script; else sets $tmp to a scratch
# directory beside it, removed when the script ends.
use_cache() {
    local cache
    cache=$(cache_root)
    out=$cache/$1-$2
    if [ -f "$out/digests.env" ]; then
        log "cached: $out"
        echo "$out"
        exit 0
    fi
    mkdir -p "$cache"
    tmp=$(mktemp -d "$cache/.$1.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# tar_dir DIR OUT [EXTRA TAR OPTIONS...]: a tar of DIR's content (names
# without a leading ./), sorted by name.
tar_dir() {
    local dir=$1 out=$2
    shift 2
    local entries
    entries=$(cd "$dir" && LC_ALL=C ls -A)
    # shellcheck disable=SC2086 # entries are plain top-level names
    (cd "$dir" && LC_ALL=C tar --sort=name --format=gnu --numeric-owner "$@" -cf - $entries) >"$out"
}

# pack_image ROOTFS OUT NAME TAG EPOCH CONFIG_JSON [TAR OPTIONS...]
#   ROOTFS       the root file system
#   OUT          output directory (created): oci/ (an OCI image layout),
#                NAME-oci.tar (an OCI archive), NAME-docker.tar (a classic
#                `docker save` archive) and digests.env
#   NAME, TAG    the image's name (docker.io/library/NAME:TAG)
#   EPOCH        seconds since 1970: the image's creation time, and the
#                time of every member of the OCI and docker archives
#   CONFIG_JSON  the config's "config" object: {"Cmd":["sh"],...}
#   TAR OPTIONS  for the layer (--owner=0 --group=0 --mtime=@N ...)
pack_image() {
    local rootfs=$1 out=$2 name=$3 tag=$4 epoch=$5 config=$6
    shift 6
    local created work
    created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
    work=$out/.work
    mkdir -p "$work" "$out/oci/blobs/sha256"

    log "packing the layer"
    tar_dir "$rootfs" "$work/layer.tar" "$@"
    gzip -n -9 <"$work/layer.tar" >"$work/layer.tar.gz"
    local diff_id layer layer_size
    diff_id=$(sha "$work/layer.tar")
    layer=$(sha "$work/layer.tar.gz")
    layer_size=$(size "$work/layer.tar.gz")

    printf '{"architecture":"amd64","os":"linux","created":"%s","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"tests/images/%s"}]}' \
        "$created" "$config" "$diff_id" "$created" "$(basename "$0")" >"$work/config.json"
    local cfg cfg_size
    cfg=$(sha "$work/config.json")
    cfg_size=$(size "$work/config.json")

    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
        "$cfg" "$cfg_size" "$layer" "$layer_size" >"$work/manifest.json"
    local man man_size
    man=$(sha "$work/manifest.json")
    man_size=$(size "$work/manifest.json")

    log "writing the OCI layout"
    cp "$work/layer.tar.gz" "$out/oci/blobs/sha256/$layer"
    cp "$work/config.json" "$out/oci/blobs/sha256/$cfg"
    cp "$work/manifest.json" "$out/oci/blobs/sha256/$man"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$out/oci/oci-layout"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"docker.io/library/%s:%s","org.opencontainers.image.ref.name":"%s"}}]}' \
        "$man" "$man_size" "$name" "$tag" "$tag" >"$out/oci/index.json"
    local fixed=(--owner=0 --group=0 --mtime="@$epoch")
    tar_dir "$out/oci" "$out/$name-oci.tar" "${fixed[@]}"

    log "writing the docker save archive"
    local d=$work/docker
    mkdir -p "$d/$diff_id"
    cp "$work/layer.tar" "$d/$diff_id/layer.tar"
    printf '1.0' >"$d/$diff_id/VERSION"
    printf '{"id":"%s","created":"%s","os":"linux","architecture":"amd64"}' "$diff_id" "$created" >"$d/$diff_id/json"
    cp "$work/config.json" "$d/$cfg.json"
    printf '[{"Config":"%s.json","RepoTags":["%s:%s"],"Layers":["%s/layer.tar"]}]' "$cfg" "$name" "$tag" "$diff_id" >"$d/manifest.json"
    printf '{"%s":{"%s":"%s"}}' "$name" "$tag" "$diff_id" >"$d/repositories"
    tar_dir "$d" "$out/$name-docker.tar" "${fixed[@]}"

    cat >"$out/digests.env" <<EOT
IMAGE=docker.io/library/$name:$tag
MANIFEST_DIGEST=sha256:$man
CONFIG_DIGEST=sha256:$cfg
LAYER_DIGEST=sha256:$layer
LAYER_SIZE=$layer_size
DIFF_ID=sha256:$diff_id
EOT
    rm -rf "$work"
}

# publish TMP OUT: moves a finished TMP to OUT unless another run got there
# first; prints OUT.
publish() {
    local tmp=$1 out=$2
    if mv -T "$tmp" "$out" 2>/dev/null; then :; else rm -rf "$tmp"; fi
    [ -f "$out/digests.env" ] || die "$out is incomplete"
    echo "$out"
}
