"""SPIRAL's networks in PyTorch: the policy, the discriminator and their parameters on the wire.

* :func:`build_policy` / :func:`build_discriminator` build the networks an experiment describes.
* :func:`observation_to_tensors` turns environment observations (numpy, HWC uint8) into
  :class:`~spiral.nets.policy.PolicyInputs` (torch, CHW floats in [0, 1]); it works for one step
  (``[N, ...]``) and for stacked episodes (``[T, B, ...]``, e.g. ``Unroll.observations()``).
* :func:`images_to_tensor` does the same for a batch of images (discriminator inputs).
* :mod:`spiral.nets.params` snapshots and restores parameters with a version.
"""

from __future__ import annotations

import numpy as np
import torch

from spiral.config import ExperimentConfig
from spiral.envs import action_spec_for
from spiral.envs.base import Observation
from spiral.nets.discriminator import Discriminator
from spiral.nets.policy import PolicyInputs, PolicyOutput, SpiralPolicy, UnrollOutput
from spiral.runtime.device import host_to_device

__all__ = ["Discriminator", "PolicyInputs", "PolicyOutput", "SpiralPolicy", "UnrollOutput", "build_discriminator",
           "build_policy", "images_to_tensor", "observation_to_tensors"]


def build_policy(cfg: ExperimentConfig) -> SpiralPolicy:
    """The policy for ``cfg``: its action space, image size/channels, noise, conditioning and sizes."""
    return SpiralPolicy(action_spec_for(cfg), image_channels=cfg.image_channels, image_size=cfg.env.image_size,
                        noise_dim=cfg.env.noise_dim, conditional=cfg.env.conditional, config=cfg.policy)


def build_discriminator(cfg: ExperimentConfig) -> Discriminator:
    """The discriminator for ``cfg``.

    Conditional experiments judge (render, target) pairs, unless ``discriminator.complement``
    mixes each pair into one image first (:mod:`spiral.agent.discriminator_inputs`); ``discriminator_learner.objective``
    ``sngan`` makes it spectrally normalised.
    """
    return Discriminator(cfg.image_channels, cfg.env.image_size,
                         conditional=cfg.env.conditional and not cfg.discriminator.complement,
                         channels=cfg.discriminator.channels, num_layers=cfg.discriminator.num_layers,
                         spectral_norm=cfg.discriminator_learner.objective == "sngan",
                         input_pool=cfg.discriminator.input_pool)


def images_to_tensor(images: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 ``[..., H, W, C]`` images to float ``[..., C, H, W]`` in [0, 1], on ``device`` (default: the CPU).

    The bytes travel as uint8 (from pinned memory on CUDA, :func:`spiral.runtime.device.host_to_device`)
    and become floats where they land: a quarter of the bytes a float copy would move, and the
    same numbers on every device.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 3:
        raise ValueError(f"images must be uint8 [..., H, W, C], got {images.dtype} {images.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if device is not None:
        tensor = host_to_device(tensor, torch.device(device))
    return tensor.movedim(-1, -3).float().div_(255.0).contiguous()


def observation_to_tensors(obs: Observation, device: str | torch.device | None = None) -> PolicyInputs:
    """Environment observation(s) to policy inputs on ``device`` (default: the CPU); leading axes
    (``[N]`` or ``[T, B]``) are kept. Images travel as uint8 (:func:`images_to_tensor`)."""
    lead = obs.canvas.shape[:-3]
    for name in ("step", "prev_action", "prev_mask", "noise"):
        value = np.asarray(getattr(obs, name))
        if value.shape[:len(lead)] != lead:
            raise ValueError(f"observation.{name} has shape {value.shape}; its leading axes must match the "
                             f"canvas's {lead}")
    target = torch.device(device) if device is not None else torch.device("cpu")

    def vectors(values: object, dtype: type) -> torch.Tensor:
        return host_to_device(torch.as_tensor(np.asarray(values, dtype=dtype)), target)

    return PolicyInputs(
        canvas=images_to_tensor(obs.canvas, device),
        step=vectors(obs.step, np.int64),
        prev_action=vectors(obs.prev_action, np.int64),
        prev_mask=vectors(obs.prev_mask, np.float32),
        noise=vectors(obs.noise, np.float32),
        target=None if obs.target is None else images_to_tensor(obs.target, device),
    )
