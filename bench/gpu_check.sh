#!/usr/bin/env bash
# The GPU check as two commands, each well under 5 minutes of a GPU machine's time:
#
#   bench/gpu_check.sh call1 [--device cuda] [--quick]
#       install (the carried wheels, then spiral with --no-deps); pytest -m cuda (tests/test_cuda.py:
#       the update, the discriminator, acting and the fast renderer on cuda against the CPU);
#       bench.update_speed on cuda for tiny and mnist, fp32 and bf16, batch 64, with the matmul peak
#   bench/gpu_check.sh call2 [--device cuda] [--quick]
#       install; bench.actor_scaling: `spiral up --config mnist --device cuda` grown from 1 to 4 to 12
#       actors in one process tree, ~40 s each after a warm-up, on the fast renderer: frames/s,
#       updates/s, policy lag, GPU utilisation (nvidia-smi), each process's CPU
#
# Every step writes STEP.log and STEP.json into $OUT (the device tool's result folder; elsewhere
# OUT defaults to bench/results/gpu-check). `--device cpu --quick` runs every step's code path on a
# CPU machine in a few minutes at tiny sizes (tests/test_gpu_check.py runs it), installing nothing:
# the wheels (for the device's Python 3.12) and spiral's install are resolved with pip's --dry-run.
#
# Before: bench/gpu_wheels.sh (builds .whl/, git-ignored). On the device (the tool `run`):
#   run(command="bench/gpu_check.sh call1", carry=[".whl"], timeout_s=330)
#   run(command="bench/gpu_check.sh call2", carry=[".whl"], timeout_s=330)
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,12p' "$0" >&2; exit 2; }
call=${1:-}
[ "$call" = call1 ] || [ "$call" = call2 ] || usage
shift
device=cuda
quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=${2:?--device needs a value}; shift 2 ;;
        --quick) quick=1; shift ;;
        *) usage ;;
    esac
done
OUT=${OUT:-bench/results/gpu-check}
PYTHON=${PYTHON:-python3}
SITE=${SPIRAL_GPU_SITE:-/tmp/spiral-gpu-site}
mkdir -p "$OUT"

# -- install: the carried wheels into a folder of their own, then spiral itself without its deps --
wheels=none
spiral_install="not run"
{
    echo "$ $PYTHON --version: $("$PYTHON" --version 2>&1)"
    if ls .whl/*.whl >/dev/null 2>&1; then
        if [ "$quick" = 1 ]; then
            # A dry run installs nothing: the wheels are for the device's Python, so check that they resolve.
            PYTHON=$PYTHON bench/gpu_wheels.sh check && wheels=checked || wheels=failed
        else
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                .whl/*.whl && wheels=installed || wheels=failed
            export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        fi
    else
        echo "no .whl/: using the packages this Python has"
    fi
    dry_run=()
    [ "$quick" = 1 ] && dry_run=(--dry-run)
    # torch==2.13.0 (pyproject) is left unmet on purpose: the device's own CUDA torch is the one to test.
    if "$PYTHON" -m pip install "${dry_run[@]}" --no-index --no-deps --no-build-isolation -e .; then
        spiral_install=$([ "$quick" = 1 ] && echo "resolved (dry run)" || echo installed)
    else
        spiral_install="failed: the steps import spiral from this checkout"
    fi
} >"$OUT/install.log" 2>&1
echo "gpu check: wheels $wheels, spiral $spiral_install (install.log)"

quick_flag=()
[ "$quick" = 1 ] && quick_flag=(--quick)
exec "$PYTHON" -m bench.gpu_check "$call" --device "$device" "${quick_flag[@]}" --out "$OUT" \
    --wheels "$wheels" --spiral-install "$spiral_install"
