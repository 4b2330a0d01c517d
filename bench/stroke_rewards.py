"""What the CPU profile's shaped L2 reward pays a stroke, at several ``l2_pool`` factors.

Two policies paint the same training digits with libmypaint, one episode each:

* the baseline, uniform random actions (each step paints with probability 1/2);
* an *ink-following* script that knows the target: it moves to a grid point on the digit's
  ink, then paints to on-ink grid points at most two cells away (moving elsewhere when none is
  left). It is not learnt; it shows what placing strokes on the ink is worth.

For each pool factor it prints the mean per-step reward of a paint step (``l2_weight`` times
the drop in pooled squared error, as :class:`spiral.agent.rewards.RewardFunction` pays
it) under both policies, and each policy's full-resolution final error as a fraction of the
blank canvas's. A random stroke that costs more than an ink stroke earns is why an agent first
learns to paint less. The last line is every figure as one JSON object.

Usage::

    python -m bench.stroke_rewards [--config tiny] [--targets 256]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from spiral.config import ExperimentConfig, experiment_path, load_experiment
from spiral.data import for_experiment
from spiral.envs import action_spec_for, make_env
from spiral.evaluation.reconstruction import blank_l2
from spiral.agent.rewards import pooled, reconstruction_l2

POOLS = (1, 2, 4, 8)
INK_LEVEL = 128
"""A pixel darker than this (of 255) is ink."""


def ink_grid_points(targets: np.ndarray, grid: int) -> np.ndarray:
    """``[N, grid * grid]`` bool: grid points within 2 px of the target's ink."""
    ink = targets[..., 0] < INK_LEVEL
    step = targets.shape[1] // grid
    on = np.zeros((len(targets), grid * grid), bool)
    for i in range(grid * grid):
        y, x = (i // grid) * step, (i % grid) * step
        on[:, i] = ink[:, max(0, y - 2):y + 3, max(0, x - 2):x + 3].any(axis=(1, 2))
    return on


def random_actions(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    return np.stack([rng.integers(0, 2, n), rng.integers(0, cells, n), rng.integers(0, cells, n)], 1)


def ink_following_actions(rng: np.random.Generator, on_ink: np.ndarray, position: np.ndarray | None,
                          grid: int) -> np.ndarray:
    actions = np.zeros((len(on_ink), 3), np.int64)
    for b, points in enumerate(on_ink):
        candidates = np.flatnonzero(points) if points.any() else np.arange(grid * grid)
        if position is None:
            actions[b] = (0, rng.choice(candidates), 0)
            continue
        py, px = divmod(int(position[b]), grid)
        near = [c for c in candidates if 0 < max(abs(c // grid - py), abs(c % grid - px)) <= 2]
        if near:
            end = rng.choice(near)
            actions[b] = (1, end, end if rng.random() < 0.5 else position[b])
        else:
            actions[b] = (0, rng.choice(candidates), 0)
    return actions


def episode(cfg: ExperimentConfig, targets: np.ndarray, scripted: bool,
            seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Canvases ``T + 1`` and actions ``[T, N, 3]`` of one episode on every target."""
    rng = np.random.default_rng(seed)
    grid = cfg.env.paint.grid_size
    on_ink = ink_grid_points(targets, grid)
    env = make_env(cfg, len(targets), seed=seed)
    try:
        canvases = [env.reset(targets).canvas.copy()]
        actions, position = [], None
        while not env.done:
            step = (ink_following_actions(rng, on_ink, position, grid) if scripted
                    else random_actions(rng, len(targets), grid * grid))
            position = step[:, 1]
            canvases.append(env.step(step).canvas.copy())
            actions.append(step)
    finally:
        env.close()
    return canvases, np.stack(actions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--targets", type=int, default=256, help="training digits painted by each policy")
    args = parser.parse_args()
    cfg = load_experiment(experiment_path(args.config))
    heads = action_spec_for(cfg).names
    if not cfg.env.conditional or heads != ("flag", "end", "control"):
        raise SystemExit(f"{args.config}: needs conditional painting with the heads flag, end, control; got {heads}")
    targets = for_experiment(cfg).sample(np.random.default_rng(0), args.targets)
    blank = blank_l2(targets)
    weight = cfg.learner.reward.l2_weight
    results: dict[str, float] = {}
    print(f"{args.config}: {args.targets} training digits, l2_weight {weight:g}; mean reward of a paint step")
    for name, scripted in (("random", False), ("ink", True)):
        canvases, actions = episode(cfg, targets, scripted, seed=1)
        paint = actions[..., 0] == 1
        results[f"{name}_final_l2_over_blank"] = float(reconstruction_l2(canvases[-1], targets).mean()) / blank
        for pool in POOLS:
            pooled_targets = pooled(targets, pool)
            errors = np.stack([reconstruction_l2(pooled(c, pool), pooled_targets) for c in canvases])
            rewards = weight * (errors[:-1] - errors[1:])
            results[f"{name}_paint_step_reward_pool{pool}"] = float(rewards[paint].mean())
    for pool in POOLS:
        r, i = results[f"random_paint_step_reward_pool{pool}"], results[f"ink_paint_step_reward_pool{pool}"]
        print(f"  l2_pool {pool}: random stroke {r:+.4f}   ink stroke {i:+.4f}")
    print(f"  final error vs blank: random {results['random_final_l2_over_blank']:.2f}x, "
          f"ink-following {results['ink_final_l2_over_blank']:.2f}x")
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
