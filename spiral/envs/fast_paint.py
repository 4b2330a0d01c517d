"""A fast painting backend: SPIRAL's brush strokes as anti-aliased capsules, rasterised in torch.

The libmypaint backend simulates a real brush: every paint step drives the brush through 50
``stroke_to`` calls, and libmypaint stamps a few hundred soft, randomly jittered *dabs* along
the way, one canvas at a time in C (about 0.6 ms per step per core). This backend keeps the
same action semantics and stroke geometry (it takes them from
:class:`~spiral.envs.paint_strokes.StrokeDecoder`, so both backends draw the same curve for the
same program: same grid mapping, same Bezier, same pressure interpolation, same move
bookkeeping) and replaces the brush simulation by a closed-form shape that a batch of canvases
rasterises in a handful of tensor operations:

* A paint step's quadratic Bezier becomes a chain of ``n`` *capsules* (line segments swept by
  a disc) joining its points at ``t = k / n``; ``n`` is the smallest count that keeps the
  chords within :data:`MAX_CHORD_ERROR` pixels of the curve and the pressure within
  :data:`MAX_PRESSURE_STEP` between capsules (1 for a straight stroke, ~14 for the sharpest).
  ``n`` depends on the stroke alone, so a canvas renders identically in any batch.
* A capsule's radius is ``brush_sizes[size] * stroke_radius_scale(pressure)`` and its opacity
  ``stroke_opacity(pressure)``, at the pressure of its middle, so a continued stroke tapers.
* A pixel's coverage by a capsule is ``clamp(radius + 1/2 - distance, 0, 1)``: the distance
  from the pixel centre ``(i + 1/2, j + 1/2)`` (as in libmypaint) to the segment, with a
  one-pixel linear ramp as the anti-aliased edge.
* The capsules of one step form one stroke: its alpha is the *maximum* over its capsules of
  ``coverage * opacity`` (a stroke does not darken where it overlaps itself), composited with
  "over" blending, ``canvas += alpha * (ink - canvas)``, on white paper. Grayscale canvases
  have one channel and black ink, or the step's grey level with a ``gray`` head; colour
  canvases take the step's RGB.
* A move draws nothing; it only moves the brush (the decoder's state).

On a CPU the step runs as one compiled loop (:mod:`spiral.envs.fast_paint_kernel`, numba): each
painting canvas walks its capsules over the pixels of each capsule's bounding box, keeps the
maximum alpha and composites it, with the same arithmetic as the torch operations below to
float32 rounding. Measured on one core with the paper's settings (``python
bench/env_throughput.py --config mnist --skip-system``): 19x libmypaint at 8 canvases and 38x at
64, 2.6x and 2.0x the torch operations (``bench/RESULTS.md``).

The torch operations (the reference, and what a CUDA device runs) evaluate every capsule on the
square pixel window around it (coverage is exactly zero outside, so this equals evaluating
every pixel of the canvas), all windows of a step in one batched computation (at most two
window sizes), and reduce the windows into the canvases with one ``scatter_reduce(amax)``. The
float32 canvases stay on ``device`` between steps; only the uint8 read-back leaves it. On one
CPU core they cost a fixed ~0.4 ms per step (op dispatch) plus ~30 us per canvas.

How it differs visually from libmypaint's ``classic/dry_brush``:

* Texture. Dry-brush dabs are soft (hardness 0.2), randomly resized (``radius_by_random``)
  and, the harder the pressure, randomly offset by up to 1.4 radii (``offset_by_random``),
  which gives libmypaint strokes their grainy, speckled, frayed look. Capsules are smooth,
  solid, clean-edged bands.
* Density. libmypaint stamps 6 dabs per radius whose opacities accumulate, so a dry-brush
  stroke is dark along its path and fades towards its scattered edges, and is darker where
  the brush moves slowly (the ends of a Bezier) or crosses itself. A capsule stroke has one
  opacity across its width and along its length; only separate steps accumulate.
* Width and pressure. Dry brush maps pressure to dab opacity and to scatter (so a hard-pressed
  stroke is both darker and much wider than the brush radius: ~17 px for radius 3 at full
  pressure); its radius also shrinks with speed, and ``slow_tracking`` makes it lag behind
  sharp turns. Here pressure scales the capsule's radius (0.8x to 2.8x the brush radius) and
  opacity (0.3 to 0.75) linearly, calibrated on straight strokes so that each brush size and
  pressure puts about the same ink per unit length, over about the same width, as libmypaint;
  capsules follow the Bezier exactly.
* Determinism. Both backends are deterministic per episode; libmypaint's jitter makes two
  strokes of one program differ from each other in texture, capsules never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from spiral.config import PaintConfig
from spiral.envs.base import BatchedEnv
from spiral.envs.paint_strokes import STROKES_PER_STEP, StrokeBatch, StrokeDecoder
from spiral.envs.spec import paint_action_spec

RADIUS_SCALE_AT_ZERO_PRESSURE = 0.8
"""Capsule radius / brush radius at pressure 0."""
RADIUS_SCALE_AT_FULL_PRESSURE = 2.8
"""Capsule radius / brush radius at pressure 1 (linear in between): libmypaint's dry brush
scatters its dabs further from the path the harder it is pressed, so its strokes widen."""
OPACITY_AT_ZERO_PRESSURE = 0.3
"""Capsule opacity at pressure 0."""
OPACITY_AT_FULL_PRESSURE = 0.75
"""Capsule opacity at pressure 1 (linear in between): the mean darkness across a dry-brush stroke."""
EDGE_WIDTH = 1.0
"""Width in pixels of the linear anti-aliasing ramp centred on the capsule's boundary."""
MAX_CHORD_ERROR = 0.25
"""Largest distance in pixels between a paint step's Bezier and the chords of its capsules."""
MAX_PRESSURE_STEP = 0.1
"""Largest pressure change between consecutive capsules of a tapering stroke."""
BUCKET_OVERHEAD_PIXELS = 16_384
"""Cost of one more window size (a dozen tensor ops), in evaluated window pixels."""


def stroke_radius_scale(pressure: np.ndarray | torch.Tensor | float) -> np.ndarray | torch.Tensor | float:
    """Capsule radius as a fraction of the brush radius, for pressures in [0, 1]."""
    return RADIUS_SCALE_AT_ZERO_PRESSURE + (RADIUS_SCALE_AT_FULL_PRESSURE - RADIUS_SCALE_AT_ZERO_PRESSURE) * pressure


def stroke_opacity(pressure: np.ndarray | torch.Tensor | float) -> np.ndarray | torch.Tensor | float:
    """Capsule opacity in [0, 1], for pressures in [0, 1]."""
    return OPACITY_AT_ZERO_PRESSURE + (OPACITY_AT_FULL_PRESSURE - OPACITY_AT_ZERO_PRESSURE) * pressure


@dataclass
class Capsules:
    """K line segments swept by discs, each drawn on one canvas.

    Attributes:
        start, stop: ``[K, 2]`` ``(y, x)`` segment ends in canvas pixels.
        radius: ``[K]`` disc radius in pixels.
        opacity: ``[K]`` opacity in [0, 1].
        canvas: ``[K]`` index of the canvas the capsule is drawn on.
    """

    start: np.ndarray
    stop: np.ndarray
    radius: np.ndarray
    opacity: np.ndarray
    canvas: np.ndarray


def bezier_capsules(start: np.ndarray, control: np.ndarray, end: np.ndarray, first_pressure: np.ndarray,
                    last_pressure: np.ndarray, brush_radius: np.ndarray, canvas: np.ndarray,
                    max_capsules: int = STROKES_PER_STEP) -> Capsules:
    """The capsules that draw M paint steps (quadratic Beziers ``start -> control -> end``).

    Args:
        start, control, end: ``[M, 2]`` ``(y, x)`` control points in canvas pixels.
        first_pressure, last_pressure: ``[M]`` pressure at the ends (linear in ``t``).
        brush_radius: ``[M]`` brush radius of each step in pixels.
        canvas: ``[M]`` canvas each step paints.
        max_capsules: Most capsules per step (libmypaint's 50 ``stroke_to`` calls).

    Every Bezier becomes a chain of ``n`` capsules joining its points at ``t = k / n``, with
    ``n`` the smallest count for which the chords stay within :data:`MAX_CHORD_ERROR` pixels of
    the curve and the pressure changes by at most :data:`MAX_PRESSURE_STEP` between capsules:
    one capsule for a straight stroke of constant pressure, about 14 for the sharpest curves on
    a 64x64 canvas. ``n`` depends on the stroke alone, so a canvas draws the same pixels in any
    batch. A capsule's radius and opacity follow the pressure at its middle and the brush radius.
    """
    m = start.shape[0]
    # B(t) = s + t (b + t a) with a = s - 2c + e and b = 2 (c - s).
    a = start - 2.0 * control + end
    b = 2.0 * (control - start)
    # Over a parameter span h, a quadratic Bezier deviates from its chord by |a| h^2 / 4.
    needed = np.maximum(np.sqrt(np.hypot(a[:, 0], a[:, 1]) * (0.25 / MAX_CHORD_ERROR)),
                        np.abs(last_pressure - first_pressure) * (1.0 / MAX_PRESSURE_STEP))
    n = np.minimum(np.ceil(needed - 1e-9), max_capsules).astype(np.int64)
    n[n < 1] = 1
    # Stroke i has points k = 0..n_i at t = k / n_i; point j of the flat list belongs to owner[j].
    owner = np.repeat(np.arange(m), n + 1)
    k = np.arange(owner.shape[0]) - np.repeat(np.cumsum(n + 1) - (n + 1), n + 1)
    t = (k / n[owner])[:, None]
    chain = start[owner] + t * (b[owner] + t * a[owner])                       # [C + M, 2]
    # Capsule j joins points j + i and j + i + 1 of stroke i.
    capsule_owner = np.repeat(np.arange(m), n)
    first = np.arange(capsule_owner.shape[0]) + capsule_owner
    middle_t = t[first, 0] + 0.5 / n[capsule_owner]
    pressure = first_pressure[capsule_owner] + (last_pressure - first_pressure)[capsule_owner] * middle_t
    return Capsules(start=chain[first], stop=chain[first + 1],
                    radius=brush_radius[capsule_owner] * stroke_radius_scale(pressure),
                    opacity=stroke_opacity(pressure), canvas=np.asarray(canvas)[capsule_owner])


def capsule_alpha(capsules: Capsules, num_canvases: int, height: int, width: int,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """Alpha of every canvas: per pixel, the maximum over the canvas's anti-aliased capsules.

    A capsule covers a pixel by ``clamp((radius + EDGE_WIDTH / 2 - distance) / EDGE_WIDTH, 0, 1)``
    (``distance`` from the pixel centre ``(i + 1/2, j + 1/2)`` to the segment) times its opacity.

    Returns:
        ``[num_canvases, height, width]`` float32 on ``device``, exactly what evaluating every
        pixel against every capsule gives (0 where nothing is drawn).
    """
    alpha = torch.zeros(num_canvases * height * width, dtype=torch.float32, device=device)
    count = capsules.start.shape[0]
    if count == 0:
        return alpha.view(num_canvases, height, width)
    start = np.asarray(capsules.start, np.float64)
    stop = np.asarray(capsules.stop, np.float64)
    reach = np.asarray(capsules.radius, np.float64)[:, None] + 0.5 * EDGE_WIDTH  # coverage is 0 beyond
    # The window of pixels whose centres (i + 1/2) lie within `reach` of the segment's bounding
    # box; coverage is exactly zero outside it, so evaluating windows equals evaluating canvases.
    low = np.ceil(np.minimum(start, stop) - reach - 0.5)
    extent = np.floor(np.maximum(start, stop) + reach - 0.5) - low + 1       # [K, 2] rows, cols
    side = np.minimum(np.maximum(extent[:, 0], extent[:, 1]), min(height, width)).astype(np.int64)
    direction = stop - start
    params = np.empty((count, 7), np.float32)
    params[:, 2:4] = direction / (direction[:, :1] ** 2 + direction[:, 1:] ** 2 + 1e-12)
    params[:, 4:6] = direction
    params[:, 6:7] = reach
    opacity = np.asarray(capsules.opacity, np.float32)
    canvas_base = np.asarray(capsules.canvas, np.int64) * (height * width)
    limit = np.array([height, width], np.float64)
    for members, bucket in _buckets(side, min(height, width)):
        if members is not None:
            params_b, start_b, low_b = params[members], start[members], low[members]
            opacity_b, base_b = opacity[members], canvas_base[members]
        else:
            params_b, start_b, low_b, opacity_b, base_b = params, start, low, opacity, canvas_base
        # A window that sticks out of the canvas is slid back inside: it still covers every
        # canvas pixel the capsule touches, and no pixel index can fall outside the canvas.
        low_b = np.clip(low_b, 0, limit - bucket)
        params_b[:, 0:2] = low_b + 0.5 - start_b                          # window's first centre - start
        corner = low_b.astype(np.int64)
        base = base_b + corner[:, 0] * width + corner[:, 1]
        _max_windows(alpha, torch.from_numpy(params_b).to(device), torch.from_numpy(opacity_b).to(device),
                     torch.from_numpy(base).to(device), bucket, width)
    return alpha.view(num_canvases, height, width)


def _buckets(side: np.ndarray, largest_side: int) -> list[tuple[np.ndarray | None, int]]:
    """Split capsules into at most two window sizes, so that small capsules need not pay for the largest.

    Returns ``(members, side)`` pairs; ``members`` None means every capsule. The split (by
    window side) is the one that evaluates the fewest pixels, counting a second round of tensor
    ops as :data:`BUCKET_OVERHEAD_PIXELS` pixels; no split when none pays for itself.
    """
    count = side.shape[0]
    largest = int(side.max())
    if count < 2 or largest * largest * count - int(np.dot(side, side)) < BUCKET_OVERHEAD_PIXELS:
        return [(None, largest)]
    order = np.argsort(side, kind="stable")
    ordered = side[order]
    small = np.arange(1, count)                          # capsules in the small bucket
    cost = small * ordered[:-1] ** 2 + (count - small) * largest * largest + BUCKET_OVERHEAD_PIXELS
    best = int(np.argmin(cost))
    if cost[best] >= count * largest * largest:
        return [(None, largest)]
    split = best + 1
    return [(order[:split], int(ordered[split - 1])), (order[split:], largest)]


_WINDOWS: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _window_grids(side: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row offsets, column offsets (``[1, side, side]`` float32) and flat offsets of a window (cached)."""
    key = (side, width, str(device))
    grids = _WINDOWS.get(key)
    if grids is None:
        offsets = torch.arange(side, device=device)
        rows = offsets[:, None].expand(side, side)
        cols = offsets[None, :].expand(side, side)
        grids = _WINDOWS[key] = (rows.float().contiguous()[None], cols.float().contiguous()[None],
                                 (rows * width + cols).contiguous()[None])
    return grids


def _max_windows(alpha: torch.Tensor, params: torch.Tensor, opacity: torch.Tensor, base: torch.Tensor,
                 side: int, width: int) -> None:
    """Evaluate K capsules on ``side x side`` windows and max them into the flat ``alpha``.

    ``params`` columns: window's first pixel centre minus segment start (y, x), segment
    direction divided by its squared length (y, x), segment direction (y, x), reach (radius +
    EDGE_WIDTH / 2). ``base`` is each window's flat index in ``alpha``. Every ``[K, P, P]``
    operation broadcasts a per-capsule ``[K, 1, 1]`` factor against a cached ``[1, P, P]`` grid
    or works in place, the cheapest forms on a CPU.
    """
    rows, cols, pattern = _window_grids(side, width, alpha.device)
    column = params.unsqueeze(2)                                          # [K, 7, 1]
    rel_y = rows + column[:, 0:1]                                         # [K, P, P] pixel centre - start
    rel_x = cols + column[:, 1:2]
    # t: projection of the pixel centre on the segment, as a fraction of its length.
    t = torch.mul(rel_y, column[:, 2:3]).addcmul_(rel_x, column[:, 3:4]).clamp_(0.0, 1.0)
    # Pixel centre minus its closest point on the segment, then the distance.
    off_y = rel_y.addcmul_(t, column[:, 4:5], value=-1.0)
    off_x = rel_x.addcmul_(t, column[:, 5:6], value=-1.0)
    dist = off_y.square_().addcmul_(off_x, off_x).sqrt_()
    # Coverage ramps from 1 to 0 over EDGE_WIDTH around the radius; times the opacity.
    coverage = dist.neg_().add_(column[:, 6:7])
    if EDGE_WIDTH != 1.0:
        coverage.div_(EDGE_WIDTH)
    coverage.clamp_(0.0, 1.0).mul_(opacity[:, None, None])
    index = base[:, None, None] + pattern
    alpha.scatter_reduce_(0, index.view(-1), coverage.view(-1), reduce="amax", include_self=True)


class FastPaintEnv(BatchedEnv):
    """N painting canvases rasterised together in torch (see the module docstring).

    Args:
        cfg: The painting environment's config (canvas, grid, brush sizes, colour, pressure);
            ``brush_type`` and ``brushes_dir`` are libmypaint's and are ignored here.
        num_envs: Number of canvases N stepped as one batch.
        episode_length: Steps per episode including the reset.
        noise_dim: Size of the per-episode noise sample.
        seed: Seed of the noise generator (the rasterizer itself is deterministic).
        device: Torch device that holds the float32 canvases between steps.
        compiled: On a CPU device, step with the compiled loop (default) instead of the torch
            operations; both draw the same pixels to float32 rounding.
    """

    def __init__(self, cfg: PaintConfig, num_envs: int, episode_length: int, noise_dim: int,
                 seed: int | None = None, *, device: str | torch.device = "cpu", compiled: bool = True) -> None:
        if not cfg.brush_sizes or any(s <= 0 for s in cfg.brush_sizes):
            raise ValueError(f"env.paint.brush_sizes must be positive radii, got {cfg.brush_sizes}")
        spec = paint_action_spec(cfg.grid_size, len(cfg.brush_sizes), cfg.use_pressure, cfg.use_color,
                                 cfg.gray_levels)
        channels = 3 if cfg.use_color else 1
        super().__init__(spec, num_envs, (cfg.canvas_size, cfg.canvas_size, channels),
                         episode_length, noise_dim, seed)
        self.paint = cfg
        self.device = torch.device(device)
        self.compiled = compiled and self.device.type == "cpu"
        """Whether steps run the compiled CPU loop (:mod:`spiral.envs.fast_paint_kernel`) rather
        than the torch operations (the reference, and what other devices run)."""
        self._decoder = StrokeDecoder(spec, cfg.canvas_size, cfg.brush_sizes, num_envs)
        # Canvases in [0, 255] (white paper = 255), [N, H, W, C]. Everything runs in inference
        # mode: no autograd bookkeeping, which saves about a tenth of the step time.
        with torch.inference_mode():
            self._canvas = torch.full((num_envs, cfg.canvas_size, cfg.canvas_size, channels), 255.0,
                                      dtype=torch.float32, device=self.device)
        self._scratch: np.ndarray | None = None
        """The compiled CPU path's working alpha image (:meth:`_draw_compiled`), all zeros between steps."""
        self._paint_strokes: Callable[..., None] | None = None
        """:func:`spiral.envs.fast_paint_kernel.paint_strokes`, imported on the first paint step."""

    def _clear(self) -> None:
        with torch.inference_mode():
            self._canvas.fill_(255.0)
        self._decoder.reset()

    def _execute(self, actions: np.ndarray) -> None:
        strokes = self._decoder.decode(actions)
        with torch.inference_mode():
            self._draw(strokes)

    def _draw(self, strokes: StrokeBatch) -> None:
        painting = np.flatnonzero(strokes.paint)
        if painting.size == 0:
            return
        if self.compiled:
            self._draw_compiled(strokes, painting)
            return
        size = self.paint.canvas_size
        capsules = bezier_capsules(strokes.start[painting], strokes.control[painting], strokes.end[painting],
                                   strokes.start_pressure[painting], strokes.end_pressure[painting],
                                   strokes.radius[painting], painting)
        alpha = capsule_alpha(capsules, self.num_envs, size, size, device=self.device).unsqueeze(-1)
        # "Over" blending: canvas += alpha * (ink - canvas). Canvases that do not paint this step
        # have alpha 0 everywhere and stay exactly as they were.
        if self._decoder.chooses_ink:   # colour, or a grey level (equal RGB) on one channel
            channels = self._canvas.shape[-1]
            ink = torch.from_numpy((strokes.rgb[:, :channels] * 255.0).astype(np.float32)).to(self.device)
            self._canvas.addcmul_(alpha, ink.view(self.num_envs, 1, 1, channels) - self._canvas)
        else:   # black ink
            self._canvas.addcmul_(alpha, self._canvas, value=-1.0)

    def _draw_compiled(self, strokes: StrokeBatch, painting: np.ndarray) -> None:
        """:meth:`_draw` on CPU canvases: the same strokes in one compiled loop
        (:func:`spiral.envs.fast_paint_kernel.paint_strokes`)."""
        if self._paint_strokes is None:  # first paint step: the kernel module imports this one's constants
            from spiral.envs.fast_paint_kernel import paint_strokes

            self._paint_strokes = paint_strokes
            self._scratch = np.zeros(self._canvas.shape[1:3], np.float32)
        if self._decoder.chooses_ink:   # colour, or a grey level (equal RGB) on one channel
            ink = np.ascontiguousarray(strokes.rgb[painting, :self._canvas.shape[-1]] * 255.0, np.float32)
        else:
            ink = np.zeros((painting.size, 1), np.float32)
        f64 = np.float64
        self._paint_strokes(self._canvas.numpy(), self._scratch, painting.astype(np.int64),
                            np.ascontiguousarray(strokes.start[painting], f64),
                            np.ascontiguousarray(strokes.control[painting], f64),
                            np.ascontiguousarray(strokes.end[painting], f64),
                            np.ascontiguousarray(strokes.start_pressure[painting], f64),
                            np.ascontiguousarray(strokes.end_pressure[painting], f64),
                            np.ascontiguousarray(strokes.radius[painting], f64), ink, STROKES_PER_STEP)

    def _read(self) -> np.ndarray:
        # Values lie in [0, 255] (convex combinations of paper and ink), so +0.5 and truncation
        # rounds to the nearest integer. numpy converts to uint8 several times faster than torch.
        if self.device.type == "cpu":
            return (self._canvas.numpy() + np.float32(0.5)).astype(np.uint8)
        with torch.inference_mode():
            return self._canvas.add(0.5).to(torch.uint8).cpu().numpy()


def benchmark(num_envs: int = 64, steps: int = 200, canvas_size: int = 64, seed: int = 0) -> float:
    """Paint steps per second on one CPU thread (every action paints; random strokes)."""
    import time

    torch.set_num_threads(1)
    cfg = PaintConfig(backend="fast", canvas_size=canvas_size)
    env = FastPaintEnv(cfg, num_envs=num_envs, episode_length=steps + 1, noise_dim=1, seed=seed)
    rng = np.random.default_rng(seed)
    actions = np.stack([rng.integers(0, n, (steps, num_envs)) for n in env.spec.sizes], -1)
    actions[..., 0] = 1
    env.reset()
    began = time.perf_counter()
    for t in range(steps):
        env.step(actions[t])
    elapsed = time.perf_counter() - began
    return steps * num_envs / elapsed


if __name__ == "__main__":
    for batch in (8, 64):
        print(f"fast paint: {benchmark(num_envs=batch):,.0f} paint steps/s on one thread (batch {batch}, 64x64)")
