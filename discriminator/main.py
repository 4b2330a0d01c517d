"""``spiral discriminator``: the WGAN-GP discriminator learner as a service process.

Real images come from the experiment's dataset (prepared into the local cache on first use),
fake ones from the replay buffer at ``services.replay_address``. Serves
``spiral.v1.DiscriminatorLearner`` on ``--listen``; trains on a background thread while the
replay buffer can serve batches (and waits, retrying, while it cannot or is down); checkpoints
under ``--run-dir/discriminator`` (TensorBoard event files under ``--run-dir/tensorboard``) and
resumes from the latest on start.
"""

from __future__ import annotations

import argparse
import logging
import threading

from discriminator.learner import DiscriminatorLearner
from discriminator.service import DiscriminatorLearnerServicer
from spiral.data import for_experiment
from spiral.rpc.peers import PeerError, RemoteRenderSampler
from spiral.rpc.server import build_server
from spiral.service_options import add_service_arguments, resolve_service_options
from spiral.service_runtime import ProgressLog, start_process

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    add_service_arguments(parser)
    parser.add_argument("--device", default="cpu", help="torch device for updates (cpu, cuda, cuda:1)")


def run(args: argparse.Namespace) -> int:
    opts = resolve_service_options("discriminator", args)
    cfg = opts.config
    start_process(opts)
    dataset = for_experiment(cfg)
    # Sample as this member: a member's replay buffer refuses another member's requests.
    sampler = RemoteRenderSampler(cfg.services.replay_address, cfg.services, member=opts.member)
    learner = DiscriminatorLearner(cfg, opts.run_dir, dataset.images, sampler, member=opts.member,
                                   device=args.device, seed=cfg.seed + 1000 * opts.member)
    serves = cfg.pbt.served_members(opts.member)
    servicer = DiscriminatorLearnerServicer(learner, member=opts.member, serves=serves)
    if len(serves) > 1:
        log.info("population discriminator: scoring for members %s", sorted(serves))
    server = build_server([servicer.binding()], opts.listen, cfg.services)
    server.start()
    log.info("discriminator serving on %s at version %d (%d real images of %s)", server.address,
             learner.version, len(dataset.images), dataset.name)

    stop = threading.Event()

    def train() -> None:
        progress = ProgressLog("discriminator updates")
        failures = 0
        while not stop.is_set():
            try:
                stats = learner.step()
                failures = 0
            except PeerError as exc:  # a replay buffer that is down or restarting must not stop us
                failures += 1
                delay = min(5.0, 0.2 * 2 ** min(failures, 5))
                log.warning("could not sample from the replay buffer (%s); retrying in %.1f s", exc, delay)
                stop.wait(delay)
                continue
            if stats is None:
                stop.wait(0.2)
                continue
            progress.maybe_log(learner.updates, version=learner.version,
                               wasserstein=stats.get("wasserstein", float("nan")))

    trainer = threading.Thread(target=train, name="discriminator-train", daemon=True)
    trainer.start()

    def stopping() -> None:
        stop.set()
        trainer.join(timeout=60)

    server.serve_until_signal(on_stopping=stopping, on_stopped=learner.checkpoint)
    learner.close()  # flush the TensorBoard event file
    sampler.close()
    log.info("discriminator stopped at version %d (checkpoint written)", learner.version)
    return 0
