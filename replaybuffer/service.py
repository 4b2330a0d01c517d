"""The replay buffer's gRPC face: ``spiral.v1.ReplayBuffer`` over a :class:`ReplayTable`.

* ``Insert`` (client stream): each :class:`~spiral.v1.replay_pb2.InsertRequest` is one actor
  batch of final renders (and targets in conditional runs). Every request is validated
  against the experiment (:func:`spiral.rpc.messages.decode_insert_request`: dtype uint8,
  shape ``[B, H, W, C]`` of this experiment, byte count, targets present exactly in
  conditional runs, the member this buffer serves) before anything is stored. A bad request
  ends its stream with INVALID_ARGUMENT (or FAILED_PRECONDITION for a wrong member), counted
  in ``spiral_rejected_messages_total``; requests of the same stream before it stay inserted.
* ``Sample``: a uniform batch once the rate limiter allows it. The server waits at most
  ``min(request.wait_seconds, max_wait_seconds, the call's remaining deadline)``; a sample
  still held back then is answered with DEADLINE_EXCEEDED and ``"rate_limited: <which limit>"``
  (:data:`spiral.rpc.errors.RATE_LIMITED_PREFIX`), so callers can tell "not yet" from a
  broken peer.
* ``Info``: size, capacity, counters and limits.

With ``pbt.shared_discriminator`` member 0's buffer is the population's: it takes every
member's renders (``serves``: members ``0 .. K-1``) into one table and serves the one shared
discriminator; a member outside the population is still refused (FAILED_PRECONDITION).

The ``spiral_replay_*`` gauges and counters are updated on every insert and sample.
"""

from __future__ import annotations

import logging
from typing import Collection, Iterable

import grpc
import numpy as np

from replaybuffer.table import RateLimited, ReplayItem, ReplayTable, TableClosed
from spiral.runtime import metrics
from spiral.rpc.errors import (RATE_LIMITED_PREFIX, InvalidMessage, check_member,
                               rejects_bad_messages)
from spiral.rpc.messages import ImageShape, RenderBatch, decode_insert_request, encode_sample_response
from spiral.rpc.server import ServiceBinding
from spiral.v1 import replay_pb2, replay_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "spiral.v1.ReplayBuffer"
_DEADLINE_MARGIN_SECONDS = 0.2
"""Time left on a Sample call's deadline for the answer to travel back."""


class ReplayBufferServicer(replay_pb2_grpc.ReplayBufferServicer):
    """Serves one :class:`ReplayTable` for one population member.

    Args:
        table: The table.
        image_shape: ``(H, W, C)`` of the renders accepted.
        conditional: Whether every render must come with its target.
        member: Population member served (requests for another are refused).
        max_wait_seconds: Longest a Sample call waits for the rate limiter.
        max_batch_size: Largest batch one Sample (or one InsertRequest) may ask for or carry.
        serves: Members whose requests are accepted (default: ``member`` alone; a shared buffer:
            the whole population, :meth:`spiral.config.PBTConfig.served_members`).
    """

    def __init__(self, table: ReplayTable, image_shape: ImageShape, conditional: bool, member: int = 0,
                 max_wait_seconds: float = 5.0, max_batch_size: int = 4096,
                 serves: Collection[int] | None = None) -> None:
        self.table = table
        self.image_shape = tuple(int(d) for d in image_shape)
        self.conditional = bool(conditional)
        self.member = int(member)
        self.serves = frozenset(int(m) for m in serves) if serves is not None else frozenset({self.member})
        self.max_wait_seconds = float(max_wait_seconds)
        self.max_batch_size = int(max_batch_size)
        self._label = str(self.member)
        metrics.REPLAY_CAPACITY.labels(self._label).set(table.capacity)
        metrics.REPLAY_SIZE.labels(self._label).set(len(table))

    def _check_member(self, member: int) -> None:
        check_member(member, self.serves, self.member, "replay buffer")

    @rejects_bad_messages(SERVICE)
    def Insert(self, request_iterator: Iterable[replay_pb2.InsertRequest],
               context: grpc.ServicerContext) -> replay_pb2.InsertSummary:
        inserted = 0
        size = len(self.table)
        for request in request_iterator:
            self._check_member(request.member)
            batch = decode_insert_request(request, self.image_shape, self.conditional, max_items=self.max_batch_size)
            size = self.table.insert(_items(batch))
            inserted += len(batch)
            metrics.REPLAY_INSERTS_TOTAL.labels(self._label).inc(len(batch))
            metrics.REPLAY_SIZE.labels(self._label).set(size)
        return replay_pb2.InsertSummary(inserted=inserted, size=size)

    @rejects_bad_messages(SERVICE)
    def Sample(self, request: replay_pb2.SampleRequest, context: grpc.ServicerContext) -> replay_pb2.SampleResponse:
        self._check_member(request.member)
        if not 1 <= request.batch_size <= self.max_batch_size:
            raise InvalidMessage("batch_size", f"batch_size must be in [1, {self.max_batch_size}], "
                                               f"got {request.batch_size}")
        if not request.wait_seconds >= 0:  # also refuses NaN
            raise InvalidMessage("wait_seconds", f"wait_seconds must be >= 0, got {request.wait_seconds}")
        wait = min(request.wait_seconds, self.max_wait_seconds)
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(0.0, min(wait, remaining - _DEADLINE_MARGIN_SECONDS))
        try:
            items = self.table.sample(request.batch_size, timeout=wait)
        except RateLimited as limited:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{RATE_LIMITED_PREFIX}: {limited.reason}")
        except TableClosed as closed:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"shutting_down: {closed}")
        metrics.REPLAY_SAMPLES_TOTAL.labels(self._label).inc(len(items))
        return encode_sample_response(_batch(items))

    def Info(self, request: replay_pb2.InfoRequest, context: grpc.ServicerContext) -> replay_pb2.InfoResponse:
        info = self.table.info()
        return replay_pb2.InfoResponse(
            size=info.size, capacity=info.capacity, inserts=info.inserts, samples=info.samples,
            min_size=info.min_size, samples_per_insert=info.samples_per_insert, member=self.member,
            item_shape=list(self.image_shape), conditional=self.conditional,
            newest_policy_version=info.newest_policy_version)

    def binding(self) -> ServiceBinding:
        """What :func:`spiral.rpc.server.build_server` needs to serve this servicer."""
        return ServiceBinding(descriptor=replay_pb2.DESCRIPTOR.services_by_name["ReplayBuffer"], servicer=self,
                              add_to_server=replay_pb2_grpc.add_ReplayBufferServicer_to_server)


def _items(batch: RenderBatch) -> list[ReplayItem]:
    """One table item per render; the arrays are copied out of the request's buffer."""
    renders = batch.renders.copy()
    targets = None if batch.targets is None else batch.targets.copy()
    return [ReplayItem(render=renders[i], target=None if targets is None else targets[i],
                       policy_version=int(batch.policy_versions[i]), actor_id=batch.actor_ids[i])
            for i in range(len(batch))]


def _batch(items: list[ReplayItem]) -> RenderBatch:
    targets = None
    if items and items[0].target is not None:
        targets = np.stack([item.target for item in items])  # type: ignore[misc]
    return RenderBatch(renders=np.stack([item.render for item in items]), targets=targets,
                       policy_versions=np.asarray([item.policy_version for item in items], np.int64),
                       actor_ids=tuple(item.actor_id for item in items))
