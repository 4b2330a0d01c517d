"""Network parameters on the wire: versioned, chunked state dicts.

A learner publishes its parameters as ``{name: array}`` with a version that grows by one per
update. ``GetParameters`` streams them as :class:`~spiral.v1.parameters_pb2.ParameterChunk`
messages of at most ``max_chunk_bytes`` tensor data each (so a large network never hits the
gRPC message limit):

* the caller already holds the newest version: one chunk ``{version: have_version,
  count: 0}`` and nothing else (:func:`up_to_date_chunk`), so polling is cheap;
* otherwise ``count`` chunks, ``index`` 0..count-1, the tensors in state-dict order. A tensor
  larger than one chunk is split along its first axis into consecutive pieces with the
  same name; :func:`assemble_parameters` concatenates them again.

Every chunk repeats the version, the count, the number of distinct tensors and the total
byte count, so the receiver can verify that it got one complete, consistent version.

Example (server and client)::

    def GetParameters(self, request, context):
        version, tensors = self.published()
        if request.have_version == version:
            yield up_to_date_chunk(version, member)
            return
        yield from chunk_parameters(version, tensors, max_chunk_bytes=4 << 20, member=member)

    update = fetch_parameters(stub, have_version=current, member=0, timeout=10.0)
    if update is not None:
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in update.tensors.items()})
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

from spiral.rpc.errors import InvalidMessage
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.rpc.tensors import decode_tensor, encode_tensor
from spiral.v1 import parameters_pb2, tensor_pb2

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
"""Tensor bytes per chunk unless told otherwise: well below any sensible message limit."""


def up_to_date_chunk(version: int, member: int = 0) -> parameters_pb2.ParameterChunk:
    """The whole answer to a caller that already holds ``version``."""
    return parameters_pb2.ParameterChunk(version=version, index=0, count=0, member=member)


def _pieces(name: str, array: np.ndarray, max_chunk_bytes: int) -> list[np.ndarray]:
    """``array`` as-is, or split along axis 0 into pieces of at most ``max_chunk_bytes``."""
    if array.nbytes <= max_chunk_bytes or array.ndim == 0:
        return [array]
    row_bytes = array.nbytes // array.shape[0] if array.shape[0] else array.nbytes
    if row_bytes > max_chunk_bytes:
        raise ValueError(f"parameter {name!r}: one row along the first axis is {row_bytes} bytes, more than "
                         f"max_chunk_bytes={max_chunk_bytes}; raise max_chunk_bytes")
    rows = max(1, max_chunk_bytes // row_bytes)
    return [array[start:start + rows] for start in range(0, array.shape[0], rows)]


def chunk_parameters(version: int, tensors: Mapping[str, np.ndarray], max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                     member: int = 0) -> list[parameters_pb2.ParameterChunk]:
    """Split a state dict into chunks of at most ``max_chunk_bytes`` tensor data each.

    Args:
        version: Parameter version (>= 0).
        tensors: ``{name: array}``; the order is kept.
        max_chunk_bytes: Tensor bytes per chunk; a tensor is split along its first axis when
            it alone is larger.
        member: Population member the parameters belong to.

    Returns:
        At least one chunk (an empty state dict gives one chunk with no tensors).

    Raises:
        ValueError: A negative version, a non-positive chunk size, or a tensor whose single
            first-axis row exceeds the chunk size.
    """
    if version < 0:
        raise ValueError(f"version must be >= 0, got {version}")
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
    groups: list[list[tensor_pb2.NamedTensor]] = [[]]
    used = 0
    total_bytes = 0
    for name, value in tensors.items():
        array = np.asarray(value)
        total_bytes += array.nbytes
        for piece in _pieces(name, array, max_chunk_bytes):
            if groups[-1] and used + piece.nbytes > max_chunk_bytes:
                groups.append([])
                used = 0
            groups[-1].append(tensor_pb2.NamedTensor(name=name, tensor=encode_tensor(piece)))
            used += piece.nbytes
    count = len(groups)
    return [parameters_pb2.ParameterChunk(version=version, index=i, count=count, tensors=group, member=member,
                                          total_tensors=len(tensors), total_bytes=total_bytes)
            for i, group in enumerate(groups)]


def assemble_parameters(chunks: Iterable[parameters_pb2.ParameterChunk], *, have_version: int | None = None,
                        max_bytes: int | None = None) -> ParameterSnapshot | None:
    """Rebuild a state dict from a chunk stream, checking that it is one complete version.

    Args:
        chunks: The stream, in order.
        have_version: The version the caller asked with; an "up to date" answer must name it.
        max_bytes: Largest total tensor data accepted.

    Returns:
        The parameters, or None when the stream says the caller is up to date.

    Raises:
        InvalidMessage: Empty stream, chunks out of order or of different versions, a count
            or total that does not match, duplicate names, or a tensor that fails
            :func:`~spiral.rpc.tensors.decode_tensor` (NaN and infinities included).
    """
    iterator = iter(chunks)
    first = next(iterator, None)
    if first is None:
        raise InvalidMessage("missing_field", "parameter stream ended without a chunk")
    if first.count == 0:
        if have_version is not None and first.version != have_version:
            raise InvalidMessage("version", f"'up to date' answer names version {first.version}, "
                                            f"but the request held {have_version}")
        if first.tensors or next(iterator, None) is not None:
            raise InvalidMessage("chunk", "'up to date' answer (count 0) must be a lone chunk without tensors")
        return None
    pieces: dict[str, list[np.ndarray]] = {}
    last_name: str | None = None
    received = 0
    expected_index = 0
    for chunk in _with_first(first, iterator):
        if (chunk.version, chunk.count, chunk.member, chunk.total_tensors, chunk.total_bytes) != (
                first.version, first.count, first.member, first.total_tensors, first.total_bytes):
            raise InvalidMessage("chunk", f"chunk {chunk.index} disagrees with chunk 0 on version, count, member "
                                          f"or totals (version {chunk.version} vs {first.version})")
        if chunk.index != expected_index:
            raise InvalidMessage("chunk", f"expected chunk {expected_index} of {first.count}, got {chunk.index}")
        expected_index += 1
        for named in chunk.tensors:
            limit = None if max_bytes is None else max_bytes - received
            array = decode_tensor(named.tensor, f"parameters[{named.name!r}]", max_bytes=limit)
            received += array.nbytes
            if named.name != last_name:
                if named.name in pieces:
                    raise InvalidMessage("chunk", f"parameter {named.name!r} appears twice, not in consecutive pieces")
                pieces[named.name] = []
                last_name = named.name
            pieces[named.name].append(array)
    if expected_index != first.count:
        raise InvalidMessage("chunk", f"stream ended after {expected_index} of {first.count} chunks")
    if len(pieces) != first.total_tensors or received != first.total_bytes:
        raise InvalidMessage("chunk", f"got {len(pieces)} tensors / {received} bytes, the stream announced "
                                      f"{first.total_tensors} / {first.total_bytes}")
    tensors: dict[str, np.ndarray] = {}
    for name, parts in pieces.items():
        if len(parts) == 1:
            tensors[name] = parts[0]
            continue
        if any(p.ndim == 0 or p.shape[1:] != parts[0].shape[1:] or p.dtype != parts[0].dtype for p in parts):
            raise InvalidMessage("chunk", f"pieces of parameter {name!r} disagree on dtype or trailing shape")
        joined = np.concatenate(parts, axis=0)
        joined.flags.writeable = False
        tensors[name] = joined
    return ParameterSnapshot(version=first.version, member=first.member, tensors=tensors)


def _with_first(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest


def fetch_parameters(stub: Any, have_version: int, member: int = 0, timeout: float = 30.0,
                     max_bytes: int | None = None, requester_done: bool = False) -> ParameterSnapshot | None:
    """Ask a ``PolicyLearner`` or ``DiscriminatorLearner`` stub for parameters newer than ``have_version``.

    Args:
        stub: A generated stub with a ``GetParameters`` server-streaming method.
        have_version: The version the caller holds (-1 for none).
        member: Population member whose parameters are wanted.
        timeout: Deadline of the whole stream in seconds (the call never blocks longer).
        max_bytes: Largest total tensor data accepted.
        requester_done: The caller is a policy learner that reached its budget
            (``GetParametersRequest.requester_done``, for its discriminator).

    Returns:
        The new parameters, or None when ``have_version`` is current.

    Raises:
        grpc.RpcError: The call failed (wrap it in :func:`spiral.rpc.client.call_with_retry`).
        InvalidMessage: The server sent an inconsistent stream.
    """
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    request = parameters_pb2.GetParametersRequest(have_version=have_version, member=member,
                                                  requester_done=requester_done)
    return assemble_parameters(stub.GetParameters(request, timeout=timeout), have_version=have_version,
                               max_bytes=max_bytes)
