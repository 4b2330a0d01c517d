"""Where a learner's tensors live: the device it trains on, the copies onto it, the figures read back.

Both learners train on the torch device they are given (``--device``, ``SPIRAL_DEVICE``; see
:mod:`spiral.runtime.service_options`), and actors always act on the CPU. Three things make a
CUDA learner fast rather than merely correct, and they live here so that every part of the
update does them the same way:

* **The device, checked at start** (:func:`training_device`). A learner asked for ``cuda``
  where torch sees no GPU stops at once with a message that says so; it never falls back to
  the CPU, where it would train on one core while the GPU it was given idles. On CUDA it also
  turns on cuDNN's autotuner (``torch.backends.cudnn.benchmark``): an update's shapes repeat,
  so the fastest convolution algorithm is picked once per shape and reused.
* **Copies from pinned memory** (:func:`host_to_device`). An unroll arrives as numpy arrays in
  ordinary (pageable) memory; copied from there, CUDA first stages the bytes itself and the
  host waits. Copied from page-locked memory with ``non_blocking=True``, the copy is queued on
  the stream like a kernel and the host goes on queueing the update's work. On the CPU a tensor
  is returned as it is.
* **One read-back per update** (:func:`read_floats`). Turning a CUDA tensor into a Python
  float (``float(t)``, ``t.item()``) waits for every queued kernel; an update that logs twenty
  figures that way stalls twenty times. The figures are kept as tensors until the update is
  done and then read in one transfer per device, as the very same float32 values ``float()``
  would give.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

DEVICE_TYPES = ("cpu", "cuda")
"""The kinds of device a learner trains on (``cuda`` may name a GPU: ``cuda:1``)."""


class DeviceUnavailable(ValueError):
    """A learner was asked to train on a device this machine does not have (or cannot name)."""


def _cuda_missing(device: torch.device) -> str | None:
    """Why ``device`` (a CUDA device) cannot be used here, or None when it can."""
    if not torch.cuda.is_available():
        build = (f"this torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
                 else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU: no NVIDIA driver, no "
                      "device given to this container, or CUDA_VISIBLE_DEVICES hides it")
        return f"no CUDA device is available ({build})"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"this machine has {count} CUDA device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})"
    return None


def training_device(name: str | torch.device, what: str = "device") -> torch.device:
    """The torch device ``name`` names, checked to exist on this machine and ready to train on.

    On CUDA, cuDNN's autotuner is turned on for the process (see the module docstring).

    Args:
        name: ``cpu``, ``cuda`` or ``cuda:N``.
        what: Where ``name`` came from, for the error (``--device``, ``SPIRAL_DEVICE``).

    Raises:
        DeviceUnavailable: ``name`` is no device a learner can use, or this machine lacks it;
            the message says which, and never is the CPU used instead.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceUnavailable(f"{what}: {str(name)!r} is not a torch device (use one of {list(DEVICE_TYPES)}, "
                                "or cuda:N)") from None
    if device.type not in DEVICE_TYPES:
        raise DeviceUnavailable(f"{what}: {str(name)!r} is no device a learner trains on (use one of "
                                f"{list(DEVICE_TYPES)}, or cuda:N)")
    if device.type == "cuda":
        missing = _cuda_missing(device)
        if missing:
            raise DeviceUnavailable(f"{what}: {str(name)!r} was asked for, but {missing}. The learner does not fall "
                                    "back to the CPU: run it on a GPU node, or ask for --device cpu")
        torch.backends.cudnn.benchmark = True
    return device


def host_to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``array`` (host memory) as a tensor on ``device``: on CUDA copied asynchronously from pinned
    memory, so the host does not wait for the copy; on the CPU the tensor itself (no copy of a tensor,
    ``torch.from_numpy``'s view of an array)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def read_floats(figures: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Every figure as a Python float, the tensors among them read back in one transfer per device.

    Args:
        figures: Python numbers and single-element tensors (any dtype, any device, with or
            without a graph).

    Returns:
        The same keys, each value exactly ``float(value)``.
    """
    read = {name: float(value) for name, value in figures.items() if not isinstance(value, torch.Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for name, value in figures.items():
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(name)
    for names in by_device.values():
        # float64 holds every float32, bfloat16 and small integer exactly: the same numbers float() gives.
        stacked = torch.stack([figures[name].detach().reshape(()).to(torch.float64) for name in names])  # type: ignore[union-attr]
        read.update(zip(names, stacked.tolist()))
    return {name: read[name] for name in figures}


__all__ = ["DEVICE_TYPES", "DeviceUnavailable", "host_to_device", "read_floats", "training_device"]
