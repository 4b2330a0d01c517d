"""Network parameters as versioned data, ready for the wire and for checkpoints.

A :class:`ParameterSnapshot` is a learner's ``state_dict`` (parameters and persistent buffers)
copied to CPU numpy arrays, stamped with a version that grows by one per update. Actors and the
policy learner compare versions to decide whether to fetch newer parameters.

:meth:`ParameterSnapshot.to_bytes` writes a self-describing ``.npz`` archive (a zip of ``.npy``
files, each carrying its dtype and shape, plus ``__version__``); :meth:`~ParameterSnapshot.from_bytes`
reads it back with ``allow_pickle=False``, so no bytes from the wire can run code.
:func:`load_snapshot` checks names and shapes before copying anything into a module.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

VERSION_KEY = "__version__"
"""Archive member holding the version (a 0-d int64 array)."""


@dataclass
class ParameterSnapshot:
    """One version of a network's parameters.

    Attributes:
        version: Parameter version (0 = initial, +1 per update).
        tensors: ``{state_dict name: array}`` in state-dict order.
    """

    version: int
    tensors: dict[str, np.ndarray]

    @property
    def num_bytes(self) -> int:
        """Bytes of tensor data (excluding archive overhead)."""
        return int(sum(np.asarray(a).nbytes for a in self.tensors.values()))

    def to_bytes(self) -> bytes:
        """The snapshot as an uncompressed ``.npz`` archive (readable by ``np.load``)."""
        if VERSION_KEY in self.tensors:
            raise ValueError(f"tensor name {VERSION_KEY!r} is reserved for the version")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
            entries = [(VERSION_KEY, np.asarray(self.version, dtype=np.int64)), *self.tensors.items()]
            for name, array in entries:
                array = np.asarray(array)
                if array.dtype == object:
                    raise ValueError(f"tensor {name!r} has dtype object; only numeric arrays can be sent")
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ParameterSnapshot":
        """Inverse of :meth:`to_bytes`; ValueError for anything that is not such an archive."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                names = list(archive.files)
                if VERSION_KEY not in names:
                    raise ValueError(f"parameter archive has no {VERSION_KEY!r} entry")
                version = int(archive[VERSION_KEY])
                tensors = {name: archive[name] for name in names if name != VERSION_KEY}
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as exc:
            raise ValueError(f"not a parameter archive: {exc}") from exc
        return cls(version=version, tensors=tensors)


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
            target.copy_(torch.from_numpy(array))
