"""The discriminator learner's gRPC face: versioned discriminator parameters and status.

The policy learner polls ``GetParameters`` to score its episodes with the newest discriminator; the
answer is one "up to date" chunk when it already holds that version. A policy learner that
reached its budget keeps asking with ``requester_done`` set: the discriminator notes its member
(:meth:`DiscriminatorLearner.note_learner_done`) and stops training once every member it serves
is done.

Population-based training:

* ``GetTrainingState`` serves the discriminator's weights and Adam state (see
  :mod:`spiral.agent.training_state`), taken between two updates under its ``state_lock``.
* ``LoadFrom`` makes this discriminator a copy of a donor: it fetches the donor's training
  state (``GetTrainingState`` on ``donor_address`` for ``donor_member``), hands it to
  :meth:`DiscriminatorLearner.request_copy`, which applies it at the start of the next update
  step, and waits up to ``copy_wait_seconds`` for that. The reply's ``applied`` says whether
  the copy already took effect (then ``version`` is the version it was published as); when
  it did not within the wait (the update loop is busy or not running), the copy stays
  pending and is still applied before the next update, so no update after the reply ever
  starts from the old discriminator, unless a newer ``LoadFrom`` replaces it.

  Errors: an empty ``donor_address`` or a negative ``donor_member`` is ``INVALID_ARGUMENT``;
  a donor that cannot be reached (down, too slow) is ``UNAVAILABLE``; a wrong ``member`` (the
  one rule of :func:`spiral.rpc.errors.check_member`), a donor that refuses, or a state that
  does not fit this discriminator is ``FAILED_PRECONDITION``.

A population discriminator (``pbt.shared_discriminator``: member 0's discriminator scores
every member's episodes) answers ``GetParameters`` for every member of the population
(``serves``) and still refuses members outside it. ``GetTrainingState`` stays its own member's.
It never copies a donor: ``LoadFrom`` is ``FAILED_PRECONDITION`` (``shared``), since replacing
the one discriminator would change every member's reward, not only the exploiting member's.
"""

from __future__ import annotations

import logging
from typing import Collection, Iterator

import grpc

from discriminator.learner import DiscriminatorLearner
from spiral.rpc.errors import InvalidMessage, PreconditionFailed, check_member, describe_members, rejects_bad_messages
from spiral.rpc.peers import PeerError, PeerRejected, PeerUnavailable
from spiral.rpc.publish import ParameterPublisher
from spiral.rpc.server import ServiceBinding
from spiral.rpc.training_state import fetch_training_state, training_state_chunks
from spiral.v1 import discriminator_pb2, discriminator_pb2_grpc, parameters_pb2

SERVICE = "spiral.v1.DiscriminatorLearner"
log = logging.getLogger(__name__)


class DiscriminatorLearnerServicer(discriminator_pb2_grpc.DiscriminatorLearnerServicer):
    """Serves one :class:`DiscriminatorLearner` (one population member).

    Args:
        learner: The discriminator learner.
        member: Its population member.
        donor_timeout: Deadline of fetching a donor's training state in ``LoadFrom``, seconds
            (also bounded by the caller's own deadline).
        copy_wait_seconds: How long ``LoadFrom`` waits for the copy to be applied (0: reply at once).
        serves: Members whose ``GetParameters`` it answers (default: ``member`` alone; a shared
            discriminator: the whole population, :meth:`spiral.config.PBTConfig.served_members`).
    """

    def __init__(self, learner: DiscriminatorLearner, member: int = 0, *, donor_timeout: float = 30.0,
                 copy_wait_seconds: float = 30.0, serves: Collection[int] | None = None) -> None:
        self.learner = learner
        self.member = member
        self.serves = frozenset(serves) if serves is not None else frozenset({member})
        self.shared = self.serves != {member}
        self.publisher = ParameterPublisher(learner.published.latest, member, serves=self.serves)
        self.donor_timeout = float(donor_timeout)
        self.copy_wait_seconds = float(copy_wait_seconds)

    @rejects_bad_messages(SERVICE)
    def GetParameters(self, request: parameters_pb2.GetParametersRequest,
                      context: grpc.ServicerContext) -> Iterator[parameters_pb2.ParameterChunk]:
        if request.requester_done:
            check_member(request.member, self.serves, self.member, "discriminator")
            self.learner.note_learner_done(request.member)
        yield from self.publisher.stream(request)

    @rejects_bad_messages(SERVICE)
    def GetTrainingState(self, request: parameters_pb2.GetTrainingStateRequest,
                         context: grpc.ServicerContext) -> Iterator[parameters_pb2.ParameterChunk]:
        check_member(request.member, {self.member}, self.member, "discriminator")
        learner = self.learner
        version, tensors = learner.export_training_state()
        yield from training_state_chunks(version, tensors, self.member)

    @rejects_bad_messages(SERVICE)
    def LoadFrom(self, request: discriminator_pb2.LoadFromRequest,
                 context: grpc.ServicerContext) -> discriminator_pb2.LoadFromReply:
        if self.shared:
            raise PreconditionFailed("shared", f"this discriminator is shared by members "
                                               f"{describe_members(self.serves)} and copies no donor "
                                               f"(an exploit copies the policy only)")
        check_member(request.member, {self.member}, self.member, "discriminator")
        if not request.donor_address:
            raise InvalidMessage("missing_field", "donor_address: must name the donor discriminator (host:port)")
        if request.donor_member < 0:
            raise InvalidMessage("donor_member", f"donor_member must be >= 0, got {request.donor_member}")
        timeout = self.donor_timeout
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.1, min(timeout, remaining - 0.5))
        donor = f"donor discriminator member {request.donor_member} at {request.donor_address}"
        try:
            update = fetch_training_state(request.donor_address, self.learner.cfg.services, "discriminator",
                                          request.donor_member, timeout=timeout)
        except PeerUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach {donor}: {exc}")
        except PeerRejected as exc:
            raise PreconditionFailed("donor_refused", f"{donor} refused GetTrainingState: {exc}") from None
        except (PeerError, ValueError) as exc:
            raise PreconditionFailed("donor_failed", f"cannot fetch the training state of {donor}: {exc}") from None
        try:
            pending = self.learner.request_copy(update.tensors, donor_version=update.version)
        except ValueError as exc:
            raise PreconditionFailed("donor_incompatible", f"{donor}: {exc}") from None
        log.info("member %d: copying %s (version %d)", self.member, donor, update.version)
        wait = self.copy_wait_seconds
        if remaining is not None:
            wait = max(0.0, min(wait, context.time_remaining() - 0.5))
        if wait > 0:
            pending.done.wait(wait)
        return discriminator_pb2.LoadFromReply(donor_version=update.version, applied=pending.applied,
                                               version=pending.version if pending.applied else 0)

    def Status(self, request: discriminator_pb2.DiscriminatorStatusRequest,
               context: grpc.ServicerContext) -> discriminator_pb2.DiscriminatorStatus:
        learner = self.learner
        dl = learner.cfg.discriminator_learner
        return discriminator_pb2.DiscriminatorStatus(
            version=learner.version, updates=learner.updates, member=self.member,
            wasserstein_estimate=float(learner.last_stats.get("wasserstein", 0.0)),
            samples_consumed=learner.samples_consumed,
            hyperparameters={"learning_rate": dl.learning_rate, "gradient_penalty": dl.gradient_penalty})

    def binding(self) -> ServiceBinding:
        return ServiceBinding(descriptor=discriminator_pb2.DESCRIPTOR.services_by_name["DiscriminatorLearner"],
                              servicer=self,
                              add_to_server=discriminator_pb2_grpc.add_DiscriminatorLearnerServicer_to_server)
