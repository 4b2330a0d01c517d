"""Refusing bad messages: typed errors, their gRPC status codes, and the rejection metric.

Every service validates what it receives before acting on it. A check that fails raises one
of two exceptions, each carrying a short machine-readable ``reason`` (a metric label such as
``dtype``, ``shape``, ``nonfinite``, ``stale_version``) and a ``detail`` sentence that names
the offending field:

* :class:`InvalidMessage`: the message itself is wrong (malformed tensor, unknown action
  head, NaN, ...). Answered with ``INVALID_ARGUMENT``: resending it will never work.
* :class:`PreconditionFailed`: the message is well formed but does not fit the server's
  state (a trajectory from a far-stale policy version, a request for another population
  member). Answered with ``FAILED_PRECONDITION``: the sender must change something first.

:func:`reject` counts the refusal in ``spiral_rejected_messages_total{service, reason}``
and aborts the call with the status and ``"reason: detail"`` as its message;
:func:`rejects_bad_messages` does that for every such exception a servicer method raises,
so one bad caller never disturbs the others.

Example::

    class ReplayBufferServicer(replay_pb2_grpc.ReplayBufferServicer):
        @rejects_bad_messages("spiral.v1.ReplayBuffer")
        def Sample(self, request, context):
            if request.batch_size < 1:
                raise InvalidMessage("batch_size", f"batch_size must be >= 1, got {request.batch_size}")
            ...
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Iterable, NoReturn, TypeVar

import grpc

from spiral.runtime import metrics

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

RATE_LIMITED_PREFIX = "rate_limited"
"""Start of the details of the DEADLINE_EXCEEDED answer a rate-limited service (the replay
buffer's Sample) gives when it held a request back: "not yet", as opposed to a broken peer."""


class RejectedMessage(ValueError):
    """A received message was refused; ``code`` is the gRPC status to answer with.

    Attributes:
        reason: Short label naming the kind of problem (used as a metric label).
        detail: Human-readable sentence naming the field and what was wrong with it.
    """

    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidMessage(RejectedMessage):
    """The message is malformed (answered with ``INVALID_ARGUMENT``)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class PreconditionFailed(RejectedMessage):
    """The message is well formed but does not fit the server's state (``FAILED_PRECONDITION``)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def check_member(member: int, serves: Iterable[int], own: int, what: str) -> None:
    """The one wrong-member rule of every service: a request for a member ``what`` does not serve
    is a failed precondition (reason ``wrong_member``), whatever the method.

    Args:
        member: The member the request is for.
        serves: The members this server answers for (its own, or a shared server's population).
        own: This server's own member.
        what: What the server is, for the message ("learner", "replay buffer", ...).
    """
    serves = frozenset(serves)
    if member in serves:
        return
    if serves == {own}:
        raise PreconditionFailed("wrong_member", f"member: this {what} serves member {own}, "
                                                 f"the request is for member {member}")
    raise PreconditionFailed("wrong_member", f"member: this {what} is shared by members {describe_members(serves)}, "
                                             f"the request is for member {member}")


def reject(context: grpc.ServicerContext, service: str, error: RejectedMessage) -> NoReturn:
    """Count ``error`` and abort the call with its status code and message."""
    metrics.REJECTED_MESSAGES_TOTAL.labels(service, error.reason).inc()
    log.info("%s refused a message from %s: %s", service, context.peer(), error)
    context.abort(error.code, str(error))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def rejects_bad_messages(service: str) -> Callable[[F], F]:
    """Decorate a servicer method so that a :class:`RejectedMessage` it raises aborts the call.

    Works for unary and streaming-response (generator) methods alike; ``service`` is the
    ``service`` label of the rejection metric (the full gRPC service name).
    """

    def decorate(method: F) -> F:
        if inspect.isgeneratorfunction(method):
            @functools.wraps(method)
            def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    yield from method(self, request, context)
                except RejectedMessage as error:
                    reject(context, service, error)
            return streaming  # type: ignore[return-value]

        @functools.wraps(method)
        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return method(self, request, context)
            except RejectedMessage as error:
                reject(context, service, error)
        return unary  # type: ignore[return-value]

    return decorate


def describe_members(members: Iterable[int]) -> str:
    """``{0, 1, 2, 3}`` -> ``"0-3"``; other sets as a sorted list (``"0, 2"``)."""
    ordered = sorted(members)
    if len(ordered) > 1 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ", ".join(str(m) for m in ordered)
