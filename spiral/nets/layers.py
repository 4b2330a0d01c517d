"""Building blocks of SPIRAL's networks, as in DeepMind's released ``spiral/agents/utils.py``.

* :class:`MLP`: Linear layers with ReLU between them (none after the last, like Sonnet's MLP).
* :class:`ResidualStack`: ResNet-v2 style blocks ``h += conv1x1(relu(conv3x3(relu(h))))``,
  followed by a final ReLU.
* :class:`ConvEncoder`: stride-2 4x4 convs that shrink a feature map by a power-of-two
  ``factor``, a 3x3 conv and a residual stack.
* :class:`ConvDecoder`: the mirror image: a 3x3 conv, a residual stack, stride-2 4x4
  transposed convs that grow the map by ``factor``, and a 3x3 conv to the output channels.
* :func:`xy_grids`: the two coordinate channels (x and y in [-1, 1]) appended to image inputs
  so convolutions know where they are.

All convolutions keep "SAME" geometry: a stride-2 conv halves the side exactly and a stride-2
transposed conv doubles it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def log2_factor(factor: int, what: str) -> int:
    """Number of stride-2 steps for a power-of-two ``factor``; ValueError names ``what`` otherwise."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"{what}: the scale factor must be a power of two, got {factor}")
    return factor.bit_length() - 1


class MLP(nn.Sequential):
    """``Linear -> ReLU -> ... -> Linear``: no activation after the last layer."""

    def __init__(self, in_features: int, sizes: Sequence[int]) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for i, size in enumerate(sizes):
            layers.append(nn.Linear(width, size))
            if i < len(sizes) - 1:
                layers.append(nn.ReLU())
            width = size
        super().__init__(*layers)
        self.out_features = width


class ResidualStack(nn.Module):
    """``num_blocks`` pre-activation residual blocks, then a ReLU.

    Each block adds ``conv1x1(relu(conv3x3(relu(h))))`` to ``h``; channels stay ``channels``.
    """

    def __init__(self, channels: int, num_blocks: int, hidden_channels: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, hidden_channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(hidden_channels, channels, 1),
            )
            for _ in range(num_blocks)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = h + block(h)
        return F.relu(h)


class ConvEncoder(nn.Module):
    """Shrinks ``[B, in_channels, S, S]`` to ``[B, channels, S / factor, S / factor]``."""

    def __init__(self, in_channels: int, factor: int, channels: int, num_blocks: int,
                 hidden_channels: int) -> None:
        super().__init__()
        steps = log2_factor(factor, "encoder (image size / 8)")
        strided: list[nn.Module] = []
        width = in_channels
        for _ in range(steps):
            strided += [nn.Conv2d(width, channels, 4, stride=2, padding=1), nn.ReLU()]
            width = channels
        self.strided = nn.Sequential(*strided)
        self.pre_stack = nn.Conv2d(width, channels, 3, padding=1)
        self.stack = ResidualStack(channels, num_blocks, hidden_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(self.pre_stack(self.strided(x)))


class ConvDecoder(nn.Module):
    """Grows ``[B, in_channels, s, s]`` to ``[B, out_channels, s * factor, s * factor]``."""

    def __init__(self, in_channels: int, factor: int, channels: int, num_blocks: int,
                 hidden_channels: int, out_channels: int) -> None:
        super().__init__()
        steps = log2_factor(factor, "decoder (grid size / 4)")
        self.pre_stack = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.stack = ResidualStack(channels, num_blocks, hidden_channels)
        strided: list[nn.Module] = []
        for _ in range(steps):
            strided += [nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), nn.ReLU()]
        self.strided = nn.Sequential(*strided)
        self.final = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.strided(self.stack(self.pre_stack(x))))


def xy_grids(height: int, width: int) -> torch.Tensor:
    """``[1, 2, H, W]``: channel 0 is x (column) and channel 1 is y (row), both in [-1, 1]."""
    x = torch.linspace(-1.0, 1.0, width).view(1, 1, 1, width).expand(1, 1, height, width)
    y = torch.linspace(-1.0, 1.0, height).view(1, 1, height, 1).expand(1, 1, height, width)
    return torch.cat([x, y], dim=1).contiguous()


def location_coordinates(index: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Flat grid indices ``row * G + col`` to ``[..., 2]`` float ``(y, x)`` in [-1, 1].

    How DeepMind's agent embeds a location: by its coordinates, not a G*G one-hot.
    """
    scale = 2.0 / max(grid_size - 1, 1)
    row = torch.div(index, grid_size, rounding_mode="floor").float()
    col = torch.remainder(index, grid_size).float()
    return torch.stack([row * scale - 1.0, col * scale - 1.0], dim=-1)
