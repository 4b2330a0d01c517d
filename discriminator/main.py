"""``spiral discriminator``: the WGAN-GP discriminator learner as a service process.

Real images come from the experiment's dataset (prepared into the local cache on first use),
fake ones from the replay buffer at ``services.replay_address``. Serves
``spiral.v1.DiscriminatorLearner`` on ``--listen``; runs :meth:`DiscriminatorLearner.run` on a
thread under a :class:`~spiral.runtime.guarded_loop.GuardedLoop` (it updates while the replay buffer can
serve batches and waits, retrying, while it cannot or is down; if it raises or stalls, health
goes NOT_SERVING and the process exits 1 without checkpointing the failed state); checkpoints
under ``--run-dir/discriminator`` (TensorBoard event files under ``--run-dir/tensorboard``) and
resumes from the latest on start. Once every policy learner it scores for is done
(``learner.max_frames``) it writes a final checkpoint, stops training and says ``done`` in
``/healthz`` and ``spiral_run_done``, but stays up serving its last parameters.
"""

from __future__ import annotations

import argparse
import logging

from discriminator.learner import DiscriminatorLearner
from discriminator.service import DiscriminatorLearnerServicer
from spiral.data import for_experiment
from spiral.runtime.budget import RunDone
from spiral.runtime.guarded_loop import GuardedLoop
from spiral.rpc.contract import declare_process_contract
from spiral.rpc.peers import RemoteRenderSampler
from spiral.rpc.server import build_server
from spiral.runtime.seeding import discriminator_seed
from spiral.runtime.service_options import add_device_argument, add_service_arguments, resolve_device, \
    resolve_service_options
from spiral.runtime.service_artifacts import start_service_artifacts
from spiral.runtime.service_runtime import start_process

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    add_service_arguments(parser)
    add_device_argument(parser, "discriminator updates")


def run(args: argparse.Namespace) -> int:
    opts = resolve_service_options("discriminator", args)
    device = resolve_device("discriminator", args)  # a GPU asked for and missing stops the process here
    cfg = opts.config
    declare_process_contract(cfg)  # peers of another experiment are refused, and refuse this one
    guard = GuardedLoop("discriminator", "discriminator updates", cfg.discriminator_learner.stall_seconds,
                        linger_seconds=cfg.services.failure_linger_seconds)
    run_done = RunDone(opts.member, "discriminator")
    start_process(opts, health=run_done.health(guard.check))
    artifacts = start_service_artifacts(opts)  # restores an empty run directory from run.artifact_uri
    dataset = for_experiment(cfg)
    # Sample as this member: a member's replay buffer refuses another member's requests.
    sampler = RemoteRenderSampler(cfg.services.replay_address, cfg.services, member=opts.member)
    serves = cfg.pbt.served_members(opts.member)
    learner = DiscriminatorLearner(cfg, opts.run_dir, dataset.images, sampler, member=opts.member,
                                   device=device, seed=discriminator_seed(cfg.seed, opts.member), serves=serves,
                                   run_done=run_done)
    servicer = DiscriminatorLearnerServicer(learner, member=opts.member, serves=serves)
    if len(serves) > 1:
        log.info("population discriminator: scoring for members %s", sorted(serves))
    server = build_server([servicer.binding()], opts.listen, cfg.services)
    server.start()
    log.info("discriminator serving on %s at version %d (%d real images of %s)", server.address,
             learner.version, len(dataset.images), dataset.name)

    guard.on_failure(lambda _reason: server.mark_not_serving())
    guard.start(learner.run)
    server.serve_until_signal(grace=cfg.services.shutdown_grace_seconds, stop_event=guard.exit_requested,
                              on_stopping=guard.stop, on_stopped=guard.unless_failed(learner.checkpoint))
    learner.close()  # flush the TensorBoard event file
    if artifacts is not None:  # the last checkpoint and records, within run.artifact_flush_seconds
        artifacts.close(cfg.run.artifact_flush_seconds)
    sampler.close()
    if guard.failure is None:
        log.info("discriminator stopped at version %d (checkpoint written)", learner.version)
    return guard.exit_code
