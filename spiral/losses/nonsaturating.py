"""The standard (non-saturating) GAN discriminator loss, used with a spectrally normalised discriminator.

SPIRAL++ (Mellor et al. 2019) replaces WGAN-GP by a spectrally normalised discriminator D that
outputs a logit and is trained as a classifier of real against rendered images::

    loss = mean(softplus(-D(real))) + mean(softplus(D(fake)))
         = -mean(log sigmoid(D(real))) - mean(log(1 - sigmoid(D(fake))))

The agent then maximises ``log sigmoid(D(render))`` (the non-saturating generator objective;
see :func:`spiral.agent.discriminator_inputs.reward_scores`), whose gradient does not vanish while D rejects the
renders confidently. The loss pins D's scale, so no level penalty is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nonsaturating_discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """``mean(softplus(-D(real))) + mean(softplus(D(fake)))`` of logits ``[B]``."""
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
