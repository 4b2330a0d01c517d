#!/usr/bin/env bash
# CI, after make test: build the container image for real and check it (tests/test_image.py).
# Installs docker.io and mmdebstrap when missing, starts dockerd when no engine answers, and
# stops the engine it started, also on failure. Images stay in /var/lib/docker, so a machine
# that keeps it rebuilds from cache.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[ci-image] %s\n' "$*" >&2; }
started=$(date +%s)

missing=""
command -v dockerd >/dev/null || missing="${missing} docker.io"
command -v mmdebstrap >/dev/null || missing="${missing} mmdebstrap"
if [[ -n "${missing}" ]]; then
  log "installing${missing}"
  SUDO=""; [[ "$(id -u)" = 0 ]] || SUDO=sudo
  ${SUDO} apt-get update -qq
  DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq --no-install-recommends ${missing} >/dev/null
fi

dockerd_pid=""
stop_dockerd() {
  if [[ -n "${dockerd_pid}" ]]; then
    log "stopping the dockerd this script started (pid ${dockerd_pid})"
    kill "${dockerd_pid}" 2>/dev/null || true
    wait "${dockerd_pid}" 2>/dev/null || true
  fi
}
trap stop_dockerd EXIT
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  dockerd >/tmp/spiral-ci-dockerd.log 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { log "dockerd did not start:"; tail -20 /tmp/spiral-ci-dockerd.log >&2; exit 1; }
fi

make image
make image-test PYTEST_ARGS="${PYTEST_ARGS:--q}"
log "image build and checks took $(( $(date +%s) - started )) s"
