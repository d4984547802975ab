#!/bin/bash
# Builds the kdns image with buildah where base images cannot be pulled: the two base images
# (a builder with gcc and Python headers, a runtime with only python3) are made with debootstrap
# from Debian bookworm, whose python3 is 3.11 like the real default python:3.11-slim-bookworm,
# and passed to the Dockerfile as BUILDER_IMAGE and BASE_IMAGE.
#
#   tests/imagebuild.sh base     make the base images unless they are already in buildah storage
#   tests/imagebuild.sh build    base, then build the image from ./Dockerfile (tag $KDNS_IMAGE)
#
# Needs root, buildah and debootstrap (Debian packages). Prints "timing <step> <seconds>" lines
# so the test can report how long each part took.
set -euo pipefail

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The debs debootstrap downloads are kept here, so remaking a base costs no download.
CACHE_DIR=${KDNS_BASE_DIR:-/var/tmp/kdns-base}
KDNS_IMAGE=${KDNS_IMAGE:-localhost/kdns:test}
# vfs and chroot isolation are what works as root inside an unprivileged container (no overlay
# mounts, no new namespaces needed).
BUILDAH=(buildah --storage-driver vfs)

BUILD_PKGS=python3,python3-venv,python3-dev,gcc,libc6-dev
RUN_PKGS=python3,iproute2,iptables

here=$(cd "$(dirname "$0")/.." && pwd)

log() { echo "imagebuild: $*" >&2; }

# The builder downloads build requirements from PyPI. Where the network intercepts TLS, the
# host's trust store holds the interception CA; a base made here trusts what the host trusts,
# as a site's own base images would. Debian's pip and python read this bundle via PIP_CERT /
# SSL_CERT_FILE.
HOST_CA=/etc/ssl/certs/ca-certificates.crt

# Tag from the suite, the package list and the CA bundle: any change makes a new base, never a
# stale one.
base_tag() {
    echo "$SUITE-$( (echo "$SUITE $1"; cat "$HOST_CA" 2>/dev/null) | sha256sum | cut -c1-12)"
}

make_base() { # name packages
    local name=$1 pkgs=$2 ref
    ref="localhost/$name:$(base_tag "$pkgs")"
    if "${BUILDAH[@]}" inspect --type image "$ref" >/dev/null 2>&1; then
        log "$ref already built"
        echo "$ref"
        return
    fi
    # A base for an older package list or CA bundle is dead weight (vfs stores every layer in
    # full): drop it before making the new one.
    "${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}}' | grep "^localhost/$name:" \
        | xargs -r "${BUILDAH[@]}" rmi >/dev/null 2>&1 || true
    local t0=$SECONDS ctr mnt
    # Not local: the EXIT trap below runs after the function's locals are gone.
    root=""
    mkdir -p "$CACHE_DIR/debs"
    root=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
    # Always called in $(...), so this EXIT trap is the subshell's: a failed run leaves no
    # half-made rootfs behind.
    trap 'rm -rf "$root"' EXIT
    log "debootstrap $name ($pkgs)"
    debootstrap --variant=minbase --include="$pkgs" --cache-dir="$CACHE_DIR/debs" \
        "$SUITE" "$root" "$MIRROR" >"$CACHE_DIR/$name.debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE_DIR/$name.debootstrap.log" >&2; return 1; }
    # apt lists and docs are dead weight in a base; python:3.11-slim drops them too.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* \
        "$root"/usr/share/man/* "$root"/usr/share/locale/*
    local env=(--env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
               --env LANG=C.UTF-8)
    # Only a base with a trust store (the builder's, through python3-dev) gets the host's.
    if [ -r "$HOST_CA" ] && [ -d "$root/etc/ssl/certs" ]; then
        cp "$HOST_CA" "$root/etc/ssl/certs/ca-certificates.crt"
        env+=(--env PIP_CERT=/etc/ssl/certs/ca-certificates.crt
              --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt)
    fi
    ctr=$("${BUILDAH[@]}" from scratch)
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    # tar keeps owners, modes and xattrs; cp -a would too, but tar streams the 500 MB faster.
    tar -C "$root" --xattrs --numeric-owner -cf - . | tar -C "$mnt" --xattrs --numeric-owner -xf -
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    "${BUILDAH[@]}" config "${env[@]}" --cmd '["python3"]' "$ctr"
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$ref" >/dev/null
    echo "timing base-$name $((SECONDS - t0))" >&2
    echo "$ref"
}

# One build at a time per machine: concurrent runs (two test sessions) would share the deb
# cache, commit the same base tags and remove each other's images.
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.lock"
flock 9

cmd=${1:-build}
case "$cmd" in
base)
    builder=$(make_base kdns-base-build "$BUILD_PKGS")
    runtime=$(make_base kdns-base-run "$RUN_PKGS")
    echo "$builder $runtime"
    ;;
build)
    builder=$(make_base kdns-base-build "$BUILD_PKGS")
    runtime=$(make_base kdns-base-run "$RUN_PKGS")
    # The previous build would stay behind untagged, 300 MB a run.
    "${BUILDAH[@]}" rmi "$KDNS_IMAGE" >/dev/null 2>&1 || true
    t0=$SECONDS
    # --layers=false: one commit per stage; vfs copies the whole rootfs per committed layer.
    "${BUILDAH[@]}" bud --isolation chroot --layers=false --pull=false \
        --build-arg BASE_IMAGE="$runtime" --build-arg BUILDER_IMAGE="$builder" \
        -t "$KDNS_IMAGE" -f "$here/Dockerfile" "$here" >&2
    echo "timing image $((SECONDS - t0))" >&2
    ;;
*)
    echo "usage: $0 base|build" >&2
    exit 2
    ;;
esac
