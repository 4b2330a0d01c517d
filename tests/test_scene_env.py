"""The MuJoCo scene environment and the ``mujoco-scenes`` generator, on real MuJoCo rendering."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from spiral.config import SceneConfig, experiment_path, load_experiment
from spiral.data.scenes import MAX_OBJECTS, MIN_OBJECTS, generate_scenes, random_scene_programs
from spiral.envs import make_env, scene_env, scene_model
from spiral.envs.scene_env import SceneEnv
from spiral.envs.spec import FLAG_PLACE, FLAG_SKIP, SCENE_SHAPES, scene_action_spec

CFG = SceneConfig()  # 64x64, 16x16 grid, 3 sizes, 4 colour bins
SPEC = scene_action_spec(CFG.grid_size, CFG.num_sizes, CFG.color_bins)
HEAD = {name: SPEC.index(name) for name in SPEC.names}


def place(location: int, shape: str = "sphere", size: int = 1, rgb: tuple[int, int, int] = (3, 0, 0)) -> np.ndarray:
    """One place action (flag 1) as a ``[K]`` row."""
    row = np.zeros(SPEC.num_heads, np.int64)
    row[HEAD["flag"]] = FLAG_PLACE
    row[HEAD["location"]] = location
    row[HEAD["shape"]] = SCENE_SHAPES.index(shape)
    row[HEAD["size"]] = size
    row[HEAD["red"]], row[HEAD["green"]], row[HEAD["blue"]] = rgb
    return row


def random_actions(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.stack([rng.integers(0, k, n) for k in SPEC.sizes], axis=-1)


def project(world: np.ndarray, image_size: int) -> tuple[float, float]:
    """Pixel (x, y) of a world point seen by the fixed camera (pinhole model written out here)."""
    position, axes = scene_model.camera_pose()
    right, up = axes[:3], axes[3:]
    forward = -np.cross(right, up)  # MuJoCo cameras look along their -z axis, z = x cross y
    d = np.asarray(world, dtype=np.float64) - position
    depth = d @ forward
    focal = (image_size / 2) / math.tan(math.radians(scene_model.CAMERA_FOVY_DEGREES) / 2)
    return image_size / 2 + focal * (d @ right) / depth, image_size / 2 - focal * (d @ up) / depth


@pytest.fixture(scope="module")
def env() -> SceneEnv:
    environment = SceneEnv(CFG, num_envs=5, episode_length=4, noise_dim=10, seed=0)
    yield environment
    environment.close()


def test_geom_type_constants_match_mujoco() -> None:
    mujoco = scene_env.load_mujoco()
    assert scene_model.GEOM_BOX == int(mujoco.mjtGeom.mjGEOM_BOX)
    assert scene_model.GEOM_SPHERE == int(mujoco.mjtGeom.mjGEOM_SPHERE)
    assert scene_model.GEOM_CYLINDER == int(mujoco.mjtGeom.mjGEOM_CYLINDER)
    assert scene_model.GEOM_CAPSULE == int(mujoco.mjtGeom.mjGEOM_CAPSULE)


def test_reset_is_the_same_empty_floor_every_time(env: SceneEnv) -> None:
    first = env.reset().canvas
    assert first.shape == (5, 64, 64, 3) and first.dtype == np.uint8
    assert (first == env.empty_image).all()
    # The floor is a flat grey: no object, no shadow anywhere.
    assert first.min() == first.max()
    rng = np.random.default_rng(1)
    while not env.done:
        actions = random_actions(rng, 5)
        actions[:, HEAD["flag"]] = FLAG_PLACE
        obs = env.step(actions)
    assert not (obs.canvas == first).all()
    again = env.reset()
    assert (again.canvas == first).all()
    assert (env.objects.count == 0).all()
    assert (again.prev_action == 0).all() and (again.step == 0).all()


@pytest.mark.parametrize("rgb,channel", [((3, 0, 0), 0), ((0, 3, 0), 1), ((0, 0, 3), 2)])
def test_placed_object_appears_at_its_cell_in_its_colour(env: SceneEnv, rgb: tuple[int, int, int],
                                                         channel: int) -> None:
    g = CFG.grid_size
    cells = np.array([0, g - 1, g * (g - 1), g * g - 1, (g // 2) * g + g // 2])  # four corners + centre
    env.reset()
    obs = env.step(np.stack([place(int(c), "sphere", 1, rgb) for c in cells]))
    radius = scene_model.size_values(CFG.num_sizes)[1]
    centres = scene_model.cell_centers(cells, g)
    for i, cell in enumerate(cells):
        image = obs.canvas[i].astype(np.int64)
        others = np.delete(image, channel, axis=-1).max(axis=-1)
        coloured = image[..., channel] - others > 60  # pixels of the object's colour
        assert coloured.sum() >= 10, f"cell {cell}: object not visible"
        ys, xs = np.nonzero(coloured)
        expected_x, expected_y = project(np.array([*centres[i], radius]), CFG.image_size)
        assert abs(xs.mean() - expected_x) < 3 and abs(ys.mean() - expected_y) < 3, (
            f"cell {cell}: object at ({xs.mean():.1f}, {ys.mean():.1f}), expected ({expected_x:.1f}, {expected_y:.1f})")
        # Everything the object changed (itself and its shadow) stays near it.
        changed_y, changed_x = np.nonzero((obs.canvas[i] != env.empty_image).any(axis=-1))
        assert np.hypot(changed_x - expected_x, changed_y - expected_y).max() < 16


def test_grid_layout_keeps_rows_and_columns_in_image_order(env: SceneEnv) -> None:
    g = CFG.grid_size
    env.reset()
    cells = [0, g - 1, g * (g - 1), g * g - 1, 0]
    obs = env.step(np.stack([place(c) for c in cells]))
    centroid = []
    for i in range(4):
        ys, xs = np.nonzero((obs.canvas[i] != env.empty_image).any(axis=-1))
        centroid.append((xs.mean(), ys.mean()))
    (x00, y00), (x0g, y0g), (xg0, yg0), (xgg, ygg) = centroid
    assert x00 < x0g and xg0 < xgg  # column grows to the right
    assert y00 < yg0 and y0g < ygg  # row grows downwards (far row at the top)


def test_flag_zero_places_nothing(env: SceneEnv) -> None:
    env.reset()
    rng = np.random.default_rng(2)
    actions = random_actions(rng, 5)
    actions[:, HEAD["flag"]] = FLAG_SKIP
    obs = env.step(actions)
    assert (obs.canvas == env.empty_image).all()
    assert (env.objects.count == 0).all()
    np.testing.assert_array_equal(obs.prev_mask, SPEC.masks_for(actions[:, 0]))
    assert obs.prev_mask[:, 1:].sum() == 0
    # A mix: only the placing environments change.
    actions[[1, 3], HEAD["flag"]] = FLAG_PLACE
    obs = env.step(actions)
    changed = (obs.canvas != env.empty_image).reshape(5, -1).any(axis=1)
    assert changed.tolist() == [False, True, False, True, False]


def test_renders_are_deterministic_and_seed_only_changes_noise() -> None:
    rng = np.random.default_rng(3)
    programs = [random_actions(rng, 3) for _ in range(3)]
    runs = []
    for seed in (0, 0, 1):
        environment = SceneEnv(CFG, num_envs=3, episode_length=4, noise_dim=10, seed=seed)
        obs = environment.reset()
        noise = obs.noise
        for actions in programs:
            obs = environment.step(actions)
        runs.append((obs.canvas, noise))
        environment.close()
    assert (runs[0][0] == runs[1][0]).all() and (runs[0][0] == runs[2][0]).all()
    assert (runs[0][1] == runs[1][1]).all() and not (runs[0][1] == runs[2][1]).all()


def test_batch_environments_are_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    # A framebuffer of 2x2 tiles forces the 5 environments through two render passes.
    monkeypatch.setattr(scene_env, "MAX_FRAMEBUFFER_SIDE", 2 * CFG.image_size)
    rng = np.random.default_rng(4)
    programs = np.stack([random_actions(rng, 5) for _ in range(3)], axis=1)  # [5 envs, 3 steps, K]
    programs[..., HEAD["flag"]] = FLAG_PLACE
    batched = SceneEnv(CFG, num_envs=5, episode_length=4, noise_dim=1)
    batched.reset()
    for t in range(3):
        final = batched.step(programs[:, t]).canvas
    batched.close()
    single = SceneEnv(CFG, num_envs=1, episode_length=4, noise_dim=1)
    for i in range(5):
        single.reset()
        for t in range(3):
            alone = single.step(programs[i:i + 1, t]).canvas[0]
        np.testing.assert_array_equal(final[i], alone, err_msg=f"env {i} differs when rendered alone")
    single.close()
    assert len({final[i].tobytes() for i in range(5)}) == 5


def test_an_env_built_in_one_thread_renders_in_another() -> None:
    # An actor builds its env in the main thread and steps it in its guarded loop's thread; a
    # GL context left current in the building thread made every render there fail
    # (EGL_BAD_ACCESS from eglMakeCurrent) and the MuJoCo actors crash-loop.
    rng = np.random.default_rng(5)
    program = [random_actions(rng, 2) for _ in range(3)]

    def paint(environment: SceneEnv) -> np.ndarray:
        environment.reset()
        for actions in program:
            canvas = environment.step(actions).canvas
        return canvas

    here = SceneEnv(CFG, num_envs=2, episode_length=4, noise_dim=1)
    expected = paint(here)
    built_here = SceneEnv(CFG, num_envs=2, episode_length=4, noise_dim=1)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            results.append(paint(built_here))
        except BaseException as error:  # noqa: BLE001 - re-raised below with its message
            errors.append(error)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join(timeout=120)
    assert not errors, f"rendering in another thread failed: {errors[0]!r}"
    np.testing.assert_array_equal(results[0], expected)
    np.testing.assert_array_equal(paint(built_here), expected)  # and back in the building thread
    here.close()
    built_here.close()


def test_episode_length_bounds_the_objects(env: SceneEnv) -> None:
    env.reset()
    for _ in range(env.steps_per_episode):
        env.step(np.stack([place(17)] * 5))
    assert env.done and (env.objects.count == env.steps_per_episode).all()
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(np.stack([place(17)] * 5))


def test_make_env_builds_the_scene_environment_of_the_mujoco_experiment() -> None:
    cfg = load_experiment(experiment_path("mujoco"))
    environment = make_env(cfg, num_envs=2, seed=0)
    try:
        assert isinstance(environment, SceneEnv)
        assert environment.spec.names == ("flag", "location", "shape", "size", "red", "green", "blue")
        assert environment.spec.sizes == (2, 256, 4, 3, 4, 4, 4)
        assert environment.reset().canvas.shape == (2, 64, 64, 3)
    finally:
        environment.close()


def test_reset_and_step_times_are_reported(env: SceneEnv) -> None:
    """Measures (never asserts) the per-episode reset and per-step render cost."""
    rng = np.random.default_rng(5)
    resets, steps = [], []
    for _ in range(5):
        start = time.perf_counter()
        env.reset()
        resets.append(time.perf_counter() - start)
        while not env.done:
            actions = random_actions(rng, env.num_envs)
            actions[:, HEAD["flag"]] = FLAG_PLACE
            start = time.perf_counter()
            env.step(actions)
            steps.append(time.perf_counter() - start)
    print(f"\nSceneEnv N={env.num_envs}: reset {1e3 * np.median(resets):.3f} ms/episode, "
          f"step {1e3 * np.median(steps) / env.num_envs:.2f} ms per environment step")


def test_random_scene_programs_place_one_to_five_objects() -> None:
    programs = random_scene_programs(SPEC, 500, np.random.default_rng(0))
    assert programs.shape == (500, MAX_OBJECTS, SPEC.num_heads) and programs.dtype == np.int64
    SPEC.validate_actions(programs)
    placing = programs[..., HEAD["flag"]] == FLAG_PLACE
    counts = placing.sum(axis=1)
    assert set(counts.tolist()) == set(range(MIN_OBJECTS, MAX_OBJECTS + 1))
    # Objects come first: no place action after a skip.
    assert (np.diff(placing.astype(int), axis=1) <= 0).all()
    assert (programs[~placing] == 0).all()


def test_generate_scenes_shapes_determinism_and_diversity() -> None:
    scenes = generate_scenes(CFG, 12, seed=0)
    assert scenes.shape == (12, 64, 64, 3) and scenes.dtype == np.uint8
    empty = SceneEnv(CFG, num_envs=1, episode_length=2, noise_dim=1)
    floor = empty.empty_image
    empty.close()
    assert all((scene != floor).any() for scene in scenes)  # every scene shows at least one object
    assert len({scene.tobytes() for scene in scenes}) == 12
    assert (generate_scenes(CFG, 12, seed=0) == scenes).all()
    assert not (generate_scenes(CFG, 12, seed=1) == scenes).all()
    # Scenes hold colours, not only the grey floor.
    spread = scenes.astype(np.int64).max(axis=-1) - scenes.astype(np.int64).min(axis=-1)
    assert (spread > 60).any(axis=(1, 2)).mean() > 0.5


def test_a_camera_framing_the_grid_puts_its_corners_on_the_image_edge() -> None:
    for pitch in (55.0, 80.0, 90.0):
        camera = scene_model.Camera.framing_grid(pitch)
        assert camera.grid_extent() == pytest.approx(1.0, abs=1e-6)
        assert camera.distance < scene_model.DEFAULT_CAMERA.distance
    # Looking straight down, cell (row, col) of a G x G grid is the image's (row, col) block.
    camera = scene_model.Camera.framing_grid(90.0)
    grid = 8
    centres = scene_model.cell_centers(np.arange(grid * grid), grid)
    image = camera.project(np.concatenate([centres, np.zeros((grid * grid, 1))], axis=1))
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    np.testing.assert_allclose(image[:, 0], (cols + 0.5) / grid * 2 - 1, atol=1e-9)
    np.testing.assert_allclose(image[:, 1], (rows + 0.5) / grid * 2 - 1, atol=1e-9)
    with pytest.raises(ValueError, match="pitch"):
        scene_model.Camera(pitch_degrees=95.0)


def test_with_frame_grid_an_object_in_a_corner_cell_is_drawn_in_that_corner() -> None:
    layout = SceneConfig(grid_size=8, camera_pitch_degrees=80.0, frame_grid=True)
    spec = scene_action_spec(layout.grid_size, layout.num_sizes, layout.color_bins)
    env = SceneEnv(layout, num_envs=2, episode_length=2, noise_dim=1, seed=0)
    try:
        empty = env.reset().canvas[0].astype(int)
        row = np.zeros((2, spec.num_heads), np.int64)
        row[:, spec.index("flag")] = FLAG_PLACE
        row[:, spec.index("location")] = (0, 63)  # the far-left and the near-right corner cells
        row[:, spec.index("red")] = 3
        canvases = env.step(row).canvas.astype(int)
    finally:
        env.close()
    for canvas, (rows, cols) in zip(canvases, ((slice(0, 16), slice(0, 16)), (slice(48, 64), slice(48, 64)))):
        changed = np.abs(canvas - empty).sum(-1) > 30
        inside = changed[rows, cols].sum()
        assert inside > 0.6 * changed.sum(), "the object lies mostly in its corner of the image"
