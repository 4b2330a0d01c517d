"""The actor-critic loss terms, with TorchBeast's conventions.

All three terms are **sums** over time and batch (not means), as in IMPALA and TorchBeast;
their relative weights (``baseline_cost``, ``entropy_cost``) are tuned for that convention.
The total policy-learner loss is::

    policy_gradient_loss(log_probs, pg_advantages)
    + baseline_cost * baseline_loss(vs - values)
    + entropy_cost * entropy_loss(entropy)

With ``learner.ppo_clip`` the policy-gradient term only counts the steps that
:func:`trust_region_mask` keeps (Sample Factory's APPO: V-trace with PPO's clip).

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


def trust_region_mask(rhos: torch.Tensor, advantages: torch.Tensor, epsilon: float) -> torch.Tensor:
    """PPO's clip as a mask: 0 where the policy has already moved far enough, 1 elsewhere.

    PPO's clipped surrogate ``min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)`` has zero gradient
    exactly where ``rho > 1 + eps`` with ``A > 0`` (the taken action is already that much more
    likely than when it was acted) or ``rho < 1 - eps`` with ``A < 0``; elsewhere its gradient is
    ``rho * A * grad log pi``. Applying the mask to V-trace's policy-gradient term (whose weight
    is ``min(rho_bar, rho)``, bounded where PPO's is not) keeps V-trace's off-policy correction
    and adds PPO's limit on how far a few updates can carry the policy from the one that acted.

    Args:
        rhos: ``[T, B]`` importance ratios ``pi(a | x) / mu(a | x)``, unclipped.
        advantages: ``[T, B]`` the advantages (only their sign is read).
        epsilon: The clip; 0 keeps every step.

    Returns:
        A float ``[T, B]`` tensor of 0s and 1s, without gradient.
    """
    if rhos.shape != advantages.shape:
        raise ValueError(f"rhos {list(rhos.shape)} and advantages {list(advantages.shape)} must match")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon!r}")
    with torch.no_grad():
        if epsilon == 0.0:
            return torch.ones_like(rhos)
        outside = ((advantages > 0) & (rhos > 1.0 + epsilon)) | ((advantages < 0) & (rhos < 1.0 - epsilon))
        return (~outside).to(rhos.dtype)


def baseline_loss(advantages: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum((vs - V)^2)``: pass ``vs - values`` with ``vs`` constant and ``values`` differentiable."""
    return 0.5 * (advantages ** 2).sum()


def entropy_loss(entropy: torch.Tensor) -> torch.Tensor:
    """``-sum(H(pi(. | x_t)))``: minimising it raises the policy's entropy (exploration bonus).

    Args:
        entropy: ``[T, B]`` per-step entropies (summed over the kept heads).
    """
    return -entropy.sum()


def recovery_loss(log_probs: torch.Tensor) -> torch.Tensor:
    """Program recovery's term, ``-sum(log pi(a_t | o_t'))`` (not the paper's; see
    ``learner.hindsight_weight``): the negative log-likelihood of relabelled episodes' own actions,
    summed over time and batch like the terms above.

    Args:
        log_probs: ``[T, B]`` log-probabilities of the episodes' actions, with each episode's own
            final canvas as the policy's target.
    """
    return -log_probs.sum()
