"""WGAN-GP: the Wasserstein discriminator loss with a gradient penalty (Gulrajani et al. 2017).

The discriminator ``D`` (the WGAN papers' "critic") scores images (or (image, target) pairs in
conditional mode); trained to
minimise ``E[D(fake)] - E[D(real)]`` under a 1-Lipschitz constraint, ``E[D(real)] - E[D(fake)]``
estimates the Wasserstein-1 distance between real images and the agent's renders. The
constraint is enforced softly by penalising ``(||grad_x D(x_hat)||_2 - 1)^2`` at random points
``x_hat = eps * real + (1 - eps) * fake`` on lines between real and fake samples.

SPIRAL uses penalty weight 10 and Adam(lr 1e-4, beta1 0.5) (see
:class:`spiral.config.DiscriminatorLearnerConfig`).
"""

from __future__ import annotations

from typing import Callable

import torch

DiscriminatorFn = Callable[..., torch.Tensor]
"""``discriminator(images [B, C, H, W]) -> [B]`` or, conditional, ``discriminator(images, targets) -> [B]``."""


def wgan_discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """WGAN discriminator loss ``mean(D(fake)) - mean(D(real))`` (without the penalty)."""
    return d_fake.mean() - d_real.mean()


def wasserstein_estimate(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """``mean(D(real)) - mean(D(fake))``: the discriminator's estimate of the Wasserstein distance."""
    return d_real.mean() - d_fake.mean()


def gradient_penalty(discriminator: DiscriminatorFn, real: torch.Tensor, fake: torch.Tensor,
                     targets: torch.Tensor | None = None, weight: float = 10.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``weight * mean((||grad D(x_hat)||_2 - 1)^2)`` on random interpolates of ``real`` and ``fake``.

    One ``eps ~ U[0, 1]`` per sample. In conditional mode the *images* are interpolated and
    ``targets`` stay fixed; the gradient is taken with respect to the images only. The penalty
    keeps its graph (``create_graph``), so it can be back-propagated into the discriminator.

    Args:
        discriminator: The discriminator (see :data:`DiscriminatorFn`).
        real: ``[B, C, H, W]`` real images.
        fake: ``[B, C, H, W]`` generated images.
        targets: ``[B, C, H, W]`` conditioning targets, or None for an unconditional discriminator.
        weight: Penalty weight (lambda).
        generator: Random source for ``eps``.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {list(real.shape)} and fake {list(fake.shape)} must have the same shape")
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), generator=generator)
    if real.is_cuda:  # from pinned memory, queued: the host does not wait for the device here
        eps = eps.pin_memory().to(real.device, non_blocking=True)
    eps = eps.to(real.device, real.dtype)
    interpolates = (eps * real.detach() + (1.0 - eps) * fake.detach()).requires_grad_(True)
    scores = discriminator(interpolates) if targets is None else discriminator(interpolates, targets.detach())
    (grads,) = torch.autograd.grad(scores.float().sum(), interpolates, create_graph=True)
    norms = grads.flatten(1).float().norm(2, dim=1)  # fp32, also when D ran under bf16 autocast
    return weight * ((norms - 1.0) ** 2).mean()


def level_penalty(d_real: torch.Tensor, d_fake: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * ((mean(D(real)) + mean(D(fake))) / 2)^2``: pins the discriminator's level (SPIRAL).

    The WGAN loss is unchanged when a constant is added to D, so nothing fixes the discriminator's
    level and, with it, the reward's: it drifts with the optimiser. Penalising the square of
    D's mean over the half-real, half-fake mixture keeps that mean near 0 and leaves the
    difference ``D(real) - D(fake)``, what the discriminator learns, free.
    """
    level = 0.5 * (d_real.mean() + d_fake.mean())
    return weight * level * level
