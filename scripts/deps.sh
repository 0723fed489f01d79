#!/usr/bin/env bash
# Installs the Debian packages vmrun's build, demo and tests need (the guest
# kernel's own build dependencies are installed by kernel-config/build.sh).
# Needs root or sudo; does nothing when everything is there.
set -euo pipefail

# busybox-static: test and demo images; e2fsprogs: ext4 test disks;
# docker-registry: the loopback registry of the pull tests; iproute2: the
# network namespaces of the virtio-net test and --network tap; nftables: the
# NAT network's rules (nft); debootstrap:
# the Debian test image; containerd: the containerd and CRI tests of
# containerd-shim-vmrun-v2 (containerd with its CRI plugin, and ctr);
# apache2-utils and openssl: the htpasswd file and the CA of the TLS
# registry of the login tests; containernetworking-plugins and curl: the
# pod network test (CNI's bridge and host-local plugins, requests to the
# pod); podman: podman with vmrun-oci as its runtime; protobuf-compiler:
# protoc, which the CRI test's gRPC client (the k8s-cri crate) is generated
# with when the tests build.
pkgs=(busybox-static build-essential e2fsprogs docker-registry iproute2 nftables debootstrap containerd apache2-utils openssl curl containernetworking-plugins podman protobuf-compiler)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "scripts/deps.sh: installing ${missing[*]}" >&2
    sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}" >&2
fi

if ! command -v cargo >/dev/null; then
    echo "scripts/deps.sh: cargo not found; install Rust 1.85 or newer (https://rustup.rs)" >&2
    exit 1
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "scripts/deps.sh: /dev/kvm is missing or not accessible; vmrun needs KVM (add this user to the kvm group)" >&2
    exit 1
fi
