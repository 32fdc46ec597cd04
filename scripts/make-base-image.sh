#!/usr/bin/env bash
# Make local Debian bookworm base images with python3 + venv (for machines that cannot pull
# python:3.11-slim-bookworm), cached between runs: the runtime base, and a builder base that adds binutils
# (Dockerfile.serve strips the venv's shared libraries with it). Prints "BASE_REF BUILDER_REF" as the last
# stdout line; pass them as --build-arg BASE_IMAGE=... --build-arg BUILDER_IMAGE=....
#
# Usage: scripts/make-base-image.sh [BASE_REF [BUILDER_REF]]
#   BASE_REF         default localhost/tfloop-base:<CACHE_KEY>
#   BUILDER_REF      default localhost/tfloop-builder:<CACHE_KEY>
# Environment:
#   TFLOOP_CACHE     cache folder (default ~/.cache/tfloop); the rootfs tarball goes in $TFLOOP_CACHE/base/
#   MIRROR           Debian mirror (default: the one apt already uses here, else http://deb.debian.org/debian)
#   BUILDAH_ARGS     extra global buildah options, e.g. "--storage-driver vfs --root DIR --runroot DIR"
#
# Steps, each skipped when its result exists: debootstrap (about 1-2 minutes) -> tarball in the cache ->
# image in buildah's store. Needs root, debootstrap and buildah.
set -euo pipefail

CACHE_KEY="bookworm-minbase-py3-v4"
BASE_REF="${1:-localhost/tfloop-base:${CACHE_KEY}}"
BUILDER_REF="${2:-localhost/tfloop-builder:${CACHE_KEY}}"
CACHE_DIR="${TFLOOP_CACHE:-${HOME}/.cache/tfloop}/base"
BASE_TAR="${CACHE_DIR}/${CACHE_KEY}.tar"
BUILDER_TAR="${CACHE_DIR}/${CACHE_KEY}-builder.tar"
read -r -a BUILDAH <<<"buildah ${BUILDAH_ARGS:-}"

log() { echo "make-base-image: $*" >&2; }
rootfs=""
container=""
cleanup() {
  [ -n "${rootfs}" ] && rm -rf "${rootfs}"
  [ -n "${container}" ] && "${BUILDAH[@]}" rm "${container}" >/dev/null 2>&1
  return 0
}
trap cleanup EXIT

apt_mirror() {
  local uri
  uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
          /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -1 | tr -d ' ') || true
  echo "${uri:-http://deb.debian.org/debian}"
}

have_image() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

if have_image "${BASE_REF}" && have_image "${BUILDER_REF}"; then
  log "${BASE_REF} and ${BUILDER_REF} already in the store"
  echo "${BASE_REF} ${BUILDER_REF}"
  exit 0
fi

pack() {  # pack ROOTFS TARBALL: drop what no image needs, then tar it
  rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/* \
         "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/info/* "$1"/usr/share/locale/* \
         "$1"/var/log/* "$1"/debootstrap
  tar -C "$1" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "$2.part" .
  mv "$2.part" "$2"
  log "cached rootfs tarball $2 ($(du -h "$2" | cut -f1))"
}

if [ ! -s "${BASE_TAR}" ] || [ ! -s "${BUILDER_TAR}" ]; then
  command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install debootstrap"; exit 2; }
  mirror="${MIRROR:-$(apt_mirror)}"
  mkdir -p "${CACHE_DIR}"
  rootfs=$(mktemp -d "${CACHE_DIR}/rootfs.XXXXXX")
  log "debootstrap bookworm from ${mirror} into ${rootfs} (1-2 minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,binutils \
    bookworm "${rootfs}" "${mirror}" >&2
  pack "${rootfs}" "${BUILDER_TAR}"
  # debootstrap marks every package manual, so name binutils and the libraries only it needs.
  chroot "${rootfs}" dpkg-query -W -f '${Package}\n' |
    grep -E '^(binutils|libbinutils|libctf|libgprofng|libjansson|libsframe)' |
    xargs chroot "${rootfs}" dpkg --purge >&2
  # The runtime base makes no venvs and converts no charsets with iconv.
  rm -rf "${rootfs}"/usr/share/python-wheels/* "${rootfs}"/usr/lib/x86_64-linux-gnu/gconv/*.so
  pack "${rootfs}" "${BASE_TAR}"
fi

import_tarball() {  # import_tarball TARBALL REF
  have_image "$2" && return 0
  log "importing $1 as $2"
  container=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" add "${container}" "$1" / >&2
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash \
    --label org.opencontainers.image.description="Debian bookworm minbase + python3 (tfloop local base)" \
    "${container}"
  "${BUILDAH[@]}" commit --quiet "${container}" "$2" >&2
  "${BUILDAH[@]}" rm "${container}" >/dev/null
  container=""
}

import_tarball "${BASE_TAR}" "${BASE_REF}"
import_tarball "${BUILDER_TAR}" "${BUILDER_REF}"
echo "${BASE_REF} ${BUILDER_REF}"
