"""The discriminator learner's gRPC face: versioned critic parameters and status.

The policy learner polls ``GetParameters`` to score its episodes with the newest critic; the
answer is one "up to date" chunk when it already holds that version.
"""

from __future__ import annotations

from typing import Iterator

import grpc

from discriminator.learner import DiscriminatorLearner
from spiral.rpc.errors import rejects_bad_messages
from spiral.rpc.publish import ParameterPublisher
from spiral.rpc.server import ServiceBinding
from spiral.v1 import discriminator_pb2, discriminator_pb2_grpc, parameters_pb2

SERVICE = "spiral.v1.DiscriminatorLearner"


class DiscriminatorLearnerServicer(discriminator_pb2_grpc.DiscriminatorLearnerServicer):
    """Serves one :class:`DiscriminatorLearner` (one population member)."""

    def __init__(self, learner: DiscriminatorLearner, member: int = 0) -> None:
        self.learner = learner
        self.member = member
        self.publisher = ParameterPublisher(learner.published.latest, member)

    @rejects_bad_messages(SERVICE)
    def GetParameters(self, request: parameters_pb2.GetParametersRequest,
                      context: grpc.ServicerContext) -> Iterator[parameters_pb2.ParameterChunk]:
        yield from self.publisher.stream(request)

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
