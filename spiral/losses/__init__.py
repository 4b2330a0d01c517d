"""SPIRAL's training losses.

* :mod:`spiral.losses.vtrace`: IMPALA's V-trace off-policy targets (``vs``) and policy-gradient
  advantages, for episodes acted by a lagging copy of the policy.
* :mod:`spiral.losses.actor_critic`: the policy-gradient, baseline and entropy terms of the
  actor-critic loss (TorchBeast's conventions: sums over time and batch), and program recovery's
  negative log-likelihood.
* :mod:`spiral.losses.wgan_gp`: the WGAN discriminator loss, its gradient penalty and the level
  penalty.
* :mod:`spiral.losses.nonsaturating`: the standard GAN discriminator loss (SPIRAL++'s spectrally
  normalised discriminator).
"""

from __future__ import annotations

from spiral.losses.actor_critic import (baseline_loss, entropy_loss, policy_gradient_loss, recovery_loss,
                                        trust_region_mask)
from spiral.losses.vtrace import VTraceReturns, vtrace
from spiral.losses.nonsaturating import nonsaturating_discriminator_loss
from spiral.losses.wgan_gp import gradient_penalty, level_penalty, wasserstein_estimate, wgan_discriminator_loss

__all__ = ["VTraceReturns", "baseline_loss", "entropy_loss", "gradient_penalty", "level_penalty",
           "nonsaturating_discriminator_loss", "policy_gradient_loss", "recovery_loss", "trust_region_mask", "vtrace",
           "wasserstein_estimate", "wgan_discriminator_loss"]
