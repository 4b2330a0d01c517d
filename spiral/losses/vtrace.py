"""V-trace: off-policy value targets and advantages (Espeholt et al. 2018, IMPALA).

Actors act with a copy of the policy that lags the learner's by a few versions, so the
episodes they send are *off-policy* for the learner. V-trace corrects for that with truncated
importance weights. With ``rho_t = pi(a_t | x_t) / mu(a_t | x_t)`` (target over behaviour
policy), ``delta_t = min(rho_bar, rho_t) * (r_t + gamma_t * V(x_{t+1}) - V(x_t))`` and
``c_i = min(c_bar, rho_i)``, the value target at step ``s`` is::

    v_s = V(x_s) + sum_{t >= s} (prod_{s <= i < t} gamma_i * c_i) * delta_t

computed here by the equivalent reverse recursion
``v_s - V(x_s) = delta_s + gamma_s * c_s * (v_{s+1} - V(x_{s+1}))``. The policy-gradient
advantage is ``min(rho_pg_bar, rho_s) * (r_s + gamma_s * v_{s+1} - V(x_s))``.

``gamma_t`` is the per-step discount, which is 0 where an episode ends after step ``t``. In the
on-policy case (all ``rho = 1``, thresholds >= 1) ``v_s`` is the n-step bootstrapped return.

Everything is computed without gradient, as in IMPALA and TorchBeast: the targets are
constants for the loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class VTraceReturns(NamedTuple):
    """V-trace outputs, each ``[T, B]``.

    Attributes:
        vs: Value targets for the baseline.
        pg_advantages: Advantages that weight the policy-gradient term.
        rhos: Unclipped importance weights ``pi / mu`` (a diagnostic of policy lag).
    """

    vs: torch.Tensor
    pg_advantages: torch.Tensor
    rhos: torch.Tensor


def _clip(x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    return x if threshold is None else torch.clamp(x, max=threshold)


def vtrace(behaviour_log_probs: torch.Tensor, target_log_probs: torch.Tensor, discounts: torch.Tensor,
           rewards: torch.Tensor, values: torch.Tensor, bootstrap_value: torch.Tensor,
           clip_rho_threshold: float | None = 1.0, clip_pg_rho_threshold: float | None = 1.0,
           clip_c_threshold: float | None = 1.0) -> VTraceReturns:
    """V-trace targets and advantages for ``[T, B]`` time-major episodes.

    Args:
        behaviour_log_probs: ``[T, B]`` log mu(a_t | x_t) of the acting policy.
        target_log_probs: ``[T, B]`` log pi(a_t | x_t) of the learner's policy.
        discounts: ``[T, B]`` gamma_t (0 after an episode's last step).
        rewards: ``[T, B]`` r_t.
        values: ``[T, B]`` V(x_t) under the learner's policy.
        bootstrap_value: ``[B]`` V(x_T) after the last step.
        clip_rho_threshold: rho_bar for the value targets (None: no clipping).
        clip_pg_rho_threshold: rho_bar for the policy-gradient advantages (None: no clipping).
        clip_c_threshold: c_bar, the trace-cutting threshold (None: no clipping).

    Returns:
        :class:`VTraceReturns`, detached from the graph.
    """
    shape = tuple(values.shape)
    if len(shape) != 2:
        raise ValueError(f"values must be [T, B], got {shape}")
    for name, tensor in (("behaviour_log_probs", behaviour_log_probs), ("target_log_probs", target_log_probs),
                         ("discounts", discounts), ("rewards", rewards)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be [T, B] = {list(shape)} like values, got {list(tensor.shape)}")
    if tuple(bootstrap_value.shape) != shape[1:]:
        raise ValueError(f"bootstrap_value must be [B] = [{shape[1]}], got {list(bootstrap_value.shape)}")
    with torch.no_grad():
        rhos = torch.exp(target_log_probs - behaviour_log_probs)
        clipped_rhos = _clip(rhos, clip_rho_threshold)
        cs = _clip(rhos, clip_c_threshold)
        values_t_plus_1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)

        acc = torch.zeros_like(bootstrap_value)
        vs_minus_v = []
        for t in range(shape[0] - 1, -1, -1):
            acc = deltas[t] + discounts[t] * cs[t] * acc
            vs_minus_v.append(acc)
        vs = torch.stack(vs_minus_v[::-1], dim=0) + values

        vs_t_plus_1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        pg_advantages = _clip(rhos, clip_pg_rho_threshold) * (rewards + discounts * vs_t_plus_1 - values)
    return VTraceReturns(vs=vs, pg_advantages=pg_advantages, rhos=rhos)
