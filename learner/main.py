"""``spiral learner``: the policy learner as a service process.

Serves ``spiral.v1.PolicyLearner`` on ``--listen``, pulls discriminator parameters from
``services.discriminator_address`` to score episodes, runs :meth:`PolicyLearner.run` on a
thread under a :class:`~spiral.runtime.guarded_loop.GuardedLoop` (if it raises or stalls, health goes
NOT_SERVING and the process exits 1 without checkpointing the failed state), writes
checkpoints, samples, ``learner.jsonl`` and TensorBoard event files (``tensorboard/``) under
``--run-dir``, and on SIGTERM stops taking calls, finishes in-flight ones, writes a last
checkpoint and closes the event file. A restarted learner resumes from its latest checkpoint.

Once it reaches its budget (``learner.max_frames``) it stays up, serving its last parameters,
says ``done`` in ``/healthz``, ``Status`` and ``spiral_run_done``, and tells its discriminator
every second (``GetParameters`` with ``requester_done``), so that one that restarts learns it too.
"""

from __future__ import annotations

import argparse
import logging

from learner.learner import PolicyLearner
from learner.population import PopulationMember, fitness_for
from learner.service import PolicyLearnerServicer
from spiral.config import ExperimentConfig
from spiral.core import PeerFailure
from spiral.runtime.budget import RunDone
from spiral.runtime.guarded_loop import GuardedLoop
from spiral.rpc.contract import declare_process_contract
from spiral.rpc.peers import RemoteParameterSource
from spiral.rpc.server import build_server
from spiral.runtime.service_options import add_device_argument, add_service_arguments, resolve_device, \
    resolve_service_options
from spiral.runtime.service_artifacts import start_service_artifacts
from spiral.runtime.service_runtime import start_process

log = logging.getLogger(__name__)


def make_population_member(learner: PolicyLearner, member: int, cfg: ExperimentConfig) -> PopulationMember | None:
    """The PBT side of this learner when the experiment trains a population (else None)."""
    if cfg.pbt.population_size <= 1:
        return None
    fitness = fitness_for(cfg)
    log.info("population member %d of %d; reporting to %s every %d updates", member, cfg.pbt.population_size,
             cfg.services.pbt_address, cfg.pbt.report_every_updates)
    return PopulationMember(learner, member, cfg.services.pbt_address, fitness)


def register(parser: argparse.ArgumentParser) -> None:
    add_service_arguments(parser)
    add_device_argument(parser, "policy updates")


def run(args: argparse.Namespace) -> int:
    opts = resolve_service_options("learner", args)
    device = resolve_device("learner", args)  # a GPU asked for and missing stops the process here
    cfg = opts.config
    declare_process_contract(cfg)  # peers of another experiment are refused, and refuse this one
    guard = GuardedLoop("learner", "policy learner updates", cfg.learner.stall_seconds,
                        linger_seconds=cfg.services.failure_linger_seconds)
    run_done = RunDone(opts.member, "policy learner")
    start_process(opts, retain_memory=True, health=run_done.health(guard.check))
    # Short deadlines: a discriminator that is down must not stall policy updates (they go on
    # scoring with the discriminator they have, or with the reconstruction term alone).
    discriminator_source = RemoteParameterSource(cfg.services.discriminator_address, cfg.services, "discriminator",
                                                 member=opts.member, call_timeout=cfg.services.call_timeout_seconds,
                                                 unavailable_retry_seconds=0.2)
    artifacts = start_service_artifacts(opts)  # restores an empty run directory from run.artifact_uri
    learner = PolicyLearner(cfg, opts.run_dir, member=opts.member, discriminator_source=discriminator_source,
                            device=device, run_done=run_done)

    def tell_discriminator_done() -> None:
        try:
            discriminator_source.report_done(learner.discriminator_version)
        except PeerFailure as exc:  # it learns on a later call: this one says so every second
            log.debug("could not tell the discriminator that this learner is done: %s", exc)

    population = make_population_member(learner, opts.member, cfg)
    servicer = PolicyLearnerServicer(learner, member=opts.member)
    server = build_server([servicer.binding()], opts.listen, cfg.services)
    server.start()
    log.info("policy learner serving on %s at version %d", server.address, learner.version)

    guard.on_failure(lambda _reason: server.mark_not_serving())
    guard.start(lambda stop, beat: learner.run(stop, beat, population.maybe_report if population else None,
                                               while_done=tell_discriminator_done))
    server.serve_until_signal(grace=cfg.services.shutdown_grace_seconds, stop_event=guard.exit_requested,
                              on_stopping=guard.stop, on_stopped=guard.unless_failed(learner.checkpoint))
    learner.close()  # flush the TensorBoard event file
    if artifacts is not None:  # the last checkpoint and records, within run.artifact_flush_seconds
        artifacts.close(cfg.run.artifact_flush_seconds)
    discriminator_source.close()
    if population is not None:
        population.close()
    if guard.failure is None:
        log.info("policy learner stopped at version %d (checkpoint written)", learner.version)
    return guard.exit_code
