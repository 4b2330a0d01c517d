"""The batched environment interface every renderer implements.

An environment executes a *program* one instruction (action) at a time on N canvases at once,
so that an actor pays for one policy forward per N environment steps. Episodes have a fixed
length: ``episode_length`` steps of which the first is a reset, so the agent acts
``episode_length - 1`` times and every canvas in the batch finishes together.

What the policy sees after each step is an :class:`Observation`. Besides the canvas it holds
the previous action and its mask (zeros after a reset), the step index, a noise sample drawn
once per episode (what makes an unconditional agent's programs differ) and, in conditional
mode, the target image the agent reconstructs.

A renderer subclasses :class:`BatchedEnv` and implements three hooks: clear its canvases,
execute one batch of actions, and read the canvases back as uint8. Bookkeeping (steps, noise,
targets, previous actions, validation) lives here once.

Loop::

    env = make_env(cfg, num_envs=8, seed=0)
    obs = env.reset(targets)
    while not env.done:
        obs = env.step(policy_actions(obs))
    final = obs.canvas
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from spiral.envs.spec import ActionSpec


@dataclass
class Observation:
    """What the policy sees, batched over N environments.

    Attributes:
        canvas: ``[N, H, W, C]`` uint8 current renders (255 = white paper for painting).
        step: ``[N]`` int32 index of the step this observation follows (0 after reset).
        prev_action: ``[N, K]`` int64 previous action, one value per head (zeros after reset).
        prev_mask: ``[N, K]`` float32 mask of the previous action (zeros after reset).
        noise: ``[N, noise_dim]`` float32 noise sample, fixed for an episode.
        target: ``[N, H, W, C]`` uint8 target images in conditional mode, else None.
    """

    canvas: np.ndarray
    step: np.ndarray
    prev_action: np.ndarray
    prev_mask: np.ndarray
    noise: np.ndarray
    target: np.ndarray | None = None


class BatchedEnv(abc.ABC):
    """N environments of one kind, stepped together for a fixed-length episode.

    Args:
        spec: The action space.
        num_envs: N, the batch size.
        image_shape: ``(H, W, C)`` of the canvas.
        episode_length: Steps per episode including the reset.
        noise_dim: Size of the per-episode noise sample.
        seed: Seed of the environment's random generator (noise, and renderer randomness).
    """

    def __init__(self, spec: ActionSpec, num_envs: int, image_shape: tuple[int, int, int],
                 episode_length: int, noise_dim: int, seed: int | None = None) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if episode_length < 2:
            raise ValueError(f"episode_length must be >= 2, got {episode_length}")
        self.spec = spec
        self.num_envs = num_envs
        self.image_shape = tuple(image_shape)
        self.episode_length = episode_length
        self.noise_dim = noise_dim
        self.rng = np.random.default_rng(seed)
        self._step = 0
        self._noise = np.zeros((num_envs, noise_dim), np.float32)
        self._targets: np.ndarray | None = None
        self._prev_action = np.zeros((num_envs, spec.num_heads), np.int64)
        self._prev_mask = np.zeros((num_envs, spec.num_heads), np.float32)
        self._started = False

    # -- hooks a renderer implements -------------------------------------------------------

    @abc.abstractmethod
    def _clear(self) -> None:
        """Reset every canvas to the empty scene and every brush/object state."""

    @abc.abstractmethod
    def _execute(self, actions: np.ndarray) -> None:
        """Execute one ``[N, K]`` batch of validated actions on the N canvases."""

    @abc.abstractmethod
    def _read(self) -> np.ndarray:
        """The N canvases as a ``[N, H, W, C]`` uint8 array (a copy the caller may keep)."""

    def close(self) -> None:
        """Release renderer resources (GL contexts, C surfaces)."""

    # -- the episode loop ------------------------------------------------------------------

    @property
    def steps_per_episode(self) -> int:
        """Actions the agent takes per episode (``episode_length - 1``)."""
        return self.episode_length - 1

    @property
    def done(self) -> bool:
        """True once the episode's last action has been executed."""
        return self._started and self._step >= self.steps_per_episode

    def reset(self, targets: np.ndarray | None = None) -> Observation:
        """Start a new episode on every canvas.

        Args:
            targets: ``[N, H, W, C]`` uint8 images to reconstruct (conditional mode), or None.
        """
        if targets is not None:
            targets = np.asarray(targets)
            if targets.shape != (self.num_envs, *self.image_shape) or targets.dtype != np.uint8:
                raise ValueError(f"targets must be uint8 of shape {(self.num_envs, *self.image_shape)}, "
                                 f"got {targets.dtype} {targets.shape}")
        self._targets = None if targets is None else targets.copy()
        self._clear()
        self._step = 0
        self._started = True
        self._noise = self.rng.standard_normal((self.num_envs, self.noise_dim)).astype(np.float32)
        self._prev_action[:] = 0
        self._prev_mask[:] = 0.0
        return self._observe()

    def step(self, actions: np.ndarray) -> Observation:
        """Execute one action per canvas: ``actions`` is ``[N, K]`` integers in head order."""
        if not self._started:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError(f"the episode is over after {self.steps_per_episode} actions; call reset()")
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs, self.spec.num_heads):
            raise ValueError(f"actions must be [{self.num_envs}, {self.spec.num_heads}] "
                             f"(heads {list(self.spec.names)}), got {actions.shape}")
        self.spec.validate_actions(actions)
        actions = actions.astype(np.int64, copy=False)
        self._execute(actions)
        self._step += 1
        self._prev_action = actions.copy()
        self._prev_mask = self.spec.masks_for(actions[:, 0])
        return self._observe()

    def canvases(self) -> np.ndarray:
        """The current ``[N, H, W, C]`` uint8 renders."""
        return self._read()

    def _observe(self) -> Observation:
        return Observation(
            canvas=self._read(),
            step=np.full((self.num_envs,), self._step, np.int32),
            prev_action=self._prev_action.copy(),
            prev_mask=self._prev_mask.copy(),
            noise=self._noise.copy(),
            target=None if self._targets is None else self._targets.copy(),
        )
