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
  pick the copied weights up. With a population discriminator (``pbt.shared_discriminator``:
  every member scores with member 0's discriminator) there is no discriminator of the member's own,
  so the copy is skipped and logged (:func:`discriminator_copy_skipped`); the controller's
  lineage line says ``"discriminator": "shared"``.

Fitness (higher is better; ``pbt.fitness``, ``auto`` by default):

* ``reconstruction`` (``auto`` in conditional runs): minus the sampled held-out L2 of the
  learner's newest held-out evaluation (:mod:`learner.evaluation`: ``learner.eval_episodes`` of
  the ``dataset.holdout`` images, seed ``learner.eval_seed`` every time, every
  ``learner.eval_every_updates`` updates), the number the task is about. The member does not
  measure it again: a report carries the newest evaluation, which may be one evaluation
  (``eval_every_updates``) older than the weights it reports. Before the first evaluation has
  finished there is none, and the member reports ``nan``, which goes to the controller as
  :data:`MISSING_FITNESS`: until its first evaluation a member ranks below every member that
  has one (members without one tie);
* ``critic`` (``auto`` in unconditional runs; the setting keeps its name): the mean score a
  discriminator gives the final canvases of the member's latest batch. With
  ``pbt.reference_critic`` (a discriminator checkpoint) every member is scored by that one
  frozen discriminator: comparable across members and over time, but only as good as that
  discriminator, and a policy may learn to please it. Without one, each member's own current
  discriminator is used, and that is weak: members' discriminators have their own scales and
  drift as they train, so rankings are noisy; prefer a conditional task or a reference
  discriminator when comparing members matters.

A controller that is down only delays the next report: training never waits for it.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from pathlib import Path
from typing import Callable

import torch

from learner.learner import PolicyLearner
from spiral.agent.training_state import DISCRIMINATOR_STATE_NAME
from spiral.runtime.checkpoint import latest_checkpoint, load_checkpoint
from spiral.config import ExperimentConfig, ServicesConfig
from spiral.nets import build_discriminator, images_to_tensor
from spiral.rpc.peers import PeerError, RemotePBTController
from spiral.rpc.training_state import fetch_training_state, request_discriminator_copy
from spiral.v1 import pbt_pb2

log = logging.getLogger(__name__)

MISSING_FITNESS = -1e9
"""The fitness reported while there is none (no held-out evaluation finished yet, or not finite)."""


def heldout_fitness(learner: PolicyLearner) -> float:
    """Minus the sampled held-out L2 of the learner's newest held-out evaluation (``nan`` before the first)."""
    report = learner.evaluator.latest
    fitness = None if report is None else report.fitness
    return math.nan if fitness is None else fitness


@torch.no_grad()
def discriminator_fitness(learner: PolicyLearner) -> float:
    """Mean score the member's own discriminator gives its latest batch's final canvases (see the caveat)."""
    canvases = learner.last_final_canvases
    if canvases is None or learner.discriminator_version == 0:
        return 0.0
    scores = learner.discriminator(images_to_tensor(canvases).to(learner.device))
    return float(scores.mean())


def load_reference_discriminator(cfg: ExperimentConfig, path: str | Path) -> torch.nn.Module:
    """A frozen discriminator from a discriminator checkpoint file, or the newest one in a directory.

    Raises:
        ValueError: naming ``pbt.reference_critic`` when nothing loadable is there or the
            weights do not fit the experiment's discriminator.
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"pbt.reference_critic: no discriminator checkpoint in {path}")
        state = found[1]
    else:
        try:
            state = load_checkpoint(path)[1]
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise ValueError(f"pbt.reference_critic: cannot read {path}: {exc}") from exc
    discriminator = build_discriminator(cfg)
    try:
        discriminator.load_state_dict(state["trainer"][DISCRIMINATOR_STATE_NAME])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ValueError(f"pbt.reference_critic: {path} is not a discriminator checkpoint of this "
                         f"experiment: {exc}") from exc
    return discriminator.eval().requires_grad_(False)


def reference_discriminator_fitness(discriminator: torch.nn.Module) -> Callable[[PolicyLearner], float]:
    """Mean score a fixed reference discriminator gives the member's latest final canvases.

    Every member is scored by the same frozen network, so the numbers are comparable across
    members and over time (unlike :func:`discriminator_fitness`); the reference is only as good as
    the discriminator it was trained as, and a policy can overfit to it over long runs.
    """

    @torch.no_grad()
    def fitness(learner: PolicyLearner) -> float:
        canvases = learner.last_final_canvases
        if canvases is None:
            return 0.0
        discriminator.to(learner.device)
        return float(discriminator(images_to_tensor(canvases).to(learner.device)).mean())

    return fitness


def fitness_for(cfg: ExperimentConfig) -> Callable[[PolicyLearner], float]:
    """The fitness function ``cfg.pbt`` asks for."""
    if cfg.pbt.fitness_kind(cfg.env.conditional) == "reconstruction":
        return heldout_fitness
    if cfg.pbt.reference_critic:
        return reference_discriminator_fitness(load_reference_discriminator(cfg, cfg.pbt.reference_critic))
    return discriminator_fitness


def discriminator_copy_skipped(cfg: ExperimentConfig, directive: pbt_pb2.Directive) -> str | None:
    """Why an exploit must not ask this member's discriminator to copy the donor's (None: copy it).

    Skipped with a population discriminator (``pbt.shared_discriminator``: one discriminator serves
    every member, and copying into it would change every member's reward), and whenever the
    donor's discriminator is this member's own (the same address: a copy into itself).
    """
    if cfg.pbt.shared_discriminator and cfg.pbt.population_size > 1:
        return "the population shares one discriminator"
    if directive.donor_discriminator_address and \
            directive.donor_discriminator_address == cfg.services.discriminator_address:
        return f"the donor's discriminator is this member's own ({directive.donor_discriminator_address})"
    return None


class PopulationMember:
    """Connects one :class:`PolicyLearner` to the PBT controller (called from its training loop)."""

    def __init__(self, learner: PolicyLearner, member: int, pbt_address: str,
                 fitness: Callable[[PolicyLearner], float]) -> None:
        cfg = learner.cfg
        self.learner = learner
        self.member = member
        self.fitness = fitness
        self.every = cfg.pbt.report_every_updates
        self.controller = RemotePBTController(pbt_address, cfg.services,
                                              call_timeout=cfg.services.call_timeout_seconds)
        self.copy_discriminator: Callable[[str, int], object] = functools.partial(
            self._request_discriminator_copy, cfg.services.discriminator_address, cfg.services)
        """``(donor_address, donor_member)``: tell this member's discriminator to copy the donor's."""
        self._next_report = 0
        self._failed_donor: int | None = None
        self.exploits = 0
        self.failed_exploits = 0
        self.discriminator_copies_skipped = 0
        self.last_fitness = math.nan

    def _request_discriminator_copy(self, address: str, services: ServicesConfig, donor_address: str,
                                    donor_member: int) -> object:
        return request_discriminator_copy(address, services, donor_address, donor_member, member=self.member,
                                          timeout=services.copy_timeout_seconds)

    def close(self) -> None:
        self.controller.close()

    def maybe_report(self, stop: threading.Event | None = None) -> None:
        """Report if due (first at update 0, so the member starts with its sampled hyperparameters)."""
        if self.learner.updates < self._next_report or (stop is not None and stop.is_set()):
            return
        learner = self.learner
        self.last_fitness = float(self.fitness(learner))
        try:
            directive = self.controller.report(
                self.member, updates=learner.updates, policy_version=learner.version,
                fitness=self.last_fitness if math.isfinite(self.last_fitness) else MISSING_FITNESS,
                hyperparameters=learner.hyperparameters, failed_donor=self._failed_donor)
        except PeerError as error:
            log.warning("PBT controller: %s; training on, next try in 5 updates", error)
            self._next_report = learner.updates + min(5, self.every)
            return
        self._next_report = learner.updates + self.every
        self._failed_donor = None  # the controller has heard of it
        self.apply(directive)

    def _exploit_failed(self, directive: pbt_pb2.Directive, why: str) -> None:
        log.warning("could not copy member %d from %s: %s; keeping this member's weights and "
                    "hyperparameters and telling the controller at the next update", directive.donor_member,
                    directive.donor_learner_address, why)
        self._failed_donor = int(directive.donor_member)
        self.failed_exploits += 1
        self._next_report = self.learner.updates  # say so at once, not M updates later

    def apply(self, directive: pbt_pb2.Directive) -> None:
        """Follow a directive (the copy itself is applied by the learner before its next update).

        An exploit copies the donor's training state if the donor still holds at least the
        ``donor_version`` the controller ranked and the state fits this member's policy;
        otherwise (unreachable, gone back to an older checkpoint, another architecture) it
        keeps this member's state and reports the failure at once. Only once the policy copy
        is accepted is this member's discriminator told to copy the donor's.
        """
        hyperparameters = {k: float(v) for k, v in directive.hyperparameters.items()}
        if directive.action != pbt_pb2.Directive.EXPLOIT:
            if hyperparameters and hyperparameters != self.learner.hyperparameters:
                try:
                    self.learner.request_copy(None, hyperparameters=hyperparameters)
                except ValueError as exc:
                    log.warning("keeping this member's hyperparameters: the controller's %s are refused: %s",
                                hyperparameters, exc)
            return
        services = self.learner.cfg.services
        try:
            donor = fetch_training_state(directive.donor_learner_address, services, "learner", directive.donor_member,
                                         timeout=services.copy_timeout_seconds)
        except Exception as exc:  # noqa: BLE001 - a donor that went away: keep training as we are
            self._exploit_failed(directive, str(exc))
            return
        if donor.version < directive.donor_version:
            # The donor went back (it restarted from an older checkpoint): these are not the
            # weights the controller ranked, so do not copy them.
            self._exploit_failed(directive, f"the donor is at version {donor.version}, older than the version "
                                            f"{directive.donor_version} the controller ranked")
            return
        try:
            self.learner.request_copy(donor.tensors, donor_version=donor.version, hyperparameters=hyperparameters)
        except ValueError as exc:
            self._exploit_failed(directive, str(exc))
            return
        skipped = discriminator_copy_skipped(self.learner.cfg, directive)
        if skipped is not None:
            self.discriminator_copies_skipped += 1
            log.info("exploit of member %d: not copying a discriminator (%s); policy, Adam state and "
                     "hyperparameters only", directive.donor_member, skipped)
        else:
            try:
                self.copy_discriminator(directive.donor_discriminator_address, int(directive.donor_member))
            except PeerError as error:
                log.warning("own discriminator could not copy member %d's: %s", directive.donor_member, error)
        self.exploits += 1
        log.info("exploit: copying member %d (version %d, fitness rank %s) with hyperparameters %s",
                 directive.donor_member, donor.version, directive.reason, hyperparameters)
