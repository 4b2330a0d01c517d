"""The run's budget (``learner.max_frames``, ``--frames``) and the time-based checkpoint cadence.

* ``spiral local --frames N`` and ``spiral up --frames N`` end by themselves with status 0; the
  learner's final checkpoint holds the frames it consumed, at or past N, beside a final sample
  grid; a run started again on the same run directory is done at once and trains no further.
* As real processes (:class:`system_harness.System`): once its learner is done, every process
  of the member stays up and healthy and says ``done`` (``/healthz``, ``spiral_run_done``, the
  learner's ``Status``); the learner still serves its parameters and refuses unrolls, the
  discriminator's version and the actors' steps stop moving, and a killed and restarted
  learner comes back done from its checkpoint.
* ``checkpoint_every_seconds`` writes a checkpoint after an update once that long has passed,
  with ``checkpoint_every_updates`` off; both learners take it.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from discriminator.learner import DiscriminatorLearner
from learner.learner import LearnerDone, PolicyLearner
from replaybuffer.table import LocalRenders, ReplayTable
from spiral.agent.acting import EpisodeRunner
from spiral.commands.cli import main as spiral_main
from spiral.commands.overrides import override_items
from spiral.commands.status import StatusSnapshot, all_done, format_status
from spiral.config import ConfigError, ExperimentConfig, load_experiment
from spiral.data import for_experiment
from spiral.envs import make_env
from spiral.nets import build_policy
from spiral.rpc.parameters import fetch_parameters
from spiral.runtime.checkpoint import latest_checkpoint, list_checkpoints
from spiral.runtime.recorder import UpdateRecorder
from spiral.v1 import learner_pb2, learner_pb2_grpc
from system_harness import System, http_get, write_config

FAST = ["--set", "learner.batch_size=8", "--set", "learner.compile=false", "--set", "actor.num_envs=4",
        "--set", "replay.min_size=8", "--set", "discriminator_learner.batch_size=8",
        "--set", "actor.parameter_refresh_seconds=0.2"]
"""``spiral local`` overrides of the tiny experiment that make an update cheap on 2 cores."""
FRAMES_PER_UPDATE = 8 * 9
"""Environment steps one update of 8 tiny episodes consumes (9 actions each)."""


def learner_state(run_dir: Path) -> tuple[int, dict]:
    restored = latest_checkpoint(run_dir / "learner")
    assert restored is not None, f"no learner checkpoint in {run_dir}"
    return restored


# -- configuration ------------------------------------------------------------------------------


def test_the_budget_is_off_by_default_and_frames_is_its_shorthand() -> None:
    cfg = load_experiment("experiments/tiny.yaml")
    assert cfg.learner.max_frames == 0 and cfg.learner.checkpoint_every_seconds == 0
    assert cfg.discriminator_learner.checkpoint_every_seconds == 0
    import argparse
    args = argparse.Namespace(set=["seed=3"], run_seed=None, frames=500)
    assert override_items(args) == ["seed=3", "learner.max_frames=500"]
    for field, value in (("learner.max_frames", -1), ("learner.checkpoint_every_seconds", -1.0),
                         ("discriminator_learner.checkpoint_every_seconds", -0.5)):
        section, name = field.split(".")
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_experiment("experiments/tiny.yaml", {section: {name: value}})


def test_the_status_line_says_how_many_members_are_done_and_when_all_are() -> None:
    def snapshot(done: dict[str, bool], gauges: dict[int, float]) -> StatusSnapshot:
        return StatusSnapshot(0.0, {}, {}, {m: {"spiral_run_done": v} for m, v in gauges.items()}, done)

    training = snapshot({"learner-0": True, "discriminator-0": True, "learner-1": False}, {0: 1.0, 1: 0.0})
    assert "done 1/2" in format_status(training, training, 1.0)
    assert not all_done(training)
    assert "done" not in format_status(snapshot({}, {0: 0.0}), snapshot({}, {0: 0.0}), 1.0)
    finished = snapshot({"learner-0": True, "discriminator-0": True, "learner-1": True}, {0: 1.0, 1: 1.0})
    assert all_done(finished) and "done 2/2" in format_status(finished, finished, 1.0)
    assert not all_done(snapshot({}, {}))  # nothing scraped yet is not done


# -- spiral local --------------------------------------------------------------------------------


def test_spiral_local_with_a_budget_ends_by_itself_and_a_restart_stays_done(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["local", "--config", "tiny", "--run-dir", str(run_dir), "--frames", "200", *FAST]
    assert spiral_main(args) == 0
    version, state = learner_state(run_dir)
    assert 200 <= state["frames"] < 200 + FRAMES_PER_UPDATE, "the update that reached the budget was the last"
    assert (run_dir / "samples" / f"update-{version:08d}.png").exists(), "the final sample grid"
    discriminator = latest_checkpoint(run_dir / "discriminator")
    assert discriminator is not None and discriminator[1]["done"] is True
    lines = (run_dir / "learner.jsonl").read_text().splitlines()

    assert spiral_main(args) == 0  # done from its checkpoints: nothing more is trained
    assert learner_state(run_dir)[0] == version
    assert latest_checkpoint(run_dir / "discriminator")[0] == discriminator[0]  # type: ignore[index]
    assert (run_dir / "learner.jsonl").read_text().splitlines() == lines


# -- spiral up -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_spiral_up_with_a_budget_exits_0_once_every_member_is_done(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    command = [sys.executable, "-m", "spiral.commands.cli", "up", "--config", str(config), "--runs-dir",
               str(tmp_path / "runs"), "--name", "budget", "--actors", "1", "--frames", "150",
               "--status-every", "0.5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in (tmp_path / "runs" / "budget" / "logs").glob("*"))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{logs}"
    assert "spiral up: done: every member reached learner.max_frames 150" in done.stdout, done.stdout
    assert "| done 1/1" in done.stdout
    version, state = learner_state(tmp_path / "runs" / "budget")
    assert state["frames"] >= 150


# -- the processes of a done member ----------------------------------------------------------------


def healthz(system: System, name: str) -> tuple[int, str]:
    return http_get(system.child(name).spec.metrics_url.rsplit("/", 1)[0] + "/healthz")


@pytest.mark.slow
def test_a_done_member_stays_up_idle_and_says_so_and_a_restarted_learner_stays_done(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, {"learner": {"max_frames": 150}})
    with System(run_dir, config, num_actors=1) as system:
        system.wait_for("the learner done", lambda: system.value("learner", "spiral_run_done") == 1)
        system.wait_for("the discriminator done", lambda: system.value("discriminator", "spiral_run_done") == 1)
        system.wait_for("the actor done", lambda: system.value("actor-0", "spiral_run_done") == 1)
        for name in ("learner", "discriminator", "actor-0"):
            status, text = healthz(system, name)
            assert status == 200 and text.startswith("done: "), (name, status, text)

        learner_address = system.child("learner").spec.grpc_address
        with grpc.insecure_channel(learner_address) as channel:
            stub = learner_pb2_grpc.PolicyLearnerStub(channel)
            status = stub.Status(learner_pb2.StatusRequest(), timeout=10)
            assert status.done and status.frames >= 150
            served = fetch_parameters(stub, have_version=-1, timeout=10)
            assert served is not None and served.version == status.version  # still serves its last parameters

        # Nothing moves any more, and nothing exits.
        discriminator_version = system.value("discriminator", "spiral_discriminator_parameter_version")
        steps = system.value("actor-0", "spiral_actor_env_steps_total")
        updates = system.value("learner", "spiral_learner_updates_total")
        time.sleep(4.0)
        assert system.value("discriminator", "spiral_discriminator_parameter_version") == discriminator_version
        assert system.value("actor-0", "spiral_actor_env_steps_total") == steps
        assert system.value("learner", "spiral_learner_updates_total") == updates
        for child in system.supervisor.children:
            assert child.popen is not None and child.popen.poll() is None, f"{child.spec.name} exited"
        discriminator = latest_checkpoint(run_dir / "discriminator")
        assert discriminator is not None and discriminator[1]["done"] is True

        # A killed learner comes back done from its checkpoint, at the same version.
        version = learner_state(run_dir)[0]
        system.kill("learner", signal.SIGKILL)
        system.restart("learner")
        system.wait_for("the restarted learner done", lambda: system.value("learner", "spiral_run_done") == 1)
        assert system.value("learner", "spiral_learner_parameter_version") == version
        assert system.value("learner", "spiral_learner_updates_total") == 0


# -- in-process: refusals and the time-based checkpoint ---------------------------------------------


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return load_experiment("experiments/tiny.yaml", {
        "actor": {"num_envs": 4}, "replay": {"min_size": 4, "capacity": 64},
        "learner": {"batch_size": 4, "compile": False, "checkpoint_every_updates": 0, "sample_grid_every_updates": 0},
        "discriminator_learner": {"batch_size": 4, "checkpoint_every_updates": 0}})


def episodes(cfg: ExperimentConfig):  # noqa: ANN201 - an iterator of Unrolls
    targets = for_experiment(cfg).images
    runner = EpisodeRunner(cfg, make_env(cfg, cfg.actor.num_envs, seed=0), build_policy(cfg), targets, seed=0,
                           actor_id="test")
    while True:
        yield runner.run_episode()


def test_a_done_learner_refuses_unrolls_and_updates_no_more(cfg: ExperimentConfig, tmp_path: Path) -> None:
    budget = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, max_frames=1))
    learner = PolicyLearner(budget, tmp_path)
    unrolls = episodes(budget)
    learner.submit(next(unrolls))
    assert learner.step(timeout=1.0) is not None
    assert learner.run_done.is_set and "learner.max_frames 1" in learner.run_done.reason
    assert learner_state(tmp_path)[0] == learner.version  # the final checkpoint
    assert (tmp_path / "samples" / "latest.png").exists()  # and the final grid, with grids off
    with pytest.raises(LearnerDone) as refused:
        learner.submit(next(unrolls))
    assert refused.value.stale  # an actor refetches at once, and learns that the learner is done
    assert learner.step(timeout=0.1) is None
    learner.close()


def test_the_time_based_checkpoint_fires_after_an_update_once_its_seconds_passed(
        cfg: ExperimentConfig, tmp_path: Path) -> None:
    now = [0.0]
    recorder = UpdateRecorder(tmp_path / "recorder", "learner", 0, (), checkpoint_every=0,
                              checkpoint_every_seconds=30.0, clock=lambda: now[0])
    assert not recorder.checkpoint_due(1)
    now[0] = 30.0
    assert recorder.checkpoint_due(2)
    recorder.checkpoint_written()
    assert not recorder.checkpoint_due(3)
    recorder.close()

    timed = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, checkpoint_every_seconds=0.05),
                                discriminator_learner=dataclasses.replace(cfg.discriminator_learner,
                                                                          checkpoint_every_seconds=0.05))
    learner = PolicyLearner(timed, tmp_path / "policy")
    renders = LocalRenders(ReplayTable(64, 4, seed=0))
    discriminator = DiscriminatorLearner(timed, tmp_path / "policy", np.zeros((1, 64, 64, 1), np.uint8), renders)
    unrolls = episodes(timed)
    for _ in range(2):
        unroll = next(unrolls)
        learner.submit(unroll)
        renders.insert(unroll.final_canvases, unroll.targets, unroll.policy_version, "test")
        time.sleep(0.1)
        assert learner.step(timeout=1.0) is not None and discriminator.step() is not None
        assert list_checkpoints(tmp_path / "policy" / "learner")[-1].name == f"ckpt-{learner.version:012d}.pt"
        assert list_checkpoints(tmp_path / "policy" / "discriminator")[-1].name == \
            f"ckpt-{discriminator.version:012d}.pt"
    learner.close()
    discriminator.close()


def test_the_discriminator_is_done_when_every_member_it_serves_is(cfg: ExperimentConfig, tmp_path: Path) -> None:
    renders = LocalRenders(ReplayTable(64, 4, seed=0))
    unroll = next(episodes(cfg))
    renders.insert(unroll.final_canvases, unroll.targets, unroll.policy_version, "test")
    shared = DiscriminatorLearner(cfg, tmp_path, np.zeros((1, 64, 64, 1), np.uint8), renders, serves={0, 1})
    shared.note_learner_done(1)
    assert shared.step() is not None and not shared.run_done.is_set  # member 0 still trains
    shared.note_learner_done(0)
    assert shared.step() is None and shared.run_done.is_set
    version = shared.version
    restored = DiscriminatorLearner(cfg, tmp_path, np.zeros((1, 64, 64, 1), np.uint8), renders)
    assert restored.run_done.is_set and restored.version == version and restored.step() is None
    larger = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, max_frames=10**6))
    extended = DiscriminatorLearner(larger, tmp_path, np.zeros((1, 64, 64, 1), np.uint8), renders)
    assert not extended.run_done.is_set and extended.step() is not None  # a larger budget trains on
    for learner in (shared, restored, extended):
        learner.close()
