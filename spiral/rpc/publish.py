"""Serving a learner's published parameters: the shared body of both ``GetParameters`` methods.

The policy learner and the discriminator learner publish versioned parameters the same way
(:class:`spiral.core.PublishedParameters`) and answer ``GetParameters`` the same way:

* the caller holds exactly the published version: one "up to date" chunk, nothing else;
* otherwise (older, or a version this server never had, e.g. after it restarted from an older
  checkpoint): the whole state dict, chunked. Sending on any mismatch, not only on "newer",
  is what lets actors follow a learner that resumed at a lower version.
"""

from __future__ import annotations

import threading
from typing import Callable, Collection, Iterator

from spiral.runtime.snapshot import ParameterSnapshot
from spiral.rpc.errors import check_member
from spiral.rpc.parameters import DEFAULT_CHUNK_BYTES, chunk_parameters, up_to_date_chunk
from spiral.v1 import parameters_pb2


class ParameterPublisher:
    """Answers ``GetParameters`` for one member from a function returning the latest snapshot.

    The chunked encoding of a version is built once and reused for every caller that asks
    for it (many actors poll the same version), so a poll costs one comparison when the
    caller is current and no re-encoding when it is not.

    ``serves``: the members whose requests are answered (default: ``member`` alone). A shared
    discriminator (``pbt.shared_discriminator``) answers every member of the population; its
    chunks still carry its own ``member``.
    """

    def __init__(self, latest: Callable[[], ParameterSnapshot], member: int,
                 max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, serves: Collection[int] | None = None) -> None:
        self._latest = latest
        self._member = member
        self._serves = frozenset(serves) if serves is not None else frozenset({member})
        self._max_chunk_bytes = max_chunk_bytes
        self._lock = threading.Lock()
        self._cached: tuple[int, list[parameters_pb2.ParameterChunk]] | None = None

    def _chunks(self, snapshot: ParameterSnapshot) -> list[parameters_pb2.ParameterChunk]:
        with self._lock:
            if self._cached is None or self._cached[0] != snapshot.version:
                self._cached = (snapshot.version, chunk_parameters(
                    snapshot.version, snapshot.tensors, max_chunk_bytes=self._max_chunk_bytes, member=self._member))
            return self._cached[1]

    def stream(self, request: parameters_pb2.GetParametersRequest) -> Iterator[parameters_pb2.ParameterChunk]:
        """The chunks answering ``request``.

        Raises:
            PreconditionFailed: The request asks for another population member's parameters.
        """
        check_member(request.member, self._serves, self._member, "server")
        snapshot = self._latest()
        if request.have_version == snapshot.version:
            yield up_to_date_chunk(snapshot.version, self._member)
            return
        yield from self._chunks(snapshot)
