"""The paper's painting environment: SPIRAL programs executed by libmypaint's brush engine.

Each of the N environments owns one libmypaint fixed tiled surface (the canvas, opaque white
paper) and one brush loaded from a ``.myb`` file (``classic/dry_brush`` by default). The action
semantics are DeepMind's released ``spiral/environments/libmypaint.py``; the geometry comes
from :class:`~spiral.envs.paint_strokes.StrokeDecoder`, shared with the fast backend:

* A *paint* step sets the brush's ``radius_logarithmic`` to ``log(brush_sizes[size])`` (as
  upstream) and, with colour heads or a ``gray`` head, its ``color_h/s/v`` from the step's RGB
  (a grey level ``g`` is ``(g, g, g)``: hue and saturation 0, value ``g``); then it drives the
  pen along the quadratic Bezier from the previous end point through ``control`` to ``end``:
  50 ``stroke_to`` calls of ``dtime = 0.1`` s with pressure interpolated linearly. A stroke
  that follows a move or reset first touches its start point (upstream's pseudo-stroke).
* A *move* resets the brush, starts a new stroke and puts the pen down at ``end`` with pressure
  0, which draws nothing. Upstream records the new position as ``(y, y)``; the decoder records
  ``(y, x)``, so the next stroke starts where the pen actually is.
* Without colour heads the brush stays black (upstream's reset colour), so strokes are dark on
  white and the canvas has one channel (upstream's ``canvas[..., 0:1]``, the surface's red),
  matching :meth:`spiral.config.ExperimentConfig.image_channels`; with colour it has three
  (RGB). Grey ink paints equal red, green and blue, so the one channel reads it back at its
  level: within one of ``255 g`` where the paint is opaque (libmypaint truncates to fix15).

Each env's dabs for one step are rendered between ``begin_atomic`` and ``end_atomic``; the
canvases are read back once per step, converted from premultiplied fix15 to uint8.

Reproducibility: the brush's dab jitter comes from a random generator that libmypaint seeds
with a constant when the brush is created and never reseeds; every reset therefore re-creates
the brushes, so an episode's canvas depends only on its actions (one env of a batch and a
fresh single env draw identical pixels for the same program).

Threads: libmypaint links libgomp. Run actors with ``OMP_NUM_THREADS=1`` (one process per
core); a 64x64 canvas is a single 64x64 tile, which libmypaint never renders in parallel, so
the setting only matters for canvases larger than 128x128 pixels.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import repeat, starmap

import numpy as np

from spiral.config import PaintConfig
from spiral.envs.base import BatchedEnv
from spiral.envs.mypaint_ctypes import FIX15_ONE, Brush, FixedSurface, fix15_to_uint8, library, load_brush_text
from spiral.envs.paint_strokes import DTIME, STROKES_PER_STEP, StrokeBatch, StrokeDecoder
from spiral.envs.spec import paint_action_spec


def rgb_to_hsv(red: float, green: float, blue: float) -> tuple[float, float, float]:
    """RGB in [0, 1] to libmypaint's HSV (hue in [0, 1)), as upstream's ``_rgb_to_hsv``."""
    red, green, blue = (min(max(float(c), 0.0), 1.0) for c in (red, green, blue))
    max_value = max(red, green, blue)
    delta = max_value - min(red, green, blue)
    if delta <= 0.0001:
        return 0.0, 0.0, max_value
    if red == max_value:
        hue = (green - blue) / delta
        if hue < 0.0:
            hue += 6.0
    elif green == max_value:
        hue = 2.0 + (blue - red) / delta
    else:
        hue = 4.0 + (red - green) / delta
    return hue / 6.0, delta / max_value, max_value


class LibMyPaintEnv(BatchedEnv):
    """N libmypaint canvases stepped together (see the module docstring).

    Args:
        cfg: The painting environment's config (canvas, grid, brush file, sizes, colour, pressure).
        num_envs: Number of canvases N stepped per call.
        episode_length: Steps per episode including the reset.
        noise_dim: Size of the per-episode noise sample.
        seed: Seed of the noise generator (libmypaint's own jitter is reproducible per episode).
    """

    def __init__(self, cfg: PaintConfig, num_envs: int, episode_length: int, noise_dim: int,
                 seed: int | None = None) -> None:
        if not cfg.brush_sizes or any(s <= 0 for s in cfg.brush_sizes):
            raise ValueError(f"env.paint.brush_sizes must be positive radii, got {cfg.brush_sizes}")
        spec = paint_action_spec(cfg.grid_size, len(cfg.brush_sizes), cfg.use_pressure, cfg.use_color,
                                 cfg.gray_levels)
        channels = 3 if cfg.use_color else 1
        super().__init__(spec, num_envs, (cfg.canvas_size, cfg.canvas_size, channels),
                         episode_length, noise_dim, seed)
        self.paint = cfg
        self._decoder = StrokeDecoder(spec, cfg.canvas_size, cfg.brush_sizes, num_envs)
        self._first_log_size = math.log(float(cfg.brush_sizes[0]))
        brush_text = load_brush_text(cfg.brushes_dir, cfg.brush_type)
        self._stroke_to = library().brush_stroke_to
        self._surfaces = [FixedSurface(cfg.canvas_size, cfg.canvas_size) for _ in range(num_envs)]
        self._brushes = [Brush(brush_text) for _ in range(num_envs)]
        # Base values last sent to each brush, to skip redundant C calls.
        self._brush_log_size = [math.nan] * num_envs
        self._brush_hsv: list[tuple[float, float, float] | None] = [None] * num_envs
        self._staging = np.empty((num_envs, cfg.canvas_size, cfg.canvas_size, 4), np.uint16)
        self._clear()

    # -- BatchedEnv hooks ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._surfaces:
            raise RuntimeError("this LibMyPaintEnv is closed")

    def _clear(self) -> None:
        self._check_open()
        self._decoder.reset()
        for i, (surface, brush) in enumerate(zip(self._surfaces, self._brushes)):
            surface.clear(FIX15_ONE)
            brush.reload()  # fresh dab random generator: episodes do not depend on the past
            self._set_log_size(i, self._first_log_size)
            self._set_hsv(i, (0.0, 0.0, 0.0))  # upstream's reset colour: R = G = B = 0
            surface.begin_atomic()
            self._move(i, 0.0, 0.0)
            surface.end_atomic()

    def _execute(self, actions: np.ndarray) -> None:
        self._check_open()
        self._draw(self._decoder.decode(actions))

    def _read(self) -> np.ndarray:
        self._check_open()
        staging = self._staging
        for i, surface in enumerate(self._surfaces):
            staging[i] = surface.pixels()
        return fix15_to_uint8(staging, self.image_shape[2])

    def surface_pixels(self, index: int) -> np.ndarray:
        """Zero-copy ``[H, W, 4]`` premultiplied fix15 RGBA of canvas ``index`` (libmypaint's memory)."""
        return self._surfaces[index].pixels()

    def close(self) -> None:
        for brush in self._brushes:
            brush.close()
        for surface in self._surfaces:
            surface.close()
        self._brushes = []
        self._surfaces = []

    # -- drawing -------------------------------------------------------------------------------

    def _set_log_size(self, i: int, log_size: float) -> None:
        if self._brush_log_size[i] != log_size:
            self._brushes[i].set_base_value("radius_logarithmic", log_size)
            self._brush_log_size[i] = log_size

    def _set_hsv(self, i: int, hsv: tuple[float, float, float]) -> None:
        if self._brush_hsv[i] != hsv:
            brush = self._brushes[i]
            brush.set_base_value("color_h", hsv[0])
            brush.set_base_value("color_s", hsv[1])
            brush.set_base_value("color_v", hsv[2])
            self._brush_hsv[i] = hsv

    def _move(self, i: int, y: float, x: float) -> None:
        """Lift the pen and put it down at ``(y, x)`` without drawing (upstream's ``_move_to``).

        Upstream passes the true ``(x, y)`` to libmypaint but records ``(y, y)`` as the brush
        position; our :class:`StrokeDecoder` records ``(y, x)``.
        """
        brush = self._brushes[i]
        brush.reset()
        brush.new_stroke()
        self._stroke_to(brush.handle, self._surfaces[i].handle, x, y, 0.0, 0.0, 0.0, DTIME)

    def _draw(self, strokes: StrokeBatch) -> None:
        stroke_to = self._stroke_to
        paint = strokes.paint.tolist()
        touch = strokes.touch_start.tolist()
        # Python floats for the hot loop: (x, y) order for libmypaint, points 1..50.
        xs = strokes.points[..., 1].tolist()
        ys = strokes.points[..., 0].tolist()
        ps = strokes.pressures.tolist()
        radius = strokes.radius.tolist()
        move_to = strokes.move_to.tolist()
        rgb = strokes.rgb.tolist() if self._decoder.chooses_ink else None
        dtimes = [DTIME] * STROKES_PER_STEP
        tilts = [0.0] * STROKES_PER_STEP
        for i, surface in enumerate(self._surfaces):
            surface.begin_atomic()
            if paint[i]:
                self._set_log_size(i, math.log(radius[i]))  # upstream: radius_logarithmic = log(size)
                if rgb is not None:
                    self._set_hsv(i, rgb_to_hsv(*rgb[i]))
                bh, sh = self._brushes[i].handle, surface.handle
                if touch[i]:
                    stroke_to(bh, sh, xs[i][0], ys[i][0], ps[i][0], 0.0, 0.0, DTIME)
                # 50 stroke_to calls driven from C-level iterators (no Python bytecode per call).
                deque(starmap(stroke_to, zip(repeat(bh, STROKES_PER_STEP), repeat(sh, STROKES_PER_STEP),
                                             xs[i][1:], ys[i][1:], ps[i][1:], tilts, tilts, dtimes)), 0)
            else:
                self._move(i, move_to[i][0], move_to[i][1])
            surface.end_atomic()
