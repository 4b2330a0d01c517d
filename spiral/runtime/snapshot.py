"""A network's parameters as versioned data, ready for the wire and for checkpoints (numpy only).

A :class:`ParameterSnapshot` is a learner's ``state_dict`` (parameters and persistent buffers)
copied to CPU numpy arrays, stamped with a version that grows by one per update (and the
population member it belongs to). Actors and the policy learner compare versions to decide
whether to fetch newer parameters; :mod:`spiral.rpc.parameters` streams them in chunks.

:meth:`ParameterSnapshot.to_bytes` writes a self-describing ``.npz`` archive (a zip of ``.npy``
files, each carrying its dtype and shape, plus ``__version__``); :meth:`~ParameterSnapshot.from_bytes`
reads it back with ``allow_pickle=False``, so no bytes from the wire can run code. Copying a
snapshot out of and into a torch module is :mod:`spiral.nets.params`.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np

VERSION_KEY = "__version__"
"""Archive member holding the version (a 0-d int64 array)."""


@dataclass
class ParameterSnapshot:
    """One version of a network's parameters.

    Attributes:
        version: Parameter version (0 = initial, +1 per update).
        tensors: ``{state_dict name: array}`` in state-dict order.
        member: Population member they belong to (0 outside a population; not in
            :meth:`to_bytes`).
    """

    version: int
    tensors: dict[str, np.ndarray]
    member: int = 0

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
