#!/usr/bin/env bash
# Install the system tools that tfloop's end-to-end tests use, when they are missing and apt is usable:
# buildah + podman + debootstrap (image builds without a Docker engine), docker-registry (a local OCI
# registry), chromium (the upload page test), wrk (the serving benchmark's load generator). Never fails
# the build: a test that still lacks a tool skips with a loud reason.
set -u
want=()
command -v buildah >/dev/null || want+=(buildah)
command -v podman >/dev/null || want+=(podman)
command -v debootstrap >/dev/null || want+=(debootstrap)
command -v docker-registry >/dev/null || want+=(docker-registry)
command -v chromium >/dev/null || want+=(chromium)
command -v wrk >/dev/null || want+=(wrk)
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${want[*]} and cannot apt-get install them here (need root and apt);" \
       "the tests that use them will skip and say so." >&2
  exit 0
fi
echo "system-deps: installing ${want[*]} (apt-get)..."
export DEBIAN_FRONTEND=noninteractive
(apt-get update -qq || true) >/dev/null 2>&1
if ! apt-get install -y -qq --no-install-recommends "${want[@]}" >/tmp/tfloop-apt.log 2>&1; then
  echo "system-deps: apt-get install failed (see /tmp/tfloop-apt.log); dependent tests will skip." >&2
fi
if command -v buildah >/dev/null && [ ! -f /etc/containers/policy.json ]; then
  mkdir -p /etc/containers
  echo '{"default":[{"type":"insecureAcceptAnything"}]}' > /etc/containers/policy.json
fi
exit 0
