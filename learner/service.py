"""The policy learner's gRPC face: parameters out, unrolls in, status.

:class:`PolicyLearnerServicer` adapts a :class:`learner.learner.PolicyLearner` to the
``spiral.v1.PolicyLearner`` service. Every received unroll is decoded and validated against
the experiment (:func:`spiral.rpc.messages.decode_unroll`: heads, dtypes, shapes, byte counts,
finite values, action ranges, masks) before it reaches the ingest queue; a bad or far-stale
unroll aborts its stream with INVALID_ARGUMENT or FAILED_PRECONDITION and a message that says
what was wrong (counted in ``spiral_rejected_messages_total``), while every other actor goes on.
A full ingest queue pushes back with RESOURCE_EXHAUSTED after a bounded wait, so actors
slow down instead of the learner running out of memory. A learner that reached its budget
(``learner.max_frames``) refuses unrolls with FAILED_PRECONDITION (``done``), says ``done`` in
``Status`` and still answers ``GetParameters`` and ``GetTrainingState``. A stream that ends
without its summary (cancelled by the actor, or cut by a refusal after some unrolls were queued)
keeps what it queued; those unrolls are counted in ``spiral_learner_unacknowledged_unrolls_total``.
gRPC Python can deliver a cancel as the ordinary end of the stream, a moment before it says
that the call was cancelled; such a stream is answered with a summary nobody reads (OK, its
unrolls not counted as unacknowledged).

``GetTrainingState`` serves the full trainer state (policy weights and Adam state, see
:mod:`spiral.agent.training_state`) to a population member that copies this one. The snapshot
is taken between two updates, under the learner's ``state_lock``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import grpc

from learner.ingest import QueueFull
from learner.learner import LearnerDone, PolicyLearner, PriorUnused, StaleUnroll
from spiral.envs import action_spec_for
from spiral.rpc.errors import PreconditionFailed, check_member, rejects_bad_messages
from spiral.rpc.messages import UnrollExpectation, decode_unroll
from spiral.rpc.publish import ParameterPublisher
from spiral.rpc.server import ServiceBinding
from spiral.rpc.training_state import training_state_chunks
from spiral.runtime import metrics
from spiral.v1 import learner_pb2, learner_pb2_grpc, parameters_pb2

SERVICE = "spiral.v1.PolicyLearner"


class PolicyLearnerServicer(learner_pb2_grpc.PolicyLearnerServicer):
    """Serves one :class:`PolicyLearner` (one population member)."""

    def __init__(self, learner: PolicyLearner, member: int = 0) -> None:
        self.learner = learner
        self.member = member
        self.expect = UnrollExpectation.for_experiment(learner.cfg, action_spec_for(learner.cfg))
        self.publisher = ParameterPublisher(learner.published.latest, member)

    @rejects_bad_messages(SERVICE)
    def GetParameters(self, request: parameters_pb2.GetParametersRequest,
                      context: grpc.ServicerContext) -> Iterator[parameters_pb2.ParameterChunk]:
        yield from self.publisher.stream(request)

    @rejects_bad_messages(SERVICE)
    def SubmitUnrolls(self, request_iterator: Iterable[learner_pb2.Unroll],
                      context: grpc.ServicerContext) -> learner_pb2.SubmitSummary:
        accepted = 0
        try:
            for msg in request_iterator:
                received = decode_unroll(msg, self.expect)
                check_member(received.member, {self.member}, self.member, "learner")
                self.learner.observe_actor_run(received.unroll.actor_id, received.run_id)
                try:
                    self.learner.submit(received.unroll, timeout=self.learner.cfg.learner.queue_wait_seconds)
                except LearnerDone as exc:
                    raise PreconditionFailed("done", str(exc)) from None
                except StaleUnroll as exc:
                    raise PreconditionFailed("stale_version", str(exc)) from None
                except PriorUnused as exc:
                    raise PreconditionFailed("prior_unused", str(exc)) from None
                except QueueFull as exc:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later")
                accepted += 1
            if not context.is_active():
                # gRPC Python may end a cancelled stream as if the caller had finished it; the
                # caller reads no summary, so none is claimed (the race can still go unseen here).
                context.abort(grpc.StatusCode.CANCELLED, "the caller cancelled the stream")
        except BaseException:
            # The stream ends without a summary, but what it queued stays queued: counted, so
            # that an actor's tally plus this one add up to what the learner received.
            if accepted:
                metrics.LEARNER_UNACKNOWLEDGED_UNROLLS_TOTAL.labels(self.learner.member).inc(accepted)
            raise
        return learner_pb2.SubmitSummary(accepted=accepted, latest_version=self.learner.version)

    @rejects_bad_messages(SERVICE)
    def GetTrainingState(self, request: parameters_pb2.GetTrainingStateRequest,
                         context: grpc.ServicerContext) -> Iterator[parameters_pb2.ParameterChunk]:
        check_member(request.member, {self.member}, self.member, "learner")
        learner = self.learner
        version, tensors = learner.export_training_state()
        yield from training_state_chunks(version, tensors, self.member)

    def Status(self, request: learner_pb2.StatusRequest, context: grpc.ServicerContext) -> learner_pb2.LearnerStatus:
        learner = self.learner
        return learner_pb2.LearnerStatus(
            version=learner.version, updates=learner.updates, frames=learner.frames,
            queue_depth=learner.queue.depth, member=self.member,
            hyperparameters={k: float(v) for k, v in learner.hyperparameters.items()},
            discriminator_version=learner.discriminator_version, done=learner.run_done.is_set)

    def binding(self) -> ServiceBinding:
        return ServiceBinding(descriptor=learner_pb2.DESCRIPTOR.services_by_name["PolicyLearner"],
                              servicer=self, add_to_server=learner_pb2_grpc.add_PolicyLearnerServicer_to_server)
