"""The synthetic ``mujoco-scenes`` dataset: random scenes rendered by the scene environment.

The paper's 3D task is to reconstruct scenes of a few primitives on a floor. The targets are
made by the very environment the agent acts in (:class:`spiral.envs.scene_env.SceneEnv`), so
every target is exactly reachable by some program: a scene of ``k`` objects (``k`` uniform in
``1..MAX_OBJECTS``) is the render after ``k`` random *place* actions, each with a uniformly
random location, shape, size and colour bin per channel. Objects may overlap or hide each
other, as they may when the agent places them.

Generation is deterministic given the seed and the scene layout; scenes are rendered in
batches of up to :data:`RENDER_BATCH` environments that share one GL context.
"""

from __future__ import annotations

import numpy as np

from spiral.config import SceneConfig
from spiral.envs.spec import FLAG_PLACE, FLAG_SKIP, ActionSpec, scene_action_spec

MIN_OBJECTS = 1
MAX_OBJECTS = 5
"""A scene holds between MIN_OBJECTS and MAX_OBJECTS objects (inclusive)."""
RENDER_BATCH = 64
"""Scenes rendered per environment batch."""


def random_scene_programs(spec: ActionSpec, count: int, rng: np.random.Generator,
                          min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS) -> np.ndarray:
    """Random scene programs: ``[count, max_objects, K]`` int64 actions in ``spec``'s head order.

    Scene ``i`` places ``k_i ~ U{min_objects..max_objects}`` objects in its first ``k_i`` steps
    (flag ``FLAG_PLACE``) and places nothing afterwards (flag ``FLAG_SKIP``, other heads 0).
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    actions = np.stack([rng.integers(0, n, size=(count, max_objects)) for n in spec.sizes], axis=-1)
    num_objects = rng.integers(min_objects, max_objects + 1, size=count)
    placing = np.arange(max_objects)[None, :] < num_objects[:, None]
    actions[..., spec.index("flag")] = np.where(placing, FLAG_PLACE, FLAG_SKIP)
    actions[~placing] = np.where(np.arange(spec.num_heads) == spec.index("flag"), FLAG_SKIP, 0)
    return actions.astype(np.int64)


def render_scene_programs(cfg: SceneConfig, programs: np.ndarray) -> np.ndarray:
    """Execute scene programs ``[count, T, K]`` in :class:`SceneEnv`; the final renders ``[count, S, S, 3]``."""
    from spiral.envs.scene_env import SceneEnv  # imports mujoco: only when scenes are rendered

    programs = np.asarray(programs, dtype=np.int64)
    if programs.ndim != 3:
        raise ValueError(f"programs must be [count, steps, heads], got shape {programs.shape}")
    count, steps, _ = programs.shape
    size = cfg.image_size
    images = np.empty((count, size, size, 3), np.uint8)
    if count == 0:
        return images
    batch = min(count, RENDER_BATCH)
    env = SceneEnv(cfg, num_envs=batch, episode_length=steps + 1, noise_dim=1, seed=0)
    try:
        for start in range(0, count, batch):
            chunk = programs[start:start + batch]
            n = len(chunk)
            if n < batch:  # pad the last batch with scenes that place nothing
                pad = np.zeros((batch - n, steps, chunk.shape[2]), np.int64)
                pad[..., env.spec.index("flag")] = FLAG_SKIP
                chunk = np.concatenate([chunk, pad])
            env.reset()
            for t in range(steps):
                obs = env.step(chunk[:, t])
            images[start:start + n] = obs.canvas[:n]
    finally:
        env.close()
    return images


def scene_programs(cfg: SceneConfig, count: int, seed: int) -> np.ndarray:
    """The programs of the ``mujoco-scenes`` dataset: ``[count, MAX_OBJECTS, K]`` int64 actions.

    Args:
        cfg: The scene layout (grid, sizes, colour bins), as the agent's environment.
        count: Number of scenes.
        seed: Seed of the random programs; the same seed and layout give the same programs.
    """
    cfg.validate("env.mujoco")
    spec = scene_action_spec(cfg.grid_size, cfg.num_sizes, cfg.color_bins)
    return random_scene_programs(spec, count, np.random.default_rng(seed))


def generate_scenes(cfg: SceneConfig, count: int, seed: int) -> np.ndarray:
    """``count`` random scenes of 1 to 5 objects rendered by :class:`SceneEnv`: uint8 ``[count, S, S, 3]``.

    The images of :func:`scene_programs` with the same arguments.
    """
    return render_scene_programs(cfg, scene_programs(cfg, count, seed))
