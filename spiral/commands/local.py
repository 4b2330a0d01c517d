"""``spiral local``: the whole training system in one process, on the same components, no gRPC.

Like MonoBeast's single process or Sample Factory's ``--serial_mode``: actors, the policy
learner, the discriminator learner and the replay table are the very classes the services wrap
(:class:`actor.actor.Actor`, :class:`learner.learner.PolicyLearner`,
:class:`discriminator.learner.DiscriminatorLearner`, :class:`replaybuffer.table.ReplayTable`),
wired through the :mod:`spiral.core` interfaces in memory instead of over
:mod:`spiral.rpc.peers`. Each actor's parameters come from the learner's published snapshot
(with the same refresh period and version lag as a remote actor), its unrolls go to the
learner's ingest queue and its final renders into the table, which the discriminator samples.

One iteration of :meth:`LocalSystem.step` is serial, on one thread: every actor plays one
batched episode, the learner updates while a batch is queued, and the discriminator updates as
often as the table's ``replay.samples_per_insert`` allows (once per iteration when it is 0,
unlimited). That makes a run deterministic for a seed and easy to step through in a debugger;
it is also the no-gRPC baseline of ``bench/env_throughput.py``.

``spiral local --config tiny --minutes 5`` writes the same run directory as ``spiral up``
(``config.yaml`` and ``overrides.yaml``, checkpoints, samples, ``learner.jsonl``, TensorBoard;
``local/code_version.json``, the code it ran),
takes the same ``--set FIELD=VALUE``, ``--seed N`` and ``--frames N``, runs under a
:class:`~spiral.runtime.guarded_loop.GuardedLoop` and resumes from its checkpoints when started again.
With a budget (``--frames N``, ``learner.max_frames``) it ends by itself, with status 0, once
the learner and the discriminator are done (a run started again after that ends at once).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from actor.actor import Actor, ActorPeers
from discriminator.learner import DiscriminatorLearner
from learner.learner import PolicyLearner
from replaybuffer.table import LocalRenders, ReplayTable
from spiral.agent.acting import EpisodeRunner
from spiral.commands.overrides import add_budget_argument, add_override_arguments, override_items
from spiral.config import ExperimentConfig, experiment_path, resolve_experiment
from spiral.data import for_experiment
from spiral.envs import make_env
from spiral.runtime.code_version import write_code_record
from spiral.runtime.guarded_loop import GuardedLoop
from spiral.nets import build_policy
from spiral.runtime.run_config import record_run_config
from spiral.runtime.seeding import actor_seed, discriminator_seed, replay_seed
from spiral.runtime.service_options import add_device_argument, device_problem
from spiral.runtime.service_runtime import ProgressLog

log = logging.getLogger(__name__)


class LocalSystem:
    """One member's actors, learner, discriminator and replay table in this process.

    Args:
        cfg: The experiment.
        run_dir: Where checkpoints, samples and logs go (the layout of ``spiral up``).
        num_actors: Actors, each with ``cfg.actor.num_envs`` environments.
        device: Torch device of both learners.
        stop: Set to end :meth:`run` (and any wait of the actors).
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, num_actors: int = 1, device: str = "cpu",
                 stop: threading.Event | None = None) -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.stop = stop or threading.Event()
        dataset = for_experiment(cfg)
        rc = cfg.replay
        self.table = ReplayTable(rc.capacity, rc.min_size, rc.samples_per_insert, seed=replay_seed(cfg.seed, 0))
        self.renders = LocalRenders(self.table)
        self.discriminator = DiscriminatorLearner(cfg, self.run_dir, dataset.images, self.renders, device=device,
                                                  seed=discriminator_seed(cfg.seed, 0))
        self.learner = PolicyLearner(cfg, self.run_dir, discriminator_source=self.discriminator.published, device=device)
        targets = dataset.images if cfg.env.conditional else None
        self.actors: list[Actor] = []
        for index in range(num_actors):
            actor_id = f"local-{index}"
            seed = actor_seed(cfg.seed, actor_id)
            runner = EpisodeRunner(cfg, make_env(cfg, cfg.actor.num_envs, seed=seed), build_policy(cfg), targets,
                                   seed=seed, actor_id=actor_id)
            peers = ActorPeers(parameters=self.learner, unrolls=self.learner, renders=self.renders,
                               learner_done=lambda: self.learner.run_done.is_set)
            self.actors.append(Actor(runner, peers, 0, actor_id, self.stop, cfg.actor.parameter_refresh_seconds))

    @property
    def done(self) -> bool:
        """Whether the learner reached its budget and the discriminator has stopped after it."""
        return self.learner.run_done.is_set and self.discriminator.run_done.is_set

    @property
    def frames(self) -> int:
        """Environment steps taken by every actor."""
        return sum(actor.stats.env_steps for actor in self.actors)

    def step(self) -> None:
        """One serial iteration: an episode per actor, then the updates it makes possible."""
        for actor in self.actors:
            actor.act_once()
        while (self.learner.queue.depth >= self.cfg.learner.batch_size and not self.stop.is_set()
               and not self.learner.run_done.is_set):
            self.learner.step(timeout=0)
        if self.learner.run_done.is_set:
            self.discriminator.note_learner_done(0)
        if self.cfg.replay.samples_per_insert > 0:
            while self.discriminator.step() is not None and not self.stop.is_set():
                pass
        else:
            self.discriminator.step()

    def run(self, stop: threading.Event, beat: Callable[[], None] = lambda: None) -> None:
        """The loop ``spiral local`` runs (under a :class:`GuardedLoop`): :meth:`step` until ``stop``."""
        progress = ProgressLog("local system frames")
        while not stop.is_set():
            beat()
            if self.done:
                stop.wait(0.5)
                continue
            self.step()
            stats = self.learner.last_stats
            progress.maybe_log(self.frames, updates=self.learner.updates, critic=self.discriminator.version,
                               reward=stats.get("mean_reward", float("nan")),
                               l2=stats.get("reconstruction_l2", float("nan")))

    def checkpoint(self) -> None:
        self.learner.checkpoint()
        self.discriminator.checkpoint()

    def close(self) -> None:
        for actor in self.actors:
            actor.runner.env.close()
        self.learner.close()
        self.discriminator.close()


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="experiment YAML or name under experiments/ (default: tiny)")
    add_override_arguments(parser)
    parser.add_argument("--run-dir", help="run directory (default: RUNS_DIR/NAME)")
    parser.add_argument("--name", help="run name (default: the experiment's name)")
    parser.add_argument("--runs-dir", default="runs", help="parent directory of runs (default: runs)")
    parser.add_argument("--actors", type=int, default=1, help="actors, each with actor.num_envs environments")
    parser.add_argument("--minutes", type=float, default=0.0, help="stop after this many minutes (0: until Ctrl-C)")
    parser.add_argument("--updates", type=int, default=0, help="stop after this many learner updates (0: no limit)")
    add_budget_argument(parser)
    add_device_argument(parser, "policy and discriminator learners (actors act on the CPU)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=os.environ.get("SPIRAL_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s local %(levelname)s %(name)s: %(message)s")
    if args.actors < 1:
        print(f"spiral local: --actors must be >= 1, got {args.actors}", file=sys.stderr)
        return 2
    device, problem = device_problem(args)
    if problem:
        print(f"spiral local: {problem}", file=sys.stderr)
        return 2
    try:
        experiment = resolve_experiment(experiment_path(args.config), override_items(args))
        cfg = experiment.config
        run_dir = Path(args.run_dir) if args.run_dir else Path(args.runs_dir) / (args.name or cfg.name)
        record_run_config(run_dir, experiment)
        write_code_record(run_dir / "local")  # the code this run directory was trained with
    except (OSError, ValueError) as exc:  # ConfigError and run_config.RunConfigMismatch are ValueErrors
        print(f"spiral local: {exc}", file=sys.stderr)
        return 2
    if cfg.run.artifact_uri:
        log.warning("spiral local sends no artifacts (run.artifact_uri %s is used by spiral up's services and in "
                    "Kubernetes); everything stays in %s", cfg.run.artifact_uri, run_dir)
    guard = GuardedLoop("local", "local system loop", max(cfg.learner.stall_seconds, cfg.actor.stall_seconds),
                        linger_seconds=0)
    system = LocalSystem(cfg, run_dir, args.actors, device=device, stop=guard.stop_event)
    log.info("one process: %d actor(s) x %d environments, learner and discriminator at versions %d / %d; "
             "writing %s", args.actors, cfg.actor.num_envs, system.learner.version, system.discriminator.version,
             run_dir)

    def handle(signum: int, _frame: object) -> None:
        log.info("received %s: stopping after this iteration", signal.Signals(signum).name)
        guard.exit_requested.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    deadline = time.monotonic() + 60 * args.minutes if args.minutes > 0 else float("inf")
    start_updates = system.learner.updates
    guard.start(system.run)
    while not guard.exit_requested.wait(0.5):
        if time.monotonic() >= deadline or (args.updates and system.learner.updates - start_updates >= args.updates):
            break
        if system.done:
            log.info("done: %s", system.learner.run_done.reason)
            break
    guard.stop(timeout=600)
    guard.unless_failed(system.checkpoint)()
    system.close()
    log.info("stopped: %d frames, learner version %d, discriminator version %d%s", system.frames,
             system.learner.version, system.discriminator.version,
             f" (the loop failed: {guard.failure})" if guard.failure else "")
    return guard.exit_code
