"""The discriminator learner, free of networking: WGAN-GP on real images vs recent renders.

:class:`DiscriminatorLearner` samples a batch of real images from the dataset and a batch of
renders from the replay buffer (the paper's 20 most recent batches), takes one WGAN-GP step,
and publishes the critic with version + 1 for the policy learner to score episodes with. In
conditional mode the critic judges pairs: real pairs are (target, target), fake pairs are
(render, target), so real images come from the targets the renders were made for.

Checkpoints are atomic and the learner resumes from the newest one. Every update's statistics
also go to TensorBoard (:class:`spiral.runtime.tensorboard.TrainingBoard`, ``tensorboard/discriminator``).

Population-based training copies a donor discriminator into this one
(:meth:`DiscriminatorLearner.request_copy`): the donor's training state is stored and applied
at the start of the next :meth:`~DiscriminatorLearner.step`, between two updates and never
during one; the version then rises by one and the copy is published like an update.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from discriminator.training import DiscriminatorTrainer
from spiral.runtime import metrics
from spiral.evaluation.visualize import json_safe
from spiral.runtime.checkpoint import latest_checkpoint, save_checkpoint
from spiral.config import ExperimentConfig
from spiral.nets import build_discriminator
from spiral.nets.params import snapshot_of
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.runtime.service_runtime import ProgressLog
from spiral.core import PeerFailure, PublishedParameters, RenderSampler
from spiral.runtime.tensorboard import TrainingBoard

log = logging.getLogger(__name__)


@dataclass
class PendingCopy:
    """A requested PBT copy of a donor discriminator's training state.

    Attributes:
        tensors: The donor's training state (``critic/...`` and ``optimizer/...``).
        donor_version: The donor's parameter version the state was taken at.
        done: Set once the copy was applied, or replaced by a newer request before that.
        applied: Whether it was applied (False if superseded).
        version: This learner's version right after applying it (-1 before).
    """

    tensors: dict[str, np.ndarray]
    donor_version: int
    done: threading.Event = field(default_factory=threading.Event)
    applied: bool = False
    version: int = -1


class DiscriminatorLearner:
    """Pure discriminator-learner logic around :class:`DiscriminatorTrainer`.

    Args:
        cfg: The experiment.
        run_dir: Where checkpoints (``discriminator/``), the log and TensorBoard event files
            (``tensorboard/discriminator[-MEMBER]``) go.
        real_images: Training images (uint8 ``[N, H, W, C]``) for unconditional runs.
        renders: The replay buffer (or anything that samples renders).
        member: Population member index (metric label).
        device: Torch device.
        seed: Seed of the real-image sampler.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, real_images: np.ndarray, renders: RenderSampler,
                 member: int = 0, device: str = "cpu", seed: int = 0) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "discriminator"
        self.member = str(member)
        self.real_images = real_images
        self.renders = renders
        self.rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):  # the seed picks the initial weights
            torch.manual_seed(seed)
            self.critic = build_discriminator(cfg).to(device)
        self.trainer = DiscriminatorTrainer(cfg, self.critic, device=device)
        log.info("critic updates on %s in %s", device, self.trainer.precision)
        self.version = 0
        self.updates = 0
        self.samples_consumed = 0
        self.state_lock = threading.Lock()
        """Held while weights, optimizer state and version change together (an update, a PBT copy),
        so a reader of the training state (:meth:`export_training_state`) sees one version."""
        self.restore()
        self.published = PublishedParameters(snapshot_of(self.critic, self.version))
        self._log_path = self.run_dir / "discriminator.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.last_stats: dict[str, float] = {}
        self._pending_copy: PendingCopy | None = None
        self._pending_copy_lock = threading.Lock()
        self.board = TrainingBoard(self.run_dir, "discriminator", member)
        metrics.DISCRIMINATOR_PARAMETER_VERSION.labels(self.member).set(self.version)

    def fetch(self, have_version: int) -> ParameterSnapshot | None:
        """ParameterSource: the published critic if newer than ``have_version``."""
        return self.published.fetch(have_version)

    def request_copy(self, tensors: Mapping[str, np.ndarray], donor_version: int = -1) -> PendingCopy:
        """Become a copy of a donor (PBT exploit) before the next update.

        The state is validated now (so a bad one is refused at once) and applied at the start
        of the next :meth:`step`. A newer request replaces one not yet applied (whose
        ``done`` is then set with ``applied`` False). Wait on the result's ``done`` to know
        when the copy took effect.

        Raises:
            ValueError: The state does not fit this critic (names every bad entry).
        """
        problems = self.trainer.check_state(tensors)
        if problems:
            raise ValueError("donor training state does not fit this discriminator: " + "; ".join(problems))
        request = PendingCopy(tensors=dict(tensors), donor_version=int(donor_version))
        with self._pending_copy_lock:
            previous, self._pending_copy = self._pending_copy, request
        if previous is not None:
            previous.done.set()
        return request

    def _apply_pending_copy(self) -> None:
        with self._pending_copy_lock:
            request, self._pending_copy = self._pending_copy, None
        if request is None:
            return
        try:
            with self.state_lock:
                self.trainer.import_state(request.tensors)
                # The version keeps rising so the policy learner picks the copied critic up.
                self.version += 1
                self.published.publish(snapshot_of(self.critic, self.version))
        except ValueError:
            log.exception("could not apply the donor's training state (donor version %d)", request.donor_version)
            request.done.set()
            return
        metrics.DISCRIMINATOR_PARAMETER_VERSION.labels(self.member).set(self.version)
        request.version, request.applied = self.version, True
        request.done.set()
        with open(self._log_path, "a") as handle:
            handle.write(json.dumps(json_safe({"time": time.time(), "event": "copy", "update": self.version,
                                               "donor_version": request.donor_version})) + "\n")
        log.info("copied donor discriminator state (donor version %d); version now %d",
                 request.donor_version, self.version)

    def step(self) -> dict[str, float] | None:
        """One WGAN-GP update, or None while the replay buffer cannot serve a batch.

        A requested copy (:meth:`request_copy`) is applied first, even when no batch comes.
        """
        self._apply_pending_copy()
        batch_size = self.cfg.discriminator_learner.batch_size
        sampled = self.renders.sample(batch_size)
        if sampled is None:
            return None
        fake, fake_targets = sampled
        self.samples_consumed += len(fake)
        if self.cfg.env.conditional:
            if fake_targets is None:
                raise ValueError("conditional runs need the targets of sampled renders")
            real = fake_targets
        else:
            real = self.real_images[self.rng.integers(0, len(self.real_images), size=len(fake))]
        started = time.perf_counter()
        with self.state_lock:
            stats = self.trainer.update(real, fake, fake_targets if self.cfg.env.conditional else None)
            self.version += 1
            self.updates += 1
            self.published.publish(snapshot_of(self.critic, self.version))
        elapsed = time.perf_counter() - started
        record = {k: float(v) for k, v in dataclasses.asdict(stats).items() if isinstance(v, (int, float))}
        record.update(update=self.version, seconds=elapsed)
        self.last_stats = record
        m = self.member
        metrics.DISCRIMINATOR_UPDATES_TOTAL.labels(m).inc()
        metrics.DISCRIMINATOR_PARAMETER_VERSION.labels(m).set(self.version)
        for key, kind in (("d_real", "real"), ("d_fake", "fake")):
            if key in record:
                metrics.DISCRIMINATOR_SCORE.labels(m, kind).set(record[key])
        if "wasserstein" in record:
            metrics.DISCRIMINATOR_WASSERSTEIN.labels(m).set(record["wasserstein"])
        for key in ("loss", "gp", "level_penalty"):
            if key in record:
                metrics.DISCRIMINATOR_LOSS.labels(m, key).set(record[key])
        with open(self._log_path, "a") as handle:
            handle.write(json.dumps(json_safe({"time": time.time(), **record})) + "\n")
        self.board.scalars(record, step=self.version)
        every = self.cfg.discriminator_learner.checkpoint_every_updates
        if every and self.version % every == 0:
            self.checkpoint()
        return record

    def restore(self) -> int | None:
        """Load the newest readable checkpoint of ``checkpoint_dir`` (the constructor does); its
        version, or None if there is none."""
        restored = latest_checkpoint(self.checkpoint_dir)
        if restored is None:
            return None
        with self.state_lock:
            self.version, state = restored
            self.trainer.load_state_dict(state["trainer"])
        log.info("resumed discriminator from checkpoint version %d", self.version)
        return self.version

    def export_training_state(self) -> tuple[int, dict[str, np.ndarray]]:
        """``(version, critic weights and Adam state)`` between two updates (a PBT donor's answer)."""
        with self.state_lock:
            return self.version, self.trainer.export_state()

    def checkpoint(self) -> Path:
        with self.state_lock:  # state_dict() holds the live tensors: serialise them between updates
            return save_checkpoint(self.checkpoint_dir, self.version, {"trainer": self.trainer.state_dict()})

    def close(self) -> None:
        """Flush and close the TensorBoard event file."""
        self.board.close()

    def run(self, stop: threading.Event, beat: Callable[[], None] = lambda: None, idle_sleep: float = 0.2) -> None:
        """The discriminator's loop, the one ``spiral discriminator`` runs: update until ``stop``.

        Each iteration calls ``beat`` (the :class:`spiral.runtime.guarded_loop.GuardedLoop` heartbeat)
        and updates once; while the replay buffer cannot serve a batch it waits ``idle_sleep``,
        and while it is down (:class:`spiral.core.PeerFailure`) it backs off exponentially up
        to 5 s. A progress line is logged every 10 s. Checkpointing on the way out is the
        caller's (after in-flight calls have finished).
        """
        progress = ProgressLog("discriminator updates")
        failures = 0
        while not stop.is_set():
            beat()
            try:
                stats = self.step()
                failures = 0
            except PeerFailure as exc:  # a replay buffer that is down or restarting must not stop us
                failures += 1
                delay = min(5.0, 0.2 * 2 ** min(failures, 5))
                log.warning("could not sample renders (%s); retrying in %.1f s", exc, delay)
                stop.wait(delay)
                continue
            if stats is None:
                stop.wait(idle_sleep)
                continue
            progress.maybe_log(self.updates, version=self.version, wasserstein=stats.get("wasserstein", float("nan")))
