"""Environments that execute SPIRAL programs: libmypaint, a fast torch rasterizer, MuJoCo scenes.

Use :func:`make_env` to build the batched environment an experiment config describes.
"""

from __future__ import annotations

from spiral.config import ExperimentConfig
from spiral.envs.base import BatchedEnv, Observation
from spiral.envs.spec import ActionHead, ActionSpec, paint_action_spec, scene_action_spec

__all__ = ["ActionHead", "ActionSpec", "BatchedEnv", "Observation", "action_spec_for", "make_env",
           "paint_action_spec", "scene_action_spec"]


def action_spec_for(cfg: ExperimentConfig) -> ActionSpec:
    """The action space of the experiment's environment (no renderer is started)."""
    if cfg.env.kind == "paint":
        p = cfg.env.paint
        return paint_action_spec(p.grid_size, len(p.brush_sizes), p.use_pressure, p.use_color, p.gray_levels)
    m = cfg.env.mujoco
    return scene_action_spec(m.grid_size, m.num_sizes, m.color_bins)


def make_env(cfg: ExperimentConfig, num_envs: int, seed: int | None = None,
             backend: str | None = None) -> BatchedEnv:
    """Build ``num_envs`` environments of the experiment's kind, stepped as one batch.

    Args:
        cfg: The experiment.
        num_envs: Batch size N.
        seed: Seed of the environments' random generator.
        backend: Paint backend override (``libmypaint`` or ``fast``); default ``cfg.env.paint.backend``.
    """
    env = cfg.env
    if env.kind == "paint":
        backend = backend or env.paint.backend
        if backend == "libmypaint":
            from spiral.envs.libmypaint_env import LibMyPaintEnv
            return LibMyPaintEnv(env.paint, num_envs=num_envs, episode_length=env.episode_length,
                                 noise_dim=env.noise_dim, seed=seed)
        if backend == "fast":
            from spiral.envs.fast_paint import FastPaintEnv
            return FastPaintEnv(env.paint, num_envs=num_envs, episode_length=env.episode_length,
                                noise_dim=env.noise_dim, seed=seed)
        raise ValueError(f"env.paint.backend: unknown backend {backend!r} (libmypaint, fast)")
    from spiral.envs.scene_env import SceneEnv
    return SceneEnv(env.mujoco, num_envs=num_envs, episode_length=env.episode_length,
                    noise_dim=env.noise_dim, seed=seed)
