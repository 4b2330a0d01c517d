"""``spiral.v1.PBTController`` over gRPC: reports in, directives out; actor assignments; status.

A thin layer over :class:`pbt_controller.controller.Controller`: it converts messages, and
refusals (:class:`~spiral.rpc.InvalidMessage` -> INVALID_ARGUMENT, e.g. an out-of-range member,
a NaN fitness or an unknown hyperparameter name; :class:`~spiral.rpc.PreconditionFailed` ->
FAILED_PRECONDITION, e.g. no member addresses known yet) are counted and answered by
:func:`spiral.rpc.rejects_bad_messages`.

What a learner does with a :class:`Directive` (``Report`` answer):

* always: train with ``directive.hyperparameters`` from the next update on (the first answer
  hands the member its sampled initial values);
* ``CONTINUE``: nothing else;
* ``EXPLOIT``: between two updates, copy member ``donor_member``'s policy weights, optimizer
  state and discriminator weights (at least version ``donor_version``), keep its own update
  counter, and bump its own parameter version so its actors fetch the copied weights. With a
  population discriminator (``pbt.shared_discriminator``) the directive leaves
  ``donor_discriminator_address`` empty and the learner copies no discriminator.
"""

from __future__ import annotations

import grpc

from pbt_controller import decision as pbt
from pbt_controller.controller import Controller
from spiral.rpc import rejects_bad_messages
from spiral.rpc.server import ServiceBinding
from spiral.v1 import pbt_pb2, pbt_pb2_grpc

SERVICE = "spiral.v1.PBTController"

_ACTIONS = {pbt.CONTINUE: pbt_pb2.Directive.CONTINUE, pbt.EXPLOIT: pbt_pb2.Directive.EXPLOIT}


class PBTControllerServicer(pbt_pb2_grpc.PBTControllerServicer):
    """Serves one :class:`Controller`."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    @rejects_bad_messages(SERVICE)
    def Report(self, request: pbt_pb2.FitnessReport, context: grpc.ServicerContext) -> pbt_pb2.Directive:
        outcome = self.controller.report(member=request.member, updates=request.updates,
                                         policy_version=request.policy_version, fitness=request.fitness,
                                         hyperparameters=dict(request.hyperparameters),
                                         failed_donor=request.failed_donor if request.exploit_failed else None)
        decided = outcome.decision
        directive = pbt_pb2.Directive(action=_ACTIONS[decided.action],
                                      donor_member=decided.donor if decided.donor is not None else 0,
                                      donor_version=outcome.donor_version, hyperparameters=decided.hyperparameters,
                                      reason=decided.reason)
        if decided.donor is not None:
            donor = self.controller.discovery.members().get(decided.donor)
            if donor is not None:
                directive.donor_learner_address = donor.learner_address
                if not self.controller.shared_discriminator:
                    directive.donor_discriminator_address = donor.discriminator_address
        return directive

    @rejects_bad_messages(SERVICE)
    def AssignActor(self, request: pbt_pb2.AssignRequest, context: grpc.ServicerContext) -> pbt_pb2.Assignment:
        addresses = self.controller.assign(request.actor_id, request.previous_member)
        return pbt_pb2.Assignment(member=addresses.member, learner_address=addresses.learner_address,
                                  discriminator_address=addresses.discriminator_address,
                                  replay_address=addresses.replay_address)

    @rejects_bad_messages(SERVICE)
    def Population(self, request: pbt_pb2.PopulationRequest,
                   context: grpc.ServicerContext) -> pbt_pb2.PopulationStatus:
        return pbt_pb2.PopulationStatus(members=[
            pbt_pb2.MemberStatus(member=s.record.member, fitness=s.record.fitness if s.record.reported else 0.0,
                                 policy_version=s.record.policy_version, updates=s.record.updates,
                                 hyperparameters=s.record.hyperparameters, actors=s.actors,
                                 exploits=s.record.exploits, reported=s.record.reported)
            for s in self.controller.population()])

    def binding(self) -> ServiceBinding:
        """What :func:`spiral.rpc.server.build_server` needs to serve this servicer."""
        return ServiceBinding(descriptor=pbt_pb2.DESCRIPTOR.services_by_name["PBTController"], servicer=self,
                              add_to_server=pbt_pb2_grpc.add_PBTControllerServicer_to_server)
