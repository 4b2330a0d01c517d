"""The libmypaint painting backend: real libmypaint 1.6 through ctypes, real brush files."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from spiral.config import PaintConfig, from_dict
from spiral.envs import make_env
from spiral.envs.libmypaint_env import LibMyPaintEnv, rgb_to_hsv
from spiral.envs.mypaint_ctypes import (FIX15_ONE, Brush, FixedSurface, fix15_to_uint8, load_brush_text,
                                        set_openmp_threads)
from spiral.envs.paint_strokes import STROKES_PER_STEP, grid_to_canvas, quadratic_bezier

G = 32  # grid
SIZE = 64  # canvas


def cell(row: int, col: int) -> int:
    return row * G + col


def make(num_envs: int = 1, episode_length: int = 6, **paint: object) -> LibMyPaintEnv:
    return LibMyPaintEnv(PaintConfig(**paint), num_envs=num_envs, episode_length=episode_length,
                         noise_dim=4, seed=0)


def action(env: LibMyPaintEnv, **heads: int) -> np.ndarray:
    """One ``[K]`` action from head values (unnamed heads are 0)."""
    out = np.zeros(env.spec.num_heads, np.int64)
    for name, value in heads.items():
        out[env.spec.index(name)] = value
    return out


def move(env: LibMyPaintEnv, end: int) -> np.ndarray:
    return action(env, flag=0, end=end)


def paint(env: LibMyPaintEnv, control: int, end: int, size: int = 0, pressure: int = 9, **rgb: int) -> np.ndarray:
    heads = {"flag": 1, "control": control, "end": end, "pressure": pressure, **rgb}
    if "size" in env.spec.names:
        heads["size"] = size
    return action(env, **heads)


def run(env: LibMyPaintEnv, steps: list[np.ndarray]) -> np.ndarray:
    """Reset and apply ``steps`` (each ``[N, K]`` or ``[K]`` for every env); final canvases."""
    env.reset()
    for step in steps:
        step = np.asarray(step)
        env.step(np.broadcast_to(step, (env.num_envs, env.spec.num_heads)))
    return env.canvases()


def random_actions(env: LibMyPaintEnv, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    acts = np.stack([rng.integers(0, n, (steps, env.num_envs)) for n in env.spec.sizes], -1)
    acts[..., 0] = rng.random((steps, env.num_envs)) < 0.8
    return acts


def distance_to_path(start: tuple[int, int], control: int, end: int) -> np.ndarray:
    """``[H, W]`` distance from each pixel centre to the sampled Bezier of a paint step."""
    s = grid_to_canvas(np.array([cell(*start)]), G, SIZE)
    c = grid_to_canvas(np.array([control]), G, SIZE)
    e = grid_to_canvas(np.array([end]), G, SIZE)
    pts = quadratic_bezier(s, c, e, 4 * STROKES_PER_STEP + 1)[0]          # [P, 2] (y, x)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    d = np.hypot(yy[..., None] - pts[:, 0], xx[..., None] - pts[:, 1])
    return d.min(-1)


@pytest.fixture(scope="module")
def env() -> LibMyPaintEnv:
    e = make(num_envs=1, episode_length=6)
    yield e
    e.close()


def test_reset_canvas_is_pure_white_with_the_configs_channels(env: LibMyPaintEnv) -> None:
    obs = env.reset()
    assert obs.canvas.dtype == np.uint8 and obs.canvas.shape == (1, SIZE, SIZE, 1)
    assert (obs.canvas == 255).all()
    colour = make(num_envs=2, use_color=True)
    try:
        canvas = colour.reset().canvas
        assert canvas.shape == (2, SIZE, SIZE, 3) and (canvas == 255).all()
    finally:
        colour.close()


def test_raw_surface_is_cleared_to_fix15_white() -> None:
    surface = FixedSurface(SIZE, SIZE)
    try:
        assert (surface.pixels() == FIX15_ONE).all(), "0xFFFF from libmypaint 1.6 must be cleared to 1<<15"
    finally:
        surface.close()


def test_binding_paints_opaque_fix15_on_white_paper_and_reports_the_dirty_box() -> None:
    cfg = PaintConfig()
    surface, brush = FixedSurface(SIZE, SIZE), Brush(load_brush_text(cfg.brushes_dir, cfg.brush_type))
    try:
        brush.set_base_value("radius_logarithmic", np.log(3.0))
        assert brush.get_base_value("radius_logarithmic") == pytest.approx(np.log(3.0))
        for name in ("color_h", "color_s", "color_v"):
            brush.set_base_value(name, 0.0)
        surface.begin_atomic()
        brush.reset()
        brush.new_stroke()
        brush.stroke_to(surface, 10.0, 20.0, 0.0, 0.1)
        for t in range(1, 51):
            brush.stroke_to(surface, 10.0 + t, 20.0, 1.0, 0.1)
        roi = surface.end_atomic()
        px = surface.pixels()
        assert (px[..., 3] == FIX15_ONE).all(), "painting on opaque white must keep alpha at 1.0"
        assert (px[..., :3] <= FIX15_ONE).all() and px[..., 0].min() < FIX15_ONE // 2
        ink_y, ink_x = np.nonzero(px[..., 0] < FIX15_ONE)
        assert roi.x <= ink_x.min() and ink_x.max() < roi.x + roi.width
        assert roi.y <= ink_y.min() and ink_y.max() < roi.y + roi.height
        with pytest.raises(ValueError, match="no_such_setting"):
            brush.set_base_value("no_such_setting", 1.0)
    finally:
        brush.close()
        surface.close()


def test_a_move_draws_nothing(env: LibMyPaintEnv) -> None:
    canvas = run(env, [move(env, cell(16, 4)), move(env, cell(3, 30))])
    assert (canvas == 255).all()


def test_a_paint_step_draws_dark_pixels_along_the_bezier_and_nowhere_far_from_it(env: LibMyPaintEnv) -> None:
    control, end = cell(4, 16), cell(16, 28)
    canvas = run(env, [move(env, cell(16, 4)), paint(env, control, end, size=1)])[0, ..., 0]
    dist = distance_to_path((16, 4), control, end)
    dark = canvas < 128
    assert dark[dist < 2].mean() > 0.3, "the stroke should cover the Bezier's own pixels"
    assert (canvas[dist > 10] == 255).all(), "paint should stay near the path"
    assert dark.sum() > 40
    raw = env.surface_pixels(0)
    assert (raw[..., 3] == FIX15_ONE).all() and (raw[..., :3] <= FIX15_ONE).all(), "paper must be fix15 white"
    # The Bezier bends towards its control point: the top of the arc is well above row 32.
    rows = np.flatnonzero(dark.any(axis=1))
    assert rows.min() < 24 and rows.max() >= 30


def test_a_stroke_continues_from_where_a_move_put_the_pen(env: LibMyPaintEnv) -> None:
    # Upstream records a move's end as (y, y); we record (y, x): a move to row 8, column 28
    # followed by a straight stroke along row 8 must not start at column 8.
    canvas = run(env, [move(env, cell(8, 28)), paint(env, cell(8, 29), cell(8, 30))])[0, ..., 0]
    assert (canvas[:, : 2 * 20] == 255).all()
    assert (canvas[12:20, 54:62] < 128).any()


def test_larger_brush_sizes_draw_more_pixels(env: LibMyPaintEnv) -> None:
    steps = lambda size: [move(env, cell(16, 4)), paint(env, cell(16, 16), cell(16, 28), size=size)]  # noqa: E731
    inked = [int((run(env, steps(size)) < 200).sum()) for size in range(3)]
    assert inked[0] > 0 and inked[0] < inked[1] < inked[2], inked


def test_pressure_changes_the_stroke(env: LibMyPaintEnv) -> None:
    steps = lambda p: [move(env, cell(16, 4)), paint(env, cell(16, 16), cell(16, 28), size=2, pressure=p)]  # noqa: E731
    light, heavy = (int((255 - run(env, steps(p)).astype(np.int64)).sum()) for p in (0, 9))
    assert 0 < light < heavy


def test_same_actions_give_identical_pixels_across_instances_and_episodes() -> None:
    a, b = make(num_envs=3, episode_length=8), make(num_envs=3, episode_length=8)
    try:
        actions = random_actions(a, 7, seed=3)
        first = run(a, list(actions))
        assert first.min() < 128
        np.testing.assert_array_equal(first, run(b, list(actions)))
        # A later episode on the same env does not depend on the earlier one (brush RNG reset).
        run(a, list(random_actions(a, 7, seed=4)))
        np.testing.assert_array_equal(first, run(a, list(actions)))
    finally:
        a.close()
        b.close()


def test_batched_envs_are_independent_and_match_single_envs() -> None:
    batch = make(num_envs=2, episode_length=4)
    single = make(num_envs=1, episode_length=4)
    try:
        horizontal = [move(batch, cell(16, 2)), paint(batch, cell(16, 16), cell(16, 29), size=2)]
        vertical = [move(batch, cell(2, 16)), paint(batch, cell(16, 16), cell(29, 16), size=2)]
        steps = [np.stack([h, v]) for h, v in zip(horizontal, vertical)]
        canvases = run(batch, steps)
        assert not np.array_equal(canvases[0], canvases[1])
        np.testing.assert_array_equal(canvases[0], run(single, horizontal)[0])
        np.testing.assert_array_equal(canvases[1], run(single, vertical)[0])
        # Horizontal stroke: middle row dark, top-centre white; vertical stroke: the reverse.
        assert canvases[0, 32, 20:44, 0].min() < 128 and (canvases[0, 0:8, 28:36] == 255).all()
        assert canvases[1, 20:44, 32, 0].min() < 128 and (canvases[1, 28:36, 0:8] == 255).all()
    finally:
        batch.close()
        single.close()


def test_colour_heads_paint_in_colour() -> None:
    env = make(num_envs=1, use_color=True)
    try:
        red = paint(env, cell(16, 16), cell(16, 28), size=2, red=19, green=0, blue=0)
        canvas = run(env, [move(env, cell(16, 4)), red])[0].astype(np.int64)
        inked = canvas.sum(-1) < 600
        assert inked.sum() > 20
        r, g, b = (canvas[..., k][inked] for k in range(3))
        assert (r > g + 50).mean() > 0.9 and np.array_equal(g, b)
    finally:
        env.close()


def test_grey_ink_reads_back_at_its_level_through_the_one_channel_readback() -> None:
    """A ``gray`` head's level g is the colour (g, g, g): the surface holds equal red, green and
    blue, so the one-channel canvas (the surface's red) is the grey, within one level of 255 g
    where an opaque brush (``classic/pen``) covers the paper."""
    levels = 8
    env = make(num_envs=levels, gray_levels=levels, brush_type="classic/pen")
    try:
        assert env.spec.names[-1] == "gray" and env.image_shape == (SIZE, SIZE, 1)
        strokes = np.stack([paint(env, cell(16, 16), cell(16, 28), size=2, gray=level) for level in range(levels)])
        canvases = run(env, [move(env, cell(16, 4)), strokes])[..., 0].astype(np.int64)
        for level in range(levels):
            raw = env.surface_pixels(level)
            assert (raw[..., 0] == raw[..., 1]).all() and (raw[..., 1] == raw[..., 2]).all()
            np.testing.assert_array_equal(fix15_to_uint8(raw, 3)[..., 0], canvases[level])
            core = canvases[level, 30:35, 12:52]
            assert np.abs(core - 255 * level / (levels - 1)).max() <= 1, (level, core.min(), core.max())
        assert (canvases[:, :20] == 255).all()
    finally:
        env.close()


def test_rgb_to_hsv_matches_the_reference_conversion() -> None:
    assert rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    assert rgb_to_hsv(0.0, 0.0, 0.0) == (0.0, 0.0, 0.0)
    assert rgb_to_hsv(0.5, 0.5, 0.5) == (0.0, 0.0, 0.5)
    h, s, v = rgb_to_hsv(0.0, 0.5, 1.0)
    assert h == pytest.approx(7 / 12) and s == pytest.approx(1.0) and v == 1.0


def test_masks_come_from_the_spec() -> None:
    env = make(num_envs=2, episode_length=4, use_color=True)
    try:
        assert env.spec.names == ("flag", "end", "control", "size", "pressure", "red", "green", "blue")
        obs = env.reset()
        assert (obs.prev_mask == 0).all()
        obs = env.step(np.stack([move(env, 5), paint(env, 7, 9)]))
        np.testing.assert_array_equal(obs.prev_mask[0], env.spec.masks_for(np.array([0]))[0])
        np.testing.assert_array_equal(obs.prev_mask[0], [1, 1, 0, 0, 0, 0, 0, 0])
        np.testing.assert_array_equal(obs.prev_mask[1], np.ones(8))
    finally:
        env.close()
    one_size = make(brush_sizes=(2.0,), use_pressure=False)
    try:
        assert one_size.spec.names == ("flag", "end", "control")
    finally:
        one_size.close()


def test_out_of_range_action_raises_value_error_naming_the_head(env: LibMyPaintEnv) -> None:
    env.reset()
    bad = paint(env, 0, 0)
    bad[env.spec.index("end")] = G * G
    with pytest.raises(ValueError, match="'end'"):
        env.step(bad[None])
    bad = paint(env, 0, 0)
    bad[env.spec.index("pressure")] = 10
    with pytest.raises(ValueError, match="'pressure'"):
        env.step(bad[None])


def test_episode_length_is_respected() -> None:
    env = make(num_envs=2, episode_length=3)
    try:
        obs = env.reset()
        assert not env.done and (obs.step == 0).all() and obs.noise.shape == (2, 4)
        for expected in (1, 2):
            obs = env.step(np.stack([paint(env, 3, 40)] * 2))
            assert (obs.step == expected).all()
        assert env.done
        with pytest.raises(RuntimeError, match="episode is over"):
            env.step(np.stack([paint(env, 3, 40)] * 2))
        env.reset()
        assert not env.done
    finally:
        env.close()


def test_make_env_builds_the_libmypaint_backend() -> None:
    cfg = from_dict({"env": {"episode_length": 5, "paint": {"backend": "libmypaint"}}})
    env = make_env(cfg, num_envs=2, seed=1)
    try:
        assert isinstance(env, LibMyPaintEnv)
        assert env.reset().canvas.shape == (2, SIZE, SIZE, cfg.image_channels)
    finally:
        env.close()


def reference_fix15_to_rgba(buf: np.ndarray) -> np.ndarray:
    """libmypaint's fix15_to_rgba8 written out plainly, one pixel at a time."""
    out = np.zeros(buf.shape, np.uint8)
    for idx in np.ndindex(buf.shape[:-1]):
        r, g, b, a = (int(v) for v in buf[idx])
        rgb = [0, 0, 0] if a == 0 else [((c << 15) + a // 2) // a for c in (r, g, b)]
        out[idx] = [(255 * v + (1 << 14)) >> 15 for v in (*rgb, a)]
    return out


def test_fix15_conversion_matches_libmypaints_rule() -> None:
    rng = np.random.default_rng(0)
    alpha = rng.integers(0, FIX15_ONE + 1, (6, 7, 1))
    alpha[0, 0] = 0
    rgb = (rng.random((6, 7, 3)) * alpha).astype(np.uint16)
    buf = np.concatenate([rgb, alpha], -1).astype(np.uint16)
    np.testing.assert_array_equal(fix15_to_uint8(buf, 3), reference_fix15_to_rgba(buf)[..., :3])
    opaque = buf.copy()
    opaque[..., 3] = FIX15_ONE
    opaque[..., :3] = rng.integers(0, FIX15_ONE + 1, (6, 7, 3))
    np.testing.assert_array_equal(fix15_to_uint8(opaque, 3), reference_fix15_to_rgba(opaque)[..., :3])
    assert fix15_to_uint8(np.full((1, 1, 4), FIX15_ONE, np.uint16), 1)[0, 0, 0] == 255


def test_missing_brush_file_names_the_package(tmp_path: object) -> None:
    with pytest.raises(FileNotFoundError, match="mypaint-brushes"):
        load_brush_text(str(tmp_path), "classic/no_such_brush")


def test_canvases_larger_than_one_tile_are_assembled_in_place() -> None:
    env = make(canvas_size=96)
    try:
        # canvas (48, 6) -> (48, 90): crosses the tile boundary at x = 64.
        canvas = run(env, [move(env, cell(16, 2)), paint(env, cell(16, 16), cell(16, 30), size=1)])[0, ..., 0]
        assert canvas.shape == (96, 96)
        assert canvas[44:53, 10:60].min() < 128 and canvas[44:53, 68:88].min() < 128
        assert (canvas[:30] == 255).all() and (canvas[66:] == 255).all()
    finally:
        env.close()


def test_closed_env_refuses_to_run_and_openmp_threads_can_be_limited() -> None:
    env = make()
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()
    assert set_openmp_threads(1) is True
