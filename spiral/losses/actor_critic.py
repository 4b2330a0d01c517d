"""The actor-critic loss terms, with TorchBeast's conventions.

All three terms are **sums** over time and batch (not means), as in IMPALA and TorchBeast;
their relative weights (``baseline_cost``, ``entropy_cost``) are tuned for that convention.
The total policy-learner loss is::

    policy_gradient_loss(log_probs, pg_advantages)
    + baseline_cost * baseline_loss(vs - values)
    + entropy_cost * entropy_loss(entropy)

For SPIRAL's autoregressive action, ``log_probs`` and ``entropy`` are already summed over the
heads that the action mask keeps (see :class:`spiral.nets.policy.SpiralPolicy`).
"""

from __future__ import annotations

import torch


def policy_gradient_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``-sum(log pi(a_t | x_t) * A_t)``; the advantages are treated as constants (detached).

    Args:
        log_probs: ``[T, B]`` log-probabilities of the taken actions under the learner's policy.
        advantages: ``[T, B]`` e.g. V-trace's ``pg_advantages``.
    """
    if log_probs.shape != advantages.shape:
        raise ValueError(f"log_probs {list(log_probs.shape)} and advantages {list(advantages.shape)} must match")
    return -(log_probs * advantages.detach()).sum()


def baseline_loss(advantages: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum((vs - V)^2)``: pass ``vs - values`` with ``vs`` constant and ``values`` differentiable."""
    return 0.5 * (advantages ** 2).sum()


def entropy_loss(entropy: torch.Tensor) -> torch.Tensor:
    """``-sum(H(pi(. | x_t)))``: minimising it raises the policy's entropy (exploration bonus).

    Args:
        entropy: ``[T, B]`` per-step entropies (summed over the kept heads).
    """
    return -entropy.sum()
