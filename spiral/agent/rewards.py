"""How SPIRAL scores an episode.

The reward arrives once, at the end of an episode, from its final render (paper, section 3):

* ``discriminator_weight * S(final)``: the critic's reward score of the render (or of the pair
  ``(render, target)`` in conditional mode; :mod:`spiral.agent.discriminator_inputs` says what the critic sees and
  how its output becomes the score S). This is the adversarial reward. With
  ``temporal_credit`` (SPIRAL++) it is paid per step instead, as the score's changes (see
  :meth:`learner.training.PolicyTrainer.step_rewards`), and with ``normalize: running`` S is
  first put to unit scale (:class:`RunningScoreNormalizer`).
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


def episode_rewards(final_canvases: np.ndarray, targets: np.ndarray | None, reward_cfg: RewardConfig,
                    critic_scores: torch.Tensor | None = None, device: str | torch.device = "cpu",
                    empty_canvases: np.ndarray | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The end-of-episode reward of each render (see the module docstring).

    Args:
        final_canvases: uint8 ``[B, H, W, C]`` renders.
        targets: uint8 ``[B, H, W, C]`` targets (conditional runs), else None.
        reward_cfg: The weights.
        critic_scores: ``[B]`` the critic's reward scores of the renders
            (:func:`spiral.agent.discriminator_inputs.reward_scores`), or None for no adversarial term (no critic
            yet, or a run that pays the critic per step).
        device: Where the rewards live.
        empty_canvases: Empty-scene renders for the blank test (None: white paper).

    Returns:
        ``(rewards [B] float32 on device, parts)`` where ``parts`` holds batch means:
        ``discriminator_score`` (NaN without critic scores), ``reconstruction_l2`` (NaN
        without targets), ``blank_fraction``, ``reward`` and each term's share of it
        (``reward_critic``, ``reward_l2``, ``reward_blank``).
    """
    final_canvases = _check_images("final_canvases", final_canvases)
    batch = len(final_canvases)
    rewards = torch.zeros(batch, dtype=torch.float32, device=device)
    parts: dict[str, float] = {"discriminator_score": math.nan, "reconstruction_l2": math.nan,
                               "reward_critic": 0.0, "reward_l2": 0.0}

    if critic_scores is not None:
        scores = critic_scores.to(device=device, dtype=torch.float32).reshape(batch)
        rewards += reward_cfg.discriminator_weight * scores
        parts["discriminator_score"] = float(scores.mean())
        parts["reward_critic"] = float(reward_cfg.discriminator_weight * scores.mean())

    if targets is not None:
        l2 = torch.from_numpy(reconstruction_l2(final_canvases, targets)).to(device)
        rewards -= reward_cfg.l2_weight * l2
        parts["reconstruction_l2"] = float(l2.mean())
        parts["reward_l2"] = float(-reward_cfg.l2_weight * l2.mean())

    blank = torch.from_numpy(is_blank(final_canvases, empty_canvases)).to(device)
    if reward_cfg.blank_penalty:
        rewards -= reward_cfg.blank_penalty * blank.float()
    parts["blank_fraction"] = float(blank.float().mean())
    parts["reward_blank"] = float(-reward_cfg.blank_penalty * blank.float().mean())
    parts["reward"] = float(rewards.mean())
    return rewards, parts


class RunningScoreNormalizer:
    """``normalize: running``: the critic's reward scores divided into unit scale by running statistics.

    Each call takes one update's scores (every canvas the learner scored), folds their mean
    and variance into exponential moving averages (weight ``1 - decay`` for the new batch; the
    first batch initialises them) and returns ``(scores - mean) / std``. After
    ``freeze_after`` updates (0: never) the statistics stop moving, so the reward's scale is
    fixed from then on. The state is part of the policy learner's checkpoint.

    Args:
        decay: Per-update decay of the averages, in (0, 1).
        freeze_after: Updates after which the statistics freeze (0: never).
    """

    MIN_STD = 1e-3
    """Floor of the standard deviation: an untrained critic may score every canvas alike."""

    def __init__(self, decay: float = 0.99, freeze_after: int = 0) -> None:
        self.decay = float(decay)
        self.freeze_after = int(freeze_after)
        self.mean = 0.0
        self.var = 1.0
        self.updates = 0

    @property
    def frozen(self) -> bool:
        """Whether the statistics have stopped moving."""
        return bool(self.freeze_after) and self.updates >= self.freeze_after

    @property
    def std(self) -> float:
        return max(math.sqrt(self.var), self.MIN_STD)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Update the statistics with ``scores`` (unless frozen) and return them normalised."""
        if not self.frozen:
            batch_mean = float(scores.mean())
            batch_var = float(scores.var(unbiased=False)) if scores.numel() > 1 else 0.0
            if self.updates == 0:
                self.mean, self.var = batch_mean, batch_var
            else:
                new_mean = self.decay * self.mean + (1 - self.decay) * batch_mean
                self.var = (self.decay * (self.var + (self.mean - new_mean) ** 2)
                            + (1 - self.decay) * (batch_var + (batch_mean - new_mean) ** 2))
                self.mean = new_mean
            self.updates += 1
        return (scores - self.mean) / self.std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "updates": self.updates}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.updates = float(state["mean"]), float(state["var"]), int(state["updates"])
