"""The policy learner, free of networking: ingest, update, publish, checkpoint, draw.

:class:`PolicyLearner` owns the policy, its optimizer (through
:class:`learner.training.PolicyTrainer`), the ingest queue, the published parameters and the
copy of the discriminator that scores episodes. Its loop:

1. take ``batch_size`` episodes from the ingest queue (waiting as long as it must);
2. refresh the discriminator from the discriminator learner if a newer version exists;
3. score the episodes, compute V-trace and update (the discriminator version is recorded);
4. publish the new parameters with version + 1;
5. record the update (:class:`spiral.runtime.recorder.UpdateRecorder`: a JSON-lines row,
   TensorBoard scalars, Prometheus metrics) and every few updates write an atomic checkpoint
   and a sample grid, and hand a snapshot of the weights to the held-out evaluator
   (:class:`learner.evaluation.HeldoutEvaluator`, ``learner.eval_every_updates``), which
   measures it on its own thread.

``submit`` is what the gRPC service (or an in-process actor) calls; it refuses unrolls whose
policy is too far behind (``learner.max_policy_lag`` versions) with :class:`StaleUnroll`.
Hyperparameter changes and weight copies from population-based training are applied between
updates, never during one (:meth:`PolicyLearner.request_copy`, the same as the discriminator's).

**The budget** (``learner.max_frames``, :mod:`spiral.runtime.budget`). The update that brings
the consumed frames to the budget is the last: the learner writes a final checkpoint and sample
grid and is done (:attr:`PolicyLearner.run_done`). It refuses unrolls from then on
(:class:`LearnerDone`), applies no PBT copy, and its loop only idles (calling ``while_done``,
where the service tells its discriminator); its parameters stay published. A learner restored
from a checkpoint whose frames reach the budget is done from the start.
"""

from __future__ import annotations

import collections
import math
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

import torch

from learner.evaluation import HeldoutEvaluator
from learner.ingest import IngestQueue, PriorPool
from learner.training import PolicyTrainer
from spiral.runtime import metrics
from spiral.runtime.checkpoint import latest_checkpoint, save_checkpoint
from spiral.runtime.device import training_device
from spiral.nets.compilation import persist_compile_cache
from spiral.runtime.atomic import atomic_write_bytes
from spiral.config import ExperimentConfig
from spiral.envs import action_spec_for
from spiral.envs.programs import program_from_actions, save_program, to_svg
from spiral.nets import build_discriminator, build_policy
from spiral.nets.params import load_snapshot, snapshot_of
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.runtime.seeding import learner_seed
from spiral.runtime.service_runtime import ProgressLog
from spiral.core import ParameterSource, PublishedParameters, Refused
from spiral.runtime.recorder import UpdateRecorder, due
from spiral.runtime.tracking import open_mirror
from spiral.runtime.budget import RunDone, budget_reached
from spiral.agent.training_state import CopyRequest, CopySlot
from spiral.agent.trajectory import Unroll
from spiral.evaluation.animation import encode_gif, step_frames
from spiral.evaluation.visualize import pair_grid, save_png

log = logging.getLogger(__name__)


def reward_in_band(mean_reward: float, band: tuple[float, float]) -> bool:
    """Whether a batch's mean episode return is finite and inside ``learner.reward.band``."""
    return math.isfinite(mean_reward) and band[0] <= mean_reward <= band[1]


MAX_TRACKED_ACTORS = 10_000
"""Actors whose run id the learner remembers (the oldest seen is forgotten first)."""
DONE_IDLE_SECONDS = 1.0
"""How long an iteration of a done learner's loop waits (it beats and tells its discriminator)."""


class StaleUnroll(Refused):
    """An unroll acted with a policy more than ``max_policy_lag`` versions behind (or ahead)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, stale=True)


class PriorUnused(Refused):
    """Episodes of prior programs sent to a learner that runs no program recovery."""


class LearnerDone(Refused):
    """An unroll sent to a learner that reached its budget (``learner.max_frames``).

    ``stale``, so an actor refetches at once, and on the way learns that its learner is done.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, stale=True)


LOSS_TERMS = ("loss", "pg_loss", "baseline_loss", "entropy_loss")
"""The update's loss terms, exported as ``spiral_learner_loss{term=...}``."""
CHECKPOINT_DISCRIMINATOR_VERSION = "critic_version"
"""The checkpoint key of the discriminator version the last update scored with (its name
from before the discriminator was called that everywhere; old checkpoints carry it too)."""


class PolicyLearner:
    """Pure learner logic around :class:`PolicyTrainer`.

    Args:
        cfg: The experiment.
        run_dir: Where checkpoints (``learner/``), samples (``samples/``), logs and TensorBoard
            event files (``tensorboard/learner[-MEMBER]``) go.
        member: Population member index (metric label).
        discriminator_source: Where discriminator parameters come from (None: reward without
            the discriminator's term).
        device: Torch device for updates (checked to exist here, :func:`~spiral.runtime.device.training_device`).
        run_done: Where it says it is done (default: its own; the service passes the one its
            ``/healthz`` reports).

    Raises:
        spiral.runtime.device.DeviceUnavailable: ``device`` is missing on this machine.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, member: int = 0,
                 discriminator_source: ParameterSource | None = None, device: str | torch.device = "cpu",
                 run_done: RunDone | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "learner"
        self.samples_dir = self.run_dir / "samples"
        self.member = str(member)
        self.device = training_device(device, "learner device")
        with torch.random.fork_rng(devices=[]):  # the experiment's seed picks the initial weights
            torch.manual_seed(learner_seed(cfg.seed, member))
            self.policy = build_policy(cfg).to(self.device)
        self.discriminator = build_discriminator(cfg).to(self.device).eval()
        """The copy of the discriminator that scores episodes (refreshed before each update)."""
        self.discriminator_version = 0
        """Its version (0: none received yet, and the reward has no discriminator term)."""
        self.discriminator_source = discriminator_source
        if cfg.learner.compile:
            persist_compile_cache(self.run_dir)
        self.trainer = PolicyTrainer(cfg, self.policy, device=self.device)
        log.info("policy updates on %s in %s%s", self.device, self.trainer.precision,
                 ", unroll compiled" if cfg.learner.compile else "")
        self.queue = IngestQueue(cfg.learner.queue_capacity)
        self.prior_pool = PriorPool(cfg.learner.hindsight_prior_episodes if cfg.learner.hindsight_weight > 0 else 0)
        """The newest episodes of prior programs, for program recovery (``learner.hindsight_weight``)."""
        self.version = 0
        self.frames = 0
        self.updates = 0
        self.pending_copy = CopySlot()
        """The PBT copy to apply before the next update (:meth:`request_copy`)."""
        self.state_lock = threading.Lock()
        """Held while weights, optimizer state and version change together (an update, a PBT copy),
        so a reader of the training state (``GetTrainingState``) sees one consistent version."""
        self._actor_runs: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._actor_runs_lock = threading.Lock()
        self.run_done = run_done if run_done is not None else RunDone(member, "policy learner")
        """Done once the consumed frames reach ``learner.max_frames`` (the module docstring)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.restore()
        self.published = PublishedParameters(self._snapshot())
        self.last_stats: dict[str, float] = {}
        self.last_final_canvases: np.ndarray | None = None
        self.recorder = UpdateRecorder(self.run_dir, "learner", member, LOSS_TERMS,
                                       cfg.learner.checkpoint_every_updates, cfg.learner.checkpoint_every_seconds,
                                       mirror=open_mirror(cfg, self.run_dir, "learner", member))
        self.recorder.version_published(self.version)
        self.evaluator = HeldoutEvaluator(cfg, self.recorder, self.member)
        """Held-out evaluation of weight snapshots every ``learner.eval_every_updates`` updates, on its
        own thread (:mod:`learner.evaluation`); its newest report is PBT's reconstruction fitness."""

    # -- what peers call ---------------------------------------------------------------------

    def submit(self, unroll: Unroll, timeout: float = 30.0) -> int:
        """UnrollSink: queue an unroll for training (blocks while the queue is full, up to
        ``timeout``); returns the learner's version.

        Episodes of prior programs (``unroll.prior``) go to :attr:`prior_pool` instead, at once.

        Raises:
            LearnerDone: The learner reached its budget and trains no more.
            StaleUnroll: The unroll's policy is more than ``max_policy_lag`` versions old.
            PriorUnused: Prior programs, and this learner runs no program recovery.
            learner.ingest.QueueFull: The queue stayed full for ``timeout`` seconds.
        """
        if self.run_done.is_set:
            raise LearnerDone(f"the learner is done ({self.run_done.reason}) and trains no more; stop acting")
        if unroll.prior:
            if self.cfg.learner.hindsight_weight <= 0:
                raise PriorUnused("episodes of prior programs are examples for program recovery, which this learner "
                                  "does not run (learner.hindsight_weight is 0); set actor.prior_share to 0")
            self.prior_pool.add(unroll)
            metrics.LEARNER_PRIOR_EPISODES_TOTAL.labels(self.member).inc(unroll.batch_size)
            return self.version
        lag = self.version - unroll.policy_version
        if lag > self.cfg.learner.max_policy_lag:
            raise StaleUnroll(f"unroll acted with policy version {unroll.policy_version}, "
                              f"{lag} versions behind the learner's {self.version} "
                              f"(learner.max_policy_lag is {self.cfg.learner.max_policy_lag}); fetch new parameters")
        if unroll.policy_version > self.version:
            raise StaleUnroll(f"unroll claims policy version {unroll.policy_version}, newer than the learner's "
                              f"{self.version}: the actor is talking to a different learner")
        self.queue.put(unroll, timeout=timeout)
        metrics.LEARNER_TRAJECTORIES_TOTAL.labels(self.member).inc(unroll.batch_size)
        metrics.LEARNER_QUEUE_DEPTH.labels(self.member).set(self.queue.depth)
        return self.version

    def observe_actor_run(self, actor_id: str, run_id: str) -> bool:
        """Note which incarnation (``run_id``) of ``actor_id`` sent an unroll; True when it changed.

        A changed run id means the actor process restarted (SEED RL's lesson: the learner, not
        the actor, notices); it is logged and counted in ``spiral_learner_actor_restarts_total``.
        The most recent :data:`MAX_TRACKED_ACTORS` actors are remembered.
        """
        if not run_id:
            return False
        with self._actor_runs_lock:
            previous = self._actor_runs.pop(actor_id, None)
            self._actor_runs[actor_id] = run_id
            while len(self._actor_runs) > MAX_TRACKED_ACTORS:
                self._actor_runs.popitem(last=False)
        if previous is None or previous == run_id:
            return False
        log.info("actor %s restarted (run %s -> %s)", actor_id, previous, run_id)
        metrics.LEARNER_ACTOR_RESTARTS_TOTAL.labels(self.member).inc()
        return True

    def fetch(self, have_version: int) -> ParameterSnapshot | None:
        """ParameterSource: the published policy if newer than ``have_version``."""
        return self.published.fetch(have_version)

    def request_copy(self, tensors: Mapping[str, np.ndarray] | None, donor_version: int = -1,
                     hyperparameters: Mapping[str, float] | None = None) -> CopyRequest:
        """Become a copy of a donor (PBT exploit) with new hyperparameters before the next update.

        The state and the hyperparameters are validated now (so a bad one is refused at once)
        and applied at the start of the next :meth:`step`. A newer request replaces one not yet
        applied (whose ``done`` is then set with ``applied`` False). Wait on the result's
        ``done`` to know when the copy took effect.

        Args:
            tensors: The donor's training state (policy weights and Adam state), or None to
                change the hyperparameters only (PBT's explore).
            donor_version: The donor's parameter version the state was taken at.
            hyperparameters: ``learning_rate`` and/or ``entropy_cost`` to set (None: keep them).

        Raises:
            ValueError: The state does not fit this policy, or a hyperparameter is refused
                (names every bad entry).
        """
        hyperparameters = {name: float(value) for name, value in (hyperparameters or {}).items()}
        problems = self.trainer.check_hyperparameters(hyperparameters)
        if tensors is not None:
            problems += self.trainer.check_state(tensors)
        if problems:
            raise ValueError("donor training state or hyperparameters do not fit this policy learner: "
                             + "; ".join(problems))
        return self.pending_copy.put(CopyRequest(tensors=None if tensors is None else dict(tensors),
                                                 donor_version=int(donor_version), hyperparameters=hyperparameters))

    @property
    def hyperparameters(self) -> dict[str, float]:
        return dict(self.trainer.hyperparameters)

    # -- the loop ----------------------------------------------------------------------------

    def _snapshot(self) -> ParameterSnapshot:
        return snapshot_of(self.policy, self.version)

    def _refresh_discriminator(self) -> None:
        if self.discriminator_source is None:
            return
        try:
            snapshot = self.discriminator_source.fetch(self.discriminator_version)
        except Exception as exc:  # noqa: BLE001 - a missing discriminator must not stop learning
            log.warning("could not refresh discriminator parameters: %s", exc)
            return
        if snapshot is not None:
            load_snapshot(self.discriminator, snapshot)
            self.discriminator_version = snapshot.version

    def _publish_next_version(self) -> None:
        """Publish the policy as version + 1 (under ``state_lock``, after an update or a copy)."""
        self.version += 1
        self.published.publish(self._snapshot())
        self.recorder.version_published(self.version)

    def _apply_copy(self, request: CopyRequest) -> int:
        """Take the donor's state (if any) and the hyperparameters; the version after it."""
        with self.state_lock:
            if request.tensors is not None:
                self.trainer.import_state(request.tensors)
                self._publish_next_version()  # so actors pick up the copied weights
            self.trainer.set_hyperparameters(**request.hyperparameters)
            return self.version

    def _apply_pending_copy(self) -> None:
        request = self.pending_copy.apply_waiting(self._apply_copy)
        if request is not None:
            log.info("applied PBT %s; hyperparameters now %s",
                     "copy" if request.tensors is not None else "hyperparameters", self.trainer.hyperparameters)

    def step(self, timeout: float = 1.0) -> dict[str, float] | None:
        """One update if a full batch arrives within ``timeout``; returns its record.

        A requested copy (:meth:`request_copy`) is applied first, even when no batch comes.
        A learner that is done updates no more (None at once). The update that reaches the
        budget writes the final sample grid and checkpoint.
        """
        if self.run_done.is_set:
            return None
        self._apply_pending_copy()
        batch = self.queue.take_batch(self.cfg.learner.batch_size, timeout=timeout)
        metrics.LEARNER_QUEUE_DEPTH.labels(self.member).set(self.queue.depth)
        if batch is None:
            return None
        self._refresh_discriminator()
        discriminator = self.discriminator if self.discriminator_version > 0 else None
        frames = batch.num_steps * batch.batch_size
        started = time.perf_counter()
        with self.state_lock:
            stats = self.trainer.update(batch, discriminator, discriminator_version=self.discriminator_version,
                                        prior=self.prior_pool.newest())
            self.updates += 1
            self.frames += frames
            self._publish_next_version()
        elapsed = time.perf_counter() - started
        policy_lag = float(self.version - 1 - batch.policy_version)
        record = self.recorder.record(stats, self.version,
                                      {"frames": self.frames, "seconds": elapsed, "policy_lag": policy_lag},
                                      frames_consumed=frames)
        self.last_stats = record
        self.last_final_canvases = batch.final_canvases
        self._export_metrics(record, frames, elapsed)
        final = budget_reached(self.frames, self.cfg.learner.max_frames)
        if final or self.recorder.checkpoint_due(self.version):
            self.checkpoint()
        if final or due(self.cfg.learner.sample_grid_every_updates, self.version):
            self.save_samples(batch)
        self.evaluator.maybe_submit(self.policy, self.updates, self.version)
        if final:
            self.run_done.set(self._budget_spent())
        return record

    def _budget_spent(self) -> str:
        """Why the learner is done, for logs and health."""
        return (f"consumed {self.frames} frames of learner.max_frames {self.cfg.learner.max_frames} "
                f"(version {self.version})")

    def _export_metrics(self, record: dict[str, float], frames: int, elapsed: float) -> None:
        """The policy learner's own metrics (the recorder exports those both learners have)."""
        m = self.member
        metrics.LEARNER_FRAMES_TOTAL.labels(m).inc(frames)
        metrics.LEARNER_UPDATE_SECONDS.labels(m).observe(elapsed)
        metrics.LEARNER_DISCRIMINATOR_VERSION.labels(m).set(self.discriminator_version)
        if "mean_reward" in record:
            metrics.LEARNER_REWARD.labels(m).set(record["mean_reward"])
            if not reward_in_band(record["mean_reward"], self.cfg.learner.reward.band):
                metrics.LEARNER_REWARD_OUT_OF_BAND.labels(m).inc()
                log.warning("update %d: mean episode return %.4g is outside learner.reward.band %s: the reward "
                            "has lost its scale", self.version, record["mean_reward"],
                            list(self.cfg.learner.reward.band))
        if "reconstruction_l2" in record:
            metrics.LEARNER_RECONSTRUCTION_L2.labels(m).set(record["reconstruction_l2"])

    def save_samples(self, batch: Unroll, count: int = 16) -> Path:
        """Sample grid PNG of final canvases (next to their targets in conditional runs).

        The first episode of the grid is also written as its program, ``update-N.json`` (what
        ``spiral render`` re-executes) and ``update-N.svg``; ``latest.*`` are the newest copies.
        The same episodes painting step by step, from the unroll's own intermediate canvases, go
        to TensorBoard as an animated GIF (``samples/animation``) and to ``latest.gif``.
        """
        renders = batch.final_canvases[:count]
        targets = None if batch.targets is None else batch.targets[:count]
        columns = 4 if targets is not None else 8
        grid = pair_grid(renders, targets, columns=columns)
        stem = f"update-{self.version:08d}"
        path = save_png(grid, self.samples_dir / f"{stem}.png")
        save_png(grid, self.samples_dir / "latest.png")
        self.recorder.image("samples/grid", grid, self.version)
        frames = step_frames(batch.canvases[:, :count], targets, columns=columns)
        animation = encode_gif(frames)
        atomic_write_bytes(self.samples_dir / "latest.gif", animation)
        self.recorder.animation("samples/animation", animation, frames.shape[1:], self.version)
        program = program_from_actions(self.cfg.env, batch.actions[:, 0], action_spec_for(self.cfg))
        for name in (stem, "latest"):
            save_program(program, self.samples_dir / f"{name}.json")
            atomic_write_bytes(self.samples_dir / f"{name}.svg", to_svg(program).encode())
        return path

    def restore(self) -> int | None:
        """Load the newest readable checkpoint of ``checkpoint_dir`` (the constructor does); its
        version, or None if there is none.

        Raises:
            ValueError: The checkpoint does not fit this experiment's policy.
        """
        restored = latest_checkpoint(self.checkpoint_dir)
        if restored is None:
            return None
        version, state = restored
        try:
            with self.state_lock:
                self.trainer.load_state_dict(state["trainer"])
                self.version = version
                self.frames = int(state.get("frames", 0))
                self.updates = int(state.get("updates", 0))
                if budget_reached(self.frames, self.cfg.learner.max_frames):
                    self.run_done.set(self._budget_spent())
        except (RuntimeError, ValueError) as exc:  # torch names the missing / misshaped tensors
            raise ValueError(f"the newest checkpoint in {self.checkpoint_dir} (version {version}) does not "
                             f"fit this experiment's policy: were the policy.* settings changed since the run "
                             f"wrote it? Start a new run directory or restore those settings. {exc}") from exc
        log.info("resumed policy learner from checkpoint version %d", self.version)
        return self.version

    def export_training_state(self) -> tuple[int, dict[str, np.ndarray]]:
        """``(version, policy weights and Adam state)`` between two updates (a PBT donor's answer)."""
        with self.state_lock:
            return self.version, self.trainer.export_state()

    def checkpoint(self) -> Path:
        """Write an atomic checkpoint of the trainer (weights, optimizer, hyperparameters)."""
        with self.state_lock:  # state_dict() holds the live tensors: serialise them between updates
            path = save_checkpoint(self.checkpoint_dir, self.version,
                                   {"trainer": self.trainer.state_dict(), "frames": self.frames,
                                    "updates": self.updates,
                                    CHECKPOINT_DISCRIMINATOR_VERSION: self.discriminator_version})
        self.recorder.checkpoint_written()
        return path

    def close(self) -> None:
        """Stop the held-out evaluator, flush and close the TensorBoard event file."""
        self.evaluator.close()
        self.recorder.close()

    def run(self, stop: threading.Event, beat: Callable[[], None] = lambda: None,
            between_updates: Callable[[threading.Event], None] | None = None,
            while_done: Callable[[], None] | None = None) -> None:
        """The learner's loop, the one ``spiral learner`` runs: update until ``stop`` is set.

        Each iteration calls ``beat`` (the :class:`spiral.runtime.guarded_loop.GuardedLoop` heartbeat),
        then ``between_updates`` (the PBT member's report), then waits at most 0.5 s for a batch
        and updates on it; a progress line is logged every 10 s. Once the learner is done
        (``learner.max_frames``) an iteration only beats, calls ``while_done`` (the service tells
        its discriminator) and waits :data:`DONE_IDLE_SECONDS`. Checkpointing on the way out is
        the caller's (after in-flight calls have finished).
        """
        progress = ProgressLog("learner updates")
        while not stop.is_set():
            beat()
            if self.run_done.is_set:
                if while_done is not None:
                    while_done()
                stop.wait(DONE_IDLE_SECONDS)
                continue
            if between_updates is not None:
                between_updates(stop)
            stats = self.step(timeout=0.5)
            if stats is not None:
                progress.maybe_log(self.updates, version=self.version, frames=self.frames,
                                   reward=stats.get("mean_reward", float("nan")),
                                   l2=stats.get("reconstruction_l2", float("nan")),
                                   discriminator=self.discriminator_version)
