"""Stroke semantics of the painting environment, shared by every paint backend.

This module turns a batch of discrete painting actions into brush geometry, exactly as
DeepMind's released libmypaint environment does, so that the libmypaint backend and the fast
torch rasterizer draw the same program:

* Locations are flat indices on a ``G x G`` grid; index ``i`` is the cell ``(i // G, i % G)``
  in ``(y, x)`` order, mapped to canvas coordinates by ``canvas_size * cell / G`` (upstream's
  ``_grid_to_real``: cell 0 lands on the canvas edge, cell G-1 one cell short of the other).
* A *paint* step (flag 1) draws the quadratic Bezier from the previous end point through
  ``control`` to ``end``, sampled at ``STROKES_PER_STEP + 1`` points; the brush is driven to
  points 1..50 with pressure interpolated linearly from the previous pressure to the new one.
  When the previous step was not painting, the brush first touches the start point with the
  stroke's (constant) pressure (upstream's "pseudo-stroke"): after a move the previous brush
  appearance is taken to be the new one, so only continued strokes interpolate pressure.
* A *move* (flag 0) lifts the brush: it is reset, starts a new stroke and is placed at
  ``end`` with pressure 0. Upstream records the new position as ``(y, y)`` (a typo in
  ``_move_to``); we record ``(y, x)``, so a stroke that follows a move starts where the move
  went.
* Brush radius is ``brush_sizes[size]`` pixels (libmypaint gets ``log`` of it); without a
  ``size`` head the first size is used. Pressure is ``linspace(0.1, 1, 10)[pressure]``, or 1
  without a pressure head. Colour is ``linspace(0, 1, 20)`` per channel; a ``gray`` head's
  level ``g`` (``linspace(0, 1, gray_levels)``) is the colour ``(g, g, g)``; without either
  the ink is black. The reset brush is black, pressure 0 (1 without a pressure head), at (0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from spiral.envs.spec import COLOR_VALUES, FLAG_PAINT, PRESSURE_VALUES, ActionSpec, gray_values

STROKES_PER_STEP = 50
"""``stroke_to`` calls per paint step (points 1..50 of a 51-point Bezier)."""
DTIME = 0.1
"""Seconds of simulated pen time per ``stroke_to`` call."""


def quadratic_bezier(start: np.ndarray, control: np.ndarray, end: np.ndarray, num_points: int) -> np.ndarray:
    """Points of quadratic Beziers: ``[N, 2]`` endpoints and controls to ``[N, num_points, 2]``."""
    t = np.linspace(0.0, 1.0, num_points).reshape(1, num_points, 1)
    s, c, e = (np.asarray(p, np.float64)[:, None, :] for p in (start, control, end))
    return (1 - t) * (1 - t) * s + 2 * (1 - t) * t * c + t * t * e


def grid_to_canvas(index: np.ndarray, grid_size: int, canvas_size: int) -> np.ndarray:
    """Flat grid indices ``[...]`` to canvas ``(y, x)`` coordinates ``[..., 2]`` (upstream's mapping)."""
    index = np.asarray(index, np.int64)
    cells = np.stack([index // grid_size, index % grid_size], axis=-1).astype(np.float64)
    return canvas_size * cells / grid_size


@dataclass
class BrushState:
    """Per-canvas brush state carried between steps (arrays of length N).

    Attributes:
        y, x: Current brush position in canvas pixels.
        pressure: Pressure at the current position.
        painting: Whether the previous step painted (a move or a reset clears it).
        radius: Brush radius in pixels of the last paint step.
        rgb: ``[N, 3]`` colour in [0, 1] of the last paint step.
    """

    y: np.ndarray
    x: np.ndarray
    pressure: np.ndarray
    painting: np.ndarray
    radius: np.ndarray
    rgb: np.ndarray

    @classmethod
    def reset(cls, num: int, use_pressure: bool, first_radius: float) -> "BrushState":
        return cls(
            y=np.zeros(num), x=np.zeros(num),
            pressure=np.full(num, 0.0 if use_pressure else 1.0),
            painting=np.zeros(num, bool),
            radius=np.full(num, float(first_radius)),
            rgb=np.zeros((num, 3)),
        )


@dataclass
class StrokeBatch:
    """What one batch of actions asks the renderer to do.

    A paint step is held as its Bezier's control points and end pressures; :attr:`points` and
    :attr:`pressures` sample it as libmypaint's ``stroke_to`` calls do, computed on first use
    (the fast backend rasterises the control points directly and never needs them).

    Attributes:
        paint: ``[N]`` bool, True where this step paints a Bezier.
        touch_start: ``[N]`` bool, True where a paint step follows a move or reset, so the
            brush first touches ``start`` with ``start_pressure``.
        start, control, end: ``[N, 2]`` ``(y, x)`` of each step's quadratic Bezier.
        start_pressure, end_pressure: ``[N]`` pressure at its ends (linear in between).
        radius: ``[N]`` brush radius in pixels for the stroke.
        rgb: ``[N, 3]`` stroke colour in [0, 1] (``(g, g, g)`` for a grey level ``g``).
        move_to: ``[N, 2]`` ``(y, x)`` where a move (``~paint``) places the brush.
    """

    paint: np.ndarray
    touch_start: np.ndarray
    start: np.ndarray
    control: np.ndarray
    end: np.ndarray
    start_pressure: np.ndarray
    end_pressure: np.ndarray
    radius: np.ndarray
    rgb: np.ndarray
    move_to: np.ndarray

    @cached_property
    def points(self) -> np.ndarray:
        """``[N, STROKES_PER_STEP + 1, 2]`` Bezier points ``(y, x)`` (row 0 is the start)."""
        return quadratic_bezier(self.start, self.control, self.end, STROKES_PER_STEP + 1)

    @cached_property
    def pressures(self) -> np.ndarray:
        """``[N, STROKES_PER_STEP + 1]`` pressure at each of :attr:`points` (row 0: start pressure)."""
        alpha = _PRESSURE_RAMP
        return self.start_pressure[:, None] * (1 - alpha) + self.end_pressure[:, None] * alpha


_PRESSURE_RAMP = np.linspace(0.0, 1.0, STROKES_PER_STEP + 1)[None, :]
"""Where along a paint step each ``stroke_to`` call lies, as a fraction of the step."""


class StrokeDecoder:
    """Decodes ``[N, K]`` painting actions into :class:`StrokeBatch` es and tracks brush state.

    Args:
        spec: The painting action spec (``paint_action_spec``).
        canvas_size: Canvas side in pixels.
        brush_sizes: Radii the ``size`` head indexes.
        num: N, the number of canvases.
    """

    def __init__(self, spec: ActionSpec, canvas_size: int, brush_sizes: tuple[float, ...], num: int) -> None:
        self.spec = spec
        self.canvas_size = canvas_size
        self.brush_sizes = np.asarray(brush_sizes, np.float64)
        self.num = num
        names = spec.names
        self._grid = spec.heads[spec.index("end")].grid_size
        self._col = {name: names.index(name) for name in names}
        self._spatial = [self._col["end"], self._col["control"]]
        self.use_pressure = "pressure" in names
        self.use_color = "red" in names
        self.use_gray = "gray" in names
        self._gray_values = gray_values(spec.sizes[self._col["gray"]]) if self.use_gray else None
        self.state = BrushState.reset(num, self.use_pressure, self.brush_sizes[0])

    @property
    def chooses_ink(self) -> bool:
        """Whether actions choose each stroke's ink (colour or gray heads); otherwise it is black."""
        return self.use_color or self.use_gray

    def reset(self) -> None:
        self.state = BrushState.reset(self.num, self.use_pressure, self.brush_sizes[0])

    def _head(self, actions: np.ndarray, name: str) -> np.ndarray | None:
        col = self._col.get(name)
        return None if col is None else actions[:, col]

    def decode(self, actions: np.ndarray) -> StrokeBatch:
        """Geometry for one step; updates the brush state as the renderer will after drawing."""
        n = actions.shape[0]
        flag = actions[:, 0]
        paint = flag == FLAG_PAINT
        # Both spatial heads in one call: [N, 2] indices to [N, 2, (y, x)].
        points = grid_to_canvas(actions[:, self._spatial], self._grid, self.canvas_size)
        end, control = points[:, 0], points[:, 1]

        pressure_idx = self._head(actions, "pressure")
        pressure = PRESSURE_VALUES[pressure_idx] if pressure_idx is not None else np.ones(n)
        size_idx = self._head(actions, "size")
        radius = self.brush_sizes[size_idx] if size_idx is not None else np.full(n, self.brush_sizes[0])
        if self.use_color:
            rgb = np.stack([COLOR_VALUES[actions[:, self._col[c]]] for c in ("red", "green", "blue")], -1)
        elif self._gray_values is not None:
            rgb = np.repeat(self._gray_values[actions[:, self._col["gray"]], None], 3, axis=-1)
        else:
            rgb = np.zeros((n, 3))

        st = self.state
        touch_start = paint & ~st.painting
        # Upstream: when the brush was not painting, the start takes the new appearance, so a
        # stroke after a move or reset has constant pressure; a continued stroke interpolates.
        start_pressure = np.where(st.painting, st.pressure, pressure)
        start = np.stack([st.y, st.x], -1)
        batch = StrokeBatch(paint=paint, touch_start=touch_start, start=start, control=control, end=end,
                            start_pressure=start_pressure, end_pressure=pressure, radius=radius, rgb=rgb,
                            move_to=end)

        # Brush state after this step.
        st.y = end[:, 0].copy()
        st.x = end[:, 1].copy()
        st.pressure = np.where(paint, pressure, st.pressure)
        st.painting = paint.copy()
        st.radius = np.where(paint, radius, st.radius)
        st.rgb = np.where(paint[:, None], rgb, st.rgb)
        return batch
