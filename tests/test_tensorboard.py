"""TensorBoard event files: written by real learner updates, read back with TensorBoard's reader."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from spiral.agent.acting import EpisodeRunner
from discriminator.learner import DiscriminatorLearner
from learner.learner import PolicyLearner
from spiral.config import ExperimentConfig, experiment_path, load_experiment
from spiral.envs import make_env
from spiral.runtime.tensorboard import TrainingBoard, board_dir, scalar_tag
from spiral.agent.trajectory import Unroll

SIZE = 64


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return load_experiment(experiment_path("tiny"), overrides={
        "env": {"paint": {"backend": "fast"}},
        "learner": {"batch_size": 4, "sample_grid_every_updates": 2, "checkpoint_every_updates": 0},
        "discriminator_learner": {"batch_size": 4, "checkpoint_every_updates": 0}})


def bar_targets(batch: int, offset: int = 0) -> np.ndarray:
    """Dark horizontal bars on white paper, at different heights."""
    images = np.full((batch, SIZE, SIZE, 1), 255, np.uint8)
    for i in range(batch):
        row = 12 + ((i + offset) * 7) % 40
        images[i, row:row + 4, 8:56] = 0
    return images


def collect(cfg: ExperimentConfig, policy: torch.nn.Module, batch: int, seed: int) -> Unroll:
    """One episode on ``batch`` real environments with the actor's own loop."""
    env = make_env(cfg, batch, seed)
    try:
        targets = bar_targets(batch) if cfg.env.conditional else None
        return EpisodeRunner(cfg, env, policy, None, seed=seed, actor_id="test").run_episode(targets)
    finally:
        env.close()


class FixedRenders:
    """A replay buffer stand-in: the same renders and targets every time."""

    def __init__(self) -> None:
        self.renders = bar_targets(4, offset=3)
        self.targets = bar_targets(4)

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.renders[:batch_size], self.targets[:batch_size]


def read_events(log_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalar_values(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in events.Scalars(tag)}


def test_tags_group_known_and_unknown_keys():
    assert scalar_tag("pg_loss") == "loss/pg_loss"
    assert scalar_tag("loss") == "loss/loss"
    assert scalar_tag("mean_reward") == "reward/mean_reward"
    assert scalar_tag("reward_l2") == "reward/reward_l2"
    assert scalar_tag("critic_real_mean") == "critic/critic_real_mean"
    assert scalar_tag("d_fake") == "critic/d_fake"
    assert scalar_tag("mean_entropy") == "policy/mean_entropy"
    assert scalar_tag("frames_per_second") == "throughput/frames_per_second"
    assert scalar_tag("something_new") == "stats/something_new"
    assert scalar_tag("eval/l2_sampled") == "eval/l2_sampled"  # a key that names its group is its own tag


def test_board_directory_names_the_member(tmp_path: Path):
    assert board_dir(tmp_path, "learner", 0) == tmp_path / "tensorboard" / "learner"
    assert board_dir(tmp_path, "discriminator", "2") == tmp_path / "tensorboard" / "discriminator-2"


def test_board_writes_finite_numbers_and_images(tmp_path: Path):
    board = TrainingBoard(tmp_path, "learner")
    assert not board.log_dir.exists()  # opened on the first write
    written = board.scalars({"loss": 1.5, "critic_real_mean": np.float32(0.25), "update": 3, "nan": math.nan,
                             "inf": math.inf, "flag": True, "name": "x"}, step=3)
    assert written == 2
    assert board.image("samples/grid", np.full((8, 16, 3), 200, np.uint8), step=3)
    assert board.image("samples/gray", np.zeros((8, 8), np.uint8), step=3)
    board.close()
    events = read_events(board.log_dir)
    assert set(events.Tags()["scalars"]) == {"loss/loss", "critic/critic_real_mean"}
    assert scalar_values(events, "critic/critic_real_mean") == {3: 0.25}
    grid = events.Images("samples/grid")[0]
    assert (grid.step, grid.width, grid.height) == (3, 16, 8)
    assert events.Images("samples/gray")


def test_policy_learner_writes_every_update_and_the_sample_grid(cfg, tmp_path: Path):
    torch.manual_seed(0)
    learner = PolicyLearner(cfg, tmp_path, member=0)
    unroll = collect(cfg, learner.policy, batch=4, seed=1)
    records = []
    for _ in range(2):
        learner.submit(unroll)
        records.append(learner.step(timeout=5.0))
    learner.close()

    events = read_events(tmp_path / "tensorboard" / "learner")
    tags = set(events.Tags()["scalars"])
    expected = {scalar_tag(key) for record in records for key, value in record.items()
                if key != "update" and math.isfinite(value)}
    assert expected <= tags  # whatever numeric keys the record has, new ones included
    assert {"loss/loss", "loss/pg_loss", "reward/mean_reward", "policy/policy_lag", "throughput/seconds",
            "throughput/frames"} <= tags
    assert scalar_values(events, "loss/loss") == pytest.approx({1: records[0]["loss"], 2: records[1]["loss"]})
    assert scalar_values(events, "throughput/frames") == {1: records[0]["frames"], 2: records[1]["frames"]}
    fps = scalar_values(events, "throughput/frames_per_second")
    assert list(fps) == [2] and fps[2] > 0  # measured between the two updates
    grid = events.Images("samples/grid")
    assert [image.step for image in grid] == [2]  # sample_grid_every_updates
    assert (tmp_path / "samples" / "latest.png").exists()


def test_discriminator_learner_writes_its_record(cfg, tmp_path: Path):
    torch.manual_seed(0)
    learner = DiscriminatorLearner(cfg, tmp_path, np.zeros((4, SIZE, SIZE, 1), np.uint8), FixedRenders(), member=1)
    records = [learner.step() for _ in range(2)]
    learner.close()

    events = read_events(tmp_path / "tensorboard" / "discriminator-1")
    tags = set(events.Tags()["scalars"])
    assert {"loss/loss", "loss/gp", "critic/d_real", "critic/d_fake", "critic/wasserstein",
            "throughput/seconds"} <= tags
    assert {scalar_tag(key) for key in records[0] if key != "update"} <= tags
    assert scalar_values(events, "critic/wasserstein") == pytest.approx(
        {1: records[0]["wasserstein"], 2: records[1]["wasserstein"]})


def test_an_unwritable_directory_warns_once_and_training_goes_on(cfg, tmp_path: Path, caplog):
    blocker = tmp_path / "tensorboard"
    blocker.write_text("a file where the directory should be")
    caplog.set_level(logging.WARNING, logger="spiral.runtime.tensorboard")
    learner = DiscriminatorLearner(cfg, tmp_path, np.zeros((4, SIZE, SIZE, 1), np.uint8), FixedRenders())
    for _ in range(2):
        assert learner.step() is not None
    assert not learner.recorder.board.enabled
    assert not learner.recorder.image("samples/grid", np.zeros((4, 4, 3), np.uint8), 2)
    learner.close()
    warnings = [r for r in caplog.records if r.name == "spiral.runtime.tensorboard"]
    assert len(warnings) == 1 and "TensorBoard" in warnings[0].getMessage()
    assert learner.version == 2
    assert (tmp_path / "discriminator.jsonl").read_text().count("\n") == 2


def test_a_writer_failing_mid_run_turns_the_board_off(tmp_path: Path, caplog):
    board = TrainingBoard(tmp_path, "learner")
    assert board.scalars({"loss": 1.0}, step=1) == 1

    class Broken:
        def add_scalar(self, *args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            raise OSError(28, "No space left on device")

    board._writer.close()
    board._writer = Broken()  # what a full disk looks like to the board
    caplog.set_level(logging.WARNING, logger="spiral.runtime.tensorboard")
    assert board.scalars({"loss": 2.0}, step=2) == 0
    assert board.scalars({"loss": 3.0}, step=3) == 0
    board.close()
    assert len([r for r in caplog.records if r.name == "spiral.runtime.tensorboard"]) == 1
    assert not board.enabled


def test_importing_the_learner_does_not_import_tensorboard():
    code = ("import sys, learner.learner, discriminator.learner, spiral.runtime.tensorboard; "
            "print('torch.utils.tensorboard' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
