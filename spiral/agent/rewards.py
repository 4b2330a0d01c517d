"""How SPIRAL scores an episode: an unroll's canvases in, per-step rewards out.

:class:`RewardFunction` is the whole reward. The policy learner calls it once per update on a
batch of finished episodes (:class:`~spiral.agent.trajectory.Unroll`) with the newest
discriminator it holds, and gets ``[T, B]`` rewards and the reward's parts to log.

The reward arrives once, at the end of an episode, from its final render (paper, section 3):

* ``discriminator_weight * S(final)``: the discriminator's reward score of the render (or of
  the pair ``(render, target)`` in conditional mode; :mod:`spiral.agent.discriminator_inputs`
  says what the discriminator sees and how its output becomes the score S). This is the
  adversarial reward (logged as ``reward_critic``). With ``temporal_credit`` (SPIRAL++) it is
  paid per step instead, as the score's changes: step t earns ``discriminator_weight *
  (S(canvas t+1) - S(canvas t))``, canvas 0 being the empty canvas the episode started from.
  With ``normalize: running`` S is first put to unit scale (:class:`RunningScoreNormalizer`).
* ``- l2_weight * L2(final, target)``: conditional runs may add the negative mean squared
  error to the target, in [0, 1] pixel units (an optional, denser reconstruction signal). With
  ``l2_shaping`` it is paid per step instead, as the error drops (measured on images
  average-pooled by ``l2_pool``, :func:`pooled`).
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
from typing import Any, Mapping

import numpy as np
import torch

from spiral.agent.discriminator_inputs import random_halves, reward_scores, score_images
from spiral.agent.trajectory import Unroll
from spiral.config import ExperimentConfig
from spiral.envs.spec import FLAG_PAINT
from spiral.nets.precision import Precision, autocast
from spiral.runtime.device import host_to_device, read_floats

BLANK_TOLERANCE = 8
"""A canvas is blank when no pixel differs from the empty canvas by more than this (of 255)."""
PAPER_WHITE = 255
"""The painting environment's empty canvas value."""
NORMALIZER_STATE_KEY = "reward_normalizer"
"""The trainer-state (checkpoint) key of the running normaliser's statistics."""

RewardParts = dict[str, float | torch.Tensor]
"""The reward's parts before they are read back: Python floats (what the host computed) and
single-element tensors on the reward's device, read together at the end of the update
(:func:`spiral.runtime.device.read_floats`) instead of one host synchronisation each."""


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


def pooled(images: np.ndarray, factor: int) -> np.ndarray:
    """uint8 ``[B, H, W, C]`` images average-pooled by ``factor`` (``factor`` 1: unchanged)."""
    if factor == 1:
        return images
    b, h, w, c = images.shape
    if h % factor or w % factor:
        raise ValueError(f"learner.reward.l2_pool: {factor} does not divide the image size {h}x{w}")
    blocks = images.reshape(b, h // factor, factor, w // factor, factor, c).astype(np.float32)
    return blocks.mean(axis=(2, 4)).round().astype(np.uint8)


class RunningScoreNormalizer:
    """``normalize: running``: the discriminator's reward scores put to unit scale by running statistics.

    Each call takes one update's scores (every canvas the learner scored), folds their mean
    and variance into exponential moving averages (weight ``1 - decay`` for the new batch; the
    first batch initialises them) and returns ``(scores - mean) / std``. After
    ``freeze_after`` updates (0: never) the statistics stop moving, so the reward's scale is
    fixed from then on. The state is part of the policy learner's checkpoint
    (:meth:`RewardFunction.state_dict`).

    Args:
        decay: Per-update decay of the averages, in (0, 1).
        freeze_after: Updates after which the statistics freeze (0: never).
    """

    MIN_STD = 1e-3
    """Floor of the standard deviation: an untrained discriminator may score every canvas alike."""

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
        if not self.frozen:  # the statistics are Python floats: one read-back of both per update
            if scores.numel() > 1:
                batch_mean, batch_var = torch.stack([scores.mean(), scores.var(unbiased=False)]).tolist()
            else:
                batch_mean, batch_var = float(scores.mean()), 0.0
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


class RewardFunction:
    """Per-step rewards ``[T, B]`` of an unroll's episodes, and the reward's parts.

    Every term of the module docstring, computed in one call per policy update. The canvases
    the discriminator scores (the empty and the final ones, or every canvas with
    ``temporal_credit``) go through it in one batched call, under the learner's precision. What
    the reward carries from one update to the next lives here too: the running normaliser's
    statistics (saved with the trainer's state, :meth:`state_dict`) and the generator that
    draws each episode's complement half (``discriminator.complement``; one half per episode,
    kept for all of its canvases).

    Args:
        cfg: The experiment: ``learner.reward`` holds the weights; ``env`` and
            ``discriminator`` say what the discriminator sees; ``seed`` seeds the halves.
        device: Where the rewards live and the discriminator runs.
        precision: The arithmetic of the discriminator's forward (``learner.precision`` as
            resolved for ``device``, :func:`spiral.nets.precision.resolve_precision`).
    """

    def __init__(self, cfg: ExperimentConfig, device: str | torch.device = "cpu",
                 precision: Precision = "fp32") -> None:
        self.cfg = cfg
        self.weights = cfg.learner.reward
        """The reward's weights and switches (``learner.reward``)."""
        self.device = torch.device(device)
        self.precision = precision
        self.normalizer = (RunningScoreNormalizer(self.weights.normalize_decay, self.weights.normalize_freeze_updates)
                           if self.weights.normalize == "running" else None)
        """The discriminator scores' running statistics (``normalize: running``), else None."""
        self.halves_rng = np.random.default_rng(cfg.seed)
        """Draws each episode's complement half (``discriminator.complement``)."""

    def __call__(self, unroll: Unroll,
                 discriminator: torch.nn.Module | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Score ``unroll``'s episodes.

        Args:
            unroll: Finished episodes (validated by the caller).
            discriminator: The network that judges the canvases, or None for no adversarial
                term (the learner has no discriminator version yet).

        Returns:
            ``(rewards [T, B] float32 on the device, parts)``. ``parts`` holds batch means: each
            term's mean per-episode return (``reward_critic``, ``reward_l2``, ``reward_blank``,
            ``reward_stroke``; ``reward`` is the last step's L2 and blank terms), the
            discriminator's raw output on the final and on the empty canvases
            (``discriminator_score``, NaN without a discriminator, and
            ``discriminator_score_empty``), the normaliser's statistics (``normalizer_mean``,
            ``normalizer_std``; 0 and 1 without one), ``reconstruction_l2`` (NaN without
            targets), ``blank_fraction``, ``paint_fraction`` (painting only) and ``stroke_starts``.
        """
        rewards, parts = self.score(unroll, discriminator)
        return rewards, read_floats(parts)

    def score(self, unroll: Unroll, discriminator: torch.nn.Module | None) -> tuple[torch.Tensor, RewardParts]:
        """:meth:`__call__` with the parts not yet read back (:data:`RewardParts`): what the policy
        trainer calls, so that the whole update reads its figures from the device once."""
        parts: RewardParts = {"discriminator_score": math.nan, "reconstruction_l2": math.nan,
                              "reward_critic": 0.0, "reward_l2": 0.0}
        rewards = torch.zeros(unroll.num_steps, unroll.batch_size, dtype=torch.float32, device=self.device)
        rewards[-1] = self._final_step_rewards(unroll, parts)
        if discriminator is not None:
            adversarial = self._adversarial_rewards(unroll, discriminator, parts)
            rewards += adversarial
            parts["reward_critic"] = adversarial.sum(0).mean()
        if self.weights.l2_shaping and self.weights.l2_weight and unroll.targets is not None:
            self._shape_l2(unroll.canvases, unroll.targets, rewards, parts)
        self._penalise_stroke_starts(unroll, rewards, parts)
        return rewards, parts

    # -- the terms -----------------------------------------------------------------------------

    def _final_step_rewards(self, unroll: Unroll, parts: RewardParts) -> torch.Tensor:
        """``[B]``: minus the weighted L2 to the targets and the blank penalty, paid at step ``T - 1``."""
        weights = self.weights
        final = unroll.final_canvases
        rewards = torch.zeros(unroll.batch_size, dtype=torch.float32, device=self.device)
        if unroll.targets is not None:
            l2 = host_to_device(reconstruction_l2(final, unroll.targets), self.device)
            rewards -= weights.l2_weight * l2
            parts["reconstruction_l2"] = l2.mean()
            parts["reward_l2"] = -weights.l2_weight * l2.mean()
        blank = host_to_device(is_blank(final, unroll.canvases[0]), self.device)
        if weights.blank_penalty:
            rewards -= weights.blank_penalty * blank.float()
        parts["blank_fraction"] = blank.float().mean()
        parts["reward_blank"] = -weights.blank_penalty * blank.float().mean()
        parts["reward"] = rewards.mean()
        return rewards

    def _adversarial_rewards(self, unroll: Unroll, discriminator: torch.nn.Module,
                             parts: RewardParts) -> torch.Tensor:
        """``[T, B]``: the discriminator's term, at the last step or, with ``temporal_credit``, per step."""
        t, b = unroll.num_steps, unroll.batch_size
        weights = self.weights
        # Temporal credit scores every canvas (T + 1 per episode); otherwise the empty and the
        # final ones (the empty canvas's score is logged: it shows where the discriminator's level is).
        scored = unroll.canvases if weights.temporal_credit else unroll.canvases[[0, -1]]
        k = len(scored)
        targets = None
        if unroll.targets is not None:
            targets = np.broadcast_to(unroll.targets, scored.shape).reshape(k * b, *scored.shape[2:])
        halves = None
        if self.cfg.discriminator.complement:
            halves = np.tile(random_halves(self.halves_rng, b), k)  # one half per episode, all its canvases
        with autocast(self.precision, self.device):
            outputs = score_images(discriminator, self.cfg, scored.reshape(k * b, *scored.shape[2:]), targets,
                                   halves, self.device).reshape(k, b)
        parts["discriminator_score"] = outputs[-1].mean()
        parts["discriminator_score_empty"] = outputs[0].mean()
        scores = reward_scores(outputs, self.cfg)
        if weights.temporal_credit:
            scores = self._normalized(scores, parts)
            return weights.discriminator_weight * (scores[1:] - scores[:-1])
        adversarial = torch.zeros(t, b, dtype=torch.float32, device=self.device)
        adversarial[-1] = weights.discriminator_weight * self._normalized(scores[-1:], parts)[0]
        return adversarial

    def _normalized(self, scores: torch.Tensor, parts: RewardParts) -> torch.Tensor:
        """``scores`` through the running normaliser (identity when ``normalize`` is ``none``)."""
        if self.normalizer is None:
            parts.update(normalizer_mean=0.0, normalizer_std=1.0)
            return scores
        scores = self.normalizer(scores)
        parts.update(normalizer_mean=self.normalizer.mean, normalizer_std=self.normalizer.std)
        return scores

    def _shape_l2(self, canvases: np.ndarray, targets: np.ndarray, rewards: torch.Tensor,
                  parts: RewardParts) -> None:
        """``l2_shaping``: trade the last step's ``-w * L2(final)`` for each step's drop in (pooled) L2.

        Potential-based shaping: the terminal term is added back and every step t earns
        ``w * (L2(canvas t) - L2(canvas t+1))``, on images pooled by ``l2_pool``.
        """
        weight, pool = self.weights.l2_weight, self.weights.l2_pool
        final_errors = reconstruction_l2(canvases[-1], targets)
        rewards[-1] += weight * host_to_device(final_errors, self.device)
        pooled_targets = pooled(targets, pool)
        errors = np.stack([reconstruction_l2(pooled(c, pool), pooled_targets) for c in canvases])  # [T+1, B]
        rewards += weight * host_to_device(errors[:-1] - errors[1:], self.device)
        parts["reward_l2"] = float(weight * (errors[0] - errors[-1]).mean())

    def _penalise_stroke_starts(self, unroll: Unroll, rewards: torch.Tensor, parts: RewardParts) -> None:
        """``- stroke_start_penalty`` at each step that starts a stroke (painting only)."""
        penalty = self.weights.stroke_start_penalty
        flags = unroll.actions[..., 0]
        if self.cfg.env.kind == "paint":
            starts = stroke_starts(flags)
            parts["paint_fraction"] = float((flags == FLAG_PAINT).mean())
        else:
            starts = np.zeros((unroll.num_steps, unroll.batch_size), np.float32)
        if penalty:
            rewards -= penalty * host_to_device(starts, self.device)
        parts["stroke_starts"] = float(starts.sum(0).mean())
        parts["reward_stroke"] = float(-penalty * starts.sum(0).mean())

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What the reward carries across updates, under its trainer-state key: the running
        normaliser's statistics (:data:`NORMALIZER_STATE_KEY`) with ``normalize: running``,
        else nothing. The halves' generator is not saved."""
        return {} if self.normalizer is None else {NORMALIZER_STATE_KEY: self.normalizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from a trainer state that :meth:`state_dict`'s entries were saved in (others are
        ignored; without the normaliser's entry its statistics start afresh)."""
        if self.normalizer is not None and NORMALIZER_STATE_KEY in state:
            self.normalizer.load_state_dict(state[NORMALIZER_STATE_KEY])
