"""Held-out evaluation of a conditional policy: how well does it reconstruct images it never trained on?

The conditional agent's task is to paint a given target. Its quality is the mean squared
error, in [0, 1] pixel units, between its final canvas and the target, averaged over a fixed
held-out batch (``dataset.holdout`` images that training never samples). Baselines put the
number in context: an untrained policy (random strokes), and each domain's canvas of doing
almost nothing (:func:`domain_baseline`), against which its goals are stated:

* strokes (MNIST, Omniglot): the **blank canvas**, white paper;
* MuJoCo scenes: the **empty floor**;
* faces (LFW, CelebA): the **mean-intensity canvas**, each target's own mean grey. A blank
  canvas is too easy a baseline for faces: most of a face is mid-grey, far from white.

The same figure, negated, is the default fitness of population-based training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spiral.agent.acting import EpisodeRunner  # the actor's own loop, so evaluation acts exactly alike
from spiral.config import ExperimentConfig
from spiral.envs import make_env
from spiral.nets.policy import SpiralPolicy
from spiral.agent.rewards import reconstruction_l2


@dataclass(frozen=True)
class Reconstruction:
    """Final canvases for a batch of targets, their per-image errors and the programs that painted them.

    Attributes:
        canvases: ``[B, H, W, C]`` uint8 final canvases.
        targets: ``[B, H, W, C]`` uint8 targets.
        l2: ``[B]`` mean squared error of each canvas to its target, in [0, 1] pixel units.
        actions: ``[B, T, K]`` int64 each episode's actions (its program).
        steps: ``[T + 1, B, H, W, C]`` uint8 the canvas before each action and the final one:
            the painting as it was made.
    """

    canvases: np.ndarray
    targets: np.ndarray
    l2: np.ndarray
    actions: np.ndarray
    steps: np.ndarray

    @property
    def mean_l2(self) -> float:
        return float(self.l2.mean())


def reconstruct(cfg: ExperimentConfig, policy: SpiralPolicy, targets: np.ndarray, seed: int = 0,
                backend: str | None = None, greedy: bool = False) -> Reconstruction:
    """Run one episode per target with ``policy`` and score the canvases.

    Actions are sampled, as the actors act, unless ``greedy``: then each head takes its most
    likely value (the policy's best guess, without exploration noise).
    """
    if not cfg.env.conditional:
        raise ValueError("reconstruction needs a conditional experiment (env.conditional: true)")
    env = make_env(cfg, len(targets), seed=seed, backend=backend)
    try:
        unroll = EpisodeRunner(cfg, env, policy, None, seed=seed, greedy=greedy).run_episode(targets)
    finally:
        env.close()
    canvases = unroll.final_canvases
    return Reconstruction(canvases=canvases, targets=targets, l2=reconstruction_l2(canvases, targets),
                          actions=np.swapaxes(unroll.actions, 0, 1).astype(np.int64), steps=unroll.canvases)


def blank_l2(targets: np.ndarray) -> float:
    """Mean error of painting nothing (a white canvas) on ``targets``."""
    return float(reconstruction_l2(np.full_like(targets, 255), targets).mean())


def empty_canvas_l2(cfg: ExperimentConfig, targets: np.ndarray, backend: str | None = None) -> float:
    """Mean error of doing nothing on ``targets``: the environment's own empty canvas.

    White paper for painting (the same as :func:`blank_l2`), the empty floor for MuJoCo scenes.
    """
    env = make_env(cfg, 1, seed=0, backend=backend)
    try:
        empty = env.reset(targets[:1] if cfg.env.conditional else None).canvas
    finally:
        env.close()
    return float(reconstruction_l2(np.broadcast_to(empty, targets.shape).copy(), targets).mean())


FACE_DATASETS = ("lfw", "celeba")
"""Datasets whose baseline is the mean-intensity canvas."""


def mean_intensity_l2(targets: np.ndarray) -> float:
    """Mean error of a canvas filled with each target's own mean intensity (over pixels and channels)."""
    targets = np.asarray(targets)
    means = targets.reshape(len(targets), -1).astype(np.float32).mean(axis=1).round()
    flat = np.broadcast_to(means[:, None, None, None], targets.shape).astype(np.uint8)
    return float(reconstruction_l2(flat, targets).mean())


def domain_baseline(cfg: ExperimentConfig, targets: np.ndarray, backend: str | None = None) -> tuple[str, float]:
    """``(name, mean L2)`` of the canvas a domain's goals are stated against (see the module docstring)."""
    if cfg.dataset.name in FACE_DATASETS:
        return "mean-intensity canvas", mean_intensity_l2(targets)
    name = "empty floor" if cfg.env.kind == "mujoco" else "blank canvas"
    return name, empty_canvas_l2(cfg, targets, backend=backend)
