"""Stroke animations: GIFs written by ``spiral sample --animate`` and by the learner, read back frame by frame."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from learner.learner import PolicyLearner
from learner.training import PolicyTrainer
from spiral.agent.acting import EpisodeRunner
from spiral.commands.cli import main as spiral_main
from spiral.config import ExperimentConfig, dump_experiment, experiment_path, load_experiment
from spiral.envs import make_env
from spiral.evaluation.animation import FINAL_HOLD_MS, FRAME_MS, encode_gif, step_frames
from spiral.evaluation.sampling import load_policy, sample_policy
from spiral.nets import build_policy
from spiral.runtime.checkpoint import save_checkpoint

torch.set_num_threads(1)


def tiny(**overrides: object) -> ExperimentConfig:
    return load_experiment(experiment_path("tiny"), overrides=overrides or None)


def timeline(gif: bytes | Path, mode: str = "L") -> list[np.ndarray]:
    """What a GIF shows in each ``FRAME_MS`` slot, the final hold left out (Pillow merges repeated frames)."""
    shown = []
    with Image.open(io.BytesIO(gif) if isinstance(gif, bytes) else gif) as image:
        assert image.format == "GIF" and image.info.get("loop") == 0
        frames = [(np.asarray(frame.convert(mode)), frame.info["duration"]) for frame in ImageSequence.Iterator(image)]
    for index, (pixels, duration) in enumerate(frames):
        if index == len(frames) - 1:
            duration -= FINAL_HOLD_MS
        assert duration > 0 and duration % FRAME_MS == 0, duration
        shown += [pixels] * (duration // FRAME_MS)
    return shown


def upscaled(frames: np.ndarray, scale: int) -> list[np.ndarray]:
    """``[F, H, W, C]`` frames as a GIF stores them: upscaled (nearest), gray frames without a channel axis."""
    big = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    return list(big[..., 0] if big.shape[-1] == 1 else big)


def assert_plays(gif: bytes | Path, expected: list[np.ndarray], mode: str = "L") -> None:
    shown = timeline(gif, mode)
    assert len(shown) == len(expected)
    for step, (got, want) in enumerate(zip(shown, expected)):
        np.testing.assert_array_equal(got, want, err_msg=f"frame {step}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conditional MNIST run (experiments/tiny.yaml) with an untrained policy's checkpoint."""
    run = tmp_path_factory.mktemp("animate") / "run"
    run.mkdir()
    cfg = tiny()
    dump_experiment(cfg, run / "config.yaml")
    torch.manual_seed(0)
    trainer = PolicyTrainer(cfg, build_policy(cfg))
    save_checkpoint(run / "learner", 3, {"trainer": trainer.state_dict(), "frames": 0, "updates": 3})
    return run


def test_sample_animate_writes_one_gif_per_episode_and_a_grid_from_the_episodes_own_canvases(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert spiral_main(["sample", str(run_dir), "--num", "5", "--seed", "2", "--out", str(out), "--animate"]) == 0
    assert f"animations {out / 'animation.gif'} and {out / 'animations'}/" in capsys.readouterr().out
    with np.load(out / "canvases.npz") as archive:
        canvases, targets = archive["canvases"], archive["targets"]

    cfg = tiny()
    policy, _ = load_policy(cfg, sorted((run_dir / "learner").glob("ckpt-*.pt"))[-1])
    steps = sample_policy(cfg, policy, 5, seed=2, keep_steps=True).canvas_steps
    assert steps is not None and steps.shape == (10, 5, 64, 64, 1)  # T + 1 canvases of 9 actions
    np.testing.assert_array_equal(steps[-1], canvases)  # the same episodes as canvases.npz
    assert (steps[0] == 255).all() and (steps[-1] < 255).any()  # from the blank canvas to a painting

    episodes = sorted((out / "animations").glob("*.gif"))
    assert [p.name for p in episodes] == [f"episode-{i:05d}.gif" for i in range(5)]
    for index, path in enumerate(episodes):
        with Image.open(path) as image:
            assert image.size == (2 * (2 + 64 + 64 + 2), 2 * (2 + 64 + 2))  # target | canvas, padded, x2
            assert 1 < image.n_frames <= 10
        expected = step_frames(steps[:, index:index + 1], targets[index:index + 1], columns=1)
        np.testing.assert_array_equal(expected[:, 2:66, 2:66], np.broadcast_to(targets[index], (10, 64, 64, 1)))
        assert_plays(path, upscaled(expected, 2))

    grid = step_frames(steps, targets, columns=4)  # frame i: every episode's canvas after step i, beside its target
    with Image.open(out / "animation.gif") as image:
        assert image.size == (2 * grid.shape[2], 2 * grid.shape[1])
    assert_plays(out / "animation.gif", upscaled(grid, 2))


def test_colour_frames_keep_their_colours_and_a_still_step_keeps_its_time() -> None:
    frames = np.zeros((4, 6, 10, 3), np.uint8)
    frames[:] = (250, 240, 230)
    frames[1:, 1:3, 2:5] = (200, 20, 40)
    frames[3:, 4:6, 6:9] = (10, 90, 250)  # frame 2 repeats frame 1: a move that painted nothing
    gif = encode_gif(frames, scale=3)
    with Image.open(io.BytesIO(gif)) as image:
        assert image.size == (30, 18) and image.n_frames == 3
    assert_plays(gif, upscaled(frames, 3), mode="RGB")
    with pytest.raises(ValueError, match="frames must be uint8"):
        encode_gif(frames.astype(np.float32))


def test_the_learner_puts_an_animated_grid_on_tensorboard(tmp_path: Path) -> None:
    cfg = tiny(env={"paint": {"backend": "fast"}},
               learner={"batch_size": 4, "sample_grid_every_updates": 2, "checkpoint_every_updates": 0})
    torch.manual_seed(0)
    learner = PolicyLearner(cfg, tmp_path, member=0)
    env = make_env(cfg, 4, seed=1)
    try:
        targets = np.full((4, 64, 64, 1), 255, np.uint8)
        targets[:, 20:28, 8:56] = 0
        unroll = EpisodeRunner(cfg, env, learner.policy, None, seed=1).run_episode(targets)
    finally:
        env.close()
    for _ in range(2):
        learner.submit(unroll)
        assert learner.step(timeout=5.0) is not None
    learner.close()

    events = EventAccumulator(str(tmp_path / "tensorboard" / "learner"), size_guidance={"images": 0})
    events.Reload()
    animations = events.Images("samples/animation")
    assert [event.step for event in animations] == [2]  # the sample grid's cadence
    gif = animations[0].encoded_image_string
    expected = step_frames(unroll.canvases, unroll.targets, columns=4)
    with Image.open(io.BytesIO(gif)) as image:
        assert image.format == "GIF" and image.n_frames > 1
        assert (animations[0].width, animations[0].height) == image.size == (expected.shape[2], expected.shape[1])
    assert_plays(gif, upscaled(expected, 1))
    assert (tmp_path / "samples" / "latest.gif").read_bytes() == gif
