"""What the discriminator judges, and how its judgement becomes a reward score.

Both learners use the discriminator: the discriminator learner trains it on real examples
against the agent's renders, the policy learner turns its scores into rewards
(:class:`spiral.agent.rewards.RewardFunction`). This module holds the rules they must share, so
that the discriminator is trained on exactly the inputs it later scores.

**What the discriminator sees** (:func:`discriminator_inputs`), by experiment:

* unconditional runs: the image alone;
* conditional runs: the pair ``(image, target)``; the real pair is ``(target, target)``;
* conditional runs with ``discriminator.complement`` (SPIRAL++): one image, the target with a
  random half replaced by the render (:func:`complement_mix`); the real example is the target
  itself. Halves are numbered :data:`HALVES`; each episode draws one (:func:`random_halves`)
  and keeps it for all of its canvases, so per-step score differences compare like with like.

**The reward score** (:func:`reward_scores`): what the agent maximises. A WGAN-GP
discriminator's output D is a Wasserstein potential (the WGAN paper's "critic") and is used as
it is; a non-saturating GAN discriminator (``sngan``) outputs a logit, and the score is
``log sigmoid(D)``, the log-probability it gives the image of being real (the generator's
objective in the non-saturating GAN loss).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from spiral.config import ExperimentConfig
from spiral.runtime.device import host_to_device

HALVES = ("left", "right", "top", "bottom")
"""The complement discriminator's masks: the half of the image that shows the render."""


def random_halves(generator: np.random.Generator, count: int) -> np.ndarray:
    """``[count]`` int64 indices into :data:`HALVES`, uniformly at random."""
    return generator.integers(0, len(HALVES), size=count).astype(np.int64)


def half_masks(halves: np.ndarray | torch.Tensor, size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """``[B, 1, size, size]`` float masks: 1 on the chosen half of each image, 0 elsewhere."""
    # Checked on the host (checking on a GPU would wait for it), then copied without waiting.
    indices = halves.cpu().numpy() if isinstance(halves, torch.Tensor) else np.asarray(halves)
    if indices.ndim != 1 or ((indices < 0) | (indices >= len(HALVES))).any():
        raise ValueError(f"halves must be a 1-D array of indices into {HALVES}, got {indices.tolist()}")
    halves = host_to_device(indices.astype(np.int64), torch.device(device))
    first_half = (torch.arange(size, device=device) < size // 2).float()
    left = first_half.view(1, size).expand(size, size)
    top = first_half.view(size, 1).expand(size, size)
    options = torch.stack([left, 1 - left, top, 1 - top])  # [4, size, size] in HALVES order
    return options[halves].unsqueeze(1)


def complement_mix(images: torch.Tensor, targets: torch.Tensor, halves: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The complement discriminator's input: ``images`` on each chosen half, ``targets`` elsewhere.

    Args:
        images: ``[B, C, S, S]`` renders in [0, 1].
        targets: ``[B, C, S, S]`` their targets.
        halves: ``[B]`` indices into :data:`HALVES`.
    """
    if images.shape != targets.shape:
        raise ValueError(f"images {list(images.shape)} and targets {list(targets.shape)} must have the same shape")
    if len(halves) != images.shape[0]:
        raise ValueError(f"need one half per image: {len(halves)} halves for {images.shape[0]} images")
    mask = half_masks(halves, images.shape[-1], images.device).to(images.dtype)
    return mask * images + (1 - mask) * targets


def discriminator_inputs(cfg: ExperimentConfig, images: torch.Tensor, targets: torch.Tensor | None,
                         halves: np.ndarray | torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The arguments with which the experiment's discriminator scores ``images`` (see the module docstring).

    Args:
        cfg: The experiment (``env.conditional`` and ``discriminator.complement`` decide).
        images: ``[B, C, S, S]`` images in [0, 1]: renders, or real examples.
        targets: ``[B, C, S, S]`` their targets (conditional runs), else None.
        halves: ``[B]`` complement halves (complement runs only).

    Returns:
        ``(images,)`` or ``(images, targets)``: call ``discriminator(*discriminator_inputs(...))``.
    """
    if not cfg.env.conditional:
        if targets is not None:
            raise ValueError("an unconditional discriminator judges images alone: pass no targets")
        return (images,)
    if targets is None:
        raise ValueError("the discriminator of a conditional run needs the images' targets")
    if cfg.discriminator.complement:
        if halves is None:
            raise ValueError("the complement discriminator needs each image's half (spiral.agent.discriminator_inputs.random_halves)")
        return (complement_mix(images, targets, halves),)
    return (images, targets)


def reward_scores(outputs: torch.Tensor, cfg: ExperimentConfig) -> torch.Tensor:
    """The score the agent maximises, from the discriminator's raw outputs (see the module docstring)."""
    if cfg.discriminator_learner.objective == "sngan":
        return F.logsigmoid(outputs)
    return outputs


@torch.no_grad()
def score_images(discriminator: torch.nn.Module, cfg: ExperimentConfig, images: np.ndarray,
                 targets: np.ndarray | None, halves: np.ndarray | None = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """The discriminator's raw outputs ``[N]`` (float32, on ``device``) for uint8 ``[N, H, W, C]`` images.

    One batched call, without gradients. ``targets`` and ``halves`` are as for
    :func:`discriminator_inputs`, one per image.
    """
    from spiral.nets import images_to_tensor  # local: keeps this module free of the nets at import

    images_t = images_to_tensor(images, device)
    targets_t = None if targets is None else images_to_tensor(targets, device)
    return discriminator(*discriminator_inputs(cfg, images_t, targets_t, halves)).float().reshape(len(images))
