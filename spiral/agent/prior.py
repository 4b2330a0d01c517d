"""A broad prior over programs: what self-supervised program recovery learns to invert besides the agent's own episodes.

Program recovery (``learner.hindsight_weight``) trains the policy, by maximum likelihood, to
write the program that painted an image when that image is its target. Its examples come from
two places: the agent's own episodes, each relabelled with its own final canvas as the target,
and programs drawn from this prior, executed by the actors (a share ``actor.prior_share`` of
their episode batches; the learner never calls a renderer). The prior is deliberately
uninformed, so that it teaches the renderer's inverse everywhere and not only where the policy
already paints:

* **strokes**: every head of every step uniform over its values, episodes of the profile's
  length;
* **scenes**: 1 to ``min(T, 5)`` objects (the dataset's range, capped by the episode), each
  with a uniform cell, shape, size and colour bins, then steps that place nothing.
"""

from __future__ import annotations

import numpy as np

from spiral.config import ExperimentConfig
from spiral.data.scenes import MAX_OBJECTS, MIN_OBJECTS, random_scene_programs
from spiral.envs.spec import ActionSpec, FLAG_SKIP


def prior_programs(cfg: ExperimentConfig, spec: ActionSpec, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` programs of the experiment's episode length drawn from the prior: ``[count, T, K]`` int64."""
    steps = cfg.env.episode_length - 1
    if cfg.env.kind == "mujoco":
        most = max(MIN_OBJECTS, min(steps, MAX_OBJECTS))
        objects = random_scene_programs(spec, count, rng, min_objects=MIN_OBJECTS, max_objects=most)
        programs = np.zeros((count, steps, spec.num_heads), np.int64)
        programs[..., spec.index("flag")] = FLAG_SKIP
        programs[:, :most] = objects
        return programs
    return np.stack([rng.integers(0, n, size=(count, steps)) for n in spec.sizes], axis=-1).astype(np.int64)
