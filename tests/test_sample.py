"""``spiral sample``: a run's checkpoint paints N episodes; canvases, grid and programs agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from learner.training import PolicyTrainer
from spiral.runtime.checkpoint import save_checkpoint
from spiral.commands.cli import main as spiral_main
from spiral.config import ExperimentConfig, dump_experiment, load_experiment
from spiral.data import for_experiment
from spiral.envs.programs import load_program
from spiral.nets import build_policy
from spiral.evaluation.sampling import load_policy, sample_policy

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = REPO_ROOT / "experiments" / "tiny.yaml"


def tiny(**overrides: Any) -> ExperimentConfig:
    return load_experiment(TINY, overrides=overrides or None)


def make_run(run_dir: Path, cfg: ExperimentConfig, version: int = 7) -> Path:
    """A ``spiral up``-shaped run directory with an untrained policy's learner checkpoint."""
    run_dir.mkdir(parents=True)
    dump_experiment(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    trainer = PolicyTrainer(cfg, build_policy(cfg))
    return save_checkpoint(run_dir / "learner", version, {"trainer": trainer.state_dict(), "frames": 0,
                                                          "updates": version, "critic_version": 0})


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("sample") / "run"
    make_run(run_dir, tiny())
    return run_dir


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def test_conditional_run_paints_the_holdout_and_programs_rerender_pixel_for_pixel(
        conditional_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert spiral_main(["sample", str(conditional_run), "--num", "5", "--out", str(out), "--seed", "3"]) == 0
    summary = capsys.readouterr().out.strip()
    assert len(summary.splitlines()) == 1
    assert "5 episodes" in summary and "version 7" in summary and "mean held-out L2" in summary

    arrays = read_npz(out / "canvases.npz")
    assert set(arrays) == {"canvases", "targets"}
    canvases, targets = arrays["canvases"], arrays["targets"]
    assert canvases.dtype == np.uint8 and canvases.shape == (5, 64, 64, 1)
    np.testing.assert_array_equal(targets, for_experiment(tiny()).holdout[:5])
    assert canvases.min() < 255  # the untrained policy paints something
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG"
    programs = sorted((out / "programs").glob("*.json"))
    assert [p.name for p in programs] == [f"episode-{i:05d}.json" for i in range(5)]
    assert json.loads(programs[0].read_text())["env"]["paint"]["backend"] == "libmypaint"

    episode = 3
    png = tmp_path / "rendered.png"
    assert spiral_main(["render", str(programs[episode]), "--backend", "libmypaint", "--out", str(png)]) == 0
    with Image.open(png) as image:
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels.reshape(canvases[episode].shape), canvases[episode])
    assert load_program(programs[episode]).actions().shape == (9, 3)


def test_more_episodes_than_holdout_images_cycle_through_chunks(conditional_run: Path) -> None:
    cfg = tiny()
    policy, version = load_policy(cfg, sorted((conditional_run / "learner").glob("ckpt-*.pt"))[-1])
    holdout = for_experiment(cfg).holdout
    result = sample_policy(cfg, policy, 70, seed=1, backend="fast", chunk_size=32)
    assert version == 7 and result.canvases.shape == (70, 64, 64, 1) and result.actions.shape == (70, 9, 3)
    np.testing.assert_array_equal(result.targets[64:], holdout[:6])
    assert result.l2 is not None and result.l2.shape == (70,) and result.mean_l2 is not None
    assert result.cfg.env.paint.backend == "fast"
    again = sample_policy(cfg, policy, 70, seed=1, backend="fast", chunk_size=32)
    np.testing.assert_array_equal(again.canvases, result.canvases)  # same seed, same episodes


def test_checkpoint_file_with_targets_file(conditional_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    targets = np.full((3, 64, 64, 1), 255, np.uint8)
    targets[:, 20:44, 28:36] = 0
    np.savez(tmp_path / "mine.npz", targets=targets)
    checkpoint = sorted((conditional_run / "learner").glob("ckpt-*.pt"))[-1]
    out = tmp_path / "out"
    assert spiral_main(["sample", str(checkpoint), "--num", "4", "--out", str(out), "--targets",
                        str(tmp_path / "mine.npz"), "--backend", "fast", "--greedy"]) == 0
    assert "mean target L2" in capsys.readouterr().out
    arrays = read_npz(out / "canvases.npz")
    assert arrays["canvases"].shape == (4, 64, 64, 1)
    np.testing.assert_array_equal(arrays["targets"], targets[[0, 1, 2, 0]])
    assert len(list((out / "programs").glob("*.json"))) == 4


def test_unconditional_run_paints_from_noise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    make_run(run_dir, tiny(env={"conditional": False}), version=12)
    out = tmp_path / "out"
    assert spiral_main(["sample", str(run_dir), "--num", "3", "--out", str(out), "--backend", "fast"]) == 0
    summary = capsys.readouterr().out
    assert "version 12" in summary and "L2" not in summary
    arrays = read_npz(out / "canvases.npz")
    assert set(arrays) == {"canvases"}
    assert arrays["canvases"].dtype == np.uint8 and arrays["canvases"].shape == (3, 64, 64, 1)
    assert not np.array_equal(arrays["canvases"][0], arrays["canvases"][1])  # fresh noise, fresh samples
    assert (out / "grid.png").is_file() and len(list((out / "programs").glob("*.json"))) == 3

    np.savez(tmp_path / "t.npz", targets=np.zeros((1, 64, 64, 1), np.uint8))
    assert spiral_main(["sample", str(run_dir), "--out", str(out), "--targets", str(tmp_path / "t.npz")]) == 2
    assert "needs a conditional experiment" in capsys.readouterr().err


def test_average_paints_with_the_moving_average_of_the_weights(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny(env={"conditional": False}, learner={"policy_average_decay": 0.999})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_experiment(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    trainer = PolicyTrainer(cfg, build_policy(cfg))
    torch.manual_seed(1)
    other = build_policy(cfg)  # stands in for an average that has drifted from the weights
    trainer.average.module.load_state_dict(other.state_dict())
    save_checkpoint(run_dir / "learner", 5, {"trainer": trainer.state_dict(), "frames": 0, "updates": 5,
                                             "critic_version": 0})

    painted = {}
    for flag in ([], ["--average"]):
        out = tmp_path / ("average" if flag else "weights")
        assert spiral_main(["sample", str(run_dir), "--num", "3", "--out", str(out), "--backend", "fast", *flag]) == 0
        painted[bool(flag)] = read_npz(out / "canvases.npz")["canvases"]
    assert "averaged weights" in capsys.readouterr().out
    fast = load_experiment(run_dir / "config.yaml", overrides={"env": {"paint": {"backend": "fast"}}})
    assert np.array_equal(painted[True], sample_policy(fast, other, 3, seed=0).canvases)
    assert not np.array_equal(painted[True], painted[False])

    plain = tmp_path / "plain"
    make_run(plain, tiny(env={"conditional": False}))
    check_fails([str(plain), "--out", str(tmp_path / "x"), "--average"], capsys,
                "holds no averaged policy", "policy_average_decay 0")


def check_fails(argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> None:
    assert spiral_main(["sample", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spiral sample: error:") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_errors_are_clear_and_exit_2(conditional_run: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    check_fails([str(tmp_path / "nowhere"), "--out", out], capsys, "nowhere: no such run directory")

    empty = tmp_path / "empty"
    (empty / "learner").mkdir(parents=True)
    dump_experiment(tiny(), empty / "config.yaml")
    check_fails([str(empty), "--out", out], capsys, "learner: no checkpoint")

    no_config = tmp_path / "no-config"
    (no_config / "learner").mkdir(parents=True)
    check_fails([str(no_config), "--out", out], capsys, "config.yaml: no experiment config")
    checkpoint = sorted((conditional_run / "learner").glob("ckpt-*.pt"))[-1]
    copied = tmp_path / "loose" / "learner" / checkpoint.name
    copied.parent.mkdir(parents=True)
    copied.write_bytes(checkpoint.read_bytes())
    check_fails([str(copied), "--out", out], capsys, "config.yaml: no experiment config")

    (tmp_path / "junk.pt").write_text("not a checkpoint")
    check_fails([str(tmp_path / "junk.pt"), "--config", str(TINY), "--out", out], capsys,
                "junk.pt: not a readable checkpoint")

    dump_experiment(tiny(env={"conditional": False}), tmp_path / "other.yaml")
    check_fails([str(checkpoint), "--config", str(tmp_path / "other.yaml"), "--out", out], capsys,
                "not a learner checkpoint of")

    expected = "uint8 [N, 64, 64, 1]"
    np.savez(tmp_path / "float.npz", targets=np.zeros((2, 64, 64, 1), np.float32))
    np.savez(tmp_path / "rgb.npz", targets=np.zeros((2, 64, 64, 3), np.uint8))
    np.savez(tmp_path / "two.npz", a=np.zeros(1), b=np.zeros(1))
    (tmp_path / "text.npz").write_text("hello")
    np.save(tmp_path / "plain.npy", np.zeros((2, 64, 64, 1), np.uint8))
    for name, fragment in [("float.npz", "got dtype float32"), ("rgb.npz", "got shape [2, 64, 64, 3]"),
                           ("two.npz", "found arrays ['a', 'b']"), ("text.npz", "not an .npz file"),
                           ("plain.npy", "not an .npz archive"), ("missing.npz", "no such targets file")]:
        check_fails([str(conditional_run), "--out", out, "--targets", str(tmp_path / name)], capsys,
                    f"{tmp_path / name}:", fragment, *([] if name == "missing.npz" else [expected]))

    check_fails([str(conditional_run), "--out", out, "--num", "0"], capsys, "--num must be >= 1")
    assert not (tmp_path / "out").exists()


def test_set_changes_a_setting_of_the_runs_config_and_a_bad_one_is_named(
        conditional_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pen"
    assert spiral_main(["sample", str(conditional_run), "--num", "2", "--out", str(out),
                        "--set", "env.paint.brush_type=classic/pen"]) == 0
    program = json.loads(sorted((out / "programs").glob("*.json"))[0].read_text())
    assert program["env"]["paint"]["brush_type"] == "classic/pen"
    capsys.readouterr()
    assert spiral_main(["sample", str(conditional_run), "--num", "2", "--out", str(out),
                        "--set", "env.paint.brushtype=classic/pen"]) == 2
    assert "--set env.paint.brushtype=classic/pen: env.paint.brushtype: unknown field" in capsys.readouterr().err
