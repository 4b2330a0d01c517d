"""``spiral learner``: the policy learner as a service process.

Serves ``spiral.v1.PolicyLearner`` on ``--listen``, pulls discriminator parameters from
``services.discriminator_address`` to score episodes, trains on a background thread, writes
checkpoints, samples, ``learner.jsonl`` and TensorBoard event files (``tensorboard/``) under
``--run-dir``, and on SIGTERM stops taking calls, finishes in-flight ones, writes a last
checkpoint and closes the event file. A restarted learner resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import threading

from learner.learner import PolicyLearner
from learner.population import PopulationMember, fitness_for
from learner.service import PolicyLearnerServicer
from spiral.config import ExperimentConfig
from spiral.data import for_experiment
from spiral.rpc.peers import RemoteParameterSource
from spiral.rpc.server import build_server
from spiral.service_options import add_service_arguments, resolve_service_options
from spiral.service_runtime import ProgressLog, start_process

log = logging.getLogger(__name__)


def make_population_member(learner: PolicyLearner, member: int, cfg: ExperimentConfig) -> PopulationMember | None:
    """The PBT side of this learner when the experiment trains a population (else None)."""
    if cfg.pbt.population_size <= 1:
        return None
    holdout = for_experiment(cfg).holdout if cfg.pbt.fitness_kind(cfg.env.conditional) == "reconstruction" else None
    fitness = fitness_for(cfg, holdout)
    log.info("population member %d of %d; reporting to %s every %d updates", member, cfg.pbt.population_size,
             cfg.services.pbt_address, cfg.pbt.report_every_updates)
    return PopulationMember(learner, member, cfg.services.pbt_address, fitness)


def register(parser: argparse.ArgumentParser) -> None:
    add_service_arguments(parser)
    parser.add_argument("--device", default="cpu", help="torch device for updates (cpu, cuda, cuda:1)")


def run(args: argparse.Namespace) -> int:
    opts = resolve_service_options("learner", args)
    cfg = opts.config
    start_process(opts, retain_memory=True)
    # Short deadlines: a discriminator that is down must not stall policy updates (they go on
    # scoring with the critic they have, or with the reconstruction term alone).
    critic_source = RemoteParameterSource(cfg.services.discriminator_address, cfg.services, "discriminator",
                                          member=opts.member, call_timeout=10.0, unavailable_retry_seconds=0.2)
    learner = PolicyLearner(cfg, opts.run_dir, member=opts.member, critic_source=critic_source, device=args.device)
    population = make_population_member(learner, opts.member, cfg)
    servicer = PolicyLearnerServicer(learner, member=opts.member)
    server = build_server([servicer.binding()], opts.listen, cfg.services)
    server.start()
    log.info("policy learner serving on %s at version %d", server.address, learner.version)

    stop = threading.Event()

    def train() -> None:
        progress = ProgressLog("learner updates")
        while not stop.is_set():
            if population is not None:
                population.maybe_report(stop)
            stats = learner.step(timeout=0.5)
            if stats is not None:
                progress.maybe_log(learner.updates, version=learner.version, frames=learner.frames,
                                   reward=stats.get("mean_reward", float("nan")),
                                   l2=stats.get("reconstruction_l2", float("nan")),
                                   critic=learner.critic_version)

    trainer = threading.Thread(target=train, name="learner-train", daemon=True)
    trainer.start()

    def stopping() -> None:
        stop.set()
        trainer.join(timeout=60)

    server.serve_until_signal(on_stopping=stopping, on_stopped=learner.checkpoint)
    learner.close()  # flush the TensorBoard event file
    critic_source.close()
    if population is not None:
        population.close()
    log.info("policy learner stopped at version %d (checkpoint written)", learner.version)
    return 0
