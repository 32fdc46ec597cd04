#!/usr/bin/env bash
# Install the system tools that tfloop's end-to-end tests use, when they are missing and apt is usable:
# buildah + podman + debootstrap (image builds without a Docker engine), docker-registry (a local OCI
# registry), chromium (the upload page test), kubectl (offline kustomize render), wrk (the serving
# benchmark's load generator). On a developer's machine a tool that cannot be installed only warns (the
# tests that need it skip loudly); in CI (CI=true) it fails the run with the tool's name.
set -u
in_ci() { case "${CI:-}" in ""|0|false|no) return 1 ;; *) return 0 ;; esac; }
tools=(buildah podman debootstrap docker-registry chromium kubectl wrk)
missing() { local t; for t in "${tools[@]}"; do command -v "$t" >/dev/null || echo "$t"; done; }
want=($(missing))
if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-deps: missing ${want[*]} and cannot apt-get install them here (need root and apt)." >&2
  else
    echo "system-deps: installing ${want[*]} (apt-get)..."
    export DEBIAN_FRONTEND=noninteractive
    (apt-get update -qq || true) >/dev/null 2>&1
    if ! apt-get install -y -qq --no-install-recommends "${want[@]}" >/tmp/tfloop-apt.log 2>&1; then
      echo "system-deps: apt-get install failed (see /tmp/tfloop-apt.log)." >&2
    fi
  fi
fi
if command -v buildah >/dev/null && [ ! -f /etc/containers/policy.json ] && [ "$(id -u)" = 0 ]; then
  mkdir -p /etc/containers
  echo '{"default":[{"type":"insecureAcceptAnything"}]}' > /etc/containers/policy.json
fi
still=($(missing))
if [ ${#still[@]} -gt 0 ]; then
  if in_ci; then
    echo "system-deps: CI needs these tools and they are missing: ${still[*]}" >&2
    exit 1
  fi
  echo "system-deps: still missing ${still[*]}; the tests that use them will skip and say so." >&2
fi
exit 0
