#!/usr/bin/env bash
# make base-image: a Debian bookworm base image (python3, venv, CA certificates, useradd) made
# offline from this machine's Debian package sources with mmdebstrap, for machines where no
# registry answers for PYTHON_IMAGE. Tagged IMAGE_NAME (default spiral-base:bookworm).
set -euo pipefail
IMAGE_NAME="${IMAGE_NAME:-spiral-base:bookworm}"
command -v mmdebstrap >/dev/null || { echo "[base-image] mmdebstrap is not installed (apt-get install mmdebstrap)" >&2; exit 1; }
started=$(date +%s)
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,passwd bookworm - \
  | docker import --change 'CMD ["/bin/bash"]' - "${IMAGE_NAME}" >/dev/null
echo "[base-image] ${IMAGE_NAME} in $(( $(date +%s) - started )) s" >&2
