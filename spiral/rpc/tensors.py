"""numpy arrays <-> ``spiral.v1.Tensor``, with strict validation of what arrives.

A :class:`~spiral.v1.tensor_pb2.Tensor` is ``{dtype, shape, data}``: a numpy dtype name, the
axis sizes, and the elements in C order, little-endian (the TorchBeast ``NDArray`` idea).
Encoding never fails for an allowed dtype. Decoding trusts nothing: it checks, in order,

1. the dtype name is one of the allowed ones (reason ``dtype``);
2. the shape has at most :data:`MAX_NDIM` axes, none negative (reason ``shape``);
3. the byte count equals ``prod(shape) * itemsize`` (reason ``byte_count``);
4. the data is within ``max_bytes`` (reason ``too_large``);
5. optional expectations of the receiver: dtype, number of axes, fixed axis sizes;
6. floating-point values are all finite (reason ``nonfinite``), unless allowed.

Each failure raises :class:`~spiral.rpc.errors.InvalidMessage` naming the field, so a
servicer can answer ``INVALID_ARGUMENT`` with a useful message.

Example::

    msg = encode_tensor(np.zeros((2, 64, 64, 1), np.uint8))
    renders = decode_tensor(msg, "renders", dtypes=("uint8",), shape=(None, 64, 64, 1))
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from spiral.rpc.errors import InvalidMessage
from spiral.v1 import tensor_pb2

ALLOWED_DTYPES: tuple[str, ...] = (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64",
)
"""dtype names a Tensor may carry (numpy's names; no objects, strings or complex numbers)."""
FLOAT_DTYPES: tuple[str, ...] = ("float16", "float32", "float64")
MAX_NDIM = 8
"""Most axes a received tensor may have."""

__all__ = ["ALLOWED_DTYPES", "FLOAT_DTYPES", "InvalidMessage", "MAX_NDIM", "decode_tensor", "encode_tensor"]


def encode_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """Encode an array (any layout or byte order) as a little-endian, C-order Tensor.

    Raises:
        ValueError: The array's dtype is not in :data:`ALLOWED_DTYPES`.
    """
    array = np.asarray(array)
    name = array.dtype.name
    if name not in ALLOWED_DTYPES:
        raise ValueError(f"cannot encode dtype {array.dtype}; allowed: {', '.join(ALLOWED_DTYPES)}")
    little = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
    return tensor_pb2.Tensor(dtype=name, shape=list(array.shape), data=little.tobytes(order="C"))


def decode_tensor(
    tensor: tensor_pb2.Tensor,
    field: str,
    *,
    dtypes: Sequence[str] | None = None,
    shape: Sequence[int | None] | None = None,
    max_bytes: int | None = None,
    allow_nonfinite: bool = False,
) -> np.ndarray:
    """Decode and validate a received Tensor.

    Args:
        tensor: The message.
        field: Name of the field it came from, used in error messages (``"renders"``).
        dtypes: dtype names accepted here (default: any of :data:`ALLOWED_DTYPES`).
        shape: Expected shape; ``None`` entries accept any size on that axis.
        max_bytes: Largest data size accepted (None: no limit beyond the gRPC message limit).
        allow_nonfinite: Accept NaN and infinities in floating-point data.

    Returns:
        A read-only array in native byte order that views (or, on big-endian hosts, copies)
        the message's bytes.

    Raises:
        InvalidMessage: With reason ``dtype``, ``shape``, ``byte_count``, ``too_large`` or
            ``nonfinite``.
    """
    name = tensor.dtype
    allowed = tuple(dtypes) if dtypes is not None else ALLOWED_DTYPES
    if name not in ALLOWED_DTYPES or name not in allowed:
        shown = repr(name) if name else "(empty)"
        raise InvalidMessage("dtype", f"{field}: dtype {shown} is not allowed here; expected "
                                      f"{' or '.join(allowed)}")
    dims = [int(d) for d in tensor.shape]
    if len(dims) > MAX_NDIM:
        raise InvalidMessage("shape", f"{field}: {len(dims)} axes, at most {MAX_NDIM} are allowed")
    if any(d < 0 for d in dims):
        raise InvalidMessage("shape", f"{field}: negative axis size in shape {dims}")
    dtype = np.dtype(name).newbyteorder("<")
    expected_bytes = math.prod(dims) * dtype.itemsize
    if max_bytes is not None and expected_bytes > max_bytes:
        raise InvalidMessage("too_large", f"{field}: shape {dims} of {name} is {expected_bytes} bytes, "
                                          f"more than the {max_bytes} allowed")
    if len(tensor.data) != expected_bytes:
        raise InvalidMessage("byte_count", f"{field}: shape {dims} of {name} needs {expected_bytes} bytes, "
                                           f"got {len(tensor.data)}")
    if shape is not None:
        want = list(shape)
        if len(dims) != len(want) or any(w is not None and w != d for w, d in zip(want, dims)):
            shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
            raise InvalidMessage("shape", f"{field}: shape {dims}, expected {shown}")
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(dims)
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
        array.flags.writeable = False
    if name in FLOAT_DTYPES and not allow_nonfinite and array.size and not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InvalidMessage("nonfinite", f"{field}: {bad} of {array.size} values are NaN or infinite")
    return array
