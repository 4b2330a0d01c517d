"""A policy learner's side of population-based training: report fitness, follow directives.

Every ``pbt.report_every_updates`` updates, between two updates, the learner measures its
fitness and reports it with its update count and hyperparameters to the PBT controller.
The controller answers with a :class:`~spiral.v1.pbt_pb2.Directive`:

* CONTINUE: train on, with the directive's hyperparameters (the controller owns them; its
  first answer hands a new member its sampled starting values);
* EXPLOIT: become a copy of the donor member. The learner fetches the donor learner's
  training state (policy weights and Adam state, ``GetTrainingState``), tells its own
  discriminator to copy the donor's discriminator (``LoadFrom``), and queues the copy with the
  explored hyperparameters; :class:`~learner.learner.PolicyLearner` applies it before its
  next update (never in the middle of one) and raises its parameter version, so its actors
  pick the copied weights up.

Fitness (higher is better):

* conditional runs: minus the mean L2 reconstruction error on a fixed held-out batch
  (``dataset.holdout`` images, the same seed every time), the number the task is about;
* unconditional runs: the mean score that the member's current discriminator gives the final
  canvases of its latest batch. Its weakness: each member's critic is its own, so scores of
  different members are on different scales and drift as the critics train; prefer a
  conditional task, or a fixed reference critic, when comparing members matters.

A controller that is down only delays the next report: training never waits for it.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Callable

import grpc
import numpy as np
import torch

from learner.learner import ExploitRequest, PolicyLearner
from spiral.config import ExperimentConfig
from spiral.evaluation import reconstruct
from spiral.nets import images_to_tensor
from spiral.rpc.client import make_channel
from spiral.rpc.training_state import fetch_training_state
from spiral.v1 import discriminator_pb2, discriminator_pb2_grpc, pbt_pb2, pbt_pb2_grpc

log = logging.getLogger(__name__)

FITNESS_SEED = 12345
"""Seed of the held-out evaluation, the same at every report so members are compared fairly."""


def conditional_fitness(cfg: ExperimentConfig, holdout: np.ndarray) -> Callable[[PolicyLearner], float]:
    """Minus the mean held-out reconstruction error of the learner's current policy."""

    def fitness(learner: PolicyLearner) -> float:
        policy = learner.policy
        try:
            return -reconstruct(cfg, policy, holdout, seed=FITNESS_SEED).mean_l2
        finally:
            policy.train()

    return fitness


@torch.no_grad()
def critic_fitness(learner: PolicyLearner) -> float:
    """Mean critic score of the latest batch's final canvases (see the module docstring's caveat)."""
    canvases = learner.last_final_canvases
    if canvases is None or learner.critic_version == 0:
        return 0.0
    scores = learner.critic(images_to_tensor(canvases).to(learner.device))
    return float(scores.mean())


class PopulationMember:
    """Connects one :class:`PolicyLearner` to the PBT controller (called from its training loop)."""

    def __init__(self, learner: PolicyLearner, member: int, pbt_address: str, fitness: Callable[[PolicyLearner], float],
                 report_timeout: float = 10.0) -> None:
        cfg = learner.cfg
        self.learner = learner
        self.member = member
        self.fitness = fitness
        self.every = cfg.pbt.report_every_updates
        self.report_timeout = report_timeout
        self.channel = make_channel(pbt_address, cfg.services)
        self.stub = pbt_pb2_grpc.PBTControllerStub(self.channel)
        self.discriminator_channel = make_channel(cfg.services.discriminator_address, cfg.services)
        self.discriminator = discriminator_pb2_grpc.DiscriminatorLearnerStub(self.discriminator_channel)
        self._next_report = 0
        self.exploits = 0
        self.last_fitness = math.nan

    def close(self) -> None:
        self.channel.close()
        self.discriminator_channel.close()

    def maybe_report(self, stop: threading.Event | None = None) -> None:
        """Report if due (first at update 0, so the member starts with its sampled hyperparameters)."""
        if self.learner.updates < self._next_report or (stop is not None and stop.is_set()):
            return
        learner = self.learner
        self.last_fitness = float(self.fitness(learner))
        report = pbt_pb2.FitnessReport(member=self.member, policy_version=learner.version, updates=learner.updates,
                                       fitness=self.last_fitness if math.isfinite(self.last_fitness) else -1e9,
                                       hyperparameters=learner.hyperparameters)
        try:
            directive = self.stub.Report(report, timeout=self.report_timeout)
        except grpc.RpcError as error:
            log.warning("PBT controller unreachable (%s); training on, next try in 5 updates", error.code().name)
            self._next_report = learner.updates + min(5, self.every)
            return
        self._next_report = learner.updates + self.every
        self.apply(directive)

    def apply(self, directive: pbt_pb2.Directive) -> None:
        """Follow a directive (the copy itself is applied by the learner before its next update)."""
        hyperparameters = {k: float(v) for k, v in directive.hyperparameters.items()}
        if directive.action != pbt_pb2.Directive.EXPLOIT:
            if hyperparameters and hyperparameters != self.learner.hyperparameters:
                self.learner.request_exploit(ExploitRequest(training_state=None, hyperparameters=hyperparameters))
            return
        services = self.learner.cfg.services
        try:
            donor = fetch_training_state(directive.donor_learner_address, services, "learner", directive.donor_member)
        except Exception as exc:  # noqa: BLE001 - a donor that went away: keep training as we are
            log.warning("could not copy member %d from %s: %s", directive.donor_member,
                        directive.donor_learner_address, exc)
            return
        try:
            self.discriminator.LoadFrom(discriminator_pb2.LoadFromRequest(
                donor_address=directive.donor_discriminator_address, donor_member=directive.donor_member,
                member=self.member), timeout=60)
        except grpc.RpcError as error:
            log.warning("own discriminator could not copy member %d's: %s %s", directive.donor_member,
                        error.code().name, error.details())
        self.learner.request_exploit(ExploitRequest(training_state=dict(donor.tensors),
                                                    hyperparameters=hyperparameters))
        self.exploits += 1
        log.info("exploit: copying member %d (version %d, fitness rank %s) with hyperparameters %s",
                 directive.donor_member, donor.version, directive.reason, hyperparameters)
