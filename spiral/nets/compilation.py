"""``torch.compile`` of the hot network calls, where this machine's toolchain allows it.

Inductor turns the policy's unroll (forward and backward) into fused kernels: on CPU it
generates C++ for the chains of element-wise ops between convolutions (bias, ReLU, residual
adds), which under bf16 autocast are otherwise the slow part (ATen's bf16 element-wise kernels
run 2-3x slower per element than fp32 here), and it leaves the convolutions and matmuls to
oneDNN/MKL (bench/RESULTS.md, ``bench/update_speed.py --compile``).

On CPU inductor needs a C++ compiler at run time; where there is none (a slim image)
:func:`maybe_compile` logs why and returns the function unchanged, so a config that asks for
compilation still runs. Compiled artefacts are cached on disk (inductor's FX-graph and kernel
caches); :func:`persist_compile_cache` points that cache into the run directory so a restarted
learner, or the next run on the same volume, loads its kernels instead of compiling them again.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., object])

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
"""Where inductor keeps compiled kernels (its default is under /tmp, lost with the pod)."""


def compiler_missing(device: str | torch.device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None when it can."""
    device = torch.device(device)
    if device.type == "cpu":
        cxx = os.environ.get("CXX", "")
        if not any(shutil.which(c) for c in (cxx, "g++", "c++", "clang++") if c):
            return "no C++ compiler on PATH (inductor's CPU backend needs g++ or clang++)"
    return None


def maybe_compile(fn: F, device: str | torch.device, what: str) -> F:
    """``torch.compile(fn)``, or ``fn`` with a warning naming ``what`` where compilation cannot run."""
    reason = compiler_missing(device)
    if reason:
        log.warning("%s: not compiling (%s); running eagerly", what, reason)
        return fn
    return torch.compile(fn)  # type: ignore[return-value]


def persist_compile_cache(run_dir: Path) -> Path:
    """Keep inductor's cache in ``run_dir/compile-cache`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set.

    Returns the directory in use.
    """
    if CACHE_ENV not in os.environ:
        path = Path(run_dir) / "compile-cache"
        path.mkdir(parents=True, exist_ok=True)
        os.environ[CACHE_ENV] = str(path)
    return Path(os.environ[CACHE_ENV])


__all__ = ["compiler_missing", "maybe_compile", "persist_compile_cache"]
