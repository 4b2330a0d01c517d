"""The fast painting backend's step as one compiled loop (numba), for canvases on the CPU.

:mod:`spiral.envs.fast_paint` defines what a paint step draws: its quadratic Bezier becomes a
chain of anti-aliased capsules (:func:`~spiral.envs.fast_paint.bezier_capsules`), the stroke's
alpha is the per-pixel maximum of their coverage times opacity
(:func:`~spiral.envs.fast_paint.capsule_alpha`), and it is composited "over" the canvas. In
torch that is a few dozen small tensor and numpy operations per step whatever the batch, so
at 8 canvases the step cost is mostly op dispatch. :func:`paint_strokes` does the same
arithmetic, with the same formulas and precision (capsule geometry in float64, pixels in
float32; a pixel's offset from the segment start is rounded once instead of twice), as one
``numba.njit`` loop over the painting canvases: for each canvas it walks the capsules
of its stroke over the pixels of each capsule's bounding box, keeps the maximum alpha in a
scratch image, and composites that box. Nothing outside a canvas's box is read or written.

It compiles on first use (a few seconds) and numba caches the machine code, beside this module
where that is writable, else under the user's cache directory (``NUMBA_CACHE_DIR``,
``XDG_CACHE_HOME``: ``/tmp/.cache`` in the image), so later processes load it in well under a
second.

The torch path stays the reference (and what a CUDA device runs); the two agree to float32
rounding (``tests/test_paint_contract.py``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from spiral.envs.fast_paint import (EDGE_WIDTH, MAX_CHORD_ERROR, MAX_PRESSURE_STEP, OPACITY_AT_FULL_PRESSURE,
                                    OPACITY_AT_ZERO_PRESSURE, RADIUS_SCALE_AT_FULL_PRESSURE,
                                    RADIUS_SCALE_AT_ZERO_PRESSURE)

# Module globals are compile-time constants to numba.
_RADIUS_SLOPE = RADIUS_SCALE_AT_FULL_PRESSURE - RADIUS_SCALE_AT_ZERO_PRESSURE
_OPACITY_SLOPE = OPACITY_AT_FULL_PRESSURE - OPACITY_AT_ZERO_PRESSURE


@numba.njit(nogil=True, cache=True)
def paint_strokes(canvas: np.ndarray, scratch: np.ndarray, which: np.ndarray, start: np.ndarray,
                  control: np.ndarray, end: np.ndarray, first_pressure: np.ndarray, last_pressure: np.ndarray,
                  brush_radius: np.ndarray, ink: np.ndarray, max_capsules: int) -> None:  # pragma: no cover - compiled
    """Draw one paint stroke on each of the canvases ``which``, in place.

    Args:
        canvas: float32 ``[N, H, W, C]`` canvases in [0, 255].
        scratch: float32 ``[H, W]`` working alpha, all zeros (left all zeros).
        which: int64 ``[M]`` the canvas each stroke paints (distinct).
        start, control, end: float64 ``[M, 2]`` the Beziers' ``(y, x)`` control points.
        first_pressure, last_pressure, brush_radius: float64 ``[M]``.
        ink: float32 ``[M, C]`` ink colour in [0, 255]: RGB on colour canvases, the grey level
            (0 for black ink) on one-channel canvases.
        max_capsules: Most capsules per stroke.
    """
    height, width, channels = canvas.shape[1], canvas.shape[2], canvas.shape[3]
    for m in range(which.shape[0]):
        c = which[m]
        sy, sx = start[m, 0], start[m, 1]
        ay = sy - 2.0 * control[m, 0] + end[m, 0]
        ax = sx - 2.0 * control[m, 1] + end[m, 1]
        by = 2.0 * (control[m, 0] - sy)
        bx = 2.0 * (control[m, 1] - sx)
        p0, p1 = first_pressure[m], last_pressure[m]
        needed = max(math.sqrt(math.hypot(ay, ax) * (0.25 / MAX_CHORD_ERROR)),
                     abs(p1 - p0) * (1.0 / MAX_PRESSURE_STEP))
        n = min(int(math.ceil(needed - 1e-9)), max_capsules)
        if n < 1:
            n = 1
        box_y0, box_x0, box_y1, box_x1 = height, width, 0, 0
        for k in range(n):
            t0 = k / n
            t1 = (k + 1) / n
            y0 = sy + t0 * (by + t0 * ay)
            x0 = sx + t0 * (bx + t0 * ax)
            y1 = sy + t1 * (by + t1 * ay)
            x1 = sx + t1 * (bx + t1 * ax)
            pressure = p0 + (p1 - p0) * (t0 + 0.5 / n)
            reach = brush_radius[m] * (RADIUS_SCALE_AT_ZERO_PRESSURE + _RADIUS_SLOPE * pressure) + 0.5 * EDGE_WIDTH
            opacity = np.float32(OPACITY_AT_ZERO_PRESSURE + _OPACITY_SLOPE * pressure)
            # The pixels whose centres lie within `reach` of the segment's bounding box.
            row0 = max(int(math.ceil(min(y0, y1) - reach - 0.5)), 0)
            col0 = max(int(math.ceil(min(x0, x1) - reach - 0.5)), 0)
            row1 = min(int(math.floor(max(y0, y1) + reach - 0.5)), height - 1)
            col1 = min(int(math.floor(max(x0, x1) + reach - 0.5)), width - 1)
            if row0 > row1 or col0 > col1:
                continue
            box_y0, box_x0 = min(box_y0, row0), min(box_x0, col0)
            box_y1, box_x1 = max(box_y1, row1), max(box_x1, col1)
            dy, dx = y1 - y0, x1 - x0
            length2 = dy * dy + dx * dx + 1e-12
            inv_y, inv_x = np.float32(dy / length2), np.float32(dx / length2)
            dir_y, dir_x = np.float32(dy), np.float32(dx)
            reach32 = np.float32(reach)
            for i in range(row0, row1 + 1):
                rel_y = np.float32(i + 0.5 - y0)
                for j in range(col0, col1 + 1):
                    rel_x = np.float32(j + 0.5 - x0)
                    t = rel_y * inv_y + rel_x * inv_x
                    t = min(max(t, np.float32(0.0)), np.float32(1.0))
                    off_y = rel_y - t * dir_y
                    off_x = rel_x - t * dir_x
                    coverage = reach32 - math.sqrt(off_y * off_y + off_x * off_x)
                    coverage = min(max(coverage, np.float32(0.0)), np.float32(1.0)) * opacity
                    if coverage > scratch[i, j]:
                        scratch[i, j] = coverage
        # Composite the stroke's box "over" the canvas and clear the scratch behind it.
        for i in range(box_y0, box_y1 + 1):
            for j in range(box_x0, box_x1 + 1):
                alpha = scratch[i, j]
                if alpha > 0.0:
                    scratch[i, j] = 0.0
                    # Black ink (0) gives the same float32 as the torch path's canvas - alpha * canvas.
                    for ch in range(channels):
                        canvas[c, i, j, ch] = canvas[c, i, j, ch] + alpha * (ink[m, ch] - canvas[c, i, j, ch])
