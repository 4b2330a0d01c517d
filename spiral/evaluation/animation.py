"""Stroke animations: an episode's own intermediate canvases as animated GIFs.

Every unroll keeps the canvas before each action and the final one (``[T + 1, N, H, W, C]``,
:class:`spiral.agent.trajectory.Unroll`), so painting can be replayed step by step without
re-rendering: frame ``i`` shows the canvas after ``i`` actions (frame 0 the blank canvas).
:func:`step_frames` lays out each step the way the sample grids do (:func:`pair_grid`: the
target left of the canvas in conditional runs); :func:`encode_gif` turns the frames into a
looping GIF whose last frame is held, so the finished painting stays on screen a moment.

GIF keeps one-channel canvases exactly (a gray palette); colour canvases are mapped onto one
256-colour palette made from the frames, shared by every frame so colours do not flicker.
Pillow merges a frame identical to the one before it (a move that paints nothing) into the
earlier frame's duration, so a GIF can have fewer frames than steps while it plays for exactly
``steps * frame_ms + final_hold_ms``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from spiral.evaluation.visualize import pair_grid

FRAME_MS = 120
"""How long each step's frame is shown."""
FINAL_HOLD_MS = 1500
"""How much longer the finished canvas stays before the animation loops."""
PALETTE_SAMPLE_FRAMES = 8
"""Colour GIFs: about this many frames (the last always) choose the shared palette."""


def step_frames(canvases: np.ndarray, targets: np.ndarray | None = None, columns: int = 8) -> np.ndarray:
    """One grid per step: ``[T + 1, GH, GW, C]`` uint8 from time-major canvases ``[T + 1, N, H, W, C]``.

    Args:
        canvases: Every episode's canvas before each action, and the final one.
        targets: ``[N, H, W, C]``: each episode's target, shown left of its canvas in every frame.
        columns: Cells per row (a cell is a canvas, or a target-canvas pair).
    """
    canvases = np.asarray(canvases)
    if canvases.ndim != 5 or canvases.dtype != np.uint8:
        raise ValueError(f"canvases must be uint8 [T + 1, N, H, W, C], got {canvases.dtype} {list(canvases.shape)}")
    return np.stack([pair_grid(step, targets, columns) for step in canvases])


def encode_gif(frames: np.ndarray, scale: int = 1, frame_ms: int = FRAME_MS,
               final_hold_ms: int = FINAL_HOLD_MS) -> bytes:
    """A looping GIF of uint8 frames ``[F, H, W, C]`` (C = 1 or 3), each upscaled by ``scale`` (nearest).

    Every frame shows for ``frame_ms``; the last one ``final_hold_ms`` longer.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[-1] not in (1, 3) or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [F >= 1, H, W, 1 or 3], got {frames.dtype} {list(frames.shape)}")
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    if frames.shape[-1] == 1:
        pictures = [Image.fromarray(frame[..., 0]) for frame in frames]
    else:
        chosen = frames[np.unique(np.r_[np.linspace(0, len(frames) - 1, PALETTE_SAMPLE_FRAMES).astype(int)])]
        palette = Image.fromarray(np.concatenate(list(chosen), axis=0)).quantize(colors=256)
        pictures = [Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    durations = [frame_ms] * len(pictures)
    durations[-1] += final_hold_ms
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return buffer.getvalue()
