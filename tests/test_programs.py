"""Programs as data: JSON round trips, strict validation, SVG, re-execution and ``spiral render``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spiral.commands.cli import main as spiral_main
from spiral.config import ExperimentConfig, from_dict
from spiral.envs import action_spec_for, make_env
from spiral.envs.fast_paint import stroke_radius_scale
from spiral.envs.programs import (Program, env_section, execute, execute_actions, from_json, load_program,
                                  program_from_actions, save_program, to_json, to_svg)
from spiral.envs.spec import PRESSURE_VALUES

torch.set_num_threads(1)
SVG = "{http://www.w3.org/2000/svg}"
REPO_ROOT = Path(__file__).resolve().parent.parent


def paint_config(**paint: object) -> ExperimentConfig:
    return from_dict({"env": {"episode_length": 7, "paint": {"backend": "fast", **paint}}})


def scene_config() -> ExperimentConfig:
    return from_dict({"env": {"kind": "mujoco", "episode_length": 5, "conditional": False}})


def random_actions(cfg: ExperimentConfig, steps: int, num: int, seed: int, paint_fraction: float = 0.7) -> np.ndarray:
    """``[steps, num, K]`` random valid actions with mostly painting (placing) steps."""
    spec = action_spec_for(cfg)
    rng = np.random.default_rng(seed)
    actions = np.stack([rng.integers(0, n, (steps, num)) for n in spec.sizes], -1)
    actions[..., 0] = rng.random((steps, num)) < paint_fraction
    return actions


def run_episode(cfg: ExperimentConfig, actions: np.ndarray, backend: str | None = None) -> np.ndarray:
    """Final ``[N, H, W, C]`` canvases of one batched episode."""
    env = make_env(cfg, num_envs=actions.shape[1], seed=0, backend=backend)
    try:
        env.reset()
        for step in actions:
            env.step(step)
        return env.canvases()
    finally:
        env.close()


def hand_program(steps: list[dict[str, int]], **paint: object) -> Program:
    cfg = paint_config(**paint)
    return Program(env=env_section(cfg.env), steps=steps)


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [paint_config(), paint_config(use_color=True, brush_sizes=[2.0]),
                                 paint_config(gray_levels=8), scene_config()],
                         ids=["paint", "paint-colour-one-size", "paint-gray", "mujoco"])
def test_json_round_trip_keeps_env_and_steps(cfg: ExperimentConfig, tmp_path: Path) -> None:
    spec = action_spec_for(cfg)
    actions = random_actions(cfg, cfg.env.episode_length - 1, 1, seed=3)[:, 0]
    program = program_from_actions(cfg.env, actions, spec)
    assert program.steps[0] == {name: int(v) for name, v in zip(spec.names, actions[0])}

    text = to_json(program)
    parsed = json.loads(text)
    assert set(parsed) == {"env", "steps"}
    assert parsed["env"]["kind"] == cfg.env.kind and parsed["env"]["episode_length"] == cfg.env.episode_length
    restored = from_json(text)
    assert restored == program
    np.testing.assert_array_equal(restored.actions(), actions)
    restored_env = restored.experiment_config().env
    assert (restored_env.kind, restored_env.episode_length) == (cfg.env.kind, cfg.env.episode_length)
    assert getattr(restored_env, cfg.env.kind) == getattr(cfg.env, cfg.env.kind)

    save_program(program, tmp_path / "program.json")
    assert load_program(tmp_path / "program.json") == program


def test_moves_may_omit_the_heads_they_ignore() -> None:
    program = hand_program([{"flag": 0, "end": 40}, {"flag": 1, "end": 45, "control": 42, "size": 2, "pressure": 9}])
    actions = from_json(to_json(program)).actions()
    assert actions.tolist()[0] == [0, 40, 0, 0, 0]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["steps"][1].update(sise=1), r"steps\[1\]: unknown head 'sise'"),
    (lambda d: d["steps"][1].update(size=3), r"steps\[1\]\.size: 3 is out of range \[0, 3\)"),
    (lambda d: d["steps"][0].update(end=1024), r"steps\[0\]\.end: 1024 is out of range \[0, 1024\)"),
    (lambda d: d["steps"][1].update(pressure=-1), r"steps\[1\]\.pressure: -1 is out of range"),
    (lambda d: d["steps"][1].update(pressure=2.0), r"steps\[1\]\.pressure: expected an integer index, got 2\.0"),
    (lambda d: d["steps"][1].update(flag=True), r"steps\[1\]\.flag: expected an integer index, got True"),
    (lambda d: d["steps"][1].pop("control"), r"steps\[1\]: missing head 'control' \(flag 1 uses it\)"),
    (lambda d: d["steps"][0].pop("flag"), r"steps\[0\]: missing head 'flag'"),
    (lambda d: d["steps"].append("paint"), r"steps\[2\]: expected a \{head: index\} object"),
    (lambda d: d.update(steps=[{"flag": 0, "end": 1}] * 7), r"7 steps do not fit an episode of episode_length 7"),
    (lambda d: d["env"]["paint"].update(brush_szes=[1.0]), r"env\.paint\.brush_szes: unknown field"),
    (lambda d: d["env"]["paint"].update(grid_size=1), r"env\.paint\.grid_size: must be >= 2"),
    (lambda d: d["env"].update(noise_dim=4), r"env\.noise_dim: unknown field for a 'paint' program"),
    (lambda d: d["env"].update(mujoco={}), r"env\.mujoco: unknown field for a 'paint' program"),
    (lambda d: d["env"].update(kind="watercolour"), r"env\.kind: expected 'paint' or 'mujoco', got 'watercolour'"),
    (lambda d: d.update(version=2), r"unknown program field\(s\) \['version'\]"),
    (lambda d: d.pop("steps"), r"missing program field 'steps'"),
])
def test_invalid_programs_raise_value_error_naming_the_entry(mutate, message: str) -> None:
    program = hand_program([{"flag": 0, "end": 40}, {"flag": 1, "end": 45, "control": 42, "size": 2, "pressure": 9}])
    data = json.loads(to_json(program))
    mutate(data)
    with pytest.raises(ValueError, match=message):
        from_json(json.dumps(data))


def test_malformed_json_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        from_json('{"env": {"kind": "paint",')
    with pytest.raises(ValueError, match="a program is a JSON object"):
        from_json("[1, 2]")


def test_program_from_actions_checks_the_spec_and_shape() -> None:
    cfg = paint_config()
    other = action_spec_for(paint_config(use_color=True))
    actions = random_actions(cfg, 3, 1, seed=0)[:, 0]
    with pytest.raises(ValueError, match="do not match the environment's"):
        program_from_actions(cfg.env, actions, other)
    with pytest.raises(ValueError, match=r"actions must be \[T, 5\]"):
        program_from_actions(cfg.env, actions[:, :3], action_spec_for(cfg))


# ---------------------------------------------------------------------------------------------
# SVG
# ---------------------------------------------------------------------------------------------


def test_paint_svg_is_xml_with_one_path_per_paint_step() -> None:
    paint = {"flag": 1, "size": 2, "pressure": 9}
    program = hand_program([
        {"flag": 0, "end": 16 * 32 + 2},
        {**paint, "control": 16 * 32 + 8, "end": 16 * 32 + 14},   # continued stroke: step 1 ...
        {**paint, "control": 16 * 32 + 20, "end": 16 * 32 + 28},  # ... and step 2
        {"flag": 0, "end": 4 * 32 + 4},
        {**paint, "control": 4 * 32 + 16, "end": 8 * 32 + 28},    # step 4
        {"flag": 0, "end": 28 * 32 + 4},
    ])
    root = ET.fromstring(to_svg(program))
    assert root.tag == f"{SVG}svg" and root.get("viewBox") == "0 0 64 64"
    paths = root.findall(f"{SVG}path")
    assert [p.get("data-step") for p in paths] == ["1", "2", "4"]
    # Grid (16, 2) is canvas (y, x) = (32, 4): SVG is x first. Step 2 starts where step 1 ended.
    assert [p.get("d").split() for p in paths] == [
        ["M", "4", "32", "Q", "16", "32", "28", "32"],
        ["M", "28", "32", "Q", "40", "32", "56", "32"],
        ["M", "8", "8", "Q", "32", "8", "56", "16"],
    ]
    for path in paths:
        assert path.get("stroke-linecap") == "round" and path.get("fill") == "none"
        assert path.get("stroke") == "#000000"
        assert float(path.get("stroke-width")) == pytest.approx(2 * 3.0 * float(stroke_radius_scale(1.0)), abs=1e-3)


def test_svg_of_an_episode_has_one_path_per_paint_step() -> None:
    cfg = paint_config(use_color=True)
    actions = random_actions(cfg, 6, 1, seed=12)[:, 0]
    program = program_from_actions(cfg.env, actions, action_spec_for(cfg))
    paths = ET.fromstring(to_svg(program)).findall(f"{SVG}path")
    painted = [i for i, flag in enumerate(actions[:, 0]) if flag == 1]
    assert painted and [int(p.get("data-step")) for p in paths] == painted


def test_paint_svg_takes_each_steps_colour_width_and_opacity() -> None:
    program = hand_program([
        {"flag": 1, "end": 100, "control": 90, "red": 19, "green": 0, "blue": 0, "size": 0, "pressure": 0},
        {"flag": 1, "end": 200, "control": 150, "red": 0, "green": 0, "blue": 19, "size": 0, "pressure": 4},
    ], use_color=True)
    paths = ET.fromstring(to_svg(program)).findall(f"{SVG}path")
    assert [p.get("stroke") for p in paths] == ["#ff0000", "#0000ff"]
    low, mid = (float(p.get("stroke-opacity")) for p in paths)
    assert 0 < low < mid < 1
    assert float(paths[1].get("stroke-width")) == pytest.approx(
        2 * 1.0 * float(stroke_radius_scale(PRESSURE_VALUES[4])), abs=1e-3)
    # The second step continues where the first ended: grid 100 = (3, 4) -> canvas (6, 8).
    assert paths[1].get("d").split()[:3] == ["M", "8", "6"]


def test_scene_svg_draws_each_placed_object() -> None:
    cfg = scene_config()
    steps = [
        {"flag": 1, "location": 0, "shape": 0, "size": 0, "red": 3, "green": 0, "blue": 0},
        {"flag": 0, "location": 5},
        {"flag": 1, "location": 255, "shape": 1, "size": 2, "red": 0, "green": 3, "blue": 0},
        {"flag": 1, "location": 136, "shape": 3, "size": 1, "red": 0, "green": 0, "blue": 3},
    ]
    root = ET.fromstring(to_svg(Program(env=env_section(cfg.env), steps=steps)))
    assert root.get("viewBox") == "0 0 64 64"
    shapes = [e for e in root if e.tag in (f"{SVG}rect", f"{SVG}circle")][1:]  # [0] is the floor
    assert [e.get("fill") for e in shapes] == ["#ff0000", "#00ff00", "#0000ff"]
    box, sphere, capsule = shapes
    assert box.tag == f"{SVG}rect" and float(box.get("x")) < 4 and float(box.get("y")) < 4      # cell (0, 0)
    assert sphere.tag == f"{SVG}circle" and float(sphere.get("cx")) == pytest.approx(62.0)  # cell (15, 15)
    assert float(sphere.get("cy")) == pytest.approx(62.0)
    assert capsule.get("rx") is not None
    assert float(capsule.get("width")) == pytest.approx(3 * float(capsule.get("height")))


# ---------------------------------------------------------------------------------------------
# Execution and ``spiral render``
# ---------------------------------------------------------------------------------------------


def test_execute_fast_reproduces_each_episode_of_a_batch() -> None:
    cfg = paint_config(use_color=True)
    actions = random_actions(cfg, 6, 3, seed=11)
    canvases = run_episode(cfg, actions, backend="fast")
    for i in range(3):
        program = from_json(to_json(program_from_actions(cfg.env, actions[:, i], action_spec_for(cfg))))
        np.testing.assert_array_equal(execute(program, backend="fast"), canvases[i])


def test_libmypaint_rendering_of_an_episode_json_reproduces_its_canvas() -> None:
    cfg = paint_config(backend="libmypaint")
    actions = random_actions(cfg, 6, 3, seed=5)
    canvases = run_episode(cfg, actions, backend="libmypaint")
    for i in range(3):
        program = from_json(to_json(program_from_actions(cfg.env, actions[:, i], action_spec_for(cfg))))
        canvas = execute(program, backend="libmypaint")
        assert canvas.min() < 255, "the episode should have drawn something"
        np.testing.assert_array_equal(canvas, canvases[i])


def test_execute_actions_replays_a_batch_and_redraws_it_with_another_brush() -> None:
    """The same actions in one batch give the episodes' canvases; another brush, the same strokes in other ink."""
    cfg = paint_config(backend="libmypaint")
    actions = random_actions(cfg, 6, 3, seed=5)
    canvases = run_episode(cfg, actions, backend="libmypaint")
    episodes = np.swapaxes(actions, 0, 1)  # [T, N, K] -> [N, T, K]
    np.testing.assert_array_equal(execute_actions(cfg, episodes), canvases)
    pen = dataclasses.replace(cfg, env=dataclasses.replace(
        cfg.env, paint=dataclasses.replace(cfg.env.paint, brush_type="classic/pen")))
    redrawn = execute_actions(pen, episodes)
    assert redrawn.shape == canvases.shape and not np.array_equal(redrawn, canvases)
    for inked, pen_inked in zip(canvases < 200, redrawn < 200):  # the pen draws where the dry brush drew
        assert (inked & pen_inked).sum() > 0.5 * min(inked.sum(), pen_inked.sum())
    with pytest.raises(ValueError, match=r"must be \[N >= 1, T, K\]"):
        execute_actions(cfg, actions[:, 0])


def test_execute_scene_program_matches_the_episode() -> None:
    cfg = scene_config()
    actions = random_actions(cfg, 4, 2, seed=2)
    canvases = run_episode(cfg, actions)
    program = program_from_actions(cfg.env, actions[:, 1], action_spec_for(cfg))
    np.testing.assert_array_equal(execute(from_json(to_json(program))), canvases[1])
    with pytest.raises(ValueError, match="scene programs run on MuJoCo"):
        execute(program, backend="fast")


@pytest.mark.parametrize(("backend", "use_color", "mode"), [("libmypaint", False, "L"), ("fast", True, "RGB")])
def test_spiral_render_cli_writes_the_episode_canvas(tmp_path: Path, backend: str, use_color: bool, mode: str) -> None:
    cfg = paint_config(use_color=use_color, backend=backend)
    actions = random_actions(cfg, 6, 1, seed=8)
    canvas = run_episode(cfg, actions, backend=backend)[0]
    assert canvas.min() < 255
    save_program(program_from_actions(cfg.env, actions[:, 0], action_spec_for(cfg)), tmp_path / "program.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "spiral.commands.cli", "render", str(tmp_path / "program.json"), "--backend", backend,
         "--out", str(tmp_path / "canvas.png"), "--svg", str(tmp_path / "program.svg")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "canvas.png" in result.stdout
    with Image.open(tmp_path / "canvas.png") as image:
        assert image.format == "PNG" and image.mode == mode
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels.reshape(canvas.shape), canvas)
    paths = ET.parse(tmp_path / "program.svg").getroot().findall(f"{SVG}path")
    assert len(paths) == int(actions[:, 0, 0].sum())


def test_spiral_render_grayscale_png_and_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    program = hand_program([{"flag": 1, "end": 500, "control": 300, "size": 2, "pressure": 9}])
    save_program(program, tmp_path / "gray.json")
    assert spiral_main(["render", str(tmp_path / "gray.json"), "--out", str(tmp_path / "gray.png")]) == 0
    with Image.open(tmp_path / "gray.png") as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), execute(program)[..., 0])

    assert spiral_main(["render", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.png")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"env": ')
    assert spiral_main(["render", str(tmp_path / "broken.json"), "--out", str(tmp_path / "x.png")]) == 2
    assert "broken.json: malformed program: not valid JSON" in capsys.readouterr().err
    (tmp_path / "bad_head.json").write_text(to_json(program).replace('"size"', '"sizes"'))
    assert spiral_main(["render", str(tmp_path / "bad_head.json"), "--out", str(tmp_path / "x.png")]) == 2
    assert "steps[0]: unknown head 'sizes'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("backend", ["libmypaint", "fast"])
def test_a_grey_program_round_trips_renders_and_draws_in_its_grey(tmp_path: Path, backend: str) -> None:
    """``env.paint.gray_levels``: the ``gray`` head survives JSON, ``spiral render`` paints its
    level on the one-channel PNG, and the SVG strokes each step in its grey."""
    row = 16 * 32
    steps = [{"flag": 0, "end": row + 4}]
    for k in range(4):   # back and forth along canvas row 32 in grey level 3 of 8 (ink 109)
        steps.append({"flag": 1, "control": row + 16, "end": row + (28 if k % 2 == 0 else 4), "size": 2,
                      "pressure": 9, "gray": 3})
    steps.append({"flag": 1, "control": 4 * 32 + 16, "end": 4 * 32 + 28, "size": 0, "pressure": 9, "gray": 7})
    program = hand_program(steps, gray_levels=8, backend=backend)
    restored = from_json(to_json(program))
    assert restored == program and restored.env["paint"]["gray_levels"] == 8
    assert restored.action_spec().names[-1] == "gray" and restored.actions()[1, -1] == 3

    save_program(program, tmp_path / "gray.json")
    assert spiral_main(["render", str(tmp_path / "gray.json"), "--out", str(tmp_path / "gray.png"),
                        "--svg", str(tmp_path / "gray.svg")]) == 0
    with Image.open(tmp_path / "gray.png") as image:
        assert image.mode == "L"
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels, execute(program)[..., 0])
    core = pixels[30:35, 16:48].astype(float)
    assert np.abs(np.median(core) - 255 * 3 / 7) <= 3, "the stroke reads back at its grey, not black"
    assert (pixels[:14] == 255).all(), "white ink on white paper draws nothing (the last step, along row 8)"

    paths = ET.parse(tmp_path / "gray.svg").getroot().findall(f"{SVG}path")
    assert [p.get("stroke") for p in paths] == ["#6d6d6d"] * 4 + ["#ffffff"]


def test_the_learners_sample_grid_comes_with_the_program_of_its_first_episode(tmp_path: Path) -> None:
    """A run leaves programs, not only pictures: ``samples/update-N.json`` re-renders pixel for pixel."""
    from spiral.agent.acting import EpisodeRunner
    from learner.learner import PolicyLearner
    from spiral.config import load_experiment

    cfg = load_experiment(REPO_ROOT / "experiments" / "tiny.yaml")
    learner = PolicyLearner(cfg, tmp_path)
    env = make_env(cfg, num_envs=3, seed=4)
    targets = np.full((3, 64, 64, 1), 255, np.uint8)
    targets[:, 20:44, 28:36] = 0
    try:
        unroll = EpisodeRunner(cfg, env, learner.policy, None, seed=4).run_episode(targets)
    finally:
        env.close()
    png = learner.save_samples(unroll)
    program = load_program(png.with_suffix(".json"))
    assert load_program(tmp_path / "samples" / "latest.json") == program
    np.testing.assert_array_equal(unroll.actions[:, 0], program.actions())
    np.testing.assert_array_equal(execute(program, backend="libmypaint"), unroll.final_canvases[0])
    ET.fromstring((tmp_path / "samples" / "latest.svg").read_text())
