"""The discriminator learner, free of networking: WGAN-GP on real images vs recent renders.

:class:`DiscriminatorLearner` samples a batch of real images from the dataset and a batch of
renders from the replay buffer (the paper's 20 most recent batches), takes one WGAN-GP step,
and publishes the discriminator with version + 1 for the policy learner to score episodes with.
In conditional mode the discriminator judges pairs: real pairs are (target, target), fake pairs
are (render, target), so real images come from the targets the renders were made for.

Checkpoints are atomic and the learner resumes from the newest one. Every update is recorded
like the policy learner's (:class:`spiral.runtime.recorder.UpdateRecorder`: a row of
``discriminator.jsonl``, TensorBoard scalars in ``tensorboard/discriminator``, Prometheus).

Population-based training copies a donor discriminator into this one
(:meth:`DiscriminatorLearner.request_copy`, the same as the policy learner's): the donor's
training state is validated, stored and applied at the start of the next
:meth:`~DiscriminatorLearner.step`, between two updates and never during one; the version then
rises by one, the copy is published like an update and logged as a ``copy`` event.

**The budget** (``learner.max_frames``, :mod:`spiral.runtime.budget`). Each policy learner it
scores for tells it when it is done (:meth:`DiscriminatorLearner.note_learner_done`). Once every
member it serves is done, it writes a final checkpoint (which records that it is done) and is
done itself: it updates no more and its loop only idles, while its parameters stay published.
Restored from such a checkpoint it is done from the start, unless the budget has changed since
(a run given a larger ``learner.max_frames`` trains on).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Collection, Mapping

import numpy as np
import torch

from discriminator.training import DiscriminatorTrainer
from spiral.agent.training_state import CopyRequest, CopySlot
from spiral.runtime import metrics
from spiral.runtime.checkpoint import latest_checkpoint, save_checkpoint
from spiral.runtime.device import training_device
from spiral.config import ExperimentConfig
from spiral.nets import build_discriminator
from spiral.nets.params import snapshot_of
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.runtime.recorder import UpdateRecorder
from spiral.runtime.tracking import open_mirror
from spiral.runtime.budget import RunDone
from spiral.runtime.service_runtime import ProgressLog
from spiral.core import PeerFailure, PublishedParameters, RenderSampler

log = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "gp", "level_penalty")
"""The update's loss terms, exported as ``spiral_discriminator_loss{term=...}``."""


class DiscriminatorLearner:
    """Pure discriminator-learner logic around :class:`DiscriminatorTrainer`.

    Args:
        cfg: The experiment.
        run_dir: Where checkpoints (``discriminator/``), the log and TensorBoard event files
            (``tensorboard/discriminator[-MEMBER]``) go.
        real_images: Training images (uint8 ``[N, H, W, C]``) for unconditional runs.
        renders: The replay buffer (or anything that samples renders).
        member: Population member index (metric label).
        device: Torch device (checked to exist here, :func:`~spiral.runtime.device.training_device`).
        seed: Seed of the real-image sampler.
        serves: The members whose policy learners it scores for (default: ``member`` alone; a
            shared discriminator: the population). It is done when all of them are.
        run_done: Where it says it is done (default: its own; the service passes the one its
            ``/healthz`` reports).

    Raises:
        spiral.runtime.device.DeviceUnavailable: ``device`` is missing on this machine.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, real_images: np.ndarray, renders: RenderSampler,
                 member: int = 0, device: str | torch.device = "cpu", seed: int = 0,
                 serves: Collection[int] | None = None, run_done: RunDone | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "discriminator"
        self.member = str(member)
        self.real_images = real_images
        self.renders = renders
        self.rng = np.random.default_rng(seed)
        device = training_device(device, "discriminator device")
        with torch.random.fork_rng(devices=[]):  # the seed picks the initial weights
            torch.manual_seed(seed)
            self.discriminator = build_discriminator(cfg).to(device)
        self.trainer = DiscriminatorTrainer(cfg, self.discriminator, device=device)
        log.info("discriminator updates on %s in %s", device, self.trainer.precision)
        self.version = 0
        self.updates = 0
        self.samples_consumed = 0
        self.serves = frozenset(serves) if serves is not None else frozenset({member})
        self.run_done = run_done if run_done is not None else RunDone(member, "discriminator")
        """Done once every member in :attr:`serves` said its learner is done (module docstring)."""
        self._learners_done: set[int] = set()
        self._learners_done_lock = threading.Lock()
        self.state_lock = threading.Lock()
        """Held while weights, optimizer state and version change together (an update, a PBT copy),
        so a reader of the training state (:meth:`export_training_state`) sees one version."""
        self.restore()
        self.published = PublishedParameters(snapshot_of(self.discriminator, self.version))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.last_stats: dict[str, float] = {}
        self.pending_copy = CopySlot()
        """The PBT copy to apply before the next update (:meth:`request_copy`)."""
        self.recorder = UpdateRecorder(self.run_dir, "discriminator", member, LOSS_TERMS,
                                       cfg.discriminator_learner.checkpoint_every_updates,
                                       cfg.discriminator_learner.checkpoint_every_seconds,
                                       mirror=open_mirror(cfg, self.run_dir, "discriminator", member))
        self.recorder.version_published(self.version)

    def fetch(self, have_version: int) -> ParameterSnapshot | None:
        """ParameterSource: the published discriminator if newer than ``have_version``."""
        return self.published.fetch(have_version)

    def request_copy(self, tensors: Mapping[str, np.ndarray], donor_version: int = -1) -> CopyRequest:
        """Become a copy of a donor (PBT exploit) before the next update.

        The state is validated now (so a bad one is refused at once) and applied at the start
        of the next :meth:`step`. A newer request replaces one not yet applied (whose
        ``done`` is then set with ``applied`` False). Wait on the result's ``done`` to know
        when the copy took effect.

        Raises:
            ValueError: The state does not fit this discriminator (names every bad entry).
        """
        problems = self.trainer.check_state(tensors)
        if problems:
            raise ValueError("donor training state does not fit this discriminator: " + "; ".join(problems))
        return self.pending_copy.put(CopyRequest(tensors=dict(tensors), donor_version=int(donor_version)))

    def _publish_next_version(self) -> None:
        """Publish the discriminator as version + 1 (under ``state_lock``, after an update or a copy)."""
        self.version += 1
        self.published.publish(snapshot_of(self.discriminator, self.version))
        self.recorder.version_published(self.version)

    def _apply_copy(self, request: CopyRequest) -> int:
        """Take the donor's state; the version after it (the discriminator has no PBT hyperparameters)."""
        with self.state_lock:
            if request.tensors is not None:
                self.trainer.import_state(request.tensors)
                self._publish_next_version()  # so the policy learner picks the copied discriminator up
            return self.version

    def _apply_pending_copy(self) -> None:
        request = self.pending_copy.apply_waiting(self._apply_copy)
        if request is not None:
            self.recorder.event("copy", {"update": self.version, "donor_version": request.donor_version})
            log.info("copied donor discriminator state (donor version %d); version now %d",
                     request.donor_version, self.version)

    def note_learner_done(self, member: int) -> None:
        """Member ``member``'s policy learner reached its budget (it says so every second)."""
        with self._learners_done_lock:
            self._learners_done.add(int(member))

    @property
    def learners_done(self) -> bool:
        """Whether every member it serves said its learner is done."""
        with self._learners_done_lock:
            return self.serves <= self._learners_done

    def finish(self) -> None:
        """Become done: write the final checkpoint (it records that) and update no more."""
        done = sorted(self.serves)
        self.run_done.set(f"the policy learner{'s' if len(done) > 1 else ''} of member{'s' if len(done) > 1 else ''} "
                          f"{', '.join(map(str, done))} reached learner.max_frames (version {self.version})")
        self.checkpoint()

    def step(self) -> dict[str, float] | None:
        """One WGAN-GP update, or None while the replay buffer cannot serve a batch.

        A requested copy (:meth:`request_copy`) is applied first, even when no batch comes.
        Once every learner it serves is done it finishes (:meth:`finish`) and updates no more.
        """
        if not self.run_done.is_set and self.learners_done:
            self.finish()
        if self.run_done.is_set:
            return None
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
            self.updates += 1
            self._publish_next_version()
        elapsed = time.perf_counter() - started
        record = self.recorder.record(stats, self.version, {"seconds": elapsed})
        self.last_stats = record
        m = self.member
        for key, kind in (("d_real", "real"), ("d_fake", "fake")):
            if key in record:
                metrics.DISCRIMINATOR_SCORE.labels(m, kind).set(record[key])
        if "wasserstein" in record:
            metrics.DISCRIMINATOR_WASSERSTEIN.labels(m).set(record["wasserstein"])
        if self.recorder.checkpoint_due(self.version):
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
        if state.get("done", False) and state.get("max_frames") == self.cfg.learner.max_frames:
            self.run_done.set(f"its checkpoint (version {self.version}) was written once its learners were done")
        return self.version

    def export_training_state(self) -> tuple[int, dict[str, np.ndarray]]:
        """``(version, discriminator weights and Adam state)`` between two updates (a PBT donor's answer)."""
        with self.state_lock:
            return self.version, self.trainer.export_state()

    def checkpoint(self) -> Path:
        """Write an atomic checkpoint of the trainer (and whether it is done, at which budget)."""
        with self.state_lock:  # state_dict() holds the live tensors: serialise them between updates
            path = save_checkpoint(self.checkpoint_dir, self.version,
                                   {"trainer": self.trainer.state_dict(), "done": self.run_done.is_set,
                                    "max_frames": self.cfg.learner.max_frames})
        self.recorder.checkpoint_written()
        return path

    def close(self) -> None:
        """Flush and close the TensorBoard event file."""
        self.recorder.close()

    def run(self, stop: threading.Event, beat: Callable[[], None] = lambda: None, idle_sleep: float = 0.2) -> None:
        """The discriminator's loop, the one ``spiral discriminator`` runs: update until ``stop``.

        Each iteration calls ``beat`` (the :class:`spiral.runtime.guarded_loop.GuardedLoop` heartbeat)
        and updates once; while the replay buffer cannot serve a batch, or once it is done, it
        waits ``idle_sleep``,
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
