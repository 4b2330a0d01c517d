"""A torch module's parameters to and from a :class:`spiral.runtime.snapshot.ParameterSnapshot`.

:func:`snapshot_of` copies a module's ``state_dict`` (parameters and persistent buffers) to CPU
numpy arrays; :func:`load_snapshot` checks names and shapes before copying anything into a module.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from spiral.runtime.device import host_to_device
from spiral.runtime.snapshot import ParameterSnapshot


def snapshot_of(module: nn.Module, version: int) -> ParameterSnapshot:
    """Copy ``module``'s state dict (parameters and persistent buffers) to CPU numpy arrays."""
    # clone() to a C-contiguous copy: parameters may be channels-last, and the copy must not share memory.
    tensors = {name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format).numpy()
               for name, t in module.state_dict().items()}
    return ParameterSnapshot(version=int(version), tensors=tensors)


def load_snapshot(module: nn.Module, snapshot: ParameterSnapshot) -> None:
    """Copy ``snapshot`` into ``module`` in place (keeping each tensor's device and dtype).

    Raises:
        ValueError: Names missing from the snapshot, unexpected names, or mismatched shapes;
            nothing is copied in that case.
    """
    own = module.state_dict()
    missing = [name for name in own if name not in snapshot.tensors]
    unexpected = [name for name in snapshot.tensors if name not in own]
    misshaped = [f"{name} (module {tuple(own[name].shape)}, snapshot {tuple(np.shape(snapshot.tensors[name]))})"
                 for name in own if name in snapshot.tensors
                 and tuple(own[name].shape) != tuple(np.shape(snapshot.tensors[name]))]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {', '.join(misshaped)}")
    if problems:
        raise ValueError(f"snapshot version {snapshot.version} does not fit {type(module).__name__}: "
                         + "; ".join(problems))
    with torch.no_grad():
        for name, target in own.items():
            array = np.asarray(snapshot.tensors[name])
            if not array.flags.writeable or not array.flags.c_contiguous:
                array = np.array(array, copy=True, order="C")
            # On CUDA from pinned memory, queued: a learner refreshing its discriminator does not wait per tensor.
            target.copy_(host_to_device(torch.from_numpy(array), target.device))
