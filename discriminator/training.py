"""One discriminator update: WGAN-GP on real images vs the agent's renders, free of networking.

:class:`DiscriminatorTrainer` takes uint8 batches (real images, renders from the replay buffer
and, in conditional runs, the targets the renders were made for) and performs one Adam step on
``mean(D(fake)) - mean(D(real)) + gradient_penalty`` (see :mod:`spiral.losses.wgan_gp`).

In conditional mode the critic judges pairs: a real pair is ``(real, real)`` (a target
reconstructs itself perfectly) and a fake pair is ``(render, its target)``. The gradient
penalty interpolates the images between the real and fake pairs and keeps the fake pairs'
targets fixed; the discriminator learner passes ``real = fake_targets``, so both pairs share
their targets and the interpolation is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from spiral.config import ExperimentConfig
from spiral.losses import critic_loss, gradient_penalty, wasserstein_estimate
from spiral.nets import images_to_tensor
from spiral.nets.discriminator import Discriminator
from spiral.rpc.training_state import check_training_state, export_training_state, import_training_state


@dataclass
class DiscriminatorUpdateStats:
    """What one critic update measured.

    Attributes:
        loss: ``mean(D(fake)) - mean(D(real)) + gp``.
        gp: The weighted gradient penalty.
        d_real, d_fake: Mean critic scores of real and fake samples.
        wasserstein: ``d_real - d_fake``, the critic's Wasserstein-distance estimate.
    """

    loss: float
    gp: float
    d_real: float
    d_fake: float
    wasserstein: float


class DiscriminatorTrainer:
    """Owns the critic's Adam optimiser (``cfg.discriminator_learner``) and performs updates.

    Args:
        cfg: The experiment.
        critic: The discriminator to train (moved to ``device``).
        device: Torch device.
        seed: Seed of the gradient-penalty interpolation.
    """

    def __init__(self, cfg: ExperimentConfig, critic: Discriminator, device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.critic = critic.to(self.device)
        dc = cfg.discriminator_learner
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=dc.learning_rate,
                                          betas=(dc.adam_beta1, dc.adam_beta2))
        self.generator = torch.Generator().manual_seed(seed)

    def _images(self, name: str, images: np.ndarray, like: tuple[int, ...] | None = None) -> torch.Tensor:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{name} must be uint8 [B, H, W, C], got {images.dtype} {list(images.shape)}")
        if like is not None and images.shape != like:
            raise ValueError(f"{name} has shape {list(images.shape)}; expected {list(like)} like the real images")
        return images_to_tensor(images).to(self.device)

    def update(self, real: np.ndarray, fake: np.ndarray, fake_targets: np.ndarray | None = None) -> DiscriminatorUpdateStats:
        """One WGAN-GP step on uint8 ``[B, H, W, C]`` batches.

        Args:
            real: Real images.
            fake: Renders.
            fake_targets: The renders' targets; required by (and only accepted by) a conditional critic.
        """
        real_t = self._images("real", real)
        fake_t = self._images("fake", fake, like=tuple(np.asarray(real).shape))
        self.critic.train()
        if self.critic.conditional:
            if fake_targets is None:
                raise ValueError("the critic is conditional: update() needs fake_targets (the renders' targets)")
            targets_t = self._images("fake_targets", fake_targets, like=tuple(np.asarray(real).shape))
            d_real = self.critic(real_t, real_t)
            d_fake = self.critic(fake_t, targets_t)
        else:
            if fake_targets is not None:
                raise ValueError("the critic is unconditional: pass fake_targets=None")
            targets_t = None
            d_real = self.critic(real_t)
            d_fake = self.critic(fake_t)
        gp = gradient_penalty(self.critic, real_t, fake_t, targets_t,
                              weight=self.cfg.discriminator_learner.gradient_penalty, generator=self.generator)
        loss = critic_loss(d_real, d_fake) + gp
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return DiscriminatorUpdateStats(loss=float(loss.detach()), gp=float(gp.detach()),
                                        d_real=float(d_real.detach().mean()), d_fake=float(d_fake.detach().mean()),
                                        wasserstein=float(wasserstein_estimate(d_real.detach(), d_fake.detach())))

    def state_dict(self) -> dict[str, Any]:
        """Critic weights and optimiser state."""
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = {"critic", "optimizer"} - set(state)
        if missing:
            raise ValueError(f"discriminator trainer state lacks {sorted(missing)}")
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])

    # -- population-based training copies ------------------------------------------------------

    def export_state(self) -> dict[str, np.ndarray]:
        """Critic weights and Adam state as flat CPU numpy arrays (what a PBT exploit copies).

        Names: ``"critic/<state_dict name>"`` and ``"optimizer/<param_index>/<key>"``; see
        :mod:`spiral.rpc.training_state`. The gradient-penalty generator is not included.
        """
        return export_training_state("critic", self.critic, self.optimizer)

    def check_state(self, tensors: Mapping[str, np.ndarray]) -> list[str]:
        """Every way ``tensors`` does not fit this trainer (empty when :meth:`import_state` would succeed)."""
        return check_training_state(tensors, "critic", self.critic, self.optimizer)

    def import_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Become a copy of the trainer whose :meth:`export_state` gave ``tensors``.

        Validates everything first and changes nothing unless all fits; Adam's settings stay.

        Raises:
            ValueError: (:class:`~spiral.rpc.training_state.TrainingStateError`) naming each bad entry.
        """
        import_training_state(tensors, "critic", self.critic, self.optimizer)
