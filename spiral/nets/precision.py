"""Arithmetic precision of the networks: ``fp32``, or ``bf16`` autocast over fp32 master weights.

``bf16`` runs the networks' matrix work (convolutions, Linear layers, the LSTM) in bfloat16
under :func:`torch.autocast`: on CPUs with AMX tiles (detected by :func:`cpu_bf16_units`)
oneDNN runs those kernels several times faster than fp32, and on CUDA the tensor cores do.
AVX-512-BF16 alone does not pay: on such a core (no AMX) a 2048x2048 bf16 matmul ran at
74 GFLOP/s against fp32's 128, and the ``tiny`` update at 0.74x of fp32 (bench/RESULTS.md).
What stays fp32 (mixed precision as in Micikevicius et al. 2018):

* the **master weights and the optimiser state**: parameters are never cast, autocast casts
  their bf16 copies per op and the gradients arrive in fp32;
* **log-probabilities, entropies and values**: the policy casts its logits and its value to
  fp32 before the softmax (:class:`spiral.nets.policy.SpiralPolicy`);
* **V-trace, the losses and the discriminator's scores as rewards**: computed outside the autocast
  region, on fp32 tensors.

bfloat16 keeps fp32's exponent range, so unlike fp16 it needs no loss scaling.

:func:`resolve_precision` turns a configured precision into the one used on a device: ``bf16``
where bf16 does not run faster than fp32 on that device (:func:`bf16_native`) falls back to
``fp32`` with a warning (speed is the only reason to ask for it). :func:`autocast` is the context
manager the trainers and the actor wrap their network calls in.
"""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager, Literal

import torch

from spiral.config import PRECISIONS

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]


def cpu_bf16_units() -> list[str]:
    """The bf16 matrix units of this machine's CPU: ``amx_bf16`` and/or ``avx512_bf16`` (may be empty)."""
    capability = torch.backends.cpu.get_cpu_capability()  # noqa: F841 (initialises cpuinfo)
    units = []
    if torch.cpu._is_amx_tile_supported():
        units.append("amx_bf16")
    if torch.cpu._is_avx512_bf16_supported():
        units.append("avx512_bf16")
    return units


def bf16_runs(device: str | torch.device) -> bool:
    """Whether ``device`` has bf16 matrix kernels at all (on a CPU: oneDNN's, AVX-512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return (torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
                and bool(cpu_bf16_units()))
    return False


def bf16_native(device: str | torch.device) -> bool:
    """Whether bf16 runs faster than fp32 on ``device``: Ampere+ GPUs, and CPUs with AMX tiles.

    A CPU with AVX-512-BF16 but no AMX has bf16 kernels (:func:`bf16_runs`) that are slower
    than its fp32 ones (see the module docstring), so it does not count.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return bf16_runs(device) and "amx_bf16" in cpu_bf16_units()
    return bf16_runs(device)


def resolve_precision(precision: str, device: str | torch.device, what: str = "precision") -> Precision:
    """The precision to use on ``device`` for a configured ``precision``.

    Raises:
        ValueError: naming ``what`` (the config field) for a value other than fp32 or bf16.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{what}: must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and not bf16_native(device):
        log.warning("%s: bf16 requested but %s has no native bf16 kernels; using fp32", what, torch.device(device))
        return "fp32"
    return "bf16" if precision == "bf16" else "fp32"


def autocast(precision: str, device: str | torch.device) -> ContextManager[object]:
    """A context in which the networks compute in ``precision`` on ``device`` (fp32: does nothing)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")


__all__ = ["PRECISIONS", "Precision", "autocast", "bf16_native", "bf16_runs", "cpu_bf16_units", "resolve_precision"]
