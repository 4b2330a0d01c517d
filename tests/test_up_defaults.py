"""``spiral up``'s command line: how many actors a member gets, and the overrides it runs with."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from spiral.commands.cli import main as spiral_main
from spiral.commands.overrides import override_items
from spiral.commands.up import default_actors, register
from spiral.config import experiment_path, resolve_experiment
from spiral.runtime.run_config import record_run_config


def test_half_the_cores_go_to_actors_and_never_none() -> None:
    # 2 cores: one actor, the other core for the learner and the critic (bench/RESULTS.md).
    assert [default_actors(n) for n in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 8]


def test_this_machines_default_is_used_only_when_actors_is_not_given() -> None:
    parser = argparse.ArgumentParser()
    register(parser)
    assert parser.parse_args([]).actors is None
    assert parser.parse_args(["--actors", "3"]).actors == 3
    assert default_actors() >= 1


def test_set_seed_and_population_flags_become_override_items_in_command_line_order() -> None:
    parser = argparse.ArgumentParser()
    register(parser)
    args = parser.parse_args(["--set", "learner.batch_size=8", "--seed", "3", "--set", "learner.reward.band=[-5,5]",
                              "--population", "2", "--no-shared-discriminator"])
    assert override_items(args) == ["learner.batch_size=8", "learner.reward.band=[-5,5]", "seed=3",
                                    "pbt.population_size=2", "pbt.shared_discriminator=false"]
    assert override_items(parser.parse_args([])) == []


def test_up_refuses_to_resume_a_run_of_other_settings_and_leaves_it_untouched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "tiny"
    record_run_config(run_dir, resolve_experiment(experiment_path("tiny"), ["seed=3"]))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert spiral_main(["up", "--config", "tiny", "--runs-dir", str(tmp_path), "--set", "learner.batch_size=8"]) == 2
    error = capsys.readouterr().err
    assert "learner.batch_size: 16 there, 8 now; seed: 3 there, 0 now" in error
    assert "with --set seed=3" in error and "another --name" in error
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_up_names_a_bad_override_before_starting_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert spiral_main(["up", "--config", "tiny", "--runs-dir", str(tmp_path), "--set", "learner.batchsize=8"]) == 2
    assert "spiral up: --set learner.batchsize=8: learner.batchsize: unknown field" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
