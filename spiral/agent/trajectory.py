"""Unrolls: the batch of finished episodes an actor hands to the policy learner.

SPIRAL episodes have a fixed length and the reward arrives only at the end (the
discriminator's score of the final canvas), so an actor ships whole episodes: for B
environments and T = episode_length - 1 actions, the canvas before every action plus the
final one, the actions and their masks, the behaviour policy's log-probabilities (for V-trace),
the per-episode noise and, in conditional mode, the targets. Everything the policy saw can be
rebuilt from these (:meth:`Unroll.observations`), so observations are not sent twice.

Each unroll carries the actor that produced it and the policy version it acted with; the
learner uses the version to measure (and bound) policy lag.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spiral.envs.base import Observation


@dataclass
class Unroll:
    """B finished episodes of T actions.

    Attributes:
        canvases: ``[T + 1, B, H, W, C]`` uint8, the canvas before each action and the final one.
        actions: ``[T, B, K]`` int64 actions in head order.
        masks: ``[T, B, K]`` float32 mask of each action taken.
        behaviour_log_probs: ``[T, B]`` float32 log-probabilities (summed over masked heads) under
            the acting policy.
        noise: ``[B, noise_dim]`` float32 per-episode noise.
        targets: ``[B, H, W, C]`` uint8 targets (conditional), else None.
        policy_version: Parameter version the actor acted with.
        actor_id: Which actor produced it.
        prior: The episodes executed programs drawn from a broad prior
            (:mod:`spiral.agent.prior`) instead of the policy's actions: examples for program
            recovery (``learner.hindsight_weight``) only, never trained on with the reward.
            Their targets are their own final canvases and their behaviour log-probabilities 0.
    """

    canvases: np.ndarray
    actions: np.ndarray
    masks: np.ndarray
    behaviour_log_probs: np.ndarray
    noise: np.ndarray
    targets: np.ndarray | None
    policy_version: int
    actor_id: str = ""
    prior: bool = False

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.actions.shape[1])

    @property
    def final_canvases(self) -> np.ndarray:
        """``[B, H, W, C]`` uint8 renders at the end of the episodes."""
        return self.canvases[-1]

    def validate(self) -> None:
        """Raise ValueError if shapes and dtypes disagree with each other."""
        t, b, k = self.actions.shape
        checks = [
            (self.canvases.ndim == 5 and self.canvases.shape[:2] == (t + 1, b), "canvases must be [T+1, B, H, W, C]"),
            (self.canvases.dtype == np.uint8, "canvases must be uint8"),
            (np.issubdtype(self.actions.dtype, np.integer), "actions must be integers"),
            (self.masks.shape == (t, b, k), "masks must be [T, B, K] like actions"),
            (self.behaviour_log_probs.shape == (t, b), "behaviour_log_probs must be [T, B]"),
            (self.noise.ndim == 2 and self.noise.shape[0] == b, "noise must be [B, noise_dim]"),
            (self.targets is None or (self.targets.shape == self.canvases.shape[1:] and self.targets.dtype == np.uint8),
             "targets must be uint8 [B, H, W, C] like a canvas"),
            (bool(np.all(np.isfinite(self.behaviour_log_probs))), "behaviour_log_probs must be finite"),
            (bool(np.all(np.isfinite(self.noise))), "noise must be finite"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def observations(self) -> Observation:
        """What the policy saw before each action, stacked: every field gets a leading T axis."""
        t, b, k = self.actions.shape
        prev_action = np.concatenate([np.zeros((1, b, k), np.int64), self.actions[:-1].astype(np.int64)], 0)
        prev_mask = np.concatenate([np.zeros((1, b, k), np.float32), self.masks[:-1].astype(np.float32)], 0)
        step = np.broadcast_to(np.arange(t, dtype=np.int32)[:, None], (t, b)).copy()
        noise = np.broadcast_to(self.noise[None], (t, *self.noise.shape)).copy()
        target = None if self.targets is None else np.broadcast_to(self.targets[None], (t, *self.targets.shape)).copy()
        return Observation(canvas=self.canvases[:-1], step=step, prev_action=prev_action,
                           prev_mask=prev_mask, noise=noise, target=target)

    @staticmethod
    def concatenate(unrolls: list["Unroll"]) -> "Unroll":
        """Join unrolls along the batch axis (policy_version: the oldest; actor_id: joined)."""
        if not unrolls:
            raise ValueError("nothing to concatenate")
        if len({u.prior for u in unrolls}) > 1:
            raise ValueError("cannot join episodes of prior programs with the policy's episodes")
        targets = None if unrolls[0].targets is None else np.concatenate([u.targets for u in unrolls], 0)  # type: ignore[misc]
        return Unroll(
            canvases=np.concatenate([u.canvases for u in unrolls], 1),
            actions=np.concatenate([u.actions for u in unrolls], 1),
            masks=np.concatenate([u.masks for u in unrolls], 1),
            behaviour_log_probs=np.concatenate([u.behaviour_log_probs for u in unrolls], 1),
            noise=np.concatenate([u.noise for u in unrolls], 0),
            targets=targets,
            policy_version=min(u.policy_version for u in unrolls),
            actor_id=",".join(sorted({u.actor_id for u in unrolls})),
            prior=unrolls[0].prior,
        )


def join_observations(observations: list[Observation]) -> Observation:
    """Time-major observations ``[T, B_i, ...]`` joined along the batch axis into ``[T, sum B_i, ...]``.

    Raises:
        ValueError: when some have targets and others do not.
    """
    if not observations:
        raise ValueError("nothing to join")
    with_targets = {o.target is not None for o in observations}
    if len(with_targets) > 1:
        raise ValueError("cannot join observations with targets and observations without")

    def joined(name: str) -> np.ndarray:
        return np.concatenate([getattr(o, name) for o in observations], axis=1)

    return Observation(canvas=joined("canvas"), step=joined("step"), prev_action=joined("prev_action"),
                       prev_mask=joined("prev_mask"), noise=joined("noise"),
                       target=joined("target") if with_targets == {True} else None)
