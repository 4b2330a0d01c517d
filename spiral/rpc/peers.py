"""Remote peers: the :mod:`spiral.core` interfaces implemented over gRPC.

An actor or a learner talks to its peers through small interfaces (``fetch``, ``submit``,
``insert``, ``sample``) and cannot tell a peer in the same process
(the learners themselves, :class:`replaybuffer.table.LocalRenders`) from one
across the network (the classes here). Each class owns one channel to one address:

* :class:`RemoteParameterSource`: ``GetParameters`` of a policy learner or a discriminator
  learner; ``fetch(have_version)`` returns a :class:`~spiral.nets.params.ParameterSnapshot`
  when the server's version differs from ``have_version`` (newer, or lower after the server
  restarted from an older checkpoint) and None when the caller is current.
  A policy learner that reached its budget tells its discriminator so with
  :meth:`RemoteParameterSource.report_done`.
* :class:`RemoteUnrollSink`: ``SubmitUnrolls`` (client stream) of the policy learner.
* :class:`RemoteLearnerStatus`: ``Status`` of the policy learner (an actor asks whether its
  learner is done).
* :class:`RemoteRenderSink`: ``Insert`` (client stream) of the replay buffer.
* :class:`RemoteRenderSampler`: ``Sample`` of the replay buffer; None while the buffer's rate
  limiter does not allow a batch (too few items, or the samples-per-insert ratio reached).
* :class:`RemotePBTController`: ``Report`` (a learner's fitness, answered with a directive)
  and ``AssignActor`` (which member an actor serves) of the PBT controller.

Failure policy: each method makes one call with a deadline. A peer that is briefly
unreachable (``UNAVAILABLE``: starting, restarting, connection reset) is retried with backoff
and jitter for at most ``unavailable_retry_seconds``; anything longer is the caller's business
(the actor loop decides whether to drop or retry), so no method blocks longer than about
``call_timeout + unavailable_retry_seconds``. The PBT controller is the exception: its callers ask
it on their own schedule and carry on without it, so its calls are made once, not retried.
Failures are raised as:

* :class:`PeerRejected` (``INVALID_ARGUMENT``, ``FAILED_PRECONDITION``, or ``RESOURCE_EXHAUSTED``
  from gRPC's message-size limit): the message was refused; resending it will not help. ``error.stale`` is True for ``FAILED_PRECONDITION``
  (e.g. a far-stale policy version), telling an actor to refetch parameters first.
* :class:`PeerUnavailable`: down, overloaded (``RESOURCE_EXHAUSTED``) or too slow
  (``DEADLINE_EXCEEDED``); worth retrying later.
* :class:`PeerError`: any other status (a bug on one side).

Example (actor)::

    learner = RemoteUnrollSink(cfg.services.learner_address, cfg.services, spec.names)
    try:
        learner.submit(unroll)
    except PeerRejected as error:
        if error.stale:
            params = source.fetch(-1)
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable, Literal, Mapping, Sequence, TypeVar

import grpc
import numpy as np

from spiral.config import ServicesConfig
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.rpc.client import RetryError, RetryPolicy, call_with_retry, make_channel
from spiral.rpc.errors import RATE_LIMITED_PREFIX, InvalidMessage
from spiral.rpc.messages import ImageShape, decode_sample_response, encode_insert_request, encode_unroll
from spiral.rpc.parameters import fetch_parameters
from spiral.core import PeerFailure, Refused, Unavailable
from spiral.agent.trajectory import Unroll
from spiral.v1 import (discriminator_pb2_grpc, learner_pb2, learner_pb2_grpc, pbt_pb2, pbt_pb2_grpc, replay_pb2,
                       replay_pb2_grpc)

log = logging.getLogger(__name__)
T = TypeVar("T")

_REFUSAL_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION})
_BUSY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                         grpc.StatusCode.CANCELLED})


class PeerError(PeerFailure):
    """A call to a peer failed.

    Attributes:
        code: The gRPC status code (None when the call never got one, e.g. it was stopped).
        details: The peer's (or the transport's) message.
        address: The peer called.
        method: The method called.
    """

    def __init__(self, address: str, method: str, code: grpc.StatusCode | None, details: str) -> None:
        name = code.name if code is not None else "NO_STATUS"
        super().__init__(f"{method} on {address} failed with {name}: {details}")
        self.address = address
        self.method = method
        self.code = code
        self.details = details


class PeerRejected(PeerError, Refused):
    """The message was refused: INVALID_ARGUMENT, FAILED_PRECONDITION, or too large for gRPC's limit."""

    @property
    def stale(self) -> bool:
        """True for FAILED_PRECONDITION: well formed but out of date (refetch parameters)."""
        return self.code == grpc.StatusCode.FAILED_PRECONDITION


class PeerUnavailable(PeerError, Unavailable):
    """The peer is down, busy or too slow right now; retry later with backoff."""


def _error_from(address: str, method: str, error: BaseException) -> PeerError:
    if isinstance(error, RetryError):
        last = error.last_error
        code = last.code() if last is not None and hasattr(last, "code") else None
        details = last.details() if last is not None and hasattr(last, "details") else str(error)
        return PeerUnavailable(address, method, code, f"{details} ({error})")
    code = error.code() if hasattr(error, "code") else None  # type: ignore[union-attr]
    details = (error.details() if hasattr(error, "details") else str(error)) or ""  # type: ignore[union-attr]
    if code in _REFUSAL_CODES:
        return PeerRejected(address, method, code, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own size limit (this side's or the peer's): resending the same message never works.
        return PeerRejected(address, method, code, details)
    if code in _BUSY_CODES:
        return PeerUnavailable(address, method, code, details)
    return PeerError(address, method, code, details)


class _EitherEvent:
    """Set when either event is: a client's own close, or its owner's stop (what a retry waits on)."""

    def __init__(self, first: threading.Event, second: threading.Event) -> None:
        self._events = (first, second)

    def is_set(self) -> bool:
        return any(event.is_set() for event in self._events)

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.is_set():
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            self._events[0].wait(min(remaining, 0.05))
        return True


class _Peer:
    """One channel to one address, and the one retry policy every call gets.

    A call is retried with backoff and jitter while it fails with one of ``retry_codes``
    (default: UNAVAILABLE only), for at most ``call_timeout + retry_seconds`` in all; ``stop``
    (the owner's shutdown) or :meth:`close` ends the retrying at once.
    """

    def __init__(self, address: str, services_cfg: ServicesConfig, call_timeout: float,
                 unavailable_retry_seconds: float, server_name: str | None,
                 retry_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE}),
                 retry_labels: tuple[str, str] | None = None, stop: threading.Event | None = None) -> None:
        if not address:
            raise ValueError("peer address is empty")
        self.address = address
        self.channel = make_channel(address, services_cfg, server_name=server_name)
        self.call_timeout = float(call_timeout)
        self.unavailable_retry_seconds = float(unavailable_retry_seconds)
        self.retry_codes = retry_codes
        self.retry_labels = retry_labels
        self._policy = RetryPolicy(initial_backoff=0.05, max_backoff=0.5, call_timeout=self.call_timeout,
                                   retry_codes=retry_codes)
        self._closed = threading.Event()
        self._stop: threading.Event | _EitherEvent = self._closed if stop is None else _EitherEvent(self._closed, stop)

    def _call(self, method: str, attempt: Callable[[float], T], timeout: float | None = None) -> T:
        """Run ``attempt(timeout)``; retry :attr:`retry_codes` briefly; raise a :class:`PeerError`."""
        if self._closed.is_set():
            raise PeerError(self.address, method, None, "this client was closed")
        policy = self._policy if timeout is None else RetryPolicy(
            initial_backoff=0.05, max_backoff=0.5, call_timeout=timeout, retry_codes=self.retry_codes)
        # The first attempt always runs; retries only within the short window.
        deadline = policy.call_timeout + self.unavailable_retry_seconds
        try:
            return call_with_retry(attempt, policy=policy, deadline_seconds=deadline,
                                   stop=self._stop,  # type: ignore[arg-type]
                                   retry_labels=self.retry_labels, description=f"{method} on {self.address}")
        except (grpc.RpcError, RetryError) as error:
            raise _error_from(self.address, method, error) from None

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled and later calls raise PeerError."""
        self._closed.set()
        self.channel.close()

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class RemoteParameterSource(_Peer):
    """A :class:`spiral.core.ParameterSource` served by a learner's ``GetParameters``.

    Args:
        address: ``host:port`` of the policy learner or discriminator learner.
        services_cfg: Message limit and TLS files.
        kind: ``"learner"`` (``spiral.v1.PolicyLearner``) or ``"discriminator"``
            (``spiral.v1.DiscriminatorLearner``).
        member: Population member whose parameters are wanted.
        call_timeout: Deadline of one fetch (the whole chunk stream), seconds.
        unavailable_retry_seconds: How long an UNAVAILABLE peer is retried within one fetch.
        server_name: Name to verify in the server's TLS certificate instead of the host.
        retry: ``retry_codes`` (retried status codes, default UNAVAILABLE), ``retry_labels``
            (``(member, peer)`` of ``spiral_actor_rpc_retries_total``) and ``stop`` (an event
            that ends retrying), as :class:`_Peer` takes them.
    """

    def __init__(self, address: str, services_cfg: ServicesConfig, kind: Literal["learner", "discriminator"],
                 member: int = 0, *, call_timeout: float = 30.0, unavailable_retry_seconds: float = 2.0,
                 server_name: str | None = None, **retry: Any) -> None:
        if kind not in ("learner", "discriminator"):
            raise ValueError(f"kind must be 'learner' or 'discriminator', got {kind!r}")
        super().__init__(address, services_cfg, call_timeout, unavailable_retry_seconds, server_name, **retry)
        self.kind = kind
        self.member = int(member)
        stub_class = learner_pb2_grpc.PolicyLearnerStub if kind == "learner" else \
            discriminator_pb2_grpc.DiscriminatorLearnerStub
        self._stub = stub_class(self.channel)

    def fetch(self, have_version: int) -> ParameterSnapshot | None:
        """The server's parameters unless the caller already holds its version.

        Returns:
            A snapshot when the server's version differs from ``have_version`` (pass -1 to
            always get one), None when the caller is current.

        Raises:
            PeerUnavailable / PeerRejected / PeerError: The call failed (see the module doc).
            PeerError: The server sent an inconsistent chunk stream.
        """
        return self._fetch(have_version, requester_done=False)

    def report_done(self, have_version: int) -> ParameterSnapshot | None:
        """:meth:`fetch`, saying that the caller (a policy learner) reached its budget: its
        discriminator stops training once every member it serves has said so.

        Raises:
            PeerUnavailable / PeerRejected / PeerError: As :meth:`fetch`.
        """
        return self._fetch(have_version, requester_done=True)

    def _fetch(self, have_version: int, requester_done: bool) -> ParameterSnapshot | None:
        try:
            return self._call("GetParameters", lambda timeout: fetch_parameters(
                self._stub, have_version=int(have_version), member=self.member, timeout=timeout,
                requester_done=requester_done))
        except InvalidMessage as error:
            raise PeerError(self.address, "GetParameters", None, f"malformed parameter stream: {error}") from None


class RemoteLearnerStatus(_Peer):
    """The policy learner's ``Status``: whether it is done (reached ``learner.max_frames``).

    Args:
        address: ``host:port`` of the policy learner.
        services_cfg: Message limit and TLS files.
        call_timeout: Deadline of one call, seconds.
        unavailable_retry_seconds: How long an UNAVAILABLE learner is retried within one call.
        server_name: Name to verify in the server's TLS certificate instead of the host.
        retry: ``retry_codes``, ``retry_labels`` and ``stop``, as :class:`RemoteParameterSource`.
    """

    def __init__(self, address: str, services_cfg: ServicesConfig, *, call_timeout: float = 10.0,
                 unavailable_retry_seconds: float = 2.0, server_name: str | None = None, **retry: Any) -> None:
        super().__init__(address, services_cfg, call_timeout, unavailable_retry_seconds, server_name, **retry)
        self._stub = learner_pb2_grpc.PolicyLearnerStub(self.channel)

    def status(self) -> learner_pb2.LearnerStatus:
        """The learner's progress, hyperparameters and whether it is done.

        Raises:
            PeerUnavailable / PeerError: The call failed.
        """
        return self._call("Status", lambda timeout: self._stub.Status(learner_pb2.StatusRequest(), timeout=timeout))

    def done(self) -> bool:
        """Whether the learner reached its budget and trains no more."""
        return bool(self.status().done)


class RemoteUnrollSink(_Peer):
    """A :class:`spiral.core.UnrollSink` that streams unrolls to a policy learner.

    Args:
        address: ``host:port`` of the policy learner.
        services_cfg: Message limit and TLS files.
        head_names: Action head names in the order of the actions' last axis
            (``ActionSpec.names``); the learner refuses unrolls whose heads differ.
        member: Population member the actor works for.
        run_id: This actor process's incarnation (default: a fresh random id).
        call_timeout: Deadline of one submit, seconds.
        unavailable_retry_seconds: How long an UNAVAILABLE learner is retried within one submit.
        server_name: Name to verify in the server's TLS certificate instead of the host.
        retry: ``retry_codes``, ``retry_labels`` and ``stop``, as :class:`RemoteParameterSource`.
    """

    def __init__(self, address: str, services_cfg: ServicesConfig, head_names: Sequence[str], member: int = 0,
                 run_id: str | None = None, *, call_timeout: float = 30.0, unavailable_retry_seconds: float = 2.0,
                 server_name: str | None = None, **retry: Any) -> None:
        super().__init__(address, services_cfg, call_timeout, unavailable_retry_seconds, server_name, **retry)
        self.head_names = tuple(head_names)
        self.member = int(member)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._stub = learner_pb2_grpc.PolicyLearnerStub(self.channel)
        self.last_summary: learner_pb2.SubmitSummary | None = None

    def submit(self, unroll: Unroll) -> int:
        """Send one unroll on a client stream and wait for the learner's summary.

        Returns:
            The learner's ``latest_version`` (how far behind the actor acts); the whole
            :class:`~spiral.v1.learner_pb2.SubmitSummary` is kept in :attr:`last_summary`.

        Raises:
            PeerRejected: INVALID_ARGUMENT (malformed) or FAILED_PRECONDITION (``stale``: the
                policy version is too old; refetch parameters), with the learner's reason.
            PeerUnavailable: The learner is down, its queue is full, or the call timed out.
        """
        message = encode_unroll(unroll, self.head_names, run_id=self.run_id, member=self.member)
        summary = self._call("SubmitUnrolls",
                             lambda timeout: self._stub.SubmitUnrolls(iter((message,)), timeout=timeout))
        self.last_summary = summary
        return int(summary.latest_version)


class RemoteRenderSink(_Peer):
    """A :class:`spiral.core.RenderSink` that inserts final renders into a replay buffer.

    Args:
        address: ``host:port`` of the replay buffer.
        services_cfg: Message limit and TLS files.
        member: Population member (the buffer refuses another member's renders).
        call_timeout: Deadline of one insert, seconds.
        unavailable_retry_seconds: How long an UNAVAILABLE buffer is retried within one insert.
        server_name: Name to verify in the server's TLS certificate instead of the host.
        retry: ``retry_codes``, ``retry_labels`` and ``stop``, as :class:`RemoteParameterSource`.
    """

    def __init__(self, address: str, services_cfg: ServicesConfig, member: int = 0, *, call_timeout: float = 10.0,
                 unavailable_retry_seconds: float = 1.0, server_name: str | None = None, **retry: Any) -> None:
        super().__init__(address, services_cfg, call_timeout, unavailable_retry_seconds, server_name, **retry)
        self.member = int(member)
        self._stub = replay_pb2_grpc.ReplayBufferStub(self.channel)

    def insert(self, renders: np.ndarray, targets: np.ndarray | None, policy_version: int, actor_id: str) -> int:
        """Insert ``[B, H, W, C]`` uint8 renders (and their targets in conditional runs).

        Returns:
            The number of items the buffer holds afterwards.

        Raises:
            PeerRejected: Wrong shape, dtype, missing/unexpected targets, wrong member.
            PeerUnavailable: The buffer is down or the call timed out.
        """
        message = encode_insert_request(renders, targets, int(policy_version), actor_id, member=self.member)
        summary = self._call("Insert", lambda timeout: self._stub.Insert(iter((message,)), timeout=timeout))
        return int(summary.size)

    def info(self) -> replay_pb2.InfoResponse:
        """The buffer's size, limits and counters."""
        return self._call("Info", lambda timeout: self._stub.Info(replay_pb2.InfoRequest(), timeout=timeout))


class RemoteRenderSampler(_Peer):
    """Samples batches of renders from a replay buffer (the discriminator's fake examples).

    Args:
        address: ``host:port`` of the replay buffer.
        services_cfg: Message limit and TLS files.
        member: Population member.
        wait_seconds: How long the buffer may hold a sample back for its rate limiter before
            answering "not now" (then :meth:`sample` returns None).
        image_shape: ``(H, W, C)`` the sampled renders must have (None: any).
        call_timeout: Deadline of one sample beyond ``wait_seconds``, seconds.
        unavailable_retry_seconds: How long an UNAVAILABLE buffer is retried within one sample.
        server_name: Name to verify in the server's TLS certificate instead of the host.
    """

    def __init__(self, address: str, services_cfg: ServicesConfig, member: int = 0, *, wait_seconds: float = 1.0,
                 image_shape: ImageShape | None = None, call_timeout: float = 10.0,
                 unavailable_retry_seconds: float = 1.0, server_name: str | None = None) -> None:
        if not wait_seconds >= 0:
            raise ValueError(f"wait_seconds must be >= 0, got {wait_seconds}")
        super().__init__(address, services_cfg, call_timeout, unavailable_retry_seconds, server_name)
        self.member = int(member)
        self.wait_seconds = float(wait_seconds)
        self.image_shape = image_shape
        self._stub = replay_pb2_grpc.ReplayBufferStub(self.channel)

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """A uniformly sampled batch ``(renders, targets)`` (targets None in unconditional runs).

        Returns:
            The batch, or None when the buffer's rate limiter did not allow it within
            ``wait_seconds`` (fewer than ``min_size`` items, or the sample ratio reached).

        Raises:
            PeerRejected: A bad request (e.g. batch_size < 1, wrong member).
            PeerUnavailable: The buffer is down, shutting down, or the call timed out.
            spiral.rpc.errors.InvalidMessage: The answer is malformed.
        """
        request = replay_pb2.SampleRequest(batch_size=int(batch_size), member=self.member,
                                           wait_seconds=self.wait_seconds)
        try:
            response = self._call("Sample", lambda timeout: self._stub.Sample(request, timeout=timeout),
                                  timeout=self.call_timeout + self.wait_seconds)
        except PeerUnavailable as error:
            if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and error.details.startswith(RATE_LIMITED_PREFIX):
                log.debug("replay buffer held the sample back: %s", error.details)
                return None
            raise
        batch = decode_sample_response(response, self.image_shape)
        return np.asarray(batch.renders), None if batch.targets is None else np.asarray(batch.targets)

    def info(self) -> replay_pb2.InfoResponse:
        """The buffer's size, limits and counters."""
        return self._call("Info", lambda timeout: self._stub.Info(replay_pb2.InfoRequest(), timeout=timeout))


class RemotePBTController(_Peer):
    """The PBT controller (``spiral.v1.PBTController``) as a population's learners and actors call it.

    Both callers ask on their own schedule and carry on without an answer: a learner reports
    every ``pbt.report_every_updates`` updates and trains on when the controller is down, an
    actor asks which member to serve every ``pbt.actor_heartbeat_seconds`` and keeps its member
    meanwhile. So by default each call is made once (no status is retried): a controller that
    is down fails it at once with :class:`PeerUnavailable`, and the caller tries again at its
    next turn instead of holding up its training or acting loop.

    Args:
        address: ``host:port`` of the PBT controller.
        services_cfg: Message limit and TLS files.
        call_timeout: Deadline of one call, seconds.
        unavailable_retry_seconds: How long a retried status is retried within one call (only
            with ``retry_codes``).
        server_name: Name to verify in the server's TLS certificate instead of the host.
        retry: ``retry_codes`` (default: none, one attempt), ``retry_labels`` and ``stop``, as
            :class:`RemoteParameterSource`.
    """

    def __init__(self, address: str, services_cfg: ServicesConfig, *, call_timeout: float = 10.0,
                 unavailable_retry_seconds: float = 0.0, server_name: str | None = None,
                 retry_codes: frozenset[grpc.StatusCode] = frozenset(), **retry: Any) -> None:
        super().__init__(address, services_cfg, call_timeout, unavailable_retry_seconds, server_name,
                         retry_codes=retry_codes, **retry)
        self._stub = pbt_pb2_grpc.PBTControllerStub(self.channel)

    def report(self, member: int, *, updates: int, policy_version: int, fitness: float,
               hyperparameters: Mapping[str, float], failed_donor: int | None = None) -> pbt_pb2.Directive:
        """Report a member's fitness; the answer says whether to train on or copy a donor.

        Args:
            member: The reporting member.
            updates: Its updates so far.
            policy_version: Its policy parameter version when the fitness was measured.
            fitness: Higher is better.
            hyperparameters: The hyperparameters it trains with.
            failed_donor: The donor of the last EXPLOIT directive the member could not carry out
                (it kept its own weights and hyperparameters), None when there was none.

        Returns:
            The controller's :class:`~spiral.v1.pbt_pb2.Directive` (CONTINUE or EXPLOIT).

        Raises:
            PeerRejected: The report was refused (e.g. a member outside the population).
            PeerUnavailable / PeerError: The controller is down, too slow, or failed.
        """
        message = pbt_pb2.FitnessReport(member=int(member), updates=int(updates), policy_version=int(policy_version),
                                        fitness=float(fitness), hyperparameters=dict(hyperparameters),
                                        exploit_failed=failed_donor is not None,
                                        failed_donor=0 if failed_donor is None else int(failed_donor))
        return self._call("Report", lambda timeout: self._stub.Report(message, timeout=timeout))

    def assign_actor(self, actor_id: str, previous_member: int | None) -> pbt_pb2.Assignment:
        """Which member ``actor_id`` should serve (asked at start and then as a heartbeat).

        Args:
            actor_id: The asking actor.
            previous_member: The member it served so far (None: none yet), so an assignment
                stays put across heartbeats and restarts.

        Returns:
            The :class:`~spiral.v1.pbt_pb2.Assignment`: the member and its services' addresses.

        Raises:
            PeerRejected: The request was refused (e.g. no member addresses known yet).
            PeerUnavailable / PeerError: The controller is down, too slow, or failed.
        """
        message = pbt_pb2.AssignRequest(actor_id=actor_id,
                                        previous_member=-1 if previous_member is None else int(previous_member))
        return self._call("AssignActor", lambda timeout: self._stub.AssignActor(message, timeout=timeout))
