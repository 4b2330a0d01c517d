"""SPIRAL's discriminator: a DCGAN-style network trained with WGAN-GP (the WGAN papers' "critic").

A stack of stride-2 4x4 convolutions (``channels``, ``2 * channels``, ``4 * channels``, ...)
with LeakyReLU(0.2), then a Linear layer to one unbounded score per image. There is no batch
normalisation: the WGAN-GP gradient penalty is computed per sample, and batch statistics would
couple the samples. Layer normalisation (per sample) may be switched on instead.

In conditional mode the discriminator judges (image, target) pairs: the two are concatenated along
channels, so it learns whether a render reconstructs *its* target, not merely whether it looks
real. Images come in as floats in [0, 1] and are shifted to [-1, 1] inside.

With ``spectral_norm`` (SPIRAL++), every conv and the final Linear are reparametrised by
``torch.nn.utils.parametrizations.spectral_norm``: each weight is divided by its largest
singular value (one power iteration per training forward), which bounds the discriminator's
Lipschitz constant without a gradient penalty.

With ``input_pool`` k > 1 (not in the papers), the discriminator judges its inputs average-pooled by
k: it sees where ink is at a coarser scale, not the texture of a brush stroke against a pen's.
A stroke beside the target's ink then already shares pooled cells with it, so the score, and
the agent's reward, changes smoothly as a stroke moves towards the ink, as ``l2_pool`` does for
the pixel reward. The stride-2 layers start from the pooled size.
"""

from __future__ import annotations

import torch
from torch import nn


class Discriminator(nn.Module):
    """DCGAN-style discriminator on ``[B, C, S, S]`` images (or image/target pairs).

    Args:
        image_channels: C of images (and of targets).
        image_size: S; must stay >= 1 after ``num_layers`` halvings.
        conditional: Judge (image, target) pairs.
        channels: Channels of the first conv; doubled by each further layer.
        num_layers: Number of stride-2 conv layers.
        layer_norm: Add LayerNorm after every conv but the first.
        spectral_norm: Spectrally normalise every conv and the score layer.
        input_pool: Average-pool the input by this factor before the first conv.
    """

    def __init__(self, image_channels: int, image_size: int, conditional: bool, channels: int = 64,
                 num_layers: int = 4, layer_norm: bool = False, spectral_norm: bool = False,
                 input_pool: int = 1) -> None:
        super().__init__()
        if input_pool < 1 or image_size % input_pool:
            raise ValueError(f"discriminator.input_pool={input_pool} does not divide the {image_size}x{image_size} image")
        pooled_size = image_size // input_pool
        final_size = pooled_size >> num_layers
        if final_size < 1 or pooled_size % (1 << num_layers):
            raise ValueError(f"discriminator.num_layers={num_layers} stride-2 layers do not fit a "
                             f"{pooled_size}x{pooled_size} input (it must be divisible by 2**num_layers)")
        self.image_channels = image_channels
        self.image_size = image_size
        self.conditional = conditional
        self.spectral_norm = spectral_norm
        self.input_pool = input_pool
        normalised = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda module: module)
        layers: list[nn.Module] = []
        width = image_channels * (2 if conditional else 1)
        size = pooled_size
        for i in range(num_layers):
            out = channels * (2 ** i)
            size //= 2
            layers.append(normalised(nn.Conv2d(width, out, 4, stride=2, padding=1)))
            if layer_norm and i > 0:
                layers.append(nn.LayerNorm([out, size, size]))
            layers.append(nn.LeakyReLU(0.2))
            width = out
        self.features = nn.Sequential(*layers)
        self.score = normalised(nn.Linear(width * final_size * final_size, 1))

    def _check(self, name: str, x: torch.Tensor) -> None:
        expected = (self.image_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} must be [B, {', '.join(map(str, expected))}] floats in [0, 1], "
                             f"got {tuple(x.shape)}")

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[B]`` of ``images`` (``[B, C, S, S]`` in [0, 1]), paired with ``targets`` if conditional."""
        self._check("images", images)
        if self.conditional:
            if targets is None:
                raise ValueError("this discriminator is conditional: it scores (image, target) pairs and "
                                 "needs targets [B, C, S, S]")
            self._check("targets", targets)
            if targets.shape[0] != images.shape[0]:
                raise ValueError(f"images and targets must have the same batch size, got "
                                 f"{images.shape[0]} and {targets.shape[0]}")
            x = torch.cat([images, targets], dim=1)
        else:
            if targets is not None:
                raise ValueError("this discriminator is unconditional: pass no targets")
            x = images
        if self.input_pool > 1:
            x = nn.functional.avg_pool2d(x, self.input_pool)
        h = self.features(x * 2.0 - 1.0)
        return self.score(h.flatten(1)).squeeze(-1)
