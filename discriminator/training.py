"""One discriminator update on real images vs the agent's renders, free of networking.

:class:`DiscriminatorTrainer` takes uint8 batches (real images, renders from the replay buffer
and, in conditional runs, the targets the renders were made for) and performs one Adam step on
the discriminator's loss, by ``discriminator_learner.objective``:

* ``wgan-gp`` (SPIRAL): ``mean(D(fake)) - mean(D(real)) + gradient_penalty + level_penalty``
  (:mod:`spiral.losses.wgan_gp`); the level penalty keeps D's mean over the half-real,
  half-fake batch near 0, so the reward has a fixed level.
* ``sngan`` (SPIRAL++): the non-saturating GAN loss of a spectrally normalised discriminator
  (:mod:`spiral.losses.nonsaturating`).

With ``discriminator_learner.precision: bf16`` the discriminator's forward passes and the gradient
penalty's double backward run under bf16 autocast (:mod:`spiral.nets.precision`); the losses, the
penalty's norms and Adam's fp32 master weights do not.

What the discriminator sees is decided by :func:`spiral.agent.discriminator_inputs.discriminator_inputs`,
the rule the policy learner scores with too. In conditional mode a real pair is ``(real, real)`` (a target
reconstructs itself perfectly) and a fake pair is ``(render, its target)``; the gradient
penalty interpolates the images and keeps the fake pairs' targets fixed (the discriminator
learner passes ``real = fake_targets``, so both pairs share their targets). With the
complement discriminator each sample draws a half: the fake is its target with that half
replaced by the render, the real is the target itself.

Checkpoints and PBT copies name the network ``critic``
(:data:`spiral.agent.training_state.DISCRIMINATOR_STATE_NAME`), so older files still load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from spiral.config import ExperimentConfig
from spiral.agent.discriminator_inputs import discriminator_inputs, random_halves
from spiral.losses import (gradient_penalty, level_penalty, nonsaturating_discriminator_loss,
                           wgan_discriminator_loss, wasserstein_estimate)
from spiral.nets import images_to_tensor
from spiral.nets.discriminator import Discriminator
from spiral.nets.precision import autocast, resolve_precision
from spiral.runtime.device import read_floats, training_device
from spiral.agent.training_state import (DISCRIMINATOR_STATE_NAME, check_training_state, export_training_state,
                                         import_training_state)


@dataclass
class DiscriminatorUpdateStats:
    """What one discriminator update measured.

    Attributes:
        loss: The whole loss that was minimised.
        gp: The weighted gradient penalty (``wgan-gp``; 0 for ``sngan``).
        d_real, d_fake: Mean discriminator outputs on real and fake samples.
        wasserstein: ``d_real - d_fake``, the discriminator's Wasserstein-distance estimate
            (``wgan-gp``; for ``sngan`` the gap between the mean logits).
        level: ``(d_real + d_fake) / 2``, the discriminator's mean over the half-real, half-fake batch.
        level_penalty: The weighted penalty on ``level ** 2`` (``wgan-gp``; 0 for ``sngan``).
    """

    loss: float
    gp: float
    d_real: float
    d_fake: float
    wasserstein: float
    level: float = 0.0
    level_penalty: float = 0.0


class DiscriminatorTrainer:
    """Owns the discriminator's Adam optimiser (``cfg.discriminator_learner``) and performs updates.

    Args:
        cfg: The experiment.
        discriminator: The discriminator to train (moved to ``device``).
        device: Torch device (checked to exist, :func:`~spiral.runtime.device.training_device`).
        seed: Seed of the gradient-penalty interpolation and of the complement halves.
    """

    def __init__(self, cfg: ExperimentConfig, discriminator: Discriminator, device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        self.cfg = cfg
        self.device = training_device(device, "discriminator trainer device")
        self.discriminator = discriminator.to(self.device)
        dc = cfg.discriminator_learner
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=dc.learning_rate,
                                          betas=(dc.adam_beta1, dc.adam_beta2))
        self.generator = torch.Generator().manual_seed(seed)
        self.halves_rng = np.random.default_rng(seed)
        self.precision = resolve_precision(dc.precision, self.device, "discriminator_learner.precision")
        """The discriminator's arithmetic in updates (``discriminator_learner.precision`` where native, else fp32)."""

    def _images(self, name: str, images: np.ndarray, like: tuple[int, ...] | None = None) -> torch.Tensor:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{name} must be uint8 [B, H, W, C], got {images.dtype} {list(images.shape)}")
        if like is not None and images.shape != like:
            raise ValueError(f"{name} has shape {list(images.shape)}; expected {list(like)} like the real images")
        return images_to_tensor(images, self.device)  # uint8 across, from pinned memory on CUDA

    def update(self, real: np.ndarray, fake: np.ndarray, fake_targets: np.ndarray | None = None) -> DiscriminatorUpdateStats:
        """One step of the discriminator's loss on uint8 ``[B, H, W, C]`` batches.

        The host waits for the device once, at the end, to read the step's figures.

        Args:
            real: Real images.
            fake: Renders.
            fake_targets: The renders' targets; required by (and only accepted by) a conditional run.
        """
        cfg = self.cfg
        dc = cfg.discriminator_learner
        shape = tuple(np.asarray(real).shape)
        real_t = self._images("real", real)
        fake_t = self._images("fake", fake, like=shape)
        self.discriminator.train()
        if cfg.env.conditional:
            if fake_targets is None:
                raise ValueError("the discriminator is conditional: update() needs fake_targets (the renders' targets)")
            targets_t = self._images("fake_targets", fake_targets, like=shape)
        else:
            if fake_targets is not None:
                raise ValueError("the discriminator is unconditional: pass fake_targets=None")
            targets_t = None
        halves = random_halves(self.halves_rng, shape[0]) if cfg.discriminator.complement else None
        real_in = discriminator_inputs(cfg, real_t, real_t if targets_t is not None else None, halves)
        fake_in = discriminator_inputs(cfg, fake_t, targets_t, halves)
        with autocast(self.precision, self.device):  # the outputs and the penalty's norms are fp32
            d_real = self.discriminator(*real_in).float()
            d_fake = self.discriminator(*fake_in).float()
            if dc.objective == "wgan-gp":
                gp = gradient_penalty(self.discriminator, real_in[0], fake_in[0],
                                      fake_in[1] if len(fake_in) == 2 else None,
                                      weight=dc.gradient_penalty, generator=self.generator)
        zero = torch.zeros((), device=self.device)
        if dc.objective == "sngan":
            gp = level = zero
            loss = nonsaturating_discriminator_loss(d_real, d_fake)
        else:
            level = level_penalty(d_real, d_fake, dc.level_penalty) if dc.level_penalty else zero
            loss = wgan_discriminator_loss(d_real, d_fake) + gp + level
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        d_real, d_fake = d_real.detach(), d_fake.detach()
        return DiscriminatorUpdateStats(**read_floats({
            "loss": loss, "gp": gp, "d_real": d_real.mean(), "d_fake": d_fake.mean(),
            "wasserstein": wasserstein_estimate(d_real, d_fake), "level": 0.5 * (d_real.mean() + d_fake.mean()),
            "level_penalty": level}))

    def state_dict(self) -> dict[str, Any]:
        """Discriminator weights (under ``critic``, :data:`DISCRIMINATOR_STATE_NAME`) and optimiser state."""
        return {DISCRIMINATOR_STATE_NAME: self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = {DISCRIMINATOR_STATE_NAME, "optimizer"} - set(state)
        if missing:
            raise ValueError(f"discriminator trainer state lacks {sorted(missing)}")
        self.discriminator.load_state_dict(state[DISCRIMINATOR_STATE_NAME])
        self.optimizer.load_state_dict(state["optimizer"])

    # -- population-based training copies ------------------------------------------------------

    def export_state(self) -> dict[str, np.ndarray]:
        """Discriminator weights and Adam state as flat CPU numpy arrays (what a PBT exploit copies).

        Names: ``"critic/<state_dict name>"`` and ``"optimizer/<param_index>/<key>"``; see
        :mod:`spiral.agent.training_state`. The gradient-penalty generator is not included.
        """
        return export_training_state(DISCRIMINATOR_STATE_NAME, self.discriminator, self.optimizer)

    def check_state(self, tensors: Mapping[str, np.ndarray]) -> list[str]:
        """Every way ``tensors`` does not fit this trainer (empty when :meth:`import_state` would succeed)."""
        return check_training_state(tensors, DISCRIMINATOR_STATE_NAME, self.discriminator, self.optimizer)

    def import_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Become a copy of the trainer whose :meth:`export_state` gave ``tensors``.

        Validates everything first and changes nothing unless all fits; Adam's settings stay.

        Raises:
            ValueError: (:class:`~spiral.agent.training_state.TrainingStateError`) naming each bad entry.
        """
        import_training_state(tensors, DISCRIMINATOR_STATE_NAME, self.discriminator, self.optimizer)
