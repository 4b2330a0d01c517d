"""How SPIRAL scores an episode.

The reward arrives once, at the end of an episode, from its final render (paper, section 3):

* ``discriminator_weight * D(final)``: the critic's score of the render (or of the pair
  ``(render, target)`` in conditional mode). This is the adversarial reward.
* ``- l2_weight * L2(final, target)``: conditional runs may add the negative mean squared
  error to the target, in [0, 1] pixel units (an optional, denser reconstruction signal).
* ``- blank_penalty``: when the final canvas shows nothing visible (no pixel differs from the
  empty canvas by more than :data:`BLANK_TOLERANCE` levels), a shaping term that keeps the
  agent from settling on an empty canvas.

A second shaping term is paid during the episode, at the step where it happens:
``- stroke_start_penalty`` for every continuous stroke sequence the agent starts, i.e. every
paint step (flag 1) that follows a move or opens the episode (:func:`stroke_starts`). Only the
painting environment has strokes; MuJoCo scenes have no such term.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spiral.config import RewardConfig
from spiral.envs.spec import FLAG_PAINT

BLANK_TOLERANCE = 8
"""A canvas is blank when no pixel differs from the empty canvas by more than this (of 255)."""
PAPER_WHITE = 255
"""The painting environment's empty canvas value."""


def _check_images(name: str, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{name} must be uint8 [B, H, W, C], got {images.dtype} {list(images.shape)}")
    return images


def reconstruction_l2(canvases: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-image mean squared error ``[B]`` (float32) between uint8 images, in [0, 1] pixel units."""
    canvases = _check_images("canvases", canvases)
    targets = _check_images("targets", targets)
    if canvases.shape != targets.shape:
        raise ValueError(f"canvases {list(canvases.shape)} and targets {list(targets.shape)} must have the same shape")
    diff = (canvases.astype(np.float32) - targets.astype(np.float32)) / 255.0
    return (diff * diff).reshape(len(diff), -1).mean(axis=1).astype(np.float32)


def is_blank(final_canvases: np.ndarray, empty_canvases: np.ndarray | None = None) -> np.ndarray:
    """``[B]`` bool: the render shows nothing visible compared to the empty canvas.

    Args:
        final_canvases: uint8 ``[B, H, W, C]`` renders.
        empty_canvases: uint8 renders of the empty scene (e.g. an unroll's first canvases), the
            same shape or broadcastable; None means white paper (255).
    """
    final_canvases = _check_images("final_canvases", final_canvases)
    empty = np.asarray(PAPER_WHITE if empty_canvases is None else empty_canvases, dtype=np.int16)
    diff = np.abs(final_canvases.astype(np.int16) - empty)
    return diff.reshape(len(diff), -1).max(axis=1) <= BLANK_TOLERANCE


def stroke_starts(flags: np.ndarray) -> np.ndarray:
    """``[T, B]`` float32: 1 where a paint step starts a new continuous stroke sequence.

    A paint step (flag 1) starts a stroke when it is the episode's first action or follows a
    move (flag 0); a paint step after a paint step continues the stroke.

    Args:
        flags: ``[T, B]`` integer ``flag`` head values.
    """
    flags = np.asarray(flags)
    if flags.ndim != 2:
        raise ValueError(f"flags must be [T, B], got {list(flags.shape)}")
    paint = flags == FLAG_PAINT
    previous = np.concatenate([np.zeros((1, flags.shape[1]), bool), paint[:-1]], axis=0)
    return (paint & ~previous).astype(np.float32)


@torch.no_grad()
def episode_rewards(final_canvases: np.ndarray, targets: np.ndarray | None, critic: torch.nn.Module | None,
                    reward_cfg: RewardConfig, device: str | torch.device = "cpu",
                    empty_canvases: np.ndarray | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The end-of-episode reward of each render (see the module docstring).

    Args:
        final_canvases: uint8 ``[B, H, W, C]`` renders.
        targets: uint8 ``[B, H, W, C]`` targets (conditional runs), else None.
        critic: The discriminator, or None (no adversarial term, e.g. before it is published).
        reward_cfg: The weights.
        device: Where the critic runs and the rewards live.
        empty_canvases: Empty-scene renders for the blank test (None: white paper).

    Returns:
        ``(rewards [B] float32 on device, parts)`` where ``parts`` holds batch means:
        ``discriminator_score`` (NaN without a critic), ``reconstruction_l2`` (NaN without
        targets), ``blank_fraction`` and ``reward``.
    """
    final_canvases = _check_images("final_canvases", final_canvases)
    batch = len(final_canvases)
    rewards = torch.zeros(batch, dtype=torch.float32, device=device)
    parts: dict[str, float] = {"discriminator_score": math.nan, "reconstruction_l2": math.nan}

    if critic is not None:
        from spiral.nets import images_to_tensor  # local: keeps this module free of the nets at import

        images = images_to_tensor(final_canvases).to(device)
        if getattr(critic, "conditional", False):
            if targets is None:
                raise ValueError("the critic is conditional: episode_rewards needs the episodes' targets")
            scores = critic(images, images_to_tensor(_check_images("targets", targets)).to(device))
        else:
            scores = critic(images)
        scores = scores.float().reshape(batch)
        rewards += reward_cfg.discriminator_weight * scores
        parts["discriminator_score"] = float(scores.mean())

    if targets is not None:
        l2 = torch.from_numpy(reconstruction_l2(final_canvases, targets)).to(device)
        rewards -= reward_cfg.l2_weight * l2
        parts["reconstruction_l2"] = float(l2.mean())

    blank = torch.from_numpy(is_blank(final_canvases, empty_canvases)).to(device)
    if reward_cfg.blank_penalty:
        rewards -= reward_cfg.blank_penalty * blank.float()
    parts["blank_fraction"] = float(blank.float().mean())
    parts["reward"] = float(rewards.mean())
    return rewards, parts
