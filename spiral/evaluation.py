"""Held-out evaluation of a conditional policy: how well does it reconstruct images it never trained on?

The conditional agent's task is to paint a given target. Its quality is the mean squared
error, in [0, 1] pixel units, between its final canvas and the target, averaged over a fixed
held-out batch (``dataset.holdout`` images that training never samples). Two baselines put
the number in context: a blank canvas (painting nothing) and an untrained policy (random
strokes). The same figure, negated, is the default fitness of population-based training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spiral.config import ExperimentConfig
from spiral.envs import make_env
from spiral.nets import observation_to_tensors
from spiral.nets.policy import SpiralPolicy
from spiral.rewards import reconstruction_l2


@dataclass(frozen=True)
class Reconstruction:
    """Final canvases for a batch of targets and their per-image errors."""

    canvases: np.ndarray
    targets: np.ndarray
    l2: np.ndarray

    @property
    def mean_l2(self) -> float:
        return float(self.l2.mean())


@torch.no_grad()
def reconstruct(cfg: ExperimentConfig, policy: SpiralPolicy, targets: np.ndarray, seed: int = 0,
                backend: str | None = None) -> Reconstruction:
    """Run one episode per target with ``policy`` (sampling its actions) and score the canvases."""
    if not cfg.env.conditional:
        raise ValueError("reconstruction needs a conditional experiment (env.conditional: true)")
    policy = policy.eval()
    env = make_env(cfg, len(targets), seed=seed, backend=backend)
    try:
        generator = torch.Generator().manual_seed(seed)
        obs = env.reset(targets)
        state = policy.initial_state(len(targets))
        while not env.done:
            out, state = policy(observation_to_tensors(obs), state, generator=generator)
            obs = env.step(out.actions.numpy())
        canvases = env.canvases().copy()
    finally:
        env.close()
    return Reconstruction(canvases=canvases, targets=targets, l2=reconstruction_l2(canvases, targets))


def blank_l2(targets: np.ndarray) -> float:
    """Mean error of painting nothing (a white canvas) on ``targets``."""
    return float(reconstruction_l2(np.full_like(targets, 255), targets).mean())
