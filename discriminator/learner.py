"""The discriminator learner, free of networking: WGAN-GP on real images vs recent renders.

:class:`DiscriminatorLearner` samples a batch of real images from the dataset and a batch of
renders from the replay buffer (the paper's 20 most recent batches), takes one WGAN-GP step,
and publishes the critic with version + 1 for the policy learner to score episodes with. In
conditional mode the critic judges pairs: real pairs are (target, target), fake pairs are
(render, target), so real images come from the targets the renders were made for.

Checkpoints are atomic and the learner resumes from the newest one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from discriminator.training import DiscriminatorTrainer
from spiral import metrics
from spiral.checkpoint import latest_checkpoint, save_checkpoint
from spiral.config import ExperimentConfig
from spiral.nets import build_discriminator
from spiral.nets.params import ParameterSnapshot, snapshot_of
from spiral.sources import PublishedParameters

log = logging.getLogger(__name__)


class RenderSampler(Protocol):
    """Where fake examples come from (the replay buffer)."""

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``(renders, targets)`` uint8 ``[B, H, W, C]`` (targets None when unconditional), or None
        when the buffer cannot serve a batch yet."""


class DiscriminatorLearner:
    """Pure discriminator-learner logic around :class:`DiscriminatorTrainer`.

    Args:
        cfg: The experiment.
        run_dir: Where checkpoints (``discriminator/``) and the log go.
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
        self.critic = build_discriminator(cfg).to(device)
        self.trainer = DiscriminatorTrainer(cfg, self.critic, device=device)
        self.version = 0
        self.updates = 0
        self.samples_consumed = 0
        restored = latest_checkpoint(self.checkpoint_dir)
        if restored is not None:
            self.version, state = restored
            self.trainer.load_state_dict(state["trainer"])
            log.info("resumed discriminator from checkpoint version %d", self.version)
        self.published = PublishedParameters(snapshot_of(self.critic, self.version))
        self._log_path = self.run_dir / "discriminator.jsonl"
        self.last_stats: dict[str, float] = {}
        metrics.DISCRIMINATOR_PARAMETER_VERSION.labels(self.member).set(self.version)

    def fetch(self, have_version: int) -> ParameterSnapshot | None:
        """ParameterSource: the published critic if newer than ``have_version``."""
        return self.published.fetch(have_version)

    def step(self) -> dict[str, float] | None:
        """One WGAN-GP update, or None while the replay buffer cannot serve a batch."""
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
        stats = self.trainer.update(real, fake, fake_targets if self.cfg.env.conditional else None)
        elapsed = time.perf_counter() - started
        self.version += 1
        self.updates += 1
        self.published.publish(snapshot_of(self.critic, self.version))
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
        for key in ("loss", "gp"):
            if key in record:
                metrics.DISCRIMINATOR_LOSS.labels(m, key).set(record[key])
        with open(self._log_path, "a") as handle:
            handle.write(json.dumps({"time": time.time(), **record}) + "\n")
        every = self.cfg.discriminator_learner.checkpoint_every_updates
        if every and self.version % every == 0:
            self.checkpoint()
        return record

    def checkpoint(self) -> Path:
        return save_checkpoint(self.checkpoint_dir, self.version, {"trainer": self.trainer.state_dict()})

    def run(self, stop: threading.Event, idle_sleep: float = 0.2) -> None:
        """Update until ``stop`` is set (sleeping while the replay buffer is short), then checkpoint."""
        while not stop.is_set():
            if self.step() is None:
                stop.wait(idle_sleep)
        self.checkpoint()
