"""One contract for every painting backend: libmypaint (the paper's renderer) and the fast torch rasterizer.

Both backends execute the same action semantics (:mod:`spiral.envs.paint_strokes`), so every
test here runs on both. They differ only in how a stroke looks (dry-brush texture vs smooth
capsules), so pixel assertions are about where ink is, never about exact values across backends.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from spiral.config import PaintConfig, from_dict
from spiral.envs import BatchedEnv, make_env
from spiral.envs.fast_paint import FastPaintEnv
from spiral.envs.spec import paint_action_spec

torch.set_num_threads(1)

G = 32      # grid
SIZE = 64   # canvas
ROW = 16    # grid row of the middle of the canvas (canvas y = 32)

_LIBMYPAINT_MISSING = importlib.util.find_spec("spiral.envs.libmypaint_env") is None
BACKENDS = [
    pytest.param("libmypaint", marks=pytest.mark.skipif(
        _LIBMYPAINT_MISSING, reason="spiral.envs.libmypaint_env is not in the tree yet")),
    "fast",
]


def cell(row: int, col: int) -> int:
    return row * G + col


def make(backend: str, num_envs: int = 1, episode_length: int = 6, seed: int | None = 0,
         noise_dim: int = 4, **paint: object) -> BatchedEnv:
    cfg = from_dict({"env": {"episode_length": episode_length, "noise_dim": noise_dim,
                             "paint": {"backend": backend, **paint}}})
    return make_env(cfg, num_envs=num_envs, seed=seed)


def action(env: BatchedEnv, **heads: int) -> np.ndarray:
    """One ``[K]`` action from head values (heads not named are 0)."""
    out = np.zeros(env.spec.num_heads, np.int64)
    for name, value in heads.items():
        out[env.spec.index(name)] = value
    return out


def move(env: BatchedEnv, end: int) -> np.ndarray:
    return action(env, flag=0, end=end)


def paint(env: BatchedEnv, control: int, end: int, size: int = 0, pressure: int = 9, **rgb: int) -> np.ndarray:
    heads = {"flag": 1, "control": control, "end": end, **rgb}
    if "size" in env.spec.names:
        heads["size"] = size
    if "pressure" in env.spec.names:
        heads["pressure"] = pressure
    return action(env, **heads)


def run(env: BatchedEnv, steps: list[np.ndarray]) -> np.ndarray:
    """Reset and apply ``steps`` (each ``[N, K]``, or ``[K]`` for every env); the final canvases."""
    env.reset()
    for step in steps:
        env.step(np.broadcast_to(np.asarray(step), (env.num_envs, env.spec.num_heads)))
    return env.canvases()


def horizontal_stroke(env: BatchedEnv, size: int = 0, pressure: int = 9, **rgb: int) -> list[np.ndarray]:
    """Move to canvas (32, 12), paint a straight line to (32, 48) (control on the line)."""
    return [move(env, cell(ROW, 6)), paint(env, cell(ROW, 15), cell(ROW, 24), size=size, pressure=pressure, **rgb)]


def random_actions(env: BatchedEnv, steps: int, seed: int) -> np.ndarray:
    """``[steps, N, K]`` random valid actions, mostly paint steps."""
    rng = np.random.default_rng(seed)
    actions = np.stack([rng.integers(0, n, (steps, env.num_envs)) for n in env.spec.sizes], -1)
    actions[..., 0] = rng.random((steps, env.num_envs)) < 0.75
    return actions


def ink(canvas: np.ndarray) -> float:
    """Total darkness of a canvas (0 for white paper)."""
    return float((255.0 - canvas.astype(np.float64)).sum())


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


# ---------------------------------------------------------------------------------------------
# Observations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("use_color", "channels"), [(False, 1), (True, 3)])
def test_reset_gives_white_canvases_and_typed_observation(backend: str, use_color: bool, channels: int) -> None:
    env = make(backend, num_envs=3, noise_dim=5, use_color=use_color)
    spec = paint_action_spec(G, 3, True, use_color)
    assert env.spec == spec
    assert env.image_shape == (SIZE, SIZE, channels)
    obs = env.reset()
    assert obs.canvas.dtype == np.uint8 and obs.canvas.shape == (3, SIZE, SIZE, channels)
    assert (obs.canvas == 255).all()
    assert obs.step.dtype == np.int32 and obs.step.tolist() == [0, 0, 0]
    assert obs.prev_action.dtype == np.int64 and obs.prev_action.shape == (3, spec.num_heads)
    assert obs.prev_mask.dtype == np.float32 and obs.prev_mask.shape == (3, spec.num_heads)
    assert not obs.prev_action.any() and not obs.prev_mask.any()
    assert obs.noise.dtype == np.float32 and obs.noise.shape == (3, 5)
    assert obs.target is None

    actions = np.stack([move(env, 5), paint(env, 40, 300), move(env, 7)])
    obs = env.step(actions)
    assert obs.step.tolist() == [1, 1, 1]
    np.testing.assert_array_equal(obs.prev_action, actions)
    np.testing.assert_array_equal(obs.prev_mask, spec.masks_for(actions[:, 0]))
    assert obs.prev_mask[0].tolist() == [1.0, 1.0] + [0.0] * (spec.num_heads - 2)   # a move: flag, end
    assert obs.prev_mask[1].tolist() == [1.0] * spec.num_heads
    assert obs.canvas.dtype == np.uint8 and obs.canvas.shape == (3, SIZE, SIZE, channels)
    env.close()


def test_conditional_targets_are_passed_through_and_checked(backend: str) -> None:
    env = make(backend, num_envs=2)
    targets = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 1), dtype=np.uint8)
    obs = env.reset(targets)
    np.testing.assert_array_equal(obs.target, targets)
    obs = env.step(np.stack([move(env, 3)] * 2))
    np.testing.assert_array_equal(obs.target, targets)
    with pytest.raises(ValueError, match="targets must be uint8"):
        env.reset(targets[:, :32])
    env.close()


# ---------------------------------------------------------------------------------------------
# Strokes
# ---------------------------------------------------------------------------------------------


def test_horizontal_stroke_darkens_the_middle_row_and_leaves_corners_white(backend: str) -> None:
    env = make(backend)
    canvas = run(env, horizontal_stroke(env, size=1))[0, ..., 0].astype(int)
    # The stroke runs along canvas row 32 from x = 12 to x = 48.
    middle = canvas[31:34, 14:47]
    assert middle.min() < 128, "the stroke should be dark on its path"
    assert (middle.min(axis=0) < 200).all(), "every column along the path should be inked"
    for corner in (canvas[:8, :8], canvas[:8, -8:], canvas[-8:, :8], canvas[-8:, -8:]):
        assert (corner == 255).all()
    # Ink stays near the path: nothing more than 12 pixels above or below it.
    assert (canvas[:20] == 255).all() and (canvas[45:] == 255).all()
    # And nothing far beyond its ends.
    assert (canvas[:, :3] == 255).all() and (canvas[:, 58:] == 255).all()
    env.close()


def test_curved_stroke_follows_its_bezier(backend: str) -> None:
    env = make(backend)
    # From canvas (32, 8) through control (8, 32) to (32, 56): the apex is at y = 20, x = 32.
    canvas = run(env, [move(env, cell(ROW, 4)), paint(env, cell(4, 16), cell(ROW, 28), size=0, pressure=4)])[0, ..., 0]
    assert canvas[18:23, 30:35].min() < 128, "the curve passes through its apex"
    assert (canvas[29:37, 26:39] == 255).all(), "the chord between the ends is not painted"
    assert (canvas[:12] == 255).all(), "the curve does not reach its control point"
    env.close()


def test_moves_draw_nothing(backend: str) -> None:
    env = make(backend, num_envs=2, episode_length=5)
    canvases = run(env, [move(env, cell(ROW, 3)), move(env, cell(ROW, 28)), move(env, cell(2, 2)), move(env, 0)])
    assert (canvases == 255).all()
    env.close()


def test_a_stroke_after_a_move_starts_where_the_move_went(backend: str) -> None:
    env = make(backend)
    # Move to canvas (8, 48), then paint a short vertical stroke down to (24, 48). Upstream's
    # (y, y) bookkeeping would start it at (8, 8) instead.
    canvas = run(env, [move(env, cell(4, 24)), paint(env, cell(8, 24), cell(12, 24), size=1)])[0, ..., 0]
    assert canvas[8:25, 46:51].min() < 128
    assert (canvas[:, :36] == 255).all()
    env.close()


def test_ink_grows_with_brush_size(backend: str) -> None:
    env = make(backend, num_envs=3)
    steps = [np.stack(s) for s in zip(*(horizontal_stroke(env, size=i) for i in range(3)))]
    canvases = run(env, steps)
    amounts = [ink(c) for c in canvases]
    assert amounts[0] > 0 and amounts[0] < amounts[1] < amounts[2], amounts
    env.close()


def test_ink_grows_with_pressure(backend: str) -> None:
    env = make(backend, num_envs=3)
    steps = [np.stack(s) for s in zip(*(horizontal_stroke(env, size=1, pressure=p) for p in (0, 4, 9)))]
    amounts = [ink(c) for c in run(env, steps)]
    assert 0 < amounts[0] < amounts[1] < amounts[2], amounts
    env.close()


def test_colour_strokes_take_their_colour(backend: str) -> None:
    env = make(backend, num_envs=2, use_color=True)
    red = horizontal_stroke(env, size=2, red=19, green=0, blue=0)
    blue = horizontal_stroke(env, size=2, red=0, green=0, blue=19)
    canvases = run(env, [np.stack(s) for s in zip(red, blue)]).astype(int)
    r, b = canvases[0, 30:35, 16:45], canvases[1, 30:35, 16:45]
    # Red ink leaves the red channel at paper white and removes green and blue.
    assert r[..., 0].min() > 200 and r[..., 1].min() < 128 and r[..., 2].min() < 128
    assert b[..., 2].min() > 200 and b[..., 0].min() < 128 and b[..., 1].min() < 128
    assert (canvases[:, :10] == 255).all()
    env.close()


def back_and_forth(env: BatchedEnv, passes: int, size: int = 2, **ink: int) -> list[np.ndarray]:
    """Move to canvas (32, 12) and paint the row to (32, 48) and back, ``passes`` strokes in all."""
    steps = [move(env, cell(ROW, 6))]
    for k in range(passes):
        steps.append(paint(env, cell(ROW, 15), cell(ROW, 24 if k % 2 == 0 else 6), size=size, **ink))
    return steps


GRAY_LEVELS = 8
"""``env.paint.gray_levels`` of the grey tests: level ``k`` is ink ``255 k / 7``."""


def gray_ink(level: int) -> float:
    return 255.0 * level / (GRAY_LEVELS - 1)


def test_the_gray_head_follows_pressure_and_is_dropped_on_moves(backend: str) -> None:
    env = make(backend, num_envs=2, gray_levels=GRAY_LEVELS)
    assert env.spec.names == ("flag", "end", "control", "size", "pressure", "gray")
    assert env.spec.sizes[-1] == GRAY_LEVELS and env.image_shape == (SIZE, SIZE, 1)
    env.reset()
    obs = env.step(np.stack([move(env, 5), paint(env, 40, 300, gray=3)]))
    assert obs.prev_mask[0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0], "a move ignores the ink"
    assert obs.prev_mask[1].tolist() == [1.0] * 6
    with pytest.raises(ValueError, match="colour heads or a gray head, not both"):
        paint_action_spec(G, 3, True, True, gray_levels=GRAY_LEVELS)
    env.close()


@pytest.mark.parametrize("level", [2, 5])
def test_a_grey_stroke_reads_back_at_its_level(backend: str, level: int) -> None:
    env = make(backend, episode_length=7, gray_levels=GRAY_LEVELS)
    band = (slice(30, 35), slice(16, 45))   # the stroke's core along row 32
    one_pass = run(env, back_and_forth(env, 1, gray=level))[0, ..., 0].astype(float)
    # Grey ink blends the paper towards its level, never past it (black ink would darken further).
    assert one_pass.min() >= gray_ink(level) - 1 and np.median(one_pass[band]) < (255 + gray_ink(level)) / 2
    # Painted over and over, the stroke's core takes the ink's level (libmypaint: within its
    # dab texture; the fast backend: its opacity compounds towards 1).
    solid = run(env, back_and_forth(env, 5, gray=level))[0, ..., 0].astype(float)
    assert np.abs(solid[band] - gray_ink(level)).max() <= 3
    assert (solid[:12] == 255).all() and (solid[52:] == 255).all(), "the ink stays near the path"
    env.close()


def test_white_over_black_lightens_and_white_on_paper_draws_nothing(backend: str) -> None:
    env = make(backend, episode_length=8, gray_levels=GRAY_LEVELS)
    white = GRAY_LEVELS - 1
    assert (run(env, back_and_forth(env, 3, gray=white)) == 255).all()
    band = (slice(30, 35), slice(16, 45))
    black = run(env, back_and_forth(env, 5, gray=0))[0, ..., 0].astype(float)
    steps = back_and_forth(env, 5, gray=0)
    steps.append(paint(env, cell(ROW, 15), cell(ROW, 6), size=2, gray=white))   # back along the row, once
    lightened = run(env, steps)[0, ..., 0].astype(float)
    assert black[band].max() < 16
    assert np.median(lightened[band]) > np.median(black[band]) + 64
    assert (lightened >= black).all(), "white ink only lightens"
    env.close()


def test_gray_level_zero_paints_exactly_what_black_strokes_paint(backend: str) -> None:
    """The ``gray`` head at black (level 0) draws the pixels the black-only action space draws."""
    plain = make(backend, num_envs=4, episode_length=8)
    gray = make(backend, num_envs=4, episode_length=8, gray_levels=GRAY_LEVELS)
    actions = random_actions(plain, 7, seed=6)
    with_gray = np.concatenate([actions, np.zeros((*actions.shape[:2], 1), actions.dtype)], -1)
    canvases = run(plain, list(actions))
    assert (canvases < 200).mean() > 0.05
    np.testing.assert_array_equal(run(gray, list(with_gray)), canvases)
    plain.close()
    gray.close()


def test_grayscale_without_pressure_or_size_heads(backend: str) -> None:
    env = make(backend, use_pressure=False, brush_sizes=[2.0])
    assert env.spec.names == ("flag", "end", "control")
    canvas = run(env, horizontal_stroke(env))[0, ..., 0]
    assert canvas[31:34, 14:47].min() < 128 and (canvas[:16] == 255).all()
    env.close()


# ---------------------------------------------------------------------------------------------
# Batches, episodes and determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_and_actions_give_identical_episodes(backend: str) -> None:
    first, second = make(backend, num_envs=3, seed=7), make(backend, num_envs=3, seed=7)
    actions = random_actions(first, 5, seed=1)
    obs_a, obs_b = first.reset(), second.reset()
    np.testing.assert_array_equal(obs_a.noise, obs_b.noise)
    for step in actions:
        obs_a, obs_b = first.step(step), second.step(step)
    np.testing.assert_array_equal(obs_a.canvas, obs_b.canvas)
    assert (obs_a.canvas < 255).any()
    # A second episode in the same env repeats the first exactly: no state leaks across resets.
    np.testing.assert_array_equal(run(first, list(actions)), obs_a.canvas)
    first.close()
    second.close()


def test_canvases_of_a_batch_are_independent(backend: str) -> None:
    batch = make(backend, num_envs=3)
    actions = random_actions(batch, 5, seed=4)
    canvases = run(batch, list(actions))
    assert len({c.tobytes() for c in canvases}) == 3, "different programs should draw different canvases"
    single = make(backend, num_envs=1)
    for i in range(3):
        np.testing.assert_array_equal(run(single, list(actions[:, i:i + 1])), canvases[i:i + 1])
    batch.close()
    single.close()


def test_done_after_episode_length_minus_one_actions(backend: str) -> None:
    env = make(backend, num_envs=2, episode_length=4)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.stack([move(env, 1)] * 2))
    env.reset()
    for t in range(3):
        assert not env.done
        obs = env.step(np.stack([move(env, t)] * 2))
    assert env.done and obs.step.tolist() == [3, 3]
    with pytest.raises(RuntimeError, match="episode is over after 3 actions"):
        env.step(np.stack([move(env, 1)] * 2))
    env.reset()
    assert not env.done
    env.close()


@pytest.mark.parametrize(("head", "value", "message"), [
    ("size", 3, r"head 'size' takes values in \[0, 3\)"),
    ("end", G * G, r"head 'end' takes values in \[0, 1024\)"),
    ("pressure", -1, r"head 'pressure' takes values in \[0, 10\)"),
    ("flag", 2, r"head 'flag' takes values in \[0, 2\)"),
])
def test_invalid_actions_raise_value_error_naming_the_head(backend: str, head: str, value: int, message: str) -> None:
    env = make(backend, num_envs=2)
    env.reset()
    actions = np.stack([paint(env, 10, 20)] * 2)
    actions[1, env.spec.index(head)] = value
    with pytest.raises(ValueError, match=message):
        env.step(actions)
    with pytest.raises(ValueError, match=r"actions must be \[2, 5\]"):
        env.step(actions[:, :4])
    with pytest.raises(ValueError, match="integers"):
        env.step(actions.astype(np.float32))
    # A rejected action changes nothing: the episode goes on from where it was.
    assert (env.step(np.stack([paint(env, 10, 20)] * 2)).step == 1).all()
    env.close()


def test_both_backends_put_ink_in_the_same_places() -> None:
    """Random programs: where libmypaint inks, the fast backend inks too (IoU of inked pixels)."""
    if _LIBMYPAINT_MISSING:
        pytest.skip("spiral.envs.libmypaint_env is not in the tree yet")
    envs = {name: make(name, num_envs=4, episode_length=6) for name in ("libmypaint", "fast")}
    actions = list(random_actions(envs["fast"], 5, seed=3))
    inked = {name: run(env, actions)[..., 0] < 200 for name, env in envs.items()}
    both = (inked["libmypaint"] & inked["fast"]).sum()
    either = (inked["libmypaint"] | inked["fast"]).sum()
    assert either > 0 and both / either > 0.7, both / either
    for env in envs.values():
        env.close()


def test_large_brushes_near_the_edges_stay_on_the_canvas(backend: str) -> None:
    """CelebA's brush sizes: strokes wider than the canvas, along its border, clip cleanly."""
    env = make(backend, num_envs=2, brush_sizes=[1.0, 2.0, 4.0, 8.0, 12.0, 24.0])
    steps = [np.stack([move(env, cell(0, 0)), move(env, cell(31, 1))]),
             np.stack([paint(env, cell(0, 16), cell(0, 31), size=5), paint(env, cell(31, 31), cell(30, 30), size=3)])]
    canvases = run(env, steps)[..., 0]
    assert canvases.shape == (2, SIZE, SIZE)
    assert canvases[0, :4].max() < 200, "a radius-24 stroke along the top edge covers it"
    assert canvases[1, -3:, 8:56].max() < 230 and (canvases[1, :24] == 255).all()
    env.close()


@pytest.mark.parametrize("use_color, gray_levels, canvas_size, brush_sizes", [
    (False, 0, 64, [1.0, 2.0, 3.0]), (True, 0, 64, [1.0, 2.0, 3.0]), (False, 0, 28, [1.0]),
    (True, 0, 64, [1.0, 2.0, 4.0, 8.0, 12.0, 24.0]), (False, 8, 64, [1.0, 2.0, 4.0, 8.0, 12.0, 24.0])])
def test_the_compiled_fast_step_draws_what_the_torch_operations_draw(use_color, gray_levels, canvas_size,
                                                                     brush_sizes) -> None:
    """``FastPaintEnv``'s compiled CPU loop against its torch path (the reference), on random
    programs: equal to float32 rounding, so a read-back pixel differs by at most one level and
    only where a value sits on a rounding boundary."""
    cfg = PaintConfig(backend="fast", canvas_size=canvas_size, brush_sizes=tuple(brush_sizes), use_color=use_color,
                      gray_levels=gray_levels)
    envs = [FastPaintEnv(cfg, num_envs=16, episode_length=31, noise_dim=1, seed=0, compiled=compiled)
            for compiled in (False, True)]
    assert not envs[0].compiled and envs[1].compiled
    actions = random_actions(envs[0], 30, seed=7)
    reads = [[], []]
    for env, out in zip(envs, reads):
        env.reset()
        for step in actions:
            env.step(step)
            out.append(env.canvases())
    torch.testing.assert_close(envs[1]._canvas, envs[0]._canvas, rtol=0, atol=5e-3)
    torch_reads, compiled_reads = (np.stack(r).astype(np.int16) for r in reads)
    assert (torch_reads < 255).mean() > 0.05  # the programs draw
    difference = np.abs(torch_reads - compiled_reads)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
